"""Where a program's Engram rows come from: one row source, chosen once from the placement.

Every program that runs the model (the runner's forward, generation's prefill and decode steps, the
train and eval steps) consumes Engram rows {table name: [B, T, H, d]}, never tables (model.py). How
those rows are read depends on where the tables live, and that is decided here, once:

  DeviceRows  the tables are in the params on the devices. Nothing happens before the program; in
              it, `memory.gather` reads them (a sharded lookup on a mesh).
  HostRows    the tables are in host RAM or memory-mapped files (`HostTables`), optionally
              with a hot-row cache on the devices (`HotRowCache`). Before the program the
              host gathers the batch's distinct rows minus the cache (`batch.prepare_rows`) and
              places them on the batch's devices; in it, `batch.assemble_rows` builds the rows
              from them and the cache. With several processes each contributes the rows it owns.

Whatever the placement, a caller does the same three things:

  feed = source.rows_for(engram_ids, mask=..., pad_to=...)  host side, before the program
  program(source.params(params), ..., feed, source.operand())
  rows = source.rows(params, feed, operand, engram_ids)      inside the program

Knowledge-patch triggers (`tables/triggers.py`) sit on top of every placement alike: the source
holds the applied `TriggerSet` (`set_triggers`); the host side gives each batch position its trigger
id (`trigger_ids`: exact token matching), the program takes `trigger_operand()` and replaces the
rows of the triggered positions (`with_triggers`), so every family and placement reads them the
same way and a position without a trigger reads exactly the base rows.

Training reads device rows the same way, and host rows through `host_training.RowFeed` (the same
host gather, a step ahead, kept exact under the updates in between); it writes rows back with the
table half of the optimizer, lazy Adam (`memory.adam_rows_math`): in the step for device tables, on
the host for host tables (`trainer._HostTableInputs.apply_row_update`).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import memory
from engram_jax.config import ModelConfig
from engram_jax.sharding import batch_devices, batch_sharding
from engram_jax.tables import batch as batch_rows
from engram_jax.tables import triggers as trigger_lib
from engram_jax.tables.host import HitCounter, HostTables, HotRowCache
from engram_jax.tables.quant import bytes_per_row


class RowSource:
  """The interface (module docstring). `placement` is "device", "host" or "disk"; `tables` the host
  tables (None on the device), `cache` the placed hot-row cache (None: none); `hit_counter` counts
  the cache's hits over the batches `rows_for` prepared."""

  placement = "device"
  tables: Optional[HostTables] = None
  cache: Optional[HotRowCache] = None
  ids_in_graph = True  # whether `rows` reads the hash ids in the program (else they need not cross)
  triggers: Optional[trigger_lib.TriggerSet] = None  # knowledge-patch triggers applied (None: none)

  def __init__(self, cfg: ModelConfig, mesh):
    self.cfg = cfg
    self.mesh = mesh
    self.dtype = jnp.dtype(cfg.dtype)
    self.hit_counter = HitCounter()
    self._triggers_placed = None

  def set_triggers(self, triggers: Optional[trigger_lib.TriggerSet]):
    """The triggers every program reads from now on (None or empty: none), replicated on the mesh."""
    if triggers is not None and not len(triggers):
      triggers = None
    self.triggers = triggers
    if triggers is None:
      self._triggers_placed = None
      return
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self._triggers_placed = jax.device_put({"tokens": triggers.tokens,
                                            "rows": {n: v.astype(self.dtype) for n, v in triggers.rows.items()}},
                                           replicated)

  def trigger_operand(self):
    """What a program reading triggers takes: {"tokens" [N, width], "rows" {name: [N, H, d]}} or None."""
    return self._triggers_placed

  def trigger_ids(self, tokens: np.ndarray, segment_ids: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Host side: each position's trigger (int32 [b, T], -1: none), or None without triggers."""
    if self.triggers is None:
      return None
    return trigger_lib.match(tokens, segment_ids, self.triggers.tokens, self.triggers.lookup)

  @staticmethod
  def with_triggers(rows, trigger_ids, trigger_operand):
    """In-graph: `rows` with the triggered positions' rows replaced (unchanged without triggers)."""
    if trigger_operand is None or rows is None:
      return rows
    return trigger_lib.select(rows, trigger_ids, trigger_operand["rows"])

  def params(self, params):
    """The params the programs take: all of them, or the backbone where the tables live elsewhere."""
    return params

  def rows_for(self, engram_ids: np.ndarray, mask: Optional[np.ndarray] = None, pad_to: int = 0):
    """Host side: what a program needs, besides the params and `operand()`, to read the rows of this
    process's hash ids [b, T, L, H] (b a multiple of its batch devices). `mask` [b, T] marks the
    positions the hit counter counts (default: all); `pad_to` pads the distinct rows per shard to at
    least this many (one shape whatever the ids). A collective with several processes: every process
    must call it for the same batches in the same order."""
    return None

  def set_cache(self, cache: Optional[HotRowCache]):
    """Replaces the hot-row cache (None: none) and resets the hit counts."""
    if cache is not None:
      raise ValueError("a hot-row cache caches host tables: these tables are on the device")

  def operand(self):
    """What every program reading through this source takes as an argument (the cache's rows)."""
    return None

  def rows(self, params, feed, operand, engram_ids) -> Dict[str, jax.Array]:
    """In-graph: {table name: rows [B, T, H, d]} (the tables' dtype from the device; host rows
    dequantized to the model's dtype)."""
    raise NotImplementedError

  def report(self) -> dict:
    """results.json's "engram_tables": placement, storage, bytes per row and the cache's hit rates."""
    return {"placement": self.placement, "quantize": None, "bytes_per_row": None, "cache": None}

  def patch(self, params, hashing, patches, *, policy: str, force: bool, log: Callable[[str], None]):
    """Applies knowledge patch directories to the tables this source reads: (params, undo, report);
    `undo(params)` returns the params with the base rows read again, exactly."""
    raise NotImplementedError


class DeviceRows(RowSource):
  """Tables in the params on the devices, read in-graph (`memory.gather`)."""

  def rows(self, params, feed, operand, engram_ids):
    if self.cfg.engram is None:
      return None
    return memory.gather(memory.split(params)[1], self.cfg.engram, engram_ids)  # sharded on the context mesh

  def patch(self, params, hashing, patches, *, policy, force, log):
    from engram_jax import patches as patches_lib

    params, undo, report = patches_lib.apply_patches(params, self.cfg, hashing, list(patches), policy=policy,
                                                     force=force, log=log)
    return params, lambda p: patches_lib.revert(p, undo), report


class HostRows(RowSource):
  """Host or disk tables (and a hot-row cache of them on every device): rows gathered on the host."""

  ids_in_graph = False

  def __init__(self, cfg: ModelConfig, mesh, tables: HostTables,
               cache: Optional[HotRowCache] = None):
    super().__init__(cfg, mesh)
    if cfg.engram is None:
      raise ValueError("host tables were given but the model has no Engram layers (model.engram is None)")
    self.tables = tables
    self.placement = tables.placement
    self.set_cache(cache)

  def set_cache(self, cache: Optional[HotRowCache]):
    """The hot-row cache, placed on every device of the mesh (None: none); resets the hit counts."""
    self.cache = cache.place(self.mesh) if cache is not None else None
    self._operand = None if self.cache is None else {n: (self.cache.rows[n], self.cache.scales[n])
                                                     for n in self.cache.ids}
    self.hit_counter.reset()

  def params(self, params):
    return memory.split(params)[0]

  def operand(self):
    return self._operand

  def gather(self, engram_ids, mask=None, pad_to=0) -> Dict[str, dict]:
    """One process: `rows_for`'s arrays on the host (`batch_rows.prepare_rows`: per table the index
    [b, T, H] and the distinct missed rows [S, U, d] of each of the S batch shards, plus their scales
    when quantized), counted by the hit counter."""
    return batch_rows.prepare_rows(self.tables, self.cache, engram_ids, batch_devices(self.mesh), mask=mask,
                                   counter=self.hit_counter, pad_to=pad_to)

  def gather_shapes(self, batch: int, length: int, pad_to: int) -> Dict[str, dict]:
    """The shapes `gather` returns for hash ids [batch, length, L, H] when the distinct rows are padded
    to `pad_to` (at least as many as a shard's lookups, so no batch needs more)."""
    shards, H = batch_devices(self.mesh), self.cfg.engram.num_heads
    U = batch_rows.row_bucket(pad_to)
    out = {}
    for name in self.tables.names:
      entry = {"index": jax.ShapeDtypeStruct((batch, length, H), jnp.int32),
               "rows": jax.ShapeDtypeStruct((shards, U, self.cfg.engram.head_dim), self.tables.rows[name].dtype)}
      if self.tables.scales[name] is not None:
        entry["scale"] = jax.ShapeDtypeStruct((shards, U), jnp.float32)
      out[name] = entry
    return out

  def rows_for(self, engram_ids, mask=None, pad_to=0):
    if jax.process_count() > 1:
      return self._contributions(np.asarray(engram_ids), pad_to)
    host = self.gather(engram_ids, mask, pad_to)
    # One call for every array: less per-step overhead when decoding.
    return jax.device_put(host, {n: {k: batch_sharding(self.mesh, v.ndim) for k, v in e.items()}
                                 for n, e in host.items()})

  def _contributions(self, local_ids: np.ndarray, pad_to: int):
    """Several processes: every process gathers the global batch's hash ids (a small int32
    all-gather), finds the same distinct rows per global batch shard, and contributes the rows it owns
    as one device's slice of a [devices, S, U, d] array (zeros on its other devices: `parts`);
    `batch.owned_rows` sums over devices. Tables whole on every process: process 0 contributes them."""
    from jax.experimental import multihost_utils

    b = local_ids.shape[0]
    glob = np.asarray(multihost_utils.process_allgather(local_ids, tiled=True))  # [B, T, L, H] global
    host = batch_rows.prepare_rows(self.tables, self.cache, glob, batch_devices(self.mesh), pad_to=pad_to)
    pi = jax.process_index()
    owner = self.tables.row_range is not None or pi == 0
    out = {}
    for name, entry in host.items():
      placed = {"index": jax.make_array_from_process_local_data(batch_sharding(self.mesh, 3),
                                                                entry["index"][pi * b:(pi + 1) * b])}
      for key, part in (("rows", "parts"), ("scale", "part_scales")):
        if key in entry:
          placed[part] = batch_rows.place_contribution(self.mesh, entry[key], owner)
      out[name] = placed
    return out

  def rows(self, params, feed, operand, engram_ids):
    return batch_rows.assemble_rows(feed, operand, self.dtype)

  def report(self) -> dict:
    out = {"placement": self.placement, "quantize": self.tables.quantize,
           "bytes_per_row": bytes_per_row(self.tables.quantize, self.cfg.engram.head_dim), "cache": None}
    if self.tables.source_check is not None:  # a table directory: where it came from, whether it matched
      out["table_dir"] = self.tables.source_check
    if self.cache is not None:
      out["cache"] = self.hit_counter.report(self.cfg.engram, self.cache.size)
    return out

  def patch(self, params, hashing, patches, *, policy, force, log):
    """Patched rows become an overlay the host gather reads instead of the base rows (the table files
    are never written); stacking on an earlier patch keeps its rows unless these replace them."""
    from engram_jax import patches as patches_lib

    host = self.tables
    if self.cache is not None:
      raise patches_lib.PatchError("knowledge patches with a hot-row cache on the devices are not supported (the "
                                   "cached rows would be the unpatched ones): use cache_rows=0")
    if host.row_range is not None:
      raise patches_lib.PatchError("knowledge patches on host tables split over several processes are not "
                                   "supported: apply them with engram_tables='device'")
    num_rows = {name: int(host.rows[name].shape[0]) for name in host.names}
    changes, report = patches_lib.resolve_patches(self.cfg, hashing, list(patches), host.read_float, num_rows,
                                                  policy=policy, force=force)
    before = dict(host.overlay)
    for name, rows in changes.items():
      ids, values = rows.ids, rows.new
      if name in host.overlay:
        old_ids = host.overlay[name][0]
        keep = ~np.isin(old_ids, rows.ids)
        ids = np.concatenate([old_ids[keep], rows.ids])
        values = np.concatenate([host.read_float(name, old_ids[keep]), rows.new])
      host.set_overlay(name, ids, values)
      log(f"{name}: {len(rows.ids)} rows patched ({self.placement} tables, read through an overlay)")

    def undo(p):
      host.overlay = before
      return p

    return params, undo, report


def build_row_source(cfg: ModelConfig, mesh, tables: Optional[HostTables] = None,
                     cache: Optional[HotRowCache] = None) -> RowSource:
  """The row source of a placement: `tables` None keeps them on the devices (in the params)."""
  if tables is None:
    if cache is not None:
      raise ValueError("a hot-row cache caches host tables: pass tables= (placement 'host' or 'disk') with it")
    return DeviceRows(cfg, mesh)
  return HostRows(cfg, mesh, tables, cache)
