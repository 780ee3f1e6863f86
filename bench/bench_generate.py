"""Generation throughput: cached decoding against re-running the full forward for every new token,
and prefill / decode speed per batch size, in one process on one freshly initialised model.

Measured, in this order (the JSON is rewritten after each part, so a run cut short keeps what it has):

1. Per batch size B (`--batches`): B prompts of `--prompt_len` tokens (windows of the embedded
   corpus, each starting with <bos>), then `--new_tokens` greedy tokens.
   - prefill: `Generator.prefill` of the B prompts (caches sized for prompt + new tokens), median
     of `--repeats` synchronised calls -> prompt tokens/s;
   - decode: `Generator.step` `--new_tokens` times after a prefill, each step fetching its tokens to
     the host as generation does (streaming) -> per-step latency (median over every timed step)
     and generated tokens/s (B x new tokens / the loop's wall time, median over `--repeats` loops);
   - decode loop: the same tokens decoded `K` steps per dispatch (`Generator.advance`, one compiled
     `lax.while_loop` per call, its outputs fetched after each call) for each K of `--blocks`,
     interleaved with the one-step loop -> tokens/s, its ratio to the one-step loop, and whether the
     tokens are identical;
   - hashing: the step's in-graph Engram hashing alone (`EngramHashing.next_ids` for B tokens,
     jitted by itself) and hashing + the table gather (`memory.gather`), medians of synchronised
     calls, as fractions of the step's latency. Separately jitted, so an upper bound on what they
     cost inside the fused step.
2. Baseline at batch 1 (unless `--no_baseline`): greedy generation the only way there was before
   generation.py, re-running `ModelRunner.forward` (the evaluation forward) over prompt + tokens so
   far for every new token, rows padded as the runner pads them (`ModelRunner.row_length`:
   data.seq_len, else model.max_seq_len; one compiled program). Same prompt, same params, same
   number of tokens; reported: cached / baseline generated tokens/s (target >= 10x on CPU), and how
   many leading greedy tokens the two produced identically.

  python bench/bench_generate.py                       # tiny on CPU, model.max_seq_len=512, batches 1 and 32
  python bench/bench_generate.py --gpu --json out.json # small on one GPU, batches 1, 32 and 128

`--gpu` is `--preset configs/small.py --batches 1 32 128` (small's max_seq_len is 2048 already); any
`--set dotted.key=value` changes the config (tiny's default is `model.max_seq_len=512`, because
tiny's own 128 cannot hold a 128-token prompt and 256 new tokens). Parameters are random: a trained
model decodes at the same speed (greedy decoding never stops early here: end-of-sequence is ignored
by the timed loops).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_model  # noqa: E402
from engram_jax import data as data_lib  # noqa: E402
from engram_jax import generation, memory  # noqa: E402
from engram_jax.model import init_variables  # noqa: E402
from engram_jax.runner import ModelRunner, runner_mesh  # noqa: E402
from engram_jax.sharding import LOGICAL_RULES, tree_shardings  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = 10.0


def build(cfg, log=print) -> generation.Generator:
  """A Generator over freshly initialised params placed on every local device."""
  mesh = runner_mesh(cfg, log)
  from engram_jax.model import abstract_variables

  shardings = tree_shardings(abstract_variables(cfg.model), mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    variables = jax.jit(lambda: nn.meta.unbox(init_variables(cfg.model, jax.random.key(cfg.train.seed))),
                        out_shardings=shardings)()
  params = variables.pop("params")
  return generation.Generator(ModelRunner(cfg, params, dict(variables), mesh), log=log)


def corpus_prompts(gen: generation.Generator, batch: int, length: int) -> List[List[int]]:
  """`batch` prompts of exactly `length` tokens: <bos> + consecutive windows of the embedded corpus."""
  runner = gen.runner
  corpus = data_lib.tokenized_split(runner.cfg.data, "train", runner.tokenizer)
  flat = np.asarray(corpus.tokens)
  vocab = runner.cfg.model.vocab_size
  out = []
  for b in range(batch):
    window = flat[b * (length - 1):(b + 1) * (length - 1)] % vocab
    out.append([runner.bos_id] + window.astype(int).tolist())
  return out


def _sync(state):
  jax.block_until_ready(state.logits)
  return state


def measure_batch(gen, batch: int, prompt_len: int, new_tokens: int, repeats: int, blocks=(4, 16, 64)
                  ) -> Dict[str, Any]:
  prompts = corpus_prompts(gen, batch, prompt_len)
  rows = gen.batch_bucket(batch)
  padded = prompts + [[gen.runner.pad_id]] * (rows - batch)
  cache_length = gen.length_bucket(prompt_len + new_tokens)
  sampling = generation.sampling_arrays(rows)  # greedy

  t0 = time.perf_counter()
  state = _sync(gen.prefill(padded, cache_length))
  prefill_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, out = gen.step(state, sampling)
  np.asarray(out.tokens)
  step_compile = time.perf_counter() - t0

  prefill_times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _sync(gen.prefill(padded, cache_length))
    prefill_times.append(time.perf_counter() - t0)

  loop_times, step_times, tokens = [], [], None
  for _ in range(repeats):
    state = _sync(gen.prefill(padded, cache_length))
    generated = []
    t_loop = time.perf_counter()
    for _ in range(new_tokens):
      t0 = time.perf_counter()
      state, out = gen.step(state, sampling)
      generated.append(np.asarray(out.tokens))  # the host sync generation.generate does every step
      step_times.append(time.perf_counter() - t0)
    loop_times.append(time.perf_counter() - t_loop)
    tokens = np.stack(generated, 1)[:batch]

  result = {
      "batch": batch, "rows": rows, "prompt_len": prompt_len, "new_tokens": new_tokens, "cache_length": cache_length,
      "prefill_compile_s": prefill_compile, "step_compile_s": step_compile,
      "prefill_s": float(np.median(prefill_times)), "prefill_tokens_per_s": batch * prompt_len / np.median(prefill_times),
      "decode_step_ms": 1e3 * float(np.median(step_times)), "decode_step_ms_p90": 1e3 * float(np.percentile(step_times, 90)),
      "decode_loop_s": float(np.median(loop_times)),
      "decode_tokens_per_s": batch * new_tokens / float(np.median(loop_times)),
  }
  result.update(measure_hashing(gen, state, rows, repeats=max(20, repeats), step_ms=result["decode_step_ms"]))
  result["decode_loop"] = measure_blocks(gen, padded, cache_length, sampling, new_tokens, blocks, repeats, tokens,
                                         batch)
  return result, prompts, tokens


def decode_blocks(gen, padded, cache_length, sampling, new_tokens: int):
  """(wall seconds, tokens [rows, new_tokens]) of `new_tokens` steps, `gen.block` per dispatch."""
  state = _sync(gen.prefill(padded, cache_length))
  produced, generated = 0, []
  t0 = time.perf_counter()
  while produced < new_tokens:
    state, out, steps = gen.advance(state, sampling, np.full(len(padded), new_tokens - produced))
    generated.append(np.asarray(out.tokens)[:, :steps])  # the host sync generation.generate does per call
    produced += steps
  return time.perf_counter() - t0, np.concatenate(generated, 1)


def measure_blocks(gen, padded, cache_length, sampling, new_tokens, blocks, repeats, step_tokens, batch):
  """The K-step decode loop against one dispatch per step (block 1), interleaved per repeat."""
  gens = {k: generation.Generator(gen.runner, log=lambda s: None, decode=gen.path, block=k) for k in [1] + list(blocks)}
  for g in gens.values():  # compile
    decode_blocks(g, padded, cache_length, sampling, new_tokens)
  times = {k: [] for k in gens}
  same = {}
  for _ in range(repeats):
    for k, g in gens.items():
      seconds, tokens = decode_blocks(g, padded, cache_length, sampling, new_tokens)
      times[k].append(seconds)
      same[k] = bool(np.array_equal(tokens[:batch], step_tokens))
  med = {k: float(np.median(v)) for k, v in times.items()}
  return {"tokens_per_s": {str(k): batch * new_tokens / v for k, v in med.items()},
          "speedup_vs_block_1": {str(k): med[1] / v for k, v in med.items()},
          "tokens_identical_to_step_loop": {str(k): v for k, v in same.items()}}


def measure_hashing(gen, state, rows: int, repeats: int, step_ms: float) -> Dict[str, Any]:
  """The step's Engram hashing (and hashing + gather) jitted alone, as fractions of a step."""
  if gen.engram is None:
    return {"hash_ms": None, "hash_gather_ms": None, "hash_fraction": None, "hash_gather_fraction": None}
  tokens = jax.numpy.zeros((rows,), jax.numpy.int32) + 5
  tables = memory.split(gen.runner.params)[1]
  engram = gen.engram
  with jax.set_mesh(gen.mesh), nn.logical_axis_rules(LOGICAL_RULES):
    hash_only = jax.jit(gen.hashing.next_ids)
    hash_gather = jax.jit(lambda h, t, l, tb: memory.gather(tb, engram, gen.hashing.next_ids(h, t, l)[0]))
    hashed = bench_model.time_calls(lambda: hash_only(state.history, tokens, gen.lookup), warmup=2, repeats=repeats)
    gathered = bench_model.time_calls(lambda: hash_gather(state.history, tokens, gen.lookup, tables), warmup=2,
                                      repeats=repeats)
  h, hg = 1e3 * hashed["step_s"], 1e3 * gathered["step_s"]
  return {"hash_ms": h, "hash_gather_ms": hg, "hash_fraction": h / step_ms, "hash_gather_fraction": hg / step_ms}


def measure_baseline(gen, prompt: List[int], new_tokens: int) -> Dict[str, Any]:
  """Greedy generation by re-running the evaluation forward over the whole sequence per token."""
  runner = gen.runner
  seq = list(prompt)
  length = runner.row_length(len(prompt) + new_tokens)
  multiple = runner.row_multiple
  batch = runner.make_batch([seq] + [[runner.pad_id]] * (multiple - 1), length)  # compile once, untimed
  runner.forward(batch)
  t0 = time.perf_counter()
  for _ in range(new_tokens):
    batch = runner.make_batch([seq] + [[runner.pad_id]] * (multiple - 1), length)
    out = runner.forward(batch)
    seq.append(int(out["argmax"][0, len(seq) - 1]))
  seconds = time.perf_counter() - t0
  return {"padded_length": length, "seconds": seconds, "tokens_per_s": new_tokens / seconds,
          "tokens": seq[len(prompt):]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default=None, help="config preset (default configs/tiny.py; --gpu: configs/small.py)")
  parser.add_argument("--gpu", action="store_true", help="small on a GPU: --preset configs/small.py --batches 1 32 128")
  parser.add_argument("--set", dest="overrides", action="append", default=None, metavar="KEY=VALUE",
                      help="config override (repeatable; tiny's default: model.max_seq_len=512)")
  parser.add_argument("--batches", type=int, nargs="*", default=None, help="batch sizes (default 1 32; --gpu 1 32 128)")
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--blocks", type=int, nargs="*", default=[4, 16, 64], help="decode steps per dispatch to time "
                      "against one per step")
  parser.add_argument("--no_baseline", action="store_true", help="skip the full-forward baseline (batch 1)")
  parser.add_argument("--json", default=None, help="also write the results here (rewritten after each part)")
  args = parser.parse_args()

  preset = args.preset or os.path.join(ROOT, "configs", "small.py" if args.gpu else "tiny.py")
  batches = args.batches or ([1, 32, 128] if args.gpu else [1, 32])
  overrides = args.overrides
  if overrides is None:
    overrides = [] if (args.gpu or "tiny" not in os.path.basename(preset)) else ["model.max_seq_len=512"]
  cfg = bench_model.apply_overrides(bench_model.load_variant(preset, "", []), overrides)
  if args.prompt_len + args.new_tokens > cfg.model.max_seq_len:
    sys.exit(f"--prompt_len {args.prompt_len} + --new_tokens {args.new_tokens} exceeds model.max_seq_len="
             f"{cfg.model.max_seq_len}: pass --set model.max_seq_len=<at least their sum>")
  if not args.no_baseline and 1 not in batches:
    sys.exit(f"--batches {batches}: the baseline compares batch 1; include 1 or pass --no_baseline")
  results: Dict[str, Any] = {"preset": cfg.name, "preset_file": os.path.relpath(preset, ROOT), "overrides": overrides,
                             "device": bench_model.device_info(), "batches": [], "command": " ".join(sys.argv)}
  gen = build(cfg, log=lambda s: print(s, file=sys.stderr))
  print(f"{cfg.name}: {jax.device_count()} {jax.default_backend()} device(s), prompt {args.prompt_len}, "
        f"new tokens {args.new_tokens}, repeats {args.repeats}")
  cached = {}
  for batch in batches:
    result, prompts, tokens = measure_batch(gen, batch, args.prompt_len, args.new_tokens, args.repeats,
                                            args.blocks)
    cached[batch] = (prompts, tokens, result)
    results["batches"].append(result)
    bench_model.write_json(args.json, results)
    fraction = "" if result["hash_fraction"] is None else (
        f", hashing {100 * result['hash_fraction']:.1f}% of a step ({100 * result['hash_gather_fraction']:.1f}% "
        "with the gather)")
    print(f"batch {batch:4d}: prefill {result['prefill_tokens_per_s']:10.0f} tok/s ({1e3 * result['prefill_s']:.1f} ms); "
          f"decode {result['decode_step_ms']:.2f} ms/step, {result['decode_tokens_per_s']:.0f} tok/s{fraction}",
          flush=True)
    loop = result["decode_loop"]
    print("            K-step loop tokens/s " + ", ".join(
        f"K={k}: {v:.0f} ({loop['speedup_vs_block_1'][k]:.2f}x, identical {loop['tokens_identical_to_step_loop'][k]})"
        for k, v in loop["tokens_per_s"].items()), flush=True)

  if not args.no_baseline:
    prompts, tokens, result = cached[1]
    base = measure_baseline(gen, prompts[0], args.new_tokens)
    same = 0
    while same < args.new_tokens and base["tokens"][same] == int(tokens[0, same]):
      same += 1
    cached_row_tok_s = result["decode_tokens_per_s"]
    results["baseline"] = {k: v for k, v in base.items() if k != "tokens"}
    results["baseline"].update({
        "batch": 1, "cached_tokens_per_s": cached_row_tok_s, "speedup": cached_row_tok_s / base["tokens_per_s"],
        "target": TARGET, "identical_leading_tokens": same})
    bench_model.write_json(args.json, results)
    b = results["baseline"]
    print(f"full forward per token (rows padded to {base['padded_length']}): {base['tokens_per_s']:.1f} tok/s; "
          f"cached: {cached_row_tok_s:.1f} tok/s -> {b['speedup']:.1f}x (target >= {TARGET:.0f}x); "
          f"greedy tokens identical for the first {same} of {args.new_tokens}")


if __name__ == "__main__":
  main()
