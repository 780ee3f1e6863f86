"""Train-step time and memory plan of this checkout against another git revision, in one run.

Each side runs in its own child process (8 fake CPU devices, the 8-device mesh of the config, the
same real batches from the pipeline) with only the public trainer API both revisions share
(`state_shardings`, `init_state`, `make_train_step`, `batch_shapes`); rounds alternate A and B so
that machine load hits both alike. Reports each side's median step time over rounds (each round:
the median of `--steps` timed steps after warmup), the ratio, and XLA's memory plan of the compiled
step (argument, output, temporary and aliased bytes), which must match when the program is the same.

  python bench/bench_step_ab.py --base HEAD~5 [--config configs/tiny.py] [--rounds 5] [--steps 20]

The base revision is exported with `git archive` into a temporary directory; nothing in the working
tree changes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(config: str, steps: int, warmup: int) -> dict:
  """Runs in the child: compile the step, time it, return JSON-able figures."""
  import time

  import flax.linen as nn
  import jax
  import numpy as np

  from engram_jax import data as data_lib
  from engram_jax import trainer
  from engram_jax.config import load_preset
  from engram_jax.sharding import LOGICAL_RULES, batch_sharding, make_mesh

  cfg = load_preset(config)
  mesh = make_mesh(cfg.mesh)
  tx, shardings, _ = trainer.state_shardings(cfg, mesh)
  state = trainer.init_state(cfg, mesh, tx, shardings)
  data_shardings = {k: batch_sharding(mesh, len(v.shape)) for k, v in trainer.batch_shapes(cfg, 1).items()}
  it = data_lib.make_train_iterator(cfg.data, engram=cfg.model.engram, vocab_size=cfg.model.vocab_size)
  batches = []
  for _ in range(4):
    local = next(it)
    batches.append({k: jax.make_array_from_process_local_data(data_shardings[k], np.asarray(local[k]))
                    for k in data_shardings})
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    step = jax.jit(trainer.make_train_step(cfg, tx), in_shardings=(shardings, data_shardings),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    compiled = step.lower(state, batches[0]).compile()
    mem = compiled.memory_analysis()
    plan = {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                              "temp_size_in_bytes", "alias_size_in_bytes")} if mem else None
    times = []
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batches[i % len(batches)])
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - t0)
  return {"median_step_s": statistics.median(times), "memory_plan": plan, "loss": float(metrics["loss"])}


def run_side(src: str, args) -> dict:
  env = dict(os.environ, PYTHONPATH=src, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--config", args.config,
                        "--steps", str(args.steps), "--warmup", str(args.warmup)],
                       cwd=src, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"child in {src} failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--base", help="git revision to compare against (B); A is this checkout")
  p.add_argument("--config", default="configs/tiny.py")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(child(args.config, args.steps, args.warmup)))
    return
  if not args.base:
    p.error("--base is required: the git revision to compare this checkout against")
  base_dir = tempfile.mkdtemp(prefix="engram_ab_")
  try:
    archive = subprocess.run(["git", "archive", args.base], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", base_dir], input=archive, check=True)
    results = {"A (this checkout)": [], f"B ({args.base})": []}
    for r in range(args.rounds):
      for name, src in zip(results, (ROOT, base_dir)):
        rec = run_side(src, args)
        results[name].append(rec)
        print(json.dumps({"round": r, "side": name, **rec}), flush=True)
    (a_name, a), (b_name, b) = results.items()
    med = lambda recs: statistics.median(x["median_step_s"] for x in recs)  # noqa: E731
    summary = {"config": args.config, "rounds": args.rounds, "steps_per_round": args.steps,
               "median_step_s": {a_name: med(a), b_name: med(b)}, "ratio_A_over_B": med(a) / med(b),
               "memory_plan": {a_name: a[0]["memory_plan"], b_name: b[0]["memory_plan"]},
               "memory_plan_equal": a[0]["memory_plan"] == b[0]["memory_plan"],
               "first_round_loss": {a_name: a[0]["loss"], b_name: b[0]["loss"]}}
    print(json.dumps(summary, indent=1))
  finally:
    shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
  main()
