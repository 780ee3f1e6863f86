"""Capacity planning without allocation: parameter counts and per-device bytes for a mesh.

Everything is derived from the trainer's own abstract state (`jax.eval_shape` of the model's and
the optimizers' init) and the shardings the logical rules give it on an `AbstractMesh` of the
requested size, so a 40B-parameter model on 256 devices is planned on a laptop.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding

from engram_jax import memory
from engram_jax.config import Config
from engram_jax.model import param_counts
from engram_jax.sharding import MESH_AXES
from engram_jax.trainer import state_shardings


def _shards(sharding: NamedSharding) -> int:
  n = 1
  for axes in sharding.spec:
    if axes is None:
      continue
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      n *= sharding.mesh.shape[a]
  return n


def _bytes_per_device(tree, shardings) -> int:
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += leaf.size * np.dtype(leaf.dtype).itemsize / _shards(sharding)
  return int(total)


def plan(cfg: Config, num_devices: Optional[int] = None) -> Dict[str, Any]:
  """The trainer's abstract state and its shardings on an abstract mesh of `num_devices`: the
  same `trainer.state_shardings` a run uses, so the plan counts exactly what training allocates
  (with row-sparse table updates: the lazy Adam moments and per-row step counts in `engram_opt`)."""
  n = num_devices or jax.device_count()
  mesh = AbstractMesh(cfg.mesh.resolve(n), MESH_AXES)
  _, shardings, abstract = state_shardings(cfg, mesh)
  return dict(mesh=mesh, state=abstract, shardings=shardings)


def _only_tables(tree, shardings):
  """(leaves, shardings) of the Engram tables and of any state leaf that belongs to one (its path
  ends with the table's path, as every optimizer moment's does)."""
  leaves, kept = [], []
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings)):
    if memory.is_table_path(path):
      leaves.append(leaf)
      kept.append(sharding)
  return leaves, kept


def dry_run_report(cfg: Config, num_devices: Optional[int] = None) -> Dict[str, Any]:
  p = plan(cfg, num_devices)
  state, shardings = p["state"], p["shardings"]
  counts = param_counts(cfg.model)
  table_bytes = sum(leaf.size * np.dtype(leaf.dtype).itemsize for leaf in _only_tables(state.params, shardings.params)[0])
  param_bytes = _bytes_per_device(state.params, shardings.params)
  opt_bytes = (_bytes_per_device(state.opt_state, shardings.opt_state)
               + _bytes_per_device(state.engram_opt, shardings.engram_opt))
  table_param_bytes = _bytes_per_device(*_only_tables(state.params, shardings.params))
  # The tables' optimizer state: optax moments under a table's path, or the lazy Adam state.
  table_opt_bytes = (_bytes_per_device(*_only_tables(state.opt_state, shardings.opt_state))
                     + _bytes_per_device(state.engram_opt, shardings.engram_opt))
  return {
      "preset": cfg.name,
      "devices": int(p["mesh"].size),
      "mesh": {k: int(v) for k, v in p["mesh"].shape.items()},
      "total_params": counts["total"],
      "activated_params": counts["activated"],
      "engram_params": counts["engram"],
      "embedding_params": counts["embedding"],
      "param_bytes_per_device": param_bytes,
      "optimizer_bytes_per_device": opt_bytes,
      "param_plus_optimizer_gib_per_device": round((param_bytes + opt_bytes) / 2**30, 3),
      "engram_table_bytes_total": int(table_bytes),
      # The tables' share of the per-device figures above (rows split over every device).
      "engram_table_bytes_per_device": table_param_bytes,
      "engram_optimizer_bytes_per_device": table_opt_bytes,
  }
