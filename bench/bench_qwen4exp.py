"""Qwen4Exp (Qwen3.8-Flash-Next) in engram_jax vs Hugging Face transformers, same weights, same machine.

One run measures engram_jax's `models.qwen4exp` on a Hugging Face `save_pretrained` directory (loaded
through `qwen4exp_convert.load_hf_dir`), then, with `--reference_python`, runs
`bench/qwen4exp_reference.py` in that interpreter (an environment with torch + transformers; this
one never imports torch) on the same directory, the same prompts, the same thread count and device,
and prints engram_jax / transformers for each figure:

- prefill: `qwen4exp.prefill` over [prefill_batch, prompt_len] prompts (full logits and every cache),
  tokens/s = batch x prompt_len / time;
- decode at each batch of --decode_batches: a prefill (untimed), then --new_tokens greedy steps,
  each one jitted `qwen4exp.decode_step` + argmax with the cache donated, its tokens fetched to the
  host (as a streaming generator does); tokens/s = batch x steps / time of the steps.
Every program is compiled before timing (warm-up calls; compilation is excluded from the figures and
reported apart as `compile_s`). Figures are medians over --repeats after --warmup; the reference
script times the same things the same way (see its docstring). Both sides draw the prompts with
`qwen4exp_reference.prompts` (numpy, from --seed) and the greedy tokens are compared: `same_tokens`
per batch (float32 on both sides; a near-tie in a random model could flip one, so this is reported,
not asserted).

Models:
  --hf_dir DIR                     an existing checkpoint (e.g. a test fixture's `hf/` directory)
  --config medium|large [--work_dir W]  a made-up config of the same layout (`CONFIGS` below): the
                                   reference script builds it with random weights and saves it to
                                   W/hf (needs --reference_python); the JAX side loads that directory.
                                   Without --reference_python the JAX side times random params of the
                                   same config and nothing is compared.

  taskset -c 0 python bench/bench_qwen4exp.py --hf_dir tests/fixtures/qwen4exp/causal_l3i1/hf \
      --reference_python VENV/bin/python --threads 1
  taskset -c 0 python bench/bench_qwen4exp.py --config medium --reference_python VENV/bin/python --threads 1
  python bench/bench_qwen4exp.py --gpu --config large --reference_python python3 --json out.json

`--moe_variant` (profiling) swaps the routed-experts call for a bench-local alternative in this
process only (see MOE_VARIANTS); the default measures the model as it is.

`--threads N` limits both sides to N intra-op threads (XLA:CPU's Eigen pool off for N = 1, torch
`set_num_threads`); pin the process (taskset) so both share the same cores. `--gpu` runs JAX on its
default accelerator and the reference with `--device cuda` (torch with every CPU thread unless
--threads says otherwise; on CPU the default is 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAYER_PATTERN = ["linear_attention"] * 3 + ["indexed_attention"]  # the release's 3:1

# Made-up text configs in Hugging Face's terms, the release's layout at smaller sizes: the 3:1 layer
# pattern, PLE at one-based layer 2 with ngram 3 and 8 heads per order, hc_count 4, partial RoPE 0.25,
# a softmax top-k router with a shared expert, the QSA indexer selecting blocks within the prompt.
_COMMON = dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02,
               attention_bias=False, linear_conv_kernel_dim=4, ple_conv_kernel_size=4,
               make_ngram_vocab_size_divisible_by=128, norm_topk_prob=True, max_position_embeddings=8192,
               hc_count=4, ple_layer_ids=[2], ngram_size=3, heads_per_ngram=8, seed=1234, indexer_kv_heads=1,
               output_gate_type="silu")
CONFIGS = {
    # ~60 M parameters (+ a 0.8 M-row table): a few times the fixtures' width, runs on one CPU core.
    "medium": dict(_COMMON, vocab_size=8192, eos_token_id=8190, pad_token_id=8191, hidden_size=256,
                   num_hidden_layers=8, layer_types=LAYER_PATTERN * 2, num_attention_heads=8, num_key_value_heads=2,
                   head_dim=64, rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0,
                                                 "partial_rotary_factor": 0.25},
                   linear_key_head_dim=64, linear_value_head_dim=64, linear_num_key_heads=4,
                   linear_num_value_heads=8, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=128,
                   shared_expert_intermediate_size=256, hc_lowrank=64, ple_embed_dim=256,
                   ngram_vocab_size_base=50_000, split_ngram_parts=8, indexer_n_heads=8, indexer_head_dim=64,
                   indexer_budget=64, indexer_compress_ratio=16),
    # ~0.6 B parameters (+ a 1.6 M-row table), for one GPU: the release's head shapes, fewer layers/experts.
    "large": dict(_COMMON, vocab_size=32768, eos_token_id=32766, pad_token_id=32767, hidden_size=1024,
                  num_hidden_layers=12, layer_types=LAYER_PATTERN * 3, num_attention_heads=16, num_key_value_heads=2,
                  head_dim=128, rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0,
                                                 "partial_rotary_factor": 0.25},
                  linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=8,
                  linear_num_value_heads=16, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
                  shared_expert_intermediate_size=512, hc_lowrank=128, ple_embed_dim=1024,
                  ngram_vocab_size_base=100_000, split_ngram_parts=16, indexer_n_heads=16, indexer_head_dim=128,
                  indexer_budget=256, indexer_compress_ratio=64),
}


def _moe_dense(x, ids, weights, w_gate, w_up, w_down):
  """Every expert on every token, combined with the routing weights: N x E work, no sort."""
  import jax
  import jax.numpy as jnp
  n, num_experts = x.shape[0], w_gate.shape[0]
  combine = jnp.zeros((n, num_experts), x.dtype).at[jnp.arange(n)[:, None], ids].add(weights.astype(x.dtype))
  h = jax.nn.silu(jnp.einsum("nd,edh->neh", x, w_gate)) * jnp.einsum("nd,edh->neh", x, w_up)
  return jnp.einsum("ned,ne->nd", jnp.einsum("neh,ehd->ned", h, w_down), combine), jnp.zeros((), jnp.int32)


def _moe_gathered(x, ids, weights, w_gate, w_up, w_down):
  """Each (token, slot) gathers its expert's matrices: N x k work and weight reads (decode-sized N)."""
  import jax
  import jax.numpy as jnp
  h = jax.nn.silu(jnp.einsum("nd,nkdh->nkh", x, w_gate[ids])) * jnp.einsum("nd,nkdh->nkh", x, w_up[ids])
  y = jnp.einsum("nkh,nkhd->nkd", h, w_down[ids])
  return jnp.einsum("nkd,nk->nd", y, weights.astype(y.dtype)), jnp.zeros((), jnp.int32)


def _moe_none(x, *_):
  """No routed experts at all (wrong outputs): the floor the rest of the model sets."""
  import jax.numpy as jnp
  return jnp.zeros_like(x), jnp.zeros((), jnp.int32)


# What `--moe_variant` puts in place of `moe.routed_experts` inside models.qwen4exp, to see how much
# of a figure the routed experts' lowering costs; "model" (the default) leaves the model as it is.
MOE_VARIANTS = {"model": None, "dense_all_experts": _moe_dense, "gathered_weights": _moe_gathered,
                "none": _moe_none}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--hf_dir", help="a Qwen4Exp save_pretrained directory")
  src.add_argument("--config", choices=sorted(CONFIGS), help="a made-up config of the same layout (see CONFIGS)")
  p.add_argument("--work_dir", default=None, help="--config: where the reference writes hf/ (default: a temp dir)")
  p.add_argument("--reference_python", default=None, help="an interpreter with torch + transformers==5.23.0")
  p.add_argument("--threads", type=int, default=None, help="intra-op threads on both sides (CPU)")
  p.add_argument("--gpu", action="store_true", help="JAX on its default accelerator, the reference on cuda")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--prompt_len", type=int, default=None, help="default 64 (CPU), 512 (--gpu)")
  p.add_argument("--prefill_batch", type=int, default=8)
  p.add_argument("--decode_batches", default=None, help="default 1,8 (CPU), 1,8,32 (--gpu)")
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1, help="untimed runs after the compiling one")
  p.add_argument("--reference_args", default="", help="extra arguments for the reference script (word-split)")
  p.add_argument("--moe_variant", default="model", choices=sorted(MOE_VARIANTS),
                 help="profiling only: replace the model's routed-experts call inside this process (see MOE_VARIANTS)")
  p.add_argument("--json", default=None, help="write the combined result here (rewritten after each side)")
  args = p.parse_args(argv)
  if args.prompt_len is None:
    args.prompt_len = 512 if args.gpu else 64
  if args.decode_batches is None:
    args.decode_batches = "1,8,32" if args.gpu else "1,8"
  return args


def _set_threads(threads):
  """XLA:CPU flags must be set before jax starts."""
  if threads == 1:
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()


def load_average():
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def run_reference(args, hf_dir, parts, extra=()):
  cmd = [args.reference_python, os.path.join(HERE, "qwen4exp_reference.py"), "--hf_dir", hf_dir,
         "--seed", str(args.seed), "--threads", str(args.threads or (os.cpu_count() if args.gpu else 1)), "--device", "cuda" if args.gpu else "cpu",
         "--prompt_len", str(args.prompt_len), "--prefill_batch", str(args.prefill_batch),
         "--decode_batches", args.decode_batches, "--new_tokens", str(args.new_tokens),
         "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--parts", parts]
  cmd += list(extra) + args.reference_args.split()
  print("reference:", " ".join(cmd), flush=True)
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    sys.stderr.write(proc.stderr[-4000:])
    raise SystemExit(f"the reference script failed (exit {proc.returncode})")
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  return json.loads(lines[-1])


def main(argv=None):
  args = parse_args(argv)
  _set_threads(args.threads)
  if not args.gpu:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  sys.path.insert(0, HERE)
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from engram_jax.models import qwen4exp as q4
  from engram_jax.models import qwen4exp_convert as cv
  from qwen4exp_reference import prompts

  if MOE_VARIANTS[args.moe_variant] is not None:
    q4.routed_experts = MOE_VARIANTS[args.moe_variant]

  result = {"moe_variant": args.moe_variant, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                        "load_average_start": load_average(), "jax": jax.__version__,
                        "devices": [str(d) for d in jax.devices()]},
            "threads": args.threads, "prompt_len": args.prompt_len, "prefill_batch": args.prefill_batch,
            "new_tokens": args.new_tokens, "repeats": args.repeats, "warmup": args.warmup}

  def save():
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=1)

  # -- the model ------------------------------------------------------------------------------------
  hf_dir = args.hf_dir
  if args.config:
    result["config"] = args.config
    if args.reference_python:
      work = args.work_dir or tempfile.mkdtemp(prefix="bench_qwen4exp_")
      os.makedirs(work, exist_ok=True)
      spec = os.path.join(work, "text_config.json")
      with open(spec, "w") as f:
        json.dump(CONFIGS[args.config], f)
      hf_dir = os.path.join(work, "hf")
      made = run_reference(args, hf_dir, parts="none", extra=["--make_random", spec])
      result["made"] = made.get("made")
  start = time.perf_counter()
  if hf_dir:
    cfg, params, tables = cv.load_hf_dir(hf_dir)
    result["hf_dir"] = hf_dir
  else:  # a made-up config without the reference: random params of the same shapes
    from engram_jax.models.qwen4exp import Qwen4ExpConfig
    cfg = Qwen4ExpConfig.from_hf(CONFIGS[args.config])
    boxed, tables = q4.init(cfg, jax.random.key(args.seed))
    params, tables = nn.meta.unbox(boxed), nn.meta.unbox(tables)
  params = jax.device_put(params)
  tables = jax.device_put(tables)
  jax.block_until_ready((params, tables))
  result["load_s"] = round(time.perf_counter() - start, 3)
  result["params"] = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
  result["table_rows"] = {k: int(v.shape[0]) for k, v in tables.items()}
  hashing = cfg.hashing() if cfg.ple_layer_ids else None
  print(f"model: {result['params']:,} params, tables {result['table_rows']}, load {result['load_s']} s", flush=True)

  def sync(x):
    return jax.block_until_ready(x)

  # -- engram_jax -----------------------------------------------------------------------------------
  ours = {}
  result["engram_jax"] = ours

  def timed(fn):
    t0 = time.perf_counter()
    out = fn()  # compiles
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
      out = fn()
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      out = fn()
      times.append(time.perf_counter() - t0)
    return float(np.median(times)), times, compile_s, out

  eos = cfg.eos_token_id
  P = args.prompt_len

  def prefill_fn(cache_length):
    return jax.jit(lambda p, t, tok, m: q4.prefill(cfg, p, t, tok, m, cache_length, hashing=hashing))

  B = args.prefill_batch
  ids = jnp.asarray(prompts(args.seed, B, P, eos), jnp.int32)
  mask = jnp.ones((B, P), jnp.int32)
  prefill = prefill_fn(P)
  median, times, compile_s, out = timed(lambda: sync(prefill(params, tables, ids, mask)))
  ours["prefill"] = {"batch": B, "tokens_per_s": B * P / median, "median_s": median, "times_s": times,
                     "compile_s": compile_s, "last_logits_argmax": np.asarray(jnp.argmax(out[0][:, -1], -1)).tolist()}
  print(f"engram_jax prefill B={B}: {B * P / median:,.0f} tokens/s (compile {compile_s:.1f} s)", flush=True)
  save()

  @jax.jit
  def first_token(logits):
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

  def step(p, t, cache, history, tokens, positions):
    logits, cache, history = q4.decode_step(cfg, p, t, cache, history, tokens, positions, hashing=hashing)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache, history

  step = jax.jit(step, donate_argnums=(2, 3))
  ours["decode"] = {}
  for batch in [int(b) for b in args.decode_batches.split(",") if b]:
    ids = jnp.asarray(prompts(args.seed, batch, P, eos), jnp.int32)
    mask = jnp.ones((batch, P), jnp.int32)
    prefill = prefill_fn(P + args.new_tokens + 1)
    state = {}

    def decode():
      logits, cache, history = prefill(params, tables, ids, mask)
      token = sync(first_token(logits))
      tokens = [np.asarray(token)]
      t0 = time.perf_counter()
      for s in range(args.new_tokens):
        positions = jnp.full((batch,), P + s, jnp.int32)
        token, cache, history = step(params, tables, cache, history, token, positions)
        tokens.append(np.asarray(token))  # fetched each step, as a streaming generator does
      state["steps_s"] = time.perf_counter() - t0
      return np.stack(tokens, axis=1)

    t0 = time.perf_counter()
    decode()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
      decode()
    step_times = []
    for _ in range(args.repeats):
      tokens = decode()
      step_times.append(state["steps_s"])
    median = float(np.median(step_times))
    ours["decode"][str(batch)] = {"tokens_per_s": batch * args.new_tokens / median, "median_s": median,
                                  "times_s": step_times, "compile_s": compile_s, "tokens": tokens.tolist()}
    print(f"engram_jax decode B={batch}: {batch * args.new_tokens / median:,.1f} tokens/s "
          f"(first call with compiles {compile_s:.1f} s)", flush=True)
    save()

  # -- transformers, then the ratios --------------------------------------------------------------
  if args.reference_python and hf_dir:
    ref = run_reference(args, hf_dir, parts="prefill,decode")
    result["transformers"] = ref
    ratios = {"prefill": ours["prefill"]["tokens_per_s"] / ref["prefill"]["tokens_per_s"]}
    same = {"prefill_last_argmax": ours["prefill"]["last_logits_argmax"] == ref["prefill"]["last_logits_argmax"]}
    for b, mine in ours["decode"].items():
      theirs = ref["decode"][b]
      ratios[f"decode_b{b}"] = mine["tokens_per_s"] / theirs["tokens_per_s"]
      a, r = np.asarray(mine["tokens"]), np.asarray(theirs["tokens"])
      same[f"decode_b{b}"] = bool(np.array_equal(a, r))
      lead = np.argmin(np.concatenate([a == r, np.zeros((a.shape[0], 1), bool)], axis=1), axis=1)
      same[f"decode_b{b}_leading_equal"] = lead.tolist()
    result["ratio_engram_jax_over_transformers"] = ratios
    result["same_tokens"] = same
    print("\n| figure | engram_jax tokens/s | transformers tokens/s | engram_jax / transformers |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| prefill B={args.prefill_batch} x {P} | {ours['prefill']['tokens_per_s']:,.0f} | "
          f"{ref['prefill']['tokens_per_s']:,.0f} | {ratios['prefill']:.2f}x |")
    for b in ours["decode"]:
      print(f"| decode B={b} | {ours['decode'][b]['tokens_per_s']:,.1f} | {ref['decode'][b]['tokens_per_s']:,.1f} | "
            f"{ratios[f'decode_b{b}']:.2f}x |")
    print("same tokens:", json.dumps(same))
  result["machine"]["load_average_end"] = load_average()
  save()
  print(json.dumps({k: v for k, v in result.items() if k not in ("engram_jax", "transformers")}))


if __name__ == "__main__":
  main()
