"""Train-step time with the Engram tables in host RAM or on disk vs on the devices (train.engram_tables).

Each point trains the tiny model (`configs/tiny.py`, its batch and length) through `trainer.train`,
checkpoints and evaluation off, logging every `--window` steps, and takes the median over windows
after the first (compilation) of seconds per step. Rounds alternate the placements of a point, and
the ratio of medians placement / device is reported per round and as the median over rounds.
Points: tiny's table (rows x 1, width 16), a wider table (`--wide_dim`), and more rows
(`--row_factors`, host only against device: the step should stay flat as the table grows, like the
device row-sparse path). For host and disk the trainer also logs seconds per step of each host stage
(`time/*_s`: the row gather on the prefetch thread, re-reading rows written since, transfer,
fetching the row gradients, the host lazy Adam); the medians are printed.

On CPU the host and device share memory, so the ratio is the cost of the orchestration itself.

`--beyond_ram F`: one run instead, with disk tables whose rows plus Adam moments take F times this
machine's RAM (tiny's table with more rows per head), checkpoints off: init time, seconds per step
and tokens/s per window, and the process's peak resident memory (VmHWM; file pages of the memory
maps count in it while resident) and its anonymous memory at the end (RssAnon). With `--checkpoint`
the run ends with a checkpoint of the tables and moments (orbax, asynchronous, chunk by chunk from
the store's copy-on-write snapshot): how long the save took, its bytes on disk, and the largest
anonymous memory sampled during the run (RssAnon, every 0.2 s; a copy of a table would show there).

  taskset -c 0 python bench/bench_host_training.py --rounds 3
  taskset -c 0 python bench/bench_host_training.py --beyond_ram 1.1 --steps 200
  python bench/bench_host_training.py --gpu   # on a GPU: the small preset, host vs device
"""

import argparse
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(preset, placement, factor=1, dim=None, steps=60, window=10, batch=None):
  from engram_jax.config import CheckpointConfig, MeshConfig, load_preset

  cfg = load_preset(os.path.join(ROOT, "configs", f"{preset}.py"))
  e = cfg.model.engram
  changes = {"vocab_size_per_ngram": tuple(int(v * factor) for v in e.vocab_size_per_ngram)}
  if dim is not None:
    changes["n_embed_per_ngram"] = dim * e.n_head_per_ngram
  model = dataclasses.replace(cfg.model, engram=dataclasses.replace(e, **changes))
  train = dataclasses.replace(cfg.train, steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps),
                              eval_every=0, log_every=window, engram_tables=placement,
                              checkpoint=CheckpointConfig(enabled=False))
  data = cfg.data if batch is None else dataclasses.replace(cfg.data, batch_size=batch)
  return dataclasses.replace(cfg, model=model, train=train, data=data, mesh=MeshConfig(data=-1))


def run(cfg):
  """(median seconds per step after the first window, {stage: median seconds per step})."""
  from engram_jax import trainer

  workdir = tempfile.mkdtemp(prefix="bench-host-training-")
  try:
    t0 = time.perf_counter()
    trainer.train(cfg, workdir, progress=False, log=lambda *_: None)
    wall = time.perf_counter() - t0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  tokens = cfg.data.batch_size * cfg.data.seq_len
  windows = [r for r in rows if "tokens_per_sec" in r][1:]
  step_s = float(np.median([tokens / r["tokens_per_sec"] for r in windows]))
  stages = {k[len("time/"):]: float(np.median([r[k] for r in windows])) for k in windows[0] if k.startswith("time/")}
  return step_s, stages, wall


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--window", type=int, default=10)
  parser.add_argument("--wide_dim", type=int, default=64)
  parser.add_argument("--row_factors", default="16,64")
  parser.add_argument("--gpu", action="store_true", help="one point: --preset (default small), host vs device tables")
  parser.add_argument("--preset", default="small", help="--gpu: the preset to train (tiny checks the path on CPU)")
  parser.add_argument("--beyond_ram", type=float, default=None,
                      help="one disk run whose tables and moments take this many times the RAM")
  parser.add_argument("--workdir", default=None, help="--beyond_ram: where the table files go (default: a temp dir)")
  parser.add_argument("--checkpoint", action="store_true", help="--beyond_ram: end with a checkpoint")
  parser.add_argument("--json", default=None, help="also write the results as JSON here")
  args = parser.parse_args()
  import jax

  if args.beyond_ram:
    return beyond_ram(args)
  if args.gpu:
    points = [(args.preset, {"factor": 1}, ("device", "host"))]
  else:
    points = [("tiny", {"factor": 1}, ("device", "host", "disk")),
              ("tiny", {"factor": 1, "dim": args.wide_dim}, ("device", "host", "disk"))]
    points += [("tiny", {"factor": int(f)}, ("device", "host")) for f in args.row_factors.split(",") if f]
  results = []
  for preset, size, placements in points:
    per_round = {p: [] for p in placements}
    stages = {p: [] for p in placements}
    for r in range(args.rounds):
      order = placements if r % 2 == 0 else tuple(reversed(placements))
      for placement in order:
        step_s, st, wall = run(config(preset, placement, steps=args.steps, window=args.window, **size))
        per_round[placement].append(step_s)
        stages[placement].append(st)
        print(json.dumps({"preset": preset, **size, "placement": placement, "round": r, "step_s": step_s,
                          "wall_s": wall, **st}), flush=True)
    from engram_jax.host_training import bytes_needed

    cfg = config(preset, "device", **size)
    row = {"preset": preset, **size, "head_dim": cfg.model.engram.head_dim,
           "table_and_moments_mib": bytes_needed(cfg.model.engram) / 2**20,
           "device_step_s": float(np.median(per_round["device"]))}
    for p in placements[1:]:
      ratios = [a / b for a, b in zip(per_round[p], per_round["device"])]
      row[f"{p}_step_s"] = float(np.median(per_round[p]))
      row[f"{p}_over_device"] = float(np.median(ratios))
      row[f"{p}_over_device_rounds"] = ratios
      row[f"{p}_stages_s"] = {k: float(np.median([s[k] for s in stages[p]])) for k in stages[p][0]}
    results.append(row)
    print(json.dumps(row), flush=True)
  summary = {"machine": f"{platform.machine()}, {jax.device_count()} x {jax.devices()[0].device_kind}",
             "points": results}
  print(json.dumps(summary), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=1)


def _proc_status(*keys):
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      name, _, value = line.partition(":")
      if name in keys:
        out[name] = int(value.split()[0]) * 1024
  return out


def beyond_ram(args):
  import math
  import threading

  import jax

  from engram_jax import checkpoint as ckpt_lib
  from engram_jax import host_training, trainer
  from engram_jax.config import CheckpointConfig, load_preset

  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  base = load_preset(os.path.join(ROOT, "configs", "tiny.py")).model.engram
  factor = args.beyond_ram * ram / host_training.bytes_needed(base)
  cfg = config("tiny", "disk", factor=math.ceil(factor), steps=args.steps, window=args.window)
  if args.checkpoint:  # one save, at the end
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint=CheckpointConfig(
        every_n_steps=args.steps, keep_last_n=1, async_save=True)))
  peak_anon, saves = [0], []
  stop = threading.Event()

  def sample():
    while not stop.wait(0.2):
      peak_anon[0] = max(peak_anon[0], _proc_status("RssAnon")["RssAnon"])

  real_save, real_wait = ckpt_lib.CheckpointManager.save, ckpt_lib.CheckpointManager.wait

  def timed_save(self, *a, **kw):
    saves.append([time.perf_counter(), None])
    return real_save(self, *a, **kw)

  def timed_wait(self):
    real_wait(self)
    if saves and saves[-1][1] is None:
      saves[-1][1] = time.perf_counter()

  ckpt_lib.CheckpointManager.save, ckpt_lib.CheckpointManager.wait = timed_save, timed_wait
  threading.Thread(target=sample, daemon=True).start()
  need = host_training.bytes_needed(cfg.model.engram)
  workdir = args.workdir or tempfile.mkdtemp(prefix="bench-beyond-ram-")
  print(json.dumps({"ram_bytes": ram, "tables_and_moments_bytes": need, "over_ram": need / ram,
                    "rows_per_head": cfg.model.engram.vocab_size_per_ngram, "workdir": workdir}), flush=True)
  t0 = time.perf_counter()
  try:
    trainer.train(cfg, workdir, progress=False, log=lambda line: print(line, flush=True))
    wall = time.perf_counter() - t0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    stop.set()
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt_dir) for f in fs) \
        if os.path.isdir(ckpt_dir) else 0
  finally:
    ckpt_lib.CheckpointManager.save, ckpt_lib.CheckpointManager.wait = real_save, real_wait
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  windows = [r for r in rows if "tokens_per_sec" in r]
  tokens = cfg.data.batch_size * cfg.data.seq_len
  steady = windows[1:] or windows
  result = {"machine": f"{platform.machine()}, {jax.device_count()} x {jax.devices()[0].device_kind}",
            "ram_gib": ram / 2**30, "tables_and_moments_gib": need / 2**30, "steps": args.steps, "wall_s": wall,
            "step_s_per_window": [tokens / r["tokens_per_sec"] for r in windows],
            "tokens_per_sec_median": float(np.median([r["tokens_per_sec"] for r in steady])),
            "stages_s": {k: float(np.median([r[k] for r in steady])) for k in steady[0] if k.startswith("time/")},
            "loss_first_last": [windows[0]["loss"], windows[-1]["loss"]],
            **{k.lower() + "_gib": v / 2**30 for k, v in _proc_status("VmHWM", "RssAnon", "RssFile").items()},
            "peak_rss_anon_sampled_gib": peak_anon[0] / 2**30}
  if args.checkpoint:
    result.update({"checkpoint_gib": ckpt_bytes / 2**30,
                   "checkpoint_s": [None if b is None else b - a for a, b in saves]})
  print(json.dumps(result), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
