"""Mesh construction and the one table mapping logical axis names to mesh axes.

Modules annotate params (`nn.with_logical_partitioning`) and activations
(`nn.with_logical_constraint`) with the logical names below; only this file (and shard_map bodies,
which take their specs from `logical_to_spec`) names mesh axes.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from engram_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
LOGICAL_RULES = (
    # Activations.
    ("batch", ("data", "fsdp", "expert")),
    ("seq", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_branch", None),
    # Decoding caches (generation.py): batch as above; positions kept whole on every device; GQA
    # cache heads split like the heads that read them; MLA's latent is shared by all heads (whole).
    ("cache_seq", None),
    ("cache_heads", "tensor"),
    ("cache_latent", None),
    # Params.
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    # Low-rank (MLA) dims: split over fsdp like `embed`; where a param has both (the down
    # projections) the first wins and the rank stays whole.
    ("lora", "fsdp"),
    ("expert", "expert"),
    ("expert_embed", "fsdp"),
    ("expert_mlp", "tensor"),
    ("branch", None),
    ("layers", None),
    ("mem", None),
    ("conv_kernel", None),
    # Engram tables: rows over every mesh axis, so capacity grows with the device count.
    ("table_rows", ("data", "fsdp", "expert", "tensor")),
    ("table_dim", None),
    # RMSNorm scales (small vectors; replicated).
    ("norm", None),
    # mHC: the output width of the fused map projection and the input-stream axis of H_res.
    ("mhc", None),
)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over axes (data, fsdp, expert, tensor) with Explicit-free (Auto) axis types."""
  devices = list(jax.devices() if devices is None else devices)
  shape = cfg.resolve(len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], rules=LOGICAL_RULES) -> PartitionSpec:
  """The PartitionSpec that the rules give a tuple of logical axis names.

  A mesh axis shards at most one dimension: a later dimension whose rule names a mesh axis an
  earlier one already uses keeps only its unused axes (none: replicated), e.g. ("embed", "lora")
  -> ("fsdp", None).
  """
  table = dict(rules)
  out, used = [], set()
  for name in logical_axes:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(table)}")
    axes = table[name]
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ())) if a not in used)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def tree_shardings(abstract_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree of logically-boxed values (from `jax.eval_shape(init)`), unboxed.

  Leaves without logical names are replicated. A dimension whose size the mesh axes do not divide
  is an error naming the leaf, its shape and the mesh axes, rather than XLA's padding surprise.
  """
  import flax.linen as nn

  is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
  specs = nn.get_partition_spec(abstract_tree)  # logical names per leaf (replicated: PartitionSpec())
  shardings = jax.tree.map(lambda names: jax.sharding.NamedSharding(mesh, logical_to_spec(tuple(names), rules)),
                           specs, is_leaf=is_spec)
  # Only the shapes are needed: unbox without applying sharding constraints (which abstract values
  # refuse inside a mesh context).
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  values = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, abstract_tree, is_leaf=is_box)

  def check(path, value, sharding):
    for dim, axes in zip(value.shape, sharding.spec):
      if axes is None:
        continue
      size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
      if dim % size:
        raise ValueError(f"{jax.tree_util.keystr(path)} has shape {value.shape}: dimension {dim} does not divide "
                         f"over mesh axes {axes} of total size {size} (mesh {dict(mesh.shape)})")
    return sharding

  return jax.tree_util.tree_map_with_path(check, values, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> jax.sharding.NamedSharding:
  """Batch arrays [B, T, ...] shard their leading axis over the `batch` rule's mesh axes."""
  return jax.sharding.NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def rule_axes(logical: str, mesh) -> Tuple[str, ...]:
  """The mesh axes the rules give one logical name, keeping those `mesh` has (for shard_map specs)."""
  entry = logical_to_spec((logical,))[0]
  names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return tuple(a for a in names if a in mesh.axis_names)


def spec_entry(axes: Tuple[str, ...]):
  """One PartitionSpec entry for a tuple of mesh axes: None, one name, or the tuple."""
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def batch_devices(mesh) -> int:
  """How many shards the batch axis splits into on `mesh` (a global batch must be a multiple)."""
  return int(np.prod([mesh.shape[a] for a in rule_axes("batch", mesh)]))


def place_batch(local: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
  """This process's rows of a batch (numpy [b, ...] per key) -> global arrays sharded over the batch
  axis of `mesh`; with several processes each contributes its own rows, in process order."""
  return {key: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(value)), np.asarray(value))
          for key, value in local.items()}
