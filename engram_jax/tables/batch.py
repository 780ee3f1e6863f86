"""A batch's rows from host tables: gathered on the host (`prepare_rows`), assembled in-graph
(`assemble_rows`).

What crosses to the devices per batch and table: the distinct rows the batch reads that are not in
the hot-row cache, once per batch shard ([S, U, d], U padded up to a power of two so only a handful
of shapes ever compile), and an int32 index [B, T, H] into "cache rows, then this shard's rows".
Repeated n-grams (frequent: the traffic is Zipfian) therefore cross once, and rows in the cache not
at all. With quantized storage the rows cross quantized (1 byte per value for int8 / float8 plus one
float32 scale per row) and are dequantized on the device, after the gather. With several processes
each contributes the rows it owns and the devices add the contributions (`place_contribution`).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import memory
from engram_jax.tables.host import HitCounter, HostTables, HotRowCache
from engram_jax.tables.quant import dequantize

# The smallest padded count of distinct rows per batch shard (then powers of two).
MIN_ROW_BUCKET = 64


def row_bucket(n: int) -> int:
  """Padded count of distinct rows per batch shard: a power of two >= MIN_ROW_BUCKET."""
  b = MIN_ROW_BUCKET
  while b < n:
    b *= 2
  return b


def prepare_rows(tables: HostTables, cache: Optional[HotRowCache], engram_ids: np.ndarray, shards: int,
                 mask: Optional[np.ndarray] = None, counter: Optional[HitCounter] = None,
                 pad_to: int = 0, distinct: Optional[Dict[str, list]] = None) -> Dict[str, dict]:
  """Host side of a batch's rows, per table: {"index" int32 [B, T, H], "rows" [S, U, d] stored dtype,
  "scale" float32 [S, U] or absent}. `engram_ids` [B, T, L, H] is this process's batch, split into
  `shards` equal batch shards (the mesh's batch devices on this process); index values < K address
  the cache, K + j row j of the shard's distinct missed rows. U is one bucket for every shard, at
  least `row_bucket(pad_to)`. `distinct`, if given, receives {table: [each shard's sorted distinct
  missed row ids]} (the rows' ids, for a caller that re-reads some of them later).
  """
  ids = memory.row_ids(tables.cfg, np.asarray(engram_ids))
  K = cache.size if cache is not None else 0
  out = {}
  for name in tables.names:
    table_ids = np.asarray(ids[name]).astype(np.int64)  # [B, T, H]
    B = table_ids.shape[0]
    if B % shards:
      raise ValueError(f"batch of {B} rows does not split into {shards} batch shards")
    per_shard = table_ids.reshape(shards, -1)
    index = np.empty(per_shard.shape, np.int32)
    uniqs = []
    hit_all = np.zeros(per_shard.shape, bool)
    for s in range(shards):
      flat = per_shard[s]
      slot = cache.slots(name, flat) if cache is not None else np.full(flat.shape, -1, np.int64)
      hit = slot >= 0
      hit_all[s] = hit
      uniq, inv = np.unique(flat[~hit], return_inverse=True)
      idx = np.empty(flat.shape, np.int64)
      idx[hit] = slot[hit]
      idx[~hit] = K + inv.reshape(-1)
      index[s] = idx
      uniqs.append(uniq)
    U = row_bucket(max(pad_to, max(len(u) for u in uniqs)))
    dim = tables.rows[name].shape[1]
    rows = np.zeros((shards, U, dim), tables.rows[name].dtype)
    scale = None if tables.scales[name] is None else np.zeros((shards, U), np.float32)
    for s, uniq in enumerate(uniqs):
      rows[s, :len(uniq)] = tables.take(name, uniq)
      if scale is not None:
        scale[s, :len(uniq)] = tables.take_scale(name, uniq)
    entry = {"index": index.reshape(table_ids.shape), "rows": rows}
    if scale is not None:
      entry["scale"] = scale
    out[name] = entry
    if distinct is not None:
      distinct[name] = uniqs
    if counter is not None and cache is not None:
      m = np.ones(table_ids.shape[:-1], bool) if mask is None else np.asarray(mask) > 0
      counter.add(name, hit_all.reshape(table_ids.shape), m)
  return out


def place_contribution(mesh, part: np.ndarray, owner: bool = True) -> jax.Array:
  """This process's contribution to rows that several processes fill (each the rows it owns, zeros
  elsewhere) as one global [devices, ...] array: `part` on the first of its devices, zeros on its
  others (and everywhere when not `owner`). `assemble_rows` (and the train step) sum over devices."""
  shape = (mesh.devices.size,) + part.shape
  spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names), *([None] * part.ndim))
  sharding = jax.sharding.NamedSharding(mesh, spec)
  index_map = sharding.addressable_devices_indices_map(shape)
  first = min(index_map, key=lambda d: index_map[d][0].start or 0)
  zeros = np.zeros((1,) + part.shape, part.dtype)
  arrays = [jax.device_put(part[None] if (d == first and owner) else zeros, d) for d in index_map]
  return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def owned_rows(entry: dict):
  """(rows, scales or None) of one table's placed arrays. With several processes the entry holds
  their contributions instead (`parts` [devices, S, U, d], `part_scales` [devices, S, U]: each row
  filled by the one device, of the process owning it, that carries its process's contribution, zeros
  elsewhere; `place_contribution`), summed here over devices. The sum is exact: every value is added
  to zeros only (int8 / float8 / bfloat16 values are exact in float32, so summing there changes
  nothing)."""
  if "parts" not in entry:
    return entry["rows"], entry.get("scale")
  scale = entry.get("part_scales")
  return jnp.sum(entry["parts"].astype(jnp.float32), axis=0), None if scale is None else jnp.sum(scale, axis=0)


def assemble_rows(host: Dict[str, dict], cache: Optional[Dict[str, Tuple[jax.Array, Optional[jax.Array]]]],
                  dtype) -> Dict[str, jax.Array]:
  """In-graph: {table name: rows [B, T, H, d] in `dtype`} from `prepare_rows`'s arrays (placed on the
  batch's devices: index split over the batch, rows [S, U, d] one shard per batch shard) and the
  cache's device rows {name: (rows [K, d], scales [K] or None)}; several processes' contributions
  are summed first (`owned_rows`). Each batch shard gathers from its own rows (a batched gather over
  the shard axis, which XLA keeps local to each device)."""
  out = {}
  for name, entry in host.items():
    index, (rows, scale) = entry["index"], owned_rows(entry)
    B, T, H = index.shape
    S = rows.shape[0]
    K = 0 if cache is None else cache[name][0].shape[0]
    idx = index.reshape(S, B // S, T, H)
    local = jnp.clip(idx - K, 0, rows.shape[1] - 1)
    got = jax.vmap(lambda r, i: jnp.take(r, i, axis=0))(rows, local)  # [S, b, T, H, d]
    got_scale = None if scale is None else jax.vmap(lambda s, i: jnp.take(s, i, axis=0))(scale, local)
    if K:
      c_rows, c_scale = cache[name]
      slot = jnp.clip(idx, 0, K - 1)
      hit = idx < K
      got = jnp.where(hit[..., None], jnp.take(c_rows, slot, axis=0), got)
      if got_scale is not None:
        got_scale = jnp.where(hit, jnp.take(c_scale, slot, axis=0), got_scale)
    out[name] = dequantize(got, got_scale, dtype).reshape(B, T, H, -1)
  return out
