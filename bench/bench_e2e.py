"""End-to-end training throughput against the model's own step time, in one process.

Three measurements of one preset variant (default `configs/small.py`), in this order:

1. "pure": `bench_model.measure_model`: the trainer's jitted train step (and forward+backward
   only) on one synthetic batch held on the device, median of `--repeats` synchronised steps.
2. "e2e": `trainer.train(cfg, workdir, max_steps=--steps)`: the real loop with the real grain
   pipeline on the configured corpus (the embedded one by default), host-side batch assembly and
   hashing, host-to-device copies, metrics logging every `--log_every` steps (JSONL + TensorBoard).
   Checkpointing and in-training evaluation are switched off (`train.checkpoint.enabled=False`,
   `train.eval_every=0`): they are not per-step costs and would dominate a short run. The steady
   state is read back from the trainer's metrics.jsonl: the log intervals ending after
   `--skip_steps` (the first interval holds compilation), step time = their summed wall time
   (tokens / logged tokens_per_sec) over their summed steps. Cross-check ("wall_clock_step_s"):
   the time between the loop's log lines over the same steps, which also counts the writing of
   the metrics that the trainer's own intervals leave out.
3. "pipeline": the input pipeline alone (a fresh train iterator, `--pipeline_batches` batches after
   the first), so a slow e2e figure can be told apart from a starved device.

Reported: e2e step time / pure train-step time (target <= 1.10: the input pipeline and
bookkeeping cost at most 10%), also against the pipelined pure step and against forward+backward.

  python bench/bench_e2e.py                     # small on one GPU, 150 steps
  python bench/bench_e2e.py --preset configs/tiny.py --steps 30 --log_every 5 --skip_steps 10 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Dict, List

import bench_model
from engram_jax import data as data_lib
from engram_jax import trainer
from engram_jax.sharding import make_mesh

TARGET = 1.10


def steady_state(rows: List[Dict[str, Any]], tokens_per_step: int, skip_steps: int) -> Dict[str, Any]:
  """Step time over the log intervals ending after `skip_steps` (from the trainer's JSONL rows)."""
  logged = [r for r in rows if "tokens_per_sec" in r]
  intervals = []
  prev = 0
  for r in logged:
    steps = r["step"] - prev
    intervals.append({"end_step": r["step"], "steps": steps, "seconds": steps * tokens_per_step / r["tokens_per_sec"],
                      "tokens_per_sec": r["tokens_per_sec"], "mfu": r.get("mfu")})
    prev = r["step"]
  kept = [i for i in intervals if i["end_step"] - i["steps"] >= skip_steps]
  if not kept:
    raise ValueError(f"no log interval starts at or after step {skip_steps}: run more --steps or lower --skip_steps "
                     f"(intervals end at {[i['end_step'] for i in intervals]})")
  steps = sum(i["steps"] for i in kept)
  seconds = sum(i["seconds"] for i in kept)
  step_s = seconds / steps
  tok_s = tokens_per_step / step_s
  return {"steps_measured": steps, "first_step_measured": kept[0]["end_step"] - kept[0]["steps"] + 1,
          "step_s": step_s, "tokens_per_s": tok_s, "mfu": None, "intervals": intervals}


def time_pipeline(cfg, batches: int) -> Dict[str, Any]:
  t0 = time.perf_counter()
  it = data_lib.make_train_iterator(cfg.data, engram=cfg.model.engram, vocab_size=cfg.model.vocab_size)
  next(it)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - t0
  close = getattr(it, "close", None)
  if close is not None:
    close()
  tokens = cfg.data.batch_size * cfg.data.seq_len
  return {"first_batch_s": first, "batches": batches, "batch_s": seconds / batches,
          "tokens_per_s": batches * tokens / seconds, "num_workers": cfg.data.num_workers}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default=os.path.join(bench_model.ROOT, "configs", "small.py"))
  parser.add_argument("--variant", default="base", help="'base' or a variant list like 'no_engram,dense'")
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--log_every", type=int, default=25)
  parser.add_argument("--skip_steps", type=int, default=50, help="steps left out of the steady state (compile)")
  parser.add_argument("--repeats", type=int, default=20, help="timed steps of the pure step")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--pipeline_batches", type=int, default=50, help="0: skip the pipeline-only timing")
  parser.add_argument("--workdir", default=None, help="emptied first (default: a temporary directory)")
  parser.add_argument("--keep_workdir", action="store_true")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  cfg = bench_model.load_variant(args.preset, args.variant, args.overrides)
  cfg = dataclasses.replace(cfg, name=bench_model.variant_label(cfg.name, args.variant))
  steps = max(cfg.train.steps, args.steps)  # the schedule's length; the run stops at args.steps
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(
      cfg.train, steps=steps, eval_every=0, log_every=args.log_every,
      checkpoint=dataclasses.replace(cfg.train.checkpoint, enabled=False)))
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  results: Dict[str, Any] = {
      "device": bench_model.device_info(), "config": cfg.name, "preset": args.preset, "overrides": args.overrides,
      "steps": args.steps, "log_every": args.log_every, "skip_steps": args.skip_steps,
      "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "tokens_per_step": tokens_per_step,
      "num_workers": cfg.data.num_workers, "train_files": cfg.data.train_files or "embedded corpus",
      "tokenizer_path": cfg.data.tokenizer_path or "embedded tokenizer", "vocab_size": cfg.model.vocab_size,
      "checkpointing": False, "eval_every": 0,
  }
  print(json.dumps({"device": results["device"]}), flush=True)
  tok = data_lib.load_tokenizer(cfg.data.tokenizer_path)
  results["tokenizer_vocab_size"] = tok.get_vocab_size()
  print(f"{cfg.name}: model vocabulary {cfg.model.vocab_size}, tokenizer {results['tokenizer_vocab_size']} tokens "
        f"({results['tokenizer_path']}); batch {cfg.data.batch_size} x {cfg.data.seq_len}, "
        f"{cfg.data.num_workers} pipeline workers", flush=True)

  mesh = make_mesh(cfg.mesh)
  results["pure"] = bench_model.measure_model(cfg, mesh, warmup=args.warmup, repeats=args.repeats)
  bench_model.write_json(args.json, results)

  workdir = args.workdir or tempfile.mkdtemp(prefix="bench_e2e_")
  if os.path.isdir(workdir):
    shutil.rmtree(workdir)
  log_times = []  # (step, perf_counter) at each of the loop's log lines: a wall-clock cross-check

  def log(line):
    match = re.match(r"step\s+(\d+)\s+loss", line)
    if match:
      log_times.append((int(match.group(1)), time.perf_counter()))
    print(line, flush=True)

  t0 = time.perf_counter()
  summary = trainer.train(cfg, workdir, progress=False, max_steps=args.steps, log=log)
  wall = time.perf_counter() - t0
  with open(summary["metrics_jsonl"]) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  e2e = steady_state(rows, tokens_per_step, args.skip_steps)
  e2e["mfu"] = bench_model.throughput(cfg, e2e["step_s"])["mfu"]
  e2e["train_wall_s"] = wall
  # Between consecutive log lines everything counts, the loop's own logging included (the JSONL's
  # intervals leave out the writing of the metrics themselves).
  kept = [(a, b) for a, b in zip(log_times, log_times[1:]) if a[0] >= args.skip_steps]
  if kept:
    e2e["wall_clock_step_s"] = sum(b[1] - a[1] for a, b in kept) / sum(b[0] - a[0] for a, b in kept)
  e2e["steps_run"] = summary["step"]
  e2e["last_loss"] = summary["history"][-1]["loss"] if summary["history"] else None
  results["e2e"] = e2e
  if not args.keep_workdir and not args.workdir:
    shutil.rmtree(workdir, ignore_errors=True)

  pure = results["pure"]
  results["ratios"] = {
      "e2e_over_train_step": e2e["step_s"] / pure["train_step"]["step_s"],
      "e2e_over_pipelined_train_step": e2e["step_s"] / pure["train_step"]["pipelined_step_s"],
      "e2e_over_fwd_bwd": e2e["step_s"] / pure["fwd_bwd"]["step_s"] if "fwd_bwd" in pure else None,
      "e2e_wall_clock_over_train_step": (e2e["wall_clock_step_s"] / pure["train_step"]["step_s"]
                                         if "wall_clock_step_s" in e2e else None),
  }
  results["target"] = {"value": results["ratios"]["e2e_over_train_step"], "target": TARGET,
                       "met": results["ratios"]["e2e_over_train_step"] <= TARGET}
  bench_model.write_json(args.json, results)

  if args.pipeline_batches > 0:
    results["pipeline"] = time_pipeline(cfg, args.pipeline_batches)
    results["pipeline"]["over_train_step_tokens_per_s"] = (results["pipeline"]["tokens_per_s"]
                                                            / pure["train_step"]["tokens_per_s"])
  results["memory"] = bench_model.memory_stats()
  bench_model.write_json(args.json, results)
  brief = {k: results[k] for k in ("config", "ratios", "target", "memory") if k in results}
  brief["pure_train_step"] = {k: pure["train_step"][k] for k in ("step_s", "pipelined_step_s", "tokens_per_s", "mfu")}
  if "fwd_bwd" in pure:
    brief["pure_fwd_bwd"] = {k: pure["fwd_bwd"][k] for k in ("step_s", "tokens_per_s", "mfu")}
  brief["e2e"] = {k: e2e.get(k) for k in ("step_s", "wall_clock_step_s", "tokens_per_s", "mfu", "steps_measured",
                                          "first_step_measured", "train_wall_s")}
  if "pipeline" in results:
    brief["pipeline"] = results["pipeline"]
  print(json.dumps({"summary": brief}, indent=1), flush=True)


if __name__ == "__main__":
  main()
