"""Engram tables in host RAM or memory-mapped files, the hot-row cache of them on the devices, and
its hit counter.

Engram's addresses depend only on the input tokens, so the rows a step reads are known before the
step runs. With placement "host" (numpy arrays in RAM) or "disk" (`np.memmap` of the table files:
the OS page cache is then the DRAM tier above the disk) the tables never reach an accelerator: the
host gathers the rows of a batch (`batch.prepare_rows`) and the program assembles them
(`batch.assemble_rows`); `source.HostRows` does both for its callers.

The hot-row cache (`HotRowCache`) holds, per table, the K rows read most often in a reference sample
(by default the start of the training split), replicated on every device, chosen once: a static
top-K by frequency. Measured against the alternatives on the same stream (bench/bench_offload.py,
BENCHMARKS.md), counting what crosses per batch (distinct missed rows): an LRU updated per batch
sends more rows at every size, and a top-K refreshed with every batch's counts saves under 3%, not
worth updating the device copy in step with the prefetch thread.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Mapping, Optional, Tuple

import jax
import numpy as np

from engram_jax import memory
from engram_jax.config import EngramConfig, ModelConfig
from engram_jax.tables.files import MANIFEST, TableFileError, check_manifest, read_manifest, sha256_file
from engram_jax.tables.quant import QUANTIZATIONS, SCALED, STORAGE, check_quantize, dequantize, quantize_rows

PLACEMENTS = ("device", "host", "disk")


def available_memory() -> Optional[int]:
  """Bytes of RAM available to new allocations (Linux MemAvailable), or None where unknown."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


@dataclasses.dataclass
class HostTables:
  """The Engram tables of a model on the host: numpy arrays (`host`) or memory maps (`disk`).

  `rows[name]` [R, d] in the storage dtype, `scales[name]` float32 [R] for int8 / float8 (else None).
  With several processes (`row_range`), a process holds only rows [lo, hi) of each table (a
  contiguous range per process; `rows[name]` is then that range). Every process hashes the same
  global batch, finds the same distinct rows per batch shard, fills in the ones it owns (zeros
  elsewhere) and the devices add the processes' contributions (`assemble_rows`): each row is
  reassembled exactly, from its one owner.
  """

  cfg: EngramConfig
  placement: str
  quantize: str
  rows: Dict[str, np.ndarray]
  scales: Dict[str, Optional[np.ndarray]]
  directory: Optional[str] = None
  # Where the table directory came from, checked against the checkpoint restored (files.check_source).
  source_check: Optional[dict] = None
  row_range: Optional[Dict[str, Tuple[int, int]]] = None
  # Knowledge patches: {name: (sorted global row ids [K], stored rows [K, d], scales [K] or None)}
  # read instead of the base rows (which, memory-mapped or not, are never written).
  overlay: Dict[str, Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = dataclasses.field(default_factory=dict)

  def read_float(self, name: str, flat_ids: np.ndarray) -> np.ndarray:
    """The rows at global ids as float32 [n, d] (dequantized, overlay applied); every row must be held."""
    rows = self.take(name, flat_ids)
    scale = None if self.scales[name] is None else self.take_scale(name, flat_ids)
    return np.asarray(dequantize(rows, scale, np.float32))

  def set_overlay(self, name: str, ids: np.ndarray, values: np.ndarray):
    """Rows `ids` read as `values` (float [K, d], stored in this table's kind) from now on."""
    order = np.argsort(ids)
    rows, scale = quantize_rows(np.asarray(values)[order], self.quantize)
    self.overlay[name] = (np.asarray(ids, np.int64)[order], rows, scale)

  def _overlaid(self, name: str, flat_ids: np.ndarray, out: np.ndarray, which: int) -> np.ndarray:
    if name not in self.overlay:
      return out
    ids = self.overlay[name][0]
    pos = np.minimum(np.searchsorted(ids, flat_ids), len(ids) - 1)
    hit = ids[pos] == flat_ids
    hit &= self.owns(name, flat_ids)  # only the owner contributes a row
    if hit.any():
      out = np.array(out, copy=True)
      out[hit] = self.overlay[name][which][pos[hit]]
    return out

  @property
  def names(self) -> Tuple[str, ...]:
    return memory.table_names(self.cfg)

  @property
  def nbytes(self) -> int:
    return int(sum(r.nbytes for r in self.rows.values()) +
               sum(s.nbytes for s in self.scales.values() if s is not None))

  @classmethod
  def from_arrays(cls, cfg: EngramConfig, tables: Mapping[str, np.ndarray], quantize: str = "float32",
                  placement: str = "host") -> "HostTables":
    """Tables given as float arrays {name: [R, d]} (e.g. `memory.split(params)[1]` fetched to the host)."""
    rows, scales = {}, {}
    for name in memory.table_names(cfg):
      if name not in tables:
        raise TableFileError(f"tables {sorted(tables)} lack {name!r}: the model's Engram layers are {cfg.layer_ids}")
      rows[name], scales[name] = quantize_rows(np.asarray(tables[name]), quantize)
    return cls(cfg, placement, quantize, rows, scales)

  @classmethod
  def open(cls, table_dir: str, cfg: ModelConfig, fingerprint: str, placement: str = "disk", *,
           quantize: Optional[str] = None, verify: bool = False, process_index: Optional[int] = None,
           process_count: Optional[int] = None) -> "HostTables":
    """Opens a table directory for `placement` "host" (read into RAM) or "disk" (memory-mapped).

    Checks the manifest against the model (fingerprint, tables, rows, width), every file's size
    (and, with `verify`, its sha256), that `quantize` (if given) is the stored one, and for "host"
    that the bytes to read fit in the available RAM. With several processes each holds the row
    range `process_rows` gives it.
    """
    if placement not in ("host", "disk"):
      raise ValueError(f"placement={placement!r}: table files are opened for 'host' or 'disk'")
    manifest = read_manifest(table_dir)
    check_manifest(manifest, table_dir, cfg, fingerprint)
    stored = manifest.get("quantize")
    if stored not in QUANTIZATIONS:
      raise TableFileError(f"table directory {table_dir!r}: quantize {stored!r} in {MANIFEST}; expected one of "
                           f"{QUANTIZATIONS}")
    if quantize is not None and check_quantize(quantize) != stored:
      raise TableFileError(f"table directory {table_dir!r} holds {stored} rows but quantize={quantize!r} was asked: "
                           f"export the tables again with --quantize {quantize}")
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    plan = {}
    for name, entry in manifest["tables"].items():
      lo, hi = process_rows(entry["rows"], pi, pc)
      for kind in ("rows", "scale"):
        if kind == "scale" and stored not in SCALED:
          continue
        info = entry.get("files", {}).get(kind)
        if info is None:
          raise TableFileError(f"table directory {table_dir!r}: {MANIFEST} lists no {kind} file for {name}")
        path = os.path.join(table_dir, info["name"])
        itemsize = 4 if kind == "scale" else STORAGE[stored].itemsize
        width = 1 if kind == "scale" else entry["dim"]
        expected = entry["rows"] * width * itemsize
        if not os.path.isfile(path):
          raise TableFileError(f"table directory {table_dir!r} lacks {info['name']} (listed in {MANIFEST})")
        size = os.path.getsize(path)
        if size != expected or size != info.get("bytes"):
          raise TableFileError(f"table directory {table_dir!r}: {info['name']} has {size} bytes; expected {expected} "
                               f"({entry['rows']} rows x {width} x {itemsize} bytes): truncated or not this table")
        if verify and sha256_file(path) != info.get("sha256"):
          raise TableFileError(f"table directory {table_dir!r}: {info['name']} does not match its sha256 in "
                               f"{MANIFEST} (modified or damaged)")
        plan[(name, kind)] = (path, lo, hi, width, itemsize)
    if placement == "host":
      need = sum((hi - lo) * width * itemsize for path, lo, hi, width, itemsize in plan.values())
      free = available_memory()
      if free is not None and need > free:
        raise MemoryError(f"placement 'host' needs {need / 2**30:.2f} GiB of RAM for the tables of {table_dir!r} but "
                          f"only {free / 2**30:.2f} GiB is available: use placement 'disk' (memory-mapped) or a "
                          f"quantized export")
    rows, scales = {}, {}
    for (name, kind), (path, lo, hi, width, itemsize) in plan.items():
      dtype = np.dtype(np.float32) if kind == "scale" else STORAGE[stored]
      shape = (hi - lo,) if kind == "scale" else (hi - lo, width)
      mapped = np.memmap(path, dtype=dtype, mode="r", offset=lo * width * itemsize, shape=shape)
      if placement == "disk":
        random_access(mapped)
      array = mapped if placement == "disk" else np.array(mapped)
      (rows if kind == "rows" else scales)[name] = array
    for name in rows:
      scales.setdefault(name, None)
    ranges = None
    if pc > 1:
      ranges = {name: process_rows(manifest["tables"][name]["rows"], pi, pc) for name in rows}
    return cls(cfg.engram, placement, stored, rows, scales, directory=table_dir, row_range=ranges)

  def gather(self, engram_ids: np.ndarray) -> Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]]:
    """{table name: (stored rows [..., H, d], scales [..., H] or None)} for hash ids [..., L, H]: the
    host version of `memory.gather` (undequantized). Needs every row (one process, no row_range)."""
    if self.row_range is not None:
      raise ValueError("HostTables.gather needs every row; this process holds a row range (use prepare)")
    ids = memory.row_ids(self.cfg, np.asarray(engram_ids))
    out = {}
    for name in self.names:
      flat = np.asarray(ids[name]).reshape(-1).astype(np.int64)
      rows = self.take(name, flat)
      scale = None if self.scales[name] is None else self.scales[name][flat]
      out[name] = (rows.reshape(ids[name].shape + rows.shape[-1:]),
                   None if scale is None else scale.reshape(ids[name].shape))
    return out

  def owns(self, name: str, flat_ids: np.ndarray) -> np.ndarray:
    """Whether this process holds each global row id (every row, without a row range)."""
    if self.row_range is None:
      return np.ones(np.shape(flat_ids), bool)
    lo, hi = self.row_range[name]
    return (flat_ids >= lo) & (flat_ids < hi)

  def take(self, name: str, flat_ids: np.ndarray) -> np.ndarray:
    """Rows at int64 global row ids [n] -> [n, d]. With a row range (several processes), rows outside
    this process's range come back as zeros: the owner of each row contributes it (`assemble_rows` adds them)."""
    return self._overlaid(name, flat_ids, self._take_owned(name, self.rows[name], flat_ids), 1)

  def take_scale(self, name: str, flat_ids: np.ndarray) -> np.ndarray:
    """The scales [n] of those rows (int8 / float8 tables), zeros where `take` gives zeros."""
    return self._overlaid(name, flat_ids, self._take_owned(name, self.scales[name], flat_ids), 2)

  def _take_owned(self, name: str, array: np.ndarray, flat_ids: np.ndarray) -> np.ndarray:
    if self.row_range is None:
      return self._take(array, flat_ids)
    own = self.owns(name, flat_ids)
    out = np.zeros((len(flat_ids),) + array.shape[1:], array.dtype)
    out[own] = self._take(array, flat_ids[own] - self.row_range[name][0])
    return out

  def _take(self, array, flat_ids):
    if self.placement == "disk" and len(flat_ids) > 1:
      # Reading a memory map in address order turns random page faults into mostly forward reads.
      order = np.argsort(flat_ids, kind="stable")
      out = np.empty((len(flat_ids),) + array.shape[1:], array.dtype)
      out[order] = array[flat_ids[order]]
      return out
    return array[flat_ids]


def random_access(mapped: np.memmap):
  """Tells the kernel a memory-mapped table is read at random (MADV_RANDOM): a page fault then reads
  its page alone instead of the default readahead (128 KiB around a row of tens of bytes)."""
  import mmap

  base = getattr(mapped, "_mmap", None)
  if base is not None and hasattr(base, "madvise") and hasattr(mmap, "MADV_RANDOM"):
    base.madvise(mmap.MADV_RANDOM)


def process_rows(rows: int, process_index: int, process_count: int) -> Tuple[int, int]:
  """[lo, hi): the contiguous rows of a table process `process_index` holds (near-equal ranges)."""
  per = -(-rows // process_count)
  return min(rows, process_index * per), min(rows, (process_index + 1) * per)


@dataclasses.dataclass
class HotRowCache:
  """The K most-read rows of each table, on every device.

  ids[name]: sorted global row ids int64 [K]; rows/scales: their stored rows [K, d] (and scales [K])
  as device arrays replicated over the mesh (`place`). The host maps a row id to its slot with
  `np.searchsorted` on the sorted ids: no map of the table's size.
  """

  ids: Dict[str, np.ndarray]
  rows: Dict[str, object]
  scales: Dict[str, Optional[object]]

  @property
  def size(self) -> int:
    return max((len(v) for v in self.ids.values()), default=0)

  @classmethod
  def build(cls, tables: HostTables, reference_ids: np.ndarray, rows_per_table: int) -> "HotRowCache":
    """Top `rows_per_table` rows of each table by how often `reference_ids` [..., L, H] (hash ids of a
    reference text) read them; ties go to the smaller row id. Only rows the sample reads qualify."""
    if not isinstance(rows_per_table, int) or rows_per_table < 1:
      raise ValueError(f"rows_per_table={rows_per_table!r}: expected a positive integer")
    if tables.row_range is not None:
      raise ValueError("a hot-row cache needs every row of the tables on this process (one process)")
    ids = memory.row_ids(tables.cfg, np.asarray(reference_ids))
    out_ids, rows, scales = {}, {}, {}
    for name in tables.names:
      uniq, counts = np.unique(np.asarray(ids[name]).reshape(-1).astype(np.int64), return_counts=True)
      top = np.lexsort((uniq, -counts))[:rows_per_table]
      chosen = np.sort(uniq[top])
      out_ids[name] = chosen
      rows[name] = tables.rows[name][chosen]
      scales[name] = None if tables.scales[name] is None else tables.scales[name][chosen]
    return cls(out_ids, rows, scales)

  def place(self, mesh) -> "HotRowCache":
    """The cache with its rows on every device of `mesh` (replicated), padded to one common K."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    k = max(1, self.size)
    rows, scales = {}, {}
    for name, r in self.rows.items():
      r = np.asarray(r)
      pad = k - len(r)
      rows[name] = jax.device_put(np.concatenate([r, np.zeros((pad,) + r.shape[1:], r.dtype)]), sharding)
      if self.scales[name] is not None:
        s = np.asarray(self.scales[name])
        scales[name] = jax.device_put(np.concatenate([s, np.zeros((pad,), s.dtype)]), sharding)
      else:
        scales[name] = None
    return HotRowCache(self.ids, rows, scales)

  def slots(self, name: str, flat_ids: np.ndarray) -> np.ndarray:
    """Slot of each id in the cache, or -1 for a miss."""
    cached = self.ids[name]
    if not len(cached):
      return np.full(flat_ids.shape, -1, np.int64)
    pos = np.minimum(np.searchsorted(cached, flat_ids), len(cached) - 1)
    return np.where(cached[pos] == flat_ids, pos, -1)


@dataclasses.dataclass
class HitCounter:
  """Cache hits and lookups per table and head (real tokens only), summed over prepared batches."""

  hits: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  lookups: Dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def add(self, name: str, hit: np.ndarray, mask: np.ndarray):
    """hit: bool [..., H]; mask: bool [...] (real tokens)."""
    h = hit[mask].reshape(-1, hit.shape[-1])
    self.hits[name] = self.hits.get(name, 0) + h.sum(axis=0).astype(np.int64)
    self.lookups[name] = self.lookups.get(name, 0) + np.full(hit.shape[-1], h.shape[0], np.int64)

  def reset(self):
    self.hits.clear()
    self.lookups.clear()

  def report(self, cfg: EngramConfig, rows_per_table: int) -> dict:
    """{"rows_per_table", "layers": [{"layer", "hit_rate", "lookups", "orders": [{"n", "hit_rate"}]}]}
    (a head of order n is one of the n_head_per_ngram heads of that order, in the hasher's order)."""
    layers = []
    for layer in cfg.layer_ids:
      name = memory.table_name(layer)
      hits = np.asarray(self.hits.get(name, np.zeros(cfg.num_heads, np.int64)))
      looks = np.asarray(self.lookups.get(name, np.zeros(cfg.num_heads, np.int64)))
      orders = []
      for i in range(cfg.num_orders):
        sl = slice(i * cfg.n_head_per_ngram, (i + 1) * cfg.n_head_per_ngram)
        total = int(looks[sl].sum())
        orders.append({"n": i + 2, "hit_rate": float(hits[sl].sum() / total) if total else None})
      total = int(looks.sum())
      layers.append({"layer": layer, "hit_rate": float(hits.sum() / total) if total else None, "lookups": total,
                     "orders": orders})
    return {"rows_per_table": int(rows_per_table), "layers": layers}
