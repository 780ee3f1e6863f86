"""Train-step time against Engram table size: row-sparse (lazy Adam) vs dense Adam on the tables.

A fixed tiny backbone with Engram at one layer; rows per head grow by `--factor` per point
(default 2^12 .. 2^16 rows per head, 8 heads: 16x). For each size and each table update mode the
step is compiled once, then timed as the median of `--repeats` steps. The claim under test is the
paper's: a step touches only the rows its tokens address, so its cost does not grow with the table.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/bench_step_scaling.py
"""

import argparse
import dataclasses
import json
import os
import platform
import time

import jax
import numpy as np

from engram_jax import data as data_lib
from engram_jax import trainer
from engram_jax.config import MeshConfig, load_preset
from engram_jax.memory import table_layout
from engram_jax.sharding import make_mesh, place_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_time(cfg, mesh, batch, repeats):
  tx, shardings, _ = trainer.state_shardings(cfg, mesh)
  state = trainer.init_state(cfg, mesh, tx, shardings)
  with jax.set_mesh(mesh):
    step = jax.jit(trainer.make_train_step(cfg, tx), donate_argnums=(0,))
    state, m = step(state, batch)  # compile
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(state)
      times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--min_log2_rows", type=int, default=12)
  parser.add_argument("--max_log2_rows", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  base = load_preset(os.path.join(ROOT, "configs", "tiny.py"))
  base = dataclasses.replace(base, mesh=MeshConfig(data=-1),
                             data=dataclasses.replace(base.data, seq_len=64, batch_size=8))
  mesh = make_mesh(base.mesh)
  results = []
  for log2 in range(args.min_log2_rows, args.max_log2_rows + 1, 2):
    engram = dataclasses.replace(base.model.engram, vocab_size_per_ngram=(2 ** log2, 2 ** log2))
    row = {"rows_per_head": 2 ** log2, "table_rows_per_layer": table_layout(engram, engram.layer_ids[0])[2]}
    for sparse in (True, False):
      cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, engram=engram),
                                train=dataclasses.replace(base.train, engram_sparse_updates=sparse))
      # Hash ids depend on the table sizes: rebuild the batch for this config.
      hashed = next(data_lib.make_train_iterator(cfg.data, engram=engram, vocab_size=cfg.model.vocab_size))
      batch = place_batch(hashed, mesh)
      row["sparse_s" if sparse else "dense_s"] = step_time(cfg, mesh, batch, args.repeats)
    results.append(row)
    print(json.dumps(row), flush=True)
  first, last = results[0], results[-1]
  print(json.dumps({
      "machine": f"{platform.machine()}, {jax.device_count()} x {jax.devices()[0].device_kind}",
      "rows_growth": last["table_rows_per_layer"] / first["table_rows_per_layer"],
      "sparse_ratio_largest_over_smallest": last["sparse_s"] / first["sparse_s"],
      "dense_ratio_largest_over_smallest": last["dense_s"] / first["dense_s"],
  }))


if __name__ == "__main__":
  main()
