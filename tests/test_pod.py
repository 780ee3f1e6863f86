"""Pod-scale plans of the paper presets, without a pod: bytes per device and a lowered train step.

1. `dry_run_report` for engram_27b / engram_40b on 64 and 256 devices (AbstractMesh, nothing
   allocated): the Engram tables and their Adam moments are exactly 1/N of the whole per device,
   and the per-device totals agree with the parameter counts and with the shardings' own
   shard shapes (computed here independently of planning.py's arithmetic).
2. The engram_27b train step lowered for 64 fake CPU devices from abstract inputs (the state's
   shapes and shardings from `trainer.state_shardings`): it lowers, with every table and table
   moment split 64 ways in the lowered program, in a process whose memory stays far below the
   ~300 GB the state would take. Lowering only: compiling a 27B step for 64 devices on two CPU
   cores would take far longer than a test may, and lowering is where sharding mistakes
   (indivisible shapes, mismatched specs, shard_map errors) surface.

The lowering runs in a subprocess because the device count is fixed when jax starts (the suite
runs with 8). Run this file as a script to lower by hand:

  XLA_FLAGS=--xla_force_host_platform_device_count=64 JAX_PLATFORMS=cpu \\
      python tests/test_pod.py --preset engram_27b --batch_size 64 --seq_len 128
"""

import argparse
import dataclasses
import json
import os
import re
import resource
import subprocess
import sys

import jax
import numpy as np
import pytest

from engram_jax import memory
from engram_jax.config import load_preset
from engram_jax.planning import dry_run_report, plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preset(name):
  return load_preset(os.path.join(ROOT, "configs", f"{name}.py"))


def _shard_bytes(leaf, sharding) -> int:
  """Bytes one device holds of `leaf`: its shard shape (which also checks the sizes divide)."""
  return int(np.prod(sharding.shard_shape(leaf.shape), dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def _leaves(tree, shardings, table_only=False):
  out = []
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings)):
    if not table_only or memory.is_table_path(path):
      out.append((leaf, sharding))
  return out


@pytest.fixture(scope="module", params=["engram_27b", "engram_40b"])
def pod_preset(request):
  return preset(request.param)


@pytest.mark.parametrize("devices", [64, 256])
def test_dry_run_splits_engram_tables_over_every_device(pod_preset, devices):
  cfg = pod_preset
  report = dry_run_report(cfg, num_devices=devices)
  p = plan(cfg, num_devices=devices)
  assert report["devices"] == devices and p["mesh"].size == devices
  state, shardings = p["state"], p["shardings"]

  # The tables: 1/N each, exactly, and all of the Engram parameters.
  tables = _leaves(state.params, shardings.params, table_only=True)
  assert len(tables) == len(cfg.model.engram.layer_ids)
  table_total = sum(leaf.size * np.dtype(leaf.dtype).itemsize for leaf, _ in tables)
  assert sum(leaf.size for leaf, _ in tables) == report["engram_params"]
  assert table_total == report["engram_table_bytes_total"]
  per_device = sum(_shard_bytes(leaf, s) for leaf, s in tables)
  assert per_device == report["engram_table_bytes_per_device"]
  assert per_device * devices == table_total

  # Their optimizer state (Adam's two moments, plus anything else kept per table, such as the
  # row-sparse path's per-row step counts): 1/N too.
  moments = _leaves(state.opt_state, shardings.opt_state, table_only=True) + _leaves(state.engram_opt,
                                                                                    shardings.engram_opt)
  assert cfg.train.engram_sparse_updates == bool(state.engram_opt)
  assert len(moments) >= 2 * len(tables)
  moment_total = sum(leaf.size * np.dtype(leaf.dtype).itemsize for leaf, _ in moments)
  moment_per_device = sum(_shard_bytes(leaf, s) for leaf, s in moments)
  assert moment_per_device == report["engram_optimizer_bytes_per_device"]
  assert moment_per_device * devices == moment_total >= 2 * table_total

  # Whole-model figures: every parameter counted once, shard by shard as the shardings say.
  params = _leaves(state.params, shardings.params)
  assert sum(leaf.size for leaf, _ in params) == report["total_params"]
  param_total = sum(leaf.size * np.dtype(leaf.dtype).itemsize for leaf, _ in params)
  assert report["param_bytes_per_device"] == sum(_shard_bytes(leaf, s) for leaf, s in params)
  optimizer = _leaves(state.opt_state, shardings.opt_state) + _leaves(state.engram_opt, shardings.engram_opt)
  assert report["optimizer_bytes_per_device"] == sum(_shard_bytes(leaf, s) for leaf, s in optimizer)
  assert param_total / devices <= report["param_bytes_per_device"] < param_total


# ----------------------------------------------------------------------------------------------
# Lowering on 64 fake devices (subprocess).


def lower_train_step(name: str, batch_size: int, seq_len: int):
  """Lower `name`'s train step for every device present, from abstract state and batch."""
  import flax.linen as nn

  from engram_jax import trainer
  from engram_jax.sharding import LOGICAL_RULES, batch_sharding, make_mesh

  cfg = preset(name)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=batch_size, seq_len=seq_len))
  mesh = make_mesh(cfg.mesh)
  trainer.check_batch_divides_mesh(cfg, mesh)
  tx, shardings, abstract_state = trainer.state_shardings(cfg, mesh)
  shapes = trainer.batch_shapes(cfg, batch_size)
  batch_shardings = {k: batch_sharding(mesh, len(v.shape)) for k, v in shapes.items()}
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k]) for k, v in shapes.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    step = jax.jit(trainer.make_train_step(cfg, tx), in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    lowered = step.lower(abstract_state, batch)
  text = lowered.as_text()
  main = text[text.index("func.func public @main("):]
  main = main[:main.index("\n")]
  table_rows = {int(leaf.shape[0]) for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state.params)
                if memory.is_table_path(path)}
  # The tables and every state leaf kept per table row (Adam moments, per-row counts, wherever
  # the trainer keeps them): whole row count and rows per device.
  rows = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
    if leaf.ndim and int(leaf.shape[0]) in table_rows:
      rows[jax.tree_util.keystr(path)] = [int(leaf.shape[0]), int(leaf.sharding.shard_shape(leaf.shape)[0])]
  state_bytes = sum(leaf.size * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(abstract_state))
  # Arguments of the lowered program with a table's row count whose rows split over all four axes.
  split = re.findall(r"%arg\d+: tensor<(\d+)[0-9x]*x[a-z0-9]+> \{sdy.sharding = #sdy.sharding<@mesh, "
                     r"\[\{\"data\", \"fsdp\", \"expert\", \"tensor\"\}", main)
  return {
      "devices": int(mesh.size), "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "state_bytes": int(state_bytes), "tables": len(table_rows),
      "table_rows_total_and_per_device": rows,
      "table_args_split_over_all_axes": sum(1 for r in split if int(r) in table_rows),
      "lowered_chars": len(text),
      "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
  }


def test_engram_27b_train_step_lowers_on_64_devices_without_allocating():
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=64")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--preset", "engram_27b", "--batch_size", "64",
                         "--seq_len", "128"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 64 and out["mesh"]["fsdp"] == 64
  # The state alone would need hundreds of GB; the process stays within a few (the compiler's own
  # memory for 64 devices: 3.9-4.3 GB measured on a 2-core machine, more while other tests compile).
  assert out["state_bytes"] > 200e9
  assert out["max_rss_bytes"] < 6e9, out["max_rss_bytes"]
  rows = out["table_rows_total_and_per_device"]
  assert out["tables"] == len(preset("engram_27b").model.engram.layer_ids)
  assert len(rows) >= 3 * out["tables"], rows  # each table and at least Adam's two moments
  assert all(per * 64 == total for total, per in rows.values()), rows
  # In the program itself: each of them is an argument whose rows split 64 ways.
  assert out["table_args_split_over_all_axes"] == len(rows)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="engram_27b")
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--seq_len", type=int, default=128)
  args = parser.parse_args()
  print(json.dumps(lower_train_step(args.preset, args.batch_size, args.seq_len)))


if __name__ == "__main__":
  main()
