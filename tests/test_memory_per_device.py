"""Each device holds 1/8 of every Engram table and of its optimizer state, in the compiled step.

The tiny preset's train step is compiled for the suite's 8 fake CPU devices exactly as
`trainer.train` jits it (same config as tests/test_train.py, so the persistent compilation cache
serves both), and the compiled executable is asked, rather than the trainer's intentions:
- its input and output shardings put 1/8 of the rows of every table, and of every state leaf
  kept per table row (Adam moments, per-row step counts, wherever the trainer keeps them), on
  each device, and no two devices hold the same rows;
- `memory_analysis()` (where the backend reports it) counts per-device argument bytes equal to
  the sum of those shards, well below what a replicated table would add.
"""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import memory, trainer
from engram_jax.config import CheckpointConfig, MeshConfig, load_preset
from engram_jax.sharding import LOGICAL_RULES, batch_sharding, make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny():
  """tests/test_train.py's tiny(): seq_len 32, batch 8, a 6-step schedule, all 8 devices on data."""
  cfg = load_preset(os.path.join(ROOT, "configs", "tiny.py"))
  train = dataclasses.replace(cfg.train, steps=6, warmup_steps=2, log_every=1, eval_every=0,
                              checkpoint=CheckpointConfig(every_n_steps=3, keep_last_n=5, async_save=True))
  data = dataclasses.replace(cfg.data, seq_len=32, batch_size=8)
  return dataclasses.replace(cfg, train=train, data=data, mesh=MeshConfig(data=-1))


def _abstract_batch(cfg, mesh):
  B, T = cfg.data.batch_size, cfg.data.seq_len
  e = cfg.model.engram
  shapes = {k: ((B, T), jnp.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
  shapes["loss_mask"] = ((B, T), jnp.float32)
  shapes["engram_ids"] = ((B, T, len(e.layer_ids), e.num_heads), jnp.int32)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in shapes.items()}


@pytest.fixture(scope="module")
def compiled_step():
  cfg = tiny()
  mesh = make_mesh(cfg.mesh)
  assert mesh.size == 8
  tx, shardings, abstract_state = trainer.state_shardings(cfg, mesh)
  batch = _abstract_batch(cfg, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    step = jax.jit(trainer.make_train_step(cfg, tx), in_shardings=(shardings, {k: v.sharding for k, v in batch.items()}),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    compiled = step.lower(abstract_state, batch).compile()
  return abstract_state, batch, compiled


def _by_path(abstract_tree, sharding_tree):
  """[(path, leaf, sharding)] matched by path: the executable leaves out arguments the step never
  reads (here optax's `last_finite` flag), so the two trees need not have the same leaves."""
  shardings = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(sharding_tree)}
  return [(jax.tree_util.keystr(p), leaf, shardings[jax.tree_util.keystr(p)])
          for p, leaf in jax.tree_util.tree_leaves_with_path(abstract_tree) if jax.tree_util.keystr(p) in shardings]


def _table_state(abstract_state, state_shardings):
  """Row counts of the tables, and [(path, leaf, sharding)] of each table and of every state leaf
  with a table's row count."""
  rows = {leaf.shape[0] for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state.params)
          if memory.is_table_path(path)}
  assert rows, "the tiny preset has Engram tables"
  return rows, [(p, leaf, s) for p, leaf, s in _by_path(abstract_state, state_shardings)
                if leaf.ndim and leaf.shape[0] in rows]


@pytest.mark.parametrize("side", ["input", "output"])
def test_compiled_step_keeps_an_eighth_of_each_table_and_its_state_per_device(compiled_step, side):
  abstract_state, _, compiled = compiled_step
  state_shardings = compiled.input_shardings[0][0] if side == "input" else compiled.output_shardings[0]
  rows, table_state = _table_state(abstract_state, state_shardings)
  # The table itself plus at least Adam's two moments for each table.
  assert len(table_state) >= 3 * len(rows), [p for p, _, _ in table_state]
  for path, leaf, sharding in table_state:
    assert sharding.shard_shape(leaf.shape) == (leaf.shape[0] // 8,) + leaf.shape[1:], (path, sharding)
    # Eight distinct row blocks, one per device: split, not replicated.
    blocks = {index[0].indices(leaf.shape[0]) for index in sharding.devices_indices_map(leaf.shape).values()}
    assert len(blocks) == 8, (path, sorted(blocks))


def test_memory_analysis_counts_eighths_of_the_tables(compiled_step):
  abstract_state, batch, compiled = compiled_step
  analysis = compiled.memory_analysis()
  if analysis is None or not getattr(analysis, "argument_size_in_bytes", 0):
    pytest.skip("this backend reports no memory analysis")
  in_shardings = compiled.input_shardings[0]

  def shard_bytes(leaf, sharding):
    return int(np.prod(sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize

  args = _by_path(abstract_state, in_shardings[0]) + _by_path(batch, in_shardings[1])
  assert len(args) >= len(jax.tree.leaves((abstract_state, batch))) - 1
  _, table_state = _table_state(abstract_state, in_shardings[0])
  table_paths = {p for p, _, _ in table_state}
  table_whole = sum(leaf.size * np.dtype(leaf.dtype).itemsize for _, leaf, _ in table_state)
  # Expected per device: an eighth of the tables and their state, plus every other argument's
  # shard as compiled (XLA may align a buffer: allow 1%). Had the tables and their state been
  # replicated, each device would hold 7/8 of them more.
  expected = table_whole / 8 + sum(shard_bytes(leaf, s) for p, leaf, s in args if p not in table_paths)
  replicated = expected + 7 / 8 * table_whole
  print(f"per-device arguments {analysis.argument_size_in_bytes} B, expected {expected:.0f} B, tables and their "
        f"state {table_whole} B in all, {table_whole / analysis.argument_size_in_bytes / 8:.0%} of a device's share")
  assert expected <= analysis.argument_size_in_bytes <= 1.01 * expected < replicated, (
      analysis.argument_size_in_bytes, expected, replicated)
