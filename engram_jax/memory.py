"""The Engram tables: where they live in the parameters, how rows are read, how row updates are written.

This module is the one answer to "where do table rows come from, and where do their updates go?":

- Layout. All heads (every order, every head) of one Engram layer live in one flat [rows, head_dim]
  table at per-head row offsets (`table_layout`), as in the official demo, rather than one parameter
  per head: one param shards its rows over the whole mesh evenly, and one gather serves every head.
  Rows are padded up to a multiple of `TABLE_PAD_MULTIPLE` so they divide every power-of-two mesh up
  to that size; padding rows are never addressed.
- Place in the parameters. The model (model.py, engram.py) never touches a table: it consumes rows.
  The tables are created here (`init_tables`) and stored in the parameter tree at
  `params[table_name(layer)]["engram"]["memory"]["table"]` (the checkpoint layout); `split` takes
  them out ({table name: table}) and `merge` puts them back; `saved_table_path` / `saved_table_name`
  translate it for saved checkpoints. Nothing else names that path.
- Reading rows. `gather(tables, engram_ids)` turns per-head hash ids into rows for every Engram
  layer. For tables on the devices it is `sharded_lookup`: an all-to-all to the rows' owners whose
  forward and backward move only the distinct rows each device reads.
- Writing updates. Training differentiates either the tables through `gather` (dense Adam, optax) or
  the gathered rows themselves (the default): then `sparse_update` applies a row-sparse (lazy) Adam
  that reads and writes only the rows read this step, in place, so a step does not cost more as the
  table grows (the paper's systems claim).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from engram_jax.config import EngramConfig
from engram_jax.hashing import head_table_sizes
from engram_jax.sharding import logical_to_spec, rule_axes, spec_entry

# Rows of every table are padded up to a multiple of this (divides every power-of-two mesh <= 1024).
TABLE_PAD_MULTIPLE = 1024
# Logical axes of a table (sharding.py maps them: rows over every mesh axis).
TABLE_AXES = ("table_rows", "table_dim")
# Where a layer's table sits under its block in the parameter tree (the checkpoint layout).
_IN_BLOCK = ("engram", "memory", "table")


@functools.lru_cache(maxsize=None)
def _all_head_sizes(cfg: EngramConfig):
  return head_table_sizes(cfg)


def table_layout(cfg: EngramConfig, layer_id: int) -> Tuple[np.ndarray, np.ndarray, int]:
  """(head sizes [H], head row offsets [H], padded row count) of one layer's flat table."""
  if layer_id not in cfg.layer_ids:
    raise ValueError(f"layer_id={layer_id}: expected one of the Engram layers {cfg.layer_ids}")
  sizes = np.array([p for order in _all_head_sizes(cfg)[layer_id] for p in order], dtype=np.int64)
  offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
  rows = int(sizes.sum())
  padded = -(-rows // TABLE_PAD_MULTIPLE) * TABLE_PAD_MULTIPLE
  return sizes, offsets, padded


# ----------------------------------------------------------------------------------------------
# The tables in the parameter tree.


def table_name(layer_id: int) -> str:
  """The key of a layer's table in `split`'s dict (and of its lazy Adam state): its block's name."""
  return f"layer_{layer_id}"


def table_names(cfg: Optional[EngramConfig]) -> Tuple[str, ...]:
  return () if cfg is None else tuple(table_name(l) for l in cfg.layer_ids)


def init_tables(cfg: EngramConfig, key: jax.Array, dtype=jnp.float32) -> Dict[str, nn.LogicallyPartitioned]:
  """Fresh tables {table name: [rows, head_dim] ~ N(0, table_init_std)}, boxed with their logical axes."""
  init = nn.with_logical_partitioning(nn.initializers.normal(cfg.table_init_std), TABLE_AXES)
  return {table_name(l): init(jax.random.fold_in(key, l), (table_layout(cfg, l)[2], cfg.head_dim), dtype)
          for l in cfg.layer_ids}


def is_table_path(path) -> bool:
  """Whether a key path (jax.tree_util) leads to a table, in a params tree or in anything shaped like
  one (an optimizer moment, a sharding tree)."""
  keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
  return keys[-len(_IN_BLOCK):] == _IN_BLOCK


def saved_table_path(name: str) -> Tuple[str, ...]:
  """The key path of table `name` in a saved train state (checkpoint.py's array paths)."""
  return ("params", name) + _IN_BLOCK


def saved_table_name(path) -> Optional[str]:
  """The table a saved train state's key path (a tuple of str, or "/"-joined) leads to; None if none."""
  keys = tuple(path.split("/")) if isinstance(path, str) else tuple(path)
  if len(keys) == 2 + len(_IN_BLOCK) and keys[0] == "params" and keys[2:] == _IN_BLOCK:
    return keys[1]
  return None


def split(params) -> Tuple[dict, Dict[str, object]]:
  """(params without the tables, {table name: table}); works on any tree shaped like the params
  (values, boxes, shardings, ShapeDtypeStructs). The input is not modified."""
  backbone, tables = dict(params), {}
  for name, block in params.items():
    node, parents = block, []
    for key in _IN_BLOCK[:-1]:
      if not isinstance(node, dict) or key not in node:
        break
      parents.append(node)
      node = node[key]
    else:
      if isinstance(node, dict) and _IN_BLOCK[-1] in node:
        tables[name] = node[_IN_BLOCK[-1]]
        backbone[name] = _without(block, _IN_BLOCK)
  return backbone, tables


def _without(tree: dict, path: Tuple[str, ...]) -> dict:
  out = dict(tree)
  if len(path) == 1:
    del out[path[0]]
  else:
    out[path[0]] = _without(tree[path[0]], path[1:])
  return out


def merge(backbone, tables: Dict[str, object]) -> dict:
  """The inverse of `split`: the full parameter tree."""
  params = dict(backbone)
  for name, table in tables.items():
    block = dict(params.get(name, {}))
    engram = dict(block.get(_IN_BLOCK[0], {}))
    engram[_IN_BLOCK[1]] = {**engram.get(_IN_BLOCK[1], {}), _IN_BLOCK[2]: table}
    block[_IN_BLOCK[0]] = engram
    params[name] = block
  return params


# ----------------------------------------------------------------------------------------------
# Reading rows.


def row_ids(cfg: EngramConfig, engram_ids: jax.Array) -> Dict[str, jax.Array]:
  """{table name: global row ids [..., H]} from per-head hash ids engram_ids [..., num_layers, H]
  (int32 in-graph; int64 numpy for numpy ids, computed on the host)."""
  return {table_name(l): _offset(cfg, l, engram_ids[..., i, :]) for i, l in enumerate(cfg.layer_ids)}


def _offset(cfg: EngramConfig, layer_id: int, hash_ids):
  offsets = table_layout(cfg, layer_id)[1]
  if isinstance(hash_ids, np.ndarray):  # the host gather's ids: no round trip through a device
    return hash_ids.astype(np.int64) + offsets
  return hash_ids.astype(jnp.int32) + jnp.asarray(offsets, jnp.int32)


def read_rows(table: jax.Array, cfg: EngramConfig, layer_id: int, hash_ids: jax.Array, mesh=None, *,
              capacity_factor: Optional[float] = 2.0) -> jax.Array:
  """One layer's rows [..., H, head_dim] for its per-head hash ids [..., H] (local to each head)."""
  if hash_ids.shape[-1] != cfg.num_heads:
    raise ValueError(f"hash ids have {hash_ids.shape[-1]} heads on their last axis; layer {layer_id} expects "
                     f"{cfg.num_heads} ({cfg.num_orders} orders x {cfg.n_head_per_ngram} heads)")
  return sharded_lookup(table, _offset(cfg, layer_id, hash_ids), mesh, capacity_factor=capacity_factor)


def gather(tables: Dict[str, jax.Array], cfg: EngramConfig, engram_ids: jax.Array, mesh=None, *,
           capacity_factor: Optional[float] = 2.0) -> Dict[str, jax.Array]:
  """Rows of every Engram layer: {table name: [..., H, head_dim]} for hash ids [..., num_layers, H].

  Tables on the devices (today's placement) are read with `sharded_lookup` on `mesh` (default: the
  context mesh; with one device a plain gather). This is differentiable: its transpose sends row
  gradients to the rows' owners.
  """
  if engram_ids.shape[-2:] != (len(cfg.layer_ids), cfg.num_heads):
    raise ValueError(f"engram_ids has shape {engram_ids.shape}; expected [..., {len(cfg.layer_ids)} Engram layers, "
                     f"{cfg.num_heads} heads]")
  return {table_name(l): read_rows(tables[table_name(l)], cfg, l, engram_ids[..., i, :], mesh,
                                   capacity_factor=capacity_factor) for i, l in enumerate(cfg.layer_ids)}


# ----------------------------------------------------------------------------------------------
# Sharded lookup: each shard reads the rows its ids address from the shards that own them.
#
# Per-shard values (names ending in `_`) inside the shard_map bodies below:
#   S  devices of the mesh (the table's rows are split over all of them, shard s owns rows
#      [s * R/S, (s+1) * R/S), the row-major order of the "table_rows" mesh axes);
#   n  ids each device routes, N/S: a batch shard's N/B ids are split evenly over the T = S/B
#      devices that hold copies of them (the "tensor" axis), so no row is fetched twice for the
#      same token, and the T pieces are all-gathered back at the end;
#   c  slots per (sender, owner) pair in one all-to-all round (`_round_capacity`).


@dataclasses.dataclass(frozen=True)
class _Routing:
  """The static plan of one sharded lookup/update: mesh axes, shard sizes and round capacity."""

  mesh: object  # jax.sharding.Mesh or AbstractMesh
  table_axes: Tuple[str, ...]  # mesh axes the rows are split over (all of them), row-major
  batch_axes: Tuple[str, ...]  # mesh axes the ids are split over
  split_axes: Tuple[str, ...]  # table axes the ids are replicated over (ids split among them)
  shards: int  # S
  rows: int  # R
  ids_per_device: int  # n
  capacity: int  # c

  @property
  def rows_per_shard(self) -> int:
    return self.rows // self.shards

  @property
  def single_round(self) -> bool:
    return self.capacity >= self.ids_per_device


def _resolve_mesh(mesh):
  """The mesh to shard over, or None when there is only one device (the plain gather is exact)."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
    return None
  return mesh


def _round_capacity(ids_per_device: int, shards: int, capacity_factor: Optional[float]) -> int:
  """Slots per (sender, owner) pair in one all-to-all round.

  None gives n, which no bucket can overflow (a device routes n ids, so at most n distinct rows
  from one owner): one round always, but every all-to-all buffer is S x n, i.e. S times the ids
  routed. With a factor f the buffers are S x ceil(f n / S) ~ f n, proportional to the ids routed;
  hashed ids spread evenly over owners, so one round is the rule for f ~ 2, and more rounds (each
  moving the next c ids of every bucket) keep the result exact when some bucket is larger.
  """
  if capacity_factor is None:
    return ids_per_device
  if not capacity_factor > 0:
    raise ValueError(f"capacity_factor={capacity_factor!r}: expected None or a positive float")
  return int(min(ids_per_device, max(1, math.ceil(capacity_factor * ids_per_device / shards))))


def _routing(mesh, rows: int, num_ids: int, capacity_factor: Optional[float]) -> _Routing:
  table_axes = rule_axes("table_rows", mesh)
  batch_axes = rule_axes("batch", mesh)
  unowned = [a for a in mesh.axis_names if a not in table_axes and mesh.shape[a] > 1]
  if unowned:
    raise ValueError(f"mesh axes {unowned} are not in the 'table_rows' rule {table_axes}: the table would be "
                     f"replicated over them and its rows would have several owners (mesh {dict(mesh.shape)})")
  if not set(batch_axes) <= set(table_axes):
    raise ValueError(f"'batch' axes {batch_axes} must be among the 'table_rows' axes {table_axes}")
  shards = math.prod(mesh.shape[a] for a in table_axes)
  if rows % shards:
    raise ValueError(f"table has {rows} rows: expected a multiple of the {shards} shards of mesh axes {table_axes}")
  if rows >= 2**31 - 1:
    raise ValueError(f"table has {rows} rows: int32 row ids need fewer than 2**31 - 1")
  ids_per_device = -(-num_ids // shards)
  return _Routing(mesh=mesh, table_axes=table_axes, batch_axes=batch_axes,
                  split_axes=tuple(a for a in table_axes if a not in batch_axes), shards=shards, rows=rows,
                  ids_per_device=ids_per_device,
                  capacity=_round_capacity(ids_per_device, shards, capacity_factor))


def _varying(x, route: _Routing):
  """`x` typed as varying over the table axes (loop carries must keep one type)."""
  return jax.lax.pcast(x, route.table_axes, to="varying")


def _my_ids(x_, route: _Routing):
  """This device's n ids (and their rows of any trailing axes) out of its batch shard's n*T."""
  if not route.split_axes:
    return x_
  t = jax.lax.axis_index(route.split_axes)
  return jax.lax.dynamic_slice_in_dim(x_, t * route.ids_per_device, route.ids_per_device, axis=0)


def _all_to_all(x_, route: _Routing):
  """[S(destination), ...] -> [S(source), ...] over every table axis at once."""
  return jax.lax.all_to_all(x_, route.table_axes, 0, 0, tiled=True)


def _dedup(ids_, route: _Routing):
  """Sorted distinct ids (padded with R, so they sort last), inverse indices, owner boundaries.

  Sorted ids make every owner's ids one contiguous run: starts_[o] is where owner o's run begins
  (starts_[S] where the padding begins), so bucketing needs no scatter.
  """
  uniq_, inv_ = jnp.unique(ids_, size=ids_.shape[0], fill_value=route.rows, return_inverse=True)
  bounds = jnp.arange(route.shards + 1, dtype=uniq_.dtype) * route.rows_per_shard
  starts_ = jnp.searchsorted(uniq_, bounds, side="left").astype(jnp.int32)
  return uniq_, inv_.reshape(-1), starts_


def _window(uniq_, first_, end_, route: _Routing):
  """The ids sent in one round: owner o gets uniq_[first_[o] : min(first_[o] + c, end_[o])].

  Returns (indices into uniq_ [S, c], valid [S, c], owner-local row ids [S, c] with R/S where
  invalid: out of range, so the owner's scatters drop them).
  """
  idx_ = first_[:, None] + jnp.arange(route.capacity, dtype=jnp.int32)[None, :]
  valid_ = idx_ < end_[:, None]
  idx_ = jnp.minimum(idx_, route.ids_per_device - 1)
  base = (jnp.arange(route.shards, dtype=jnp.int32) * route.rows_per_shard)[:, None]
  local_ = jnp.where(valid_, uniq_[idx_] - base, route.rows_per_shard)
  return idx_, valid_, local_


def _num_rounds(starts_, route: _Routing):
  """Rounds every device runs: the largest bucket of any device over c (a collective: all agree)."""
  if route.single_round:
    return 1
  counts_ = starts_[1:] - starts_[:-1]
  biggest = jax.lax.pmax(jnp.max(counts_), route.table_axes)
  return (biggest + route.capacity - 1) // route.capacity


def _rounds(num_rounds, body, init):
  if isinstance(num_rounds, int) and num_rounds == 1:
    return body(0, init)
  return jax.lax.fori_loop(0, num_rounds, body, init)


def _lookup_fwd_body(table_, rows_, *, route: _Routing):
  ids_ = _my_ids(rows_, route)  # [n]
  uniq_, inv_, starts_ = _dedup(ids_, route)
  n, c, dim = route.ids_per_device, route.capacity, table_.shape[1]
  owner_ = jnp.minimum(uniq_ // route.rows_per_shard, route.shards - 1)  # [n]
  pos_ = jnp.arange(n, dtype=jnp.int32) - starts_[owner_]  # place in the owner's bucket

  def one_round(r, uniq_rows_):
    first = r * c
    _, _, local_ = _window(uniq_, starts_[:-1] + first, starts_[1:], route)  # [S, c]
    asked_ = _all_to_all(local_, route)  # [S(requester), c]
    found_ = jnp.take(table_, asked_, axis=0, mode="clip")  # [S(requester), c, d]
    got_ = _all_to_all(found_, route)  # [S(owner), c, d]
    here_ = (pos_ >= first) & (pos_ < first + c)
    mine_ = got_[owner_, jnp.clip(pos_ - first, 0, c - 1)]  # [n, d]
    return jnp.where(here_[:, None], mine_, uniq_rows_)

  init = _varying(jnp.zeros((n, dim), table_.dtype), route)
  uniq_rows_ = _rounds(_num_rounds(starts_, route), one_round, init)  # [n, d]
  out_ = uniq_rows_[inv_]  # [n, d]
  if route.split_axes:
    out_ = jax.lax.all_gather(out_, route.split_axes, axis=0, tiled=True, to="invarying")  # [n*T, d]
  return out_, uniq_, inv_


def _lookup_bwd_body(grads_, uniq_, inv_, *, route: _Routing, dim: int, dtype):
  grads_ = _my_ids(grads_, route)  # [n, d]
  n, c = route.ids_per_device, route.capacity
  grads_ = jax.ops.segment_sum(grads_.astype(dtype), inv_, num_segments=n)  # per distinct id
  bounds = jnp.arange(route.shards + 1, dtype=uniq_.dtype) * route.rows_per_shard
  starts_ = jnp.searchsorted(uniq_, bounds, side="left").astype(jnp.int32)

  def one_round(r, dtable_):
    idx_, valid_, local_ = _window(uniq_, starts_[:-1] + r * c, starts_[1:], route)
    send_ = jnp.where(valid_[..., None], grads_[idx_], 0)  # [S(owner), c, d]
    rows_ = _all_to_all(local_, route).reshape(-1)  # [S*c]
    recv_ = _all_to_all(send_, route).reshape(-1, dim)  # [S*c, d]
    return dtable_.at[rows_].add(recv_, mode="drop")

  init = _varying(jnp.zeros((route.rows_per_shard, dim), dtype), route)
  return _rounds(_num_rounds(starts_, route), one_round, init)


def _lookup_specs(route: _Routing):
  table = PartitionSpec(spec_entry(route.table_axes), None)
  ids = PartitionSpec(spec_entry(route.batch_axes))
  out = PartitionSpec(spec_entry(route.batch_axes), None)
  per_device = PartitionSpec(spec_entry(route.table_axes))
  return table, ids, out, per_device


def _sharded_take_fwd_impl(route: _Routing, table, rows):
  table_spec, ids_spec, out_spec, per_device = _lookup_specs(route)
  body = jax.shard_map(functools.partial(_lookup_fwd_body, route=route), mesh=route.mesh,
                       in_specs=(table_spec, ids_spec), out_specs=(out_spec, per_device, per_device))
  return body(table, rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sharded_take(route: _Routing, table, rows):
  return _sharded_take_fwd_impl(route, table, rows)[0]


def _sharded_take_fwd(route, table, rows):
  out, uniq, inv = _sharded_take_fwd_impl(route, table, rows)
  return out, (uniq, inv)


def _sharded_take_bwd(route, residuals, grads):
  uniq, inv = residuals
  table_spec, _, out_spec, per_device = _lookup_specs(route)
  # The cotangent has the output's dtype and width, which are the table's.
  body = jax.shard_map(
      functools.partial(_lookup_bwd_body, route=route, dim=grads.shape[1], dtype=grads.dtype),
      mesh=route.mesh, in_specs=(out_spec, per_device, per_device), out_specs=table_spec)
  return body(grads, uniq, inv), None


_sharded_take.defvjp(_sharded_take_fwd, _sharded_take_bwd)


def sharded_lookup(table: jax.Array, rows: jax.Array, mesh=None, *,
                   capacity_factor: Optional[float] = 2.0) -> jax.Array:
  """Rows of a row-sharded table: table [R, d], rows [N] global int row ids -> [N, d].

  `rows` are already offset per head (the caller flattens [B, T, H] ids; any shape is flattened
  row-major and the result is `rows.shape + (d,)`). The table's rows are split over every mesh
  axis ("table_rows" rule); the ids and the result are split over the "batch" axes and replicated
  over the rest. `mesh` defaults to the context mesh (`jax.set_mesh`); with one device (or none)
  this is `jnp.take(table, rows, axis=0, mode="clip")`.

  Why a shard_map rather than `jnp.take` under jit: XLA partitions a gather from a row-sharded
  operand by all-gathering the ids and having every shard gather the rows it owns for all N ids,
  then all-reducing [N, d], so every device moves and adds N x d values whatever the mesh; and it
  partitions the transpose (the scatter-add into the table gradient) by scattering into a
  replicated [R, d] buffer that it then all-reduces: backward communication grows with the table,
  not the batch (both read off the compiled HLO on the 8-device CPU mesh). Here
  each device de-duplicates the ids it routes, sends each distinct id once to the shard that
  owns it (all_to_all over all mesh axes at once), the owner gathers locally, and the rows come
  back the same way. The backward (custom_vjp) sums the row gradients per distinct id, sends them
  to the owners and scatter-adds them into the owner's shard of the table gradient (repeated ids
  are summed, as `jnp.take`'s transpose does). That dense [R, d] table cotangent is still
  materialised (it is the param gradient); what shrinks is the communication.

  Bytes moved per lookup and device (S devices, ids split into n = N / S per device, U_s distinct
  on device s, u_so of them owned by shard o, c = slots per (device, owner) pair, k = rounds =
  ceil(max_{s,o} u_so / c), b = bytes per table element):
    forward:  k * S * c * 4 bytes of ids out + k * S * c * d * b bytes of rows back,
              plus (T - 1) * n * d * b for the all-gather of the result over the T devices that
              share a batch shard (the "tensor" axis);
    backward: k * S * c * (4 + d * b) bytes (ids and summed gradients to the owners);
    (each a fraction (S-1)/S over the network, the rest stays on the device), plus one scalar
    pmax per direction when several rounds are possible. The useful payload is U_s * (4 + d*b)
    each way; with capacity_factor=f, S * c ~ f * n, so the buffers are proportional to the ids
    routed (f ~ 2 makes one round the rule for uniformly hashed ids; lower f when n-gram repeats
    make U_s much smaller than n), whereas jnp.take under jit moves ~N * d * b per device.
    capacity_factor=None sets c = n: one round always, but S * n slots per device per round.

  Out-of-range ids are clamped to [0, R) (the gradient goes to the clamped
  row): a compiled program cannot raise, so range checks belong to the host, where the hasher
  produces ids below each head's size by construction.
  """
  num_rows, dim = table.shape
  shape = rows.shape
  flat = jnp.clip(rows.reshape(-1).astype(jnp.int32), 0, num_rows - 1)
  mesh = _resolve_mesh(mesh)
  if mesh is None:
    return jnp.take(table, flat, axis=0, mode="clip").reshape(shape + (dim,))
  route = _routing(mesh, num_rows, flat.shape[0], capacity_factor)
  padded = route.ids_per_device * route.shards - flat.shape[0]
  if padded:
    flat = jnp.pad(flat, (0, padded))  # row 0: read, sliced off; its zero cotangent adds nothing
  out = _sharded_take(route, table, flat)
  return out[:flat.shape[0] - padded].reshape(shape + (dim,))


# ----------------------------------------------------------------------------------------------
# Row-sparse (lazy) Adam for the tables: a step touches only the rows read in it.


class SparseAdamState(NamedTuple):
  """Lazy Adam state of one table: moments like the table and a step count per row."""

  m: jax.Array  # [R, d] first moment
  v: jax.Array  # [R, d] second moment
  count: jax.Array  # [R] int32: steps in which the row was read


def sparse_adam_init(table: jax.Array) -> SparseAdamState:
  """Zero moments and counts. Under jit the results follow the table's row sharding (or pass
  `sparse_adam_state_specs()` as out_shardings)."""
  return SparseAdamState(m=jnp.zeros_like(table), v=jnp.zeros_like(table),
                         count=jnp.zeros(table.shape[:1], jnp.int32))


def sparse_adam_state_specs() -> SparseAdamState:
  """PartitionSpecs of the state: moments and counts split by rows like the table."""
  rows = logical_to_spec(("table_rows", "table_dim"))
  return SparseAdamState(m=rows, v=rows, count=logical_to_spec(("table_rows",)))


def adam_rows_math(rows, m, v, count, grads, *, lr, b1, b2, eps):
  """Lazy Adam on gathered rows: rows, m, v [K, d], count [K] int32 and their summed gradients
  grads [K, d] -> the new (rows, m, v, count). The one place the update's arithmetic is written:
  the device update (`_adam_rows`) and the host update (host_training.py) both call it, so tables
  off the devices follow the same float32 operations in the same order.

  Each formula is optax.scale_by_adam's (eps_root = 0) followed by scale(-lr) and apply_updates.
  """
  count = jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count)  # optax.safe_increment
  m = (1 - b1) * grads + b1 * m
  v = (1 - b2) * (grads ** 2) + b2 * v
  m_hat = m / (1 - b1 ** count).astype(m.dtype)[:, None]
  v_hat = v / (1 - b2 ** count).astype(v.dtype)[:, None]
  step = (-lr) * (m_hat / (jnp.sqrt(v_hat) + eps))
  return (rows + step).astype(rows.dtype), m, v, count


def _adam_rows(table, state: SparseAdamState, ids, grads, *, lr, b1, b2, eps):
  """Lazy Adam at ids [K] (repeats summed; ids >= R ignored) with grads [K, d]; returns both.

  A row read every step follows optax.adam up to float rounding (XLA fuses the two programs
  differently; ~1 ulp of the update per step in float32). Reads and writes are gathers and
  scatters at K rows: with the table and state donated, XLA updates them in place and the step
  costs O(K d), not O(R d).
  """
  num_rows = table.shape[0]
  uniq, inv = jnp.unique(ids, size=ids.shape[0], fill_value=num_rows, return_inverse=True)
  grads = jax.ops.segment_sum(grads.astype(state.m.dtype), inv.reshape(-1), num_segments=ids.shape[0])
  take = lambda a: jnp.take(a, uniq, axis=0, mode="clip")  # noqa: E731 (padding reads row R-1, never written)
  rows, m, v, count = adam_rows_math(take(table), take(state.m), take(state.v), take(state.count), grads,
                                     lr=lr, b1=b1, b2=b2, eps=eps)
  write = lambda a, x: a.at[uniq].set(x.astype(a.dtype), mode="drop")  # noqa: E731
  return write(table, rows), SparseAdamState(m=write(state.m, m), v=write(state.v, v),
                                             count=write(state.count, count))


def _adam_body(table_, m_, v_, count_, rows_, grads_, lr, *, route: _Routing, hyper):
  """Route this device's (row, grad) pairs to the rows' owners and apply lazy Adam there.

  A row must be updated once, with the sum of every device's gradient for it. With c < n a
  bucket may need several rounds, and a row could then reach its owner in two rounds from two
  senders, so rounds are cut at a frontier instead of at bucket positions: every device sends
  the next c ids of each bucket; f[o] is the smallest id any device still holds back for owner o
  (or R); the owner applies Adam to the ids below f[o] it received, which are all the ids below
  f[o] any device has left (ids are sorted, each device's window covers everything below the id
  it holds back); ids at or above f[o] are sent again next round. The device that set f[o] had
  all its c ids accepted, so each round moves at least c ids per unfinished owner.
  """
  ids_ = _my_ids(rows_, route)  # [n]
  grads_ = _my_ids(grads_, route)  # [n, d]
  n, c, dim = route.ids_per_device, route.capacity, grads_.shape[1]
  uniq_, inv_, starts_ = _dedup(ids_, route)
  grads_ = jax.ops.segment_sum(grads_, inv_, num_segments=n)  # per distinct id
  end_ = starts_[1:]
  me = jax.lax.axis_index(route.table_axes)
  state_ = SparseAdamState(m_, v_, count_)

  def one_round(ptr_, table_, state_):
    idx_, valid_, local_ = _window(uniq_, ptr_, end_, route)  # [S, c]
    held_ = jnp.where(ptr_ + c < end_, uniq_[jnp.minimum(ptr_ + c, n - 1)], route.rows)  # [S]
    frontier = jnp.min(jax.lax.all_gather(held_, route.table_axes, to="invarying"), axis=0)  # [S]
    send_ = jnp.where(valid_[..., None], grads_[idx_], 0)
    got_rows_ = _all_to_all(local_, route)  # [S(sender), c] owner-local ids
    got_grads_ = _all_to_all(send_, route)  # [S(sender), c, d]
    accept_ = got_rows_ < frontier[me] - me * route.rows_per_shard
    got_rows_ = jnp.where(accept_, got_rows_, route.rows_per_shard).reshape(-1)
    table_, state_ = _adam_rows(table_, state_, got_rows_, got_grads_.reshape(-1, dim), lr=lr, **hyper)
    ptr_ = jnp.maximum(ptr_, jnp.minimum(jnp.searchsorted(uniq_, frontier).astype(jnp.int32), end_))
    return ptr_, table_, state_, jnp.any(frontier < route.rows)

  if route.single_round:
    _, table_, state_, _ = one_round(starts_[:-1], table_, state_)
  else:
    def cond(carry):
      return carry[-1]

    def body(carry):
      return one_round(*carry[:-1])

    _, table_, state_, _ = jax.lax.while_loop(cond, body, (starts_[:-1], table_, state_, jnp.bool_(True)))
  return (table_,) + tuple(state_)


def sparse_adam_update(table: jax.Array, state: SparseAdamState, rows: jax.Array, row_grads: jax.Array, *,
                       lr, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, mesh=None,
                       capacity_factor: Optional[float] = 2.0) -> Tuple[jax.Array, SparseAdamState]:
  """One lazy Adam step at the rows read: table [R, d], rows [N] ids, row_grads [N, d].

  `rows` are the global row ids read this step (repeats allowed: their gradients are summed, as
  the table's dense gradient would sum them), `row_grads` the gradients w.r.t. the rows gathered
  for them (the cotangent of `sharded_lookup`'s output). `lr` is a float or a scalar array (a
  schedule evaluated by the caller at the global step). Ids are clamped to [0, R) like the lookup.

  Semantics (lazy Adam, as TF's LazyAdam and PyTorch's SparseAdam): a row's m and v decay, its
  step count advances and the row moves only in steps that read it; bias correction uses the
  row's own count. A row read every step therefore follows dense Adam exactly (optax.adam, same
  hyper-parameters); a row read rarely keeps its stale moments instead of decaying them and
  taking momentum steps with zero gradient, as dense Adam would. Rows not read stay bit-identical,
  parameters and state. Why not dense Adam: its step reads and writes 3 R d values whatever the
  batch, which at the paper's table sizes dwarfs the rest of the step.

  Jit it with the table and state donated (`jax.jit(..., donate_argnums=(0, 1))`) so the scatters
  write in place: the step then costs O(N d), independent of R.

  Sharded tables (a mesh from the argument or context with more than one device): a shard_map
  over all mesh axes sends each device's distinct (row, summed gradient) pairs to the rows'
  owners with all_to_all, in the same buckets as `sharded_lookup`'s backward (rounds, when a
  bucket outgrows c, are cut at a frontier so that every row is still updated once with all its
  gradient; see `_adam_body`), and each owner updates its own rows in place. Without it (no mesh, table sharded by jit), XLA partitions the gathers
  and scatters itself: the compiled HLO has no all-gather of the table, so the scatters do stay
  local, but the N ids are all-gathered, the de-duplicating sort runs on all N ids on every
  device, and the gathered rows, moments and summed gradients are all-reduced as [N, d] arrays,
  so every device does (and moves) the whole step's work rather than 1/S of it.
  """
  num_rows, dim = table.shape
  flat = jnp.clip(rows.reshape(-1).astype(jnp.int32), 0, num_rows - 1)
  grads = row_grads.reshape(flat.shape[0], dim)
  hyper = dict(b1=b1, b2=b2, eps=eps)
  mesh = _resolve_mesh(mesh)
  if mesh is None:
    return _adam_rows(table, state, flat, grads, lr=lr, **hyper)
  route = _routing(mesh, num_rows, flat.shape[0], capacity_factor)
  padded = route.ids_per_device * route.shards - flat.shape[0]
  if padded:  # padding reads row 0 with a zero gradient: it must not count as a read
    flat = jnp.pad(flat, (0, padded), constant_values=num_rows)
    grads = jnp.pad(grads, ((0, padded), (0, 0)))
  table_spec, ids_spec, grads_spec, _ = _lookup_specs(route)
  count_spec = PartitionSpec(spec_entry(route.table_axes))
  body = jax.shard_map(
      functools.partial(_adam_body, route=route, hyper=hyper), mesh=mesh,
      in_specs=(table_spec, table_spec, table_spec, count_spec, ids_spec, grads_spec, PartitionSpec()),
      out_specs=(table_spec, table_spec, table_spec, count_spec))
  table, m, v, count = body(table, state.m, state.v, state.count, flat, grads, jnp.asarray(lr, jnp.promote_types(table.dtype, jnp.float32)))
  return table, SparseAdamState(m, v, count)


# ----------------------------------------------------------------------------------------------
# Writing updates: lazy Adam over every table.


def sparse_init(tables: Dict[str, jax.Array]) -> Dict[str, SparseAdamState]:
  """{table name: zero lazy Adam state} (moments like the table, a step count per row)."""
  return {name: sparse_adam_init(table) for name, table in tables.items()}


def sparse_state_shardings(table_shardings: Dict[str, jax.sharding.NamedSharding]) -> Dict[str, SparseAdamState]:
  """Shardings of `sparse_init`'s state from the tables' shardings: moments and counts split by rows."""
  count = lambda s: jax.sharding.NamedSharding(s.mesh, sparse_adam_state_specs().count)  # noqa: E731
  return {name: SparseAdamState(m=s, v=s, count=count(s)) for name, s in table_shardings.items()}


def sparse_update(tables: Dict[str, jax.Array], states: Dict[str, SparseAdamState], cfg: EngramConfig,
                  engram_ids: jax.Array, row_grads: Dict[str, jax.Array], *, lr, b1: float, b2: float,
                  eps: float) -> Tuple[Dict[str, jax.Array], Dict[str, SparseAdamState]]:
  """One lazy Adam step of every table at the rows read: engram_ids [..., num_layers, H] (any leading
  axes, e.g. micro-batches), row_grads {table name: [..., H, head_dim]} (the gradient with respect to
  `gather`'s output). See `sparse_adam_update` for the semantics."""
  ids = row_ids(cfg, engram_ids)
  new_tables, new_states = {}, {}
  for name, table in tables.items():
    d = table.shape[-1]
    new_tables[name], new_states[name] = sparse_adam_update(
        table, states[name], ids[name].reshape(-1), row_grads[name].reshape(-1, d).astype(table.dtype),
        lr=lr, b1=b1, b2=b2, eps=eps)
  return new_tables, new_states
