"""Engram tables off the accelerator: host RAM or a memory-mapped file, a hot-row cache on the
devices, quantized rows, and the table file format (export, open, verify).

Engram's addresses depend only on the input tokens, so the rows a step reads are known before the
step runs. With `placement="host"` (numpy arrays in RAM) or `"disk"` (`np.memmap` of the table
files: the OS page cache is then the DRAM tier above the disk) the tables never reach an
accelerator: the host gathers the rows of a batch (`HostTables.prepare`), the runner places them
on the batch's devices and the jitted forward assembles them (`assemble_rows`) and passes them to
the model as `rows` (model.forward). `placement="device"` keeps today's in-graph `memory.gather`.

What crosses to the devices per batch and table (`prepare_rows`): the distinct rows the batch reads
that are not in the hot-row cache, once per batch shard ([S, U, d], U padded up to a power of two
so only a handful of shapes ever compile), and an int32 index [B, T, H] into "cache rows, then
this shard's rows". Repeated n-grams (frequent: the traffic is Zipfian) therefore cross once, and
rows in the cache not at all. With quantized storage the rows cross quantized (1 byte per value
for int8 / float8 plus one float32 scale per row) and are dequantized on the device, after the
gather (`dequantize`).

The hot-row cache (`HotRowCache`) holds, per table, the K rows read most often in a reference sample
(by default the start of the training split), replicated on every device, chosen once: a static
top-K by frequency. Measured against the alternatives on the same stream (bench/bench_offload.py,
BENCHMARKS.md), counting what crosses per batch (distinct missed rows): an LRU updated per batch
sends more rows at every size, and a top-K refreshed with every batch's counts saves under 3%, not
worth updating the device copy in step with the prefetch thread.

Table files (`write_table_dir`, `export_tables`, `HostTables.open`): a directory with one raw
row-major file per table (`<table>.rows`, the storage dtype) plus `<table>.scale` (float32 per row)
for int8 / float8, and `manifest.json` with the model's row fingerprint (`patches.fingerprint`:
everything that gives a row its meaning), each table's rows, width, dtype, byte size and sha256.
Opening checks the fingerprint and every file's size (a truncated file is an error, not a short
read); the checksums are read back with `verify=True` (a pass over every byte: minutes for tens of
GB). Directories are written under a temporary name and renamed when complete, and an existing
directory is never written over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import shutil
import tempfile
import threading
from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from engram_jax import memory
from engram_jax.config import EngramConfig, ModelConfig

PLACEMENTS = ("device", "host", "disk")
QUANTIZATIONS = ("float32", "bfloat16", "int8", "float8_e4m3")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The smallest padded count of distinct rows per batch shard (then powers of two).
MIN_ROW_BUCKET = 64

_STORAGE = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
            "int8": np.dtype(np.int8), "float8_e4m3": np.dtype(ml_dtypes.float8_e4m3fn)}
_SCALED = ("int8", "float8_e4m3")
_QMAX = {"int8": 127.0, "float8_e4m3": float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)}  # 448


class TableFileError(ValueError):
  """A table directory that cannot be used for this model: missing, damaged or another layout.
  Nothing was written."""


# ----------------------------------------------------------------------------------------------
# Quantization.


def check_quantize(kind: str) -> str:
  if kind not in QUANTIZATIONS:
    raise ValueError(f"quantize={kind!r}: expected one of {QUANTIZATIONS}")
  return kind


def quantize_rows(rows: np.ndarray, kind: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """float rows [n, d] -> (stored rows [n, d] in the storage dtype, float32 scale [n] or None).

  Error bounds per element x of a row whose largest magnitude is a (so scale s = a / qmax), for
  the dequantized value (`dequantize`), round to nearest:
    bfloat16:     |err| <= 2^-8 |x|          (8 significand bits)
    int8:         |err| <= s / 2 = a / 254   (s = a / 127; values -127..127)
    float8_e4m3:  |err| <= 2^-4 |x| + 2^-10 s (3 mantissa bits; s = a / 448; the second term is the
                  subnormal range, |x / s| < 2^-6)
  plus float32 rounding of x / s and of the product (a few ulps of x). tests/test_offload.py checks
  these bounds on random rows.
  """
  check_quantize(kind)
  rows = np.asarray(rows, np.float32)
  if kind == "float32":
    return np.ascontiguousarray(rows), None
  if kind == "bfloat16":
    return rows.astype(_STORAGE[kind]), None
  amax = np.max(np.abs(rows), axis=-1)
  scale = (amax / np.float32(_QMAX[kind])).astype(np.float32)
  safe = np.where(scale > 0, scale, np.float32(1.0))[:, None]
  if kind == "int8":
    q = np.clip(np.rint(rows / safe), -127, 127).astype(np.int8)
  else:
    q = np.clip(rows / safe, -_QMAX[kind], _QMAX[kind]).astype(_STORAGE[kind])
  return q, scale


def dequantize(stored, scale, dtype):
  """Stored rows [..., d] (and scales [...] for int8 / float8) -> rows in `dtype` (numpy or jnp)."""
  xp = jnp if isinstance(stored, jax.Array) or isinstance(scale, jax.Array) else np
  rows = stored.astype(xp.float32)
  if scale is not None:
    rows = rows * scale[..., None].astype(xp.float32)
  return rows.astype(dtype)


def bytes_per_row(kind: str, dim: int) -> int:
  """Bytes one table row takes in storage (and on the way to the device) under `kind`."""
  return _STORAGE[check_quantize(kind)].itemsize * dim + (4 if kind in _SCALED else 0)


# ----------------------------------------------------------------------------------------------
# Table files.


def _sha256_file(path: str, chunk: int = 1 << 24) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      block = f.read(chunk)
      if not block:
        return h.hexdigest()
      h.update(block)


def _layout(cfg: EngramConfig) -> Dict[str, Dict[str, int]]:
  return {memory.table_name(l): {"rows": int(memory.table_layout(cfg, l)[2]), "dim": int(cfg.head_dim)}
          for l in cfg.layer_ids}


def write_table_dir(out_dir: str, cfg: ModelConfig, fingerprint: str,
                    read_chunk: Callable[[str, int, int], np.ndarray], *, quantize: str = "float32",
                    chunk_rows: int = 1 << 16, extra: Optional[dict] = None,
                    log: Callable[[str], None] = print) -> str:
  """Writes every table of `cfg` to a new table directory, chunk by chunk.

  `read_chunk(name, start, stop)` returns float rows [stop - start, d] of table `name` (a checkpoint
  reader, a params tree, a random generator for benchmarks), so no table is ever whole in memory.
  Refuses an existing `out_dir` (nothing is written); writes under a temporary name beside it and
  renames it when every file and the manifest are complete.
  """
  check_quantize(quantize)
  if cfg.engram is None:
    raise TableFileError("the model has no Engram layers (model.engram is None): it has no tables to write")
  if not isinstance(chunk_rows, int) or chunk_rows < 1:
    raise ValueError(f"chunk_rows={chunk_rows!r}: expected a positive integer")
  if os.path.exists(out_dir):
    raise FileExistsError(f"table directory {out_dir!r} already exists: choose another path (nothing was written)")
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tables-", dir=parent)
  try:
    tables = {}
    for name, shape in _layout(cfg.engram).items():
      rows, dim = shape["rows"], shape["dim"]
      files = {"rows": f"{name}.rows"} | ({"scale": f"{name}.scale"} if quantize in _SCALED else {})
      hashes = {k: hashlib.sha256() for k in files}
      handles = {k: open(os.path.join(tmp, f), "wb") for k, f in files.items()}
      try:
        for start in range(0, rows, chunk_rows):
          stop = min(rows, start + chunk_rows)
          chunk = np.asarray(read_chunk(name, start, stop))
          if chunk.shape != (stop - start, dim):
            raise TableFileError(f"table {name}: rows [{start}, {stop}) came back with shape {chunk.shape}; expected "
                                 f"{(stop - start, dim)}")
          stored, scale = quantize_rows(chunk, quantize)
          for kind, value in (("rows", stored), ("scale", scale)):
            if kind in files:
              raw = np.ascontiguousarray(value).tobytes()
              handles[kind].write(raw)
              hashes[kind].update(raw)
      finally:
        for f in handles.values():
          f.close()
      entry = {"rows": rows, "dim": dim, "dtype": quantize, "files": {}}
      for kind, file in files.items():
        entry["files"][kind] = {"name": file, "bytes": os.path.getsize(os.path.join(tmp, file)),
                                "sha256": hashes[kind].hexdigest()}
      tables[name] = entry
      log(f"wrote {name}: {rows} rows x {dim} ({quantize}, {bytes_per_row(quantize, dim)} bytes per row)")
    manifest = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "quantize": quantize,
                "layer_ids": list(cfg.engram.layer_ids), "tables": tables, **(extra or {})}
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
      f.write("\n")
    if os.path.exists(out_dir):  # someone else wrote it meanwhile: keep theirs
      raise FileExistsError(f"table directory {out_dir!r} appeared while writing: nothing was written over")
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def checkpoint_table_reader(checkpoint_dir: str, step: int):
  """read_chunk(name, start, stop) over a checkpoint's saved tables, read with tensorstore straight
  from the zarr3 arrays in the step's OCDBT store (`checkpoint.saved_array_reader`): no device is
  involved and only the saved chunks that overlap [start, stop) are read."""
  from engram_jax import checkpoint as ckpt_lib

  arrays = ckpt_lib.saved_array_reader(checkpoint_dir, step)
  paths = {p[1]: p for p in arrays.paths if len(p) >= 4 and p[0] == "params" and p[-3:] == ("engram", "memory", "table")}

  def read(name: str, start: int, stop: int) -> np.ndarray:
    if name not in paths:
      raise TableFileError(f"checkpoint {checkpoint_dir!r} step {step} has no table {name!r} (it has "
                           f"{sorted(paths)})")
    return np.asarray(arrays(paths[name], start, stop), np.float32)

  read.names = tuple(sorted(paths))  # type: ignore[attr-defined]
  read.shape = lambda name: arrays.shape(paths[name])  # type: ignore[attr-defined]
  return read


def export_tables(cfg, checkpoint_dir: str, out_dir: str, *, step: Optional[int] = None, quantize: str = "float32",
                  chunk_rows: int = 1 << 16, hashing=None, log: Callable[[str], None] = print) -> str:
  """A checkpoint's Engram tables -> a table directory (`write_table_dir`), read chunk by chunk with
  tensorstore (never placed on an accelerator, never whole in memory). `cfg` is the run's Config."""
  from engram_jax import checkpoint as ckpt_lib
  from engram_jax import data as data_lib
  from engram_jax.patches import fingerprint

  if os.path.exists(out_dir):
    raise FileExistsError(f"table directory {out_dir!r} already exists: choose another path (nothing was written)")
  if cfg.model.engram is None:
    raise TableFileError("the model has no Engram layers (model.engram is None): it has no tables to export")
  step = ckpt_lib.step_to_read(checkpoint_dir, step)
  reader = checkpoint_table_reader(checkpoint_dir, step)
  for name, shape in _layout(cfg.model.engram).items():
    if name not in reader.names:
      raise TableFileError(f"checkpoint {checkpoint_dir!r} step {step} has no table {name!r}: the config's Engram "
                           f"layers {cfg.model.engram.layer_ids} do not match it (it has {list(reader.names)})")
    saved = reader.shape(name)
    if saved != (shape["rows"], shape["dim"]):
      raise TableFileError(f"checkpoint {checkpoint_dir!r} step {step}: table {name} is {saved}; the config's layout "
                           f"is {(shape['rows'], shape['dim'])}")
  if hashing is None:
    hashing = data_lib.engram_hashing(data_lib.load_tokenizer(cfg.data.tokenizer_path), cfg.model.engram)
  return write_table_dir(out_dir, cfg.model, fingerprint(cfg.model, hashing), reader, quantize=quantize,
                         chunk_rows=chunk_rows, log=log,
                         extra={"source": {"checkpoint_step": int(step)}})


def read_manifest(table_dir: str) -> dict:
  if not os.path.isdir(table_dir):
    raise TableFileError(f"table directory {table_dir!r} does not exist (write one with "
                         "`python eval.py --export_tables DIR`)")
  path = os.path.join(table_dir, MANIFEST)
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise TableFileError(f"table directory {table_dir!r} has no {MANIFEST}: not a table directory, or an "
                         "incomplete copy") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise TableFileError(f"table directory {table_dir!r}: {MANIFEST} is not valid JSON ({e})") from None
  version = manifest.get("format_version") if isinstance(manifest, dict) else None
  if version != FORMAT_VERSION:
    raise TableFileError(f"table directory {table_dir!r} has format_version {version!r}; this engram_jax reads "
                         f"version {FORMAT_VERSION}")
  return manifest


def check_manifest(manifest: dict, table_dir: str, cfg: ModelConfig, fingerprint: str):
  """TableFileError naming the first difference between a table directory and the model's layout."""
  want = _layout(cfg.engram)
  have = manifest.get("tables", {})
  if sorted(have) != sorted(want):
    raise TableFileError(f"table directory {table_dir!r} holds tables {sorted(have)}; the model's Engram layers "
                         f"need {sorted(want)}")
  for name, shape in want.items():
    entry = have[name]
    if entry.get("rows") != shape["rows"] or entry.get("dim") != shape["dim"]:
      raise TableFileError(f"table directory {table_dir!r}: {name} has {entry.get('rows')} rows x {entry.get('dim')}; "
                           f"the model expects {shape['rows']} rows x {shape['dim']}")
  if manifest.get("fingerprint") != fingerprint:
    raise TableFileError(f"table directory {table_dir!r} was written for another hashing config or tokenizer: its "
                         f"fingerprint {str(manifest.get('fingerprint'))[:12]}... differs from the model's "
                         f"{fingerprint[:12]}... (same rows and width, but rows would mean other n-grams)")


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


# ----------------------------------------------------------------------------------------------
# Host tables.


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
    if self.row_range is not None:  # only the owner contributes a row
      lo, hi = self.row_range[name]
      hit &= (flat_ids >= lo) & (flat_ids < hi)
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
        if kind == "scale" and stored not in _SCALED:
          continue
        info = entry.get("files", {}).get(kind)
        if info is None:
          raise TableFileError(f"table directory {table_dir!r}: {MANIFEST} lists no {kind} file for {name}")
        path = os.path.join(table_dir, info["name"])
        itemsize = 4 if kind == "scale" else _STORAGE[stored].itemsize
        width = 1 if kind == "scale" else entry["dim"]
        expected = entry["rows"] * width * itemsize
        if not os.path.isfile(path):
          raise TableFileError(f"table directory {table_dir!r} lacks {info['name']} (listed in {MANIFEST})")
        size = os.path.getsize(path)
        if size != expected or size != info.get("bytes"):
          raise TableFileError(f"table directory {table_dir!r}: {info['name']} has {size} bytes; expected {expected} "
                               f"({entry['rows']} rows x {width} x {itemsize} bytes): truncated or not this table")
        if verify and _sha256_file(path) != info.get("sha256"):
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
      dtype = np.dtype(np.float32) if kind == "scale" else _STORAGE[stored]
      shape = (hi - lo,) if kind == "scale" else (hi - lo, width)
      mapped = np.memmap(path, dtype=dtype, mode="r", offset=lo * width * itemsize, shape=shape)
      if placement == "disk":
        _random_access(mapped)
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

  def take(self, name: str, flat_ids: np.ndarray) -> np.ndarray:
    """Rows at int64 global row ids [n] -> [n, d]. With a row range (several processes), rows outside
    this process's range come back as zeros: the owner of each row contributes it (`assemble_rows` adds them)."""
    table = self.rows[name]
    if self.row_range is not None:
      lo, hi = self.row_range[name]
      own = (flat_ids >= lo) & (flat_ids < hi)
      out = np.zeros((len(flat_ids), table.shape[1]), table.dtype)
      out[own] = self._take(table, flat_ids[own] - lo)
    else:
      out = self._take(table, flat_ids)
    return self._overlaid(name, flat_ids, out, 1)

  def take_scale(self, name: str, flat_ids: np.ndarray) -> np.ndarray:
    scale = self.scales[name]
    if self.row_range is not None:
      lo, hi = self.row_range[name]
      own = (flat_ids >= lo) & (flat_ids < hi)
      out = np.zeros(len(flat_ids), np.float32)
      out[own] = scale[flat_ids[own] - lo]
    else:
      out = scale[flat_ids]
    return self._overlaid(name, flat_ids, out, 2)

  def _take(self, table, flat_ids):
    if self.placement == "disk" and len(flat_ids) > 1:
      # Reading a memory map in address order turns random page faults into mostly forward reads.
      order = np.argsort(flat_ids, kind="stable")
      out = np.empty((len(flat_ids), table.shape[1]), table.dtype)
      out[order] = table[flat_ids[order]]
      return out
    return table[flat_ids]


def _random_access(mapped: np.memmap):
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


# ----------------------------------------------------------------------------------------------
# The hot-row cache.


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


# ----------------------------------------------------------------------------------------------
# A batch's rows: host side (prepare_rows) and device side (assemble_rows).


def row_bucket(n: int) -> int:
  """Padded count of distinct rows per batch shard: a power of two >= MIN_ROW_BUCKET."""
  b = MIN_ROW_BUCKET
  while b < n:
    b *= 2
  return b


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


def assemble_rows(host: Dict[str, dict], cache: Optional[Dict[str, Tuple[jax.Array, Optional[jax.Array]]]],
                  dtype) -> Dict[str, jax.Array]:
  """In-graph: {table name: rows [B, T, H, d] in `dtype`} from `prepare_rows`'s arrays (placed on the
  batch's devices: index split over the batch, rows [S, U, d] one shard per batch shard) and the
  cache's device rows {name: (rows [K, d], scales [K] or None)}. Each batch shard gathers from its own
  rows (a batched gather over the shard axis, which XLA keeps local to each device)."""
  out = {}
  for name, entry in host.items():
    index, rows, scale = entry["index"], entry["rows"], entry.get("scale")
    if rows.ndim == 4:
      # Several processes: [devices, S, U, d] partial rows, each row filled by the one device (of the
      # process owning it) that carries its process's contribution, zeros elsewhere. The sum is
      # exact: every value is added to zeros only (int8 / float8 / bfloat16 values are exact in
      # float32, so summing there changes nothing).
      rows = jnp.sum(rows.astype(jnp.float32), axis=0)
      scale = None if scale is None else jnp.sum(scale, axis=0)
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


# ----------------------------------------------------------------------------------------------
# Prefetch.


class Prefetcher:
  """Runs `prepare(item)` for upcoming items on a background thread, `depth` items ahead, and yields
  (item, prepared) in the input order.

  The thread releases the GIL in numpy's gathers and in `jax.device_put`, so the host gather and the
  transfer of batch i+1 overlap the device step of batch i (dispatched asynchronously by the main
  thread). An exception in `prepare` is re-raised by the iterator at the item that failed; closing
  the iterator early stops the thread.
  """

  _DONE = object()

  def __init__(self, items: Iterable, prepare: Callable, depth: int = 2):
    if not isinstance(depth, int) or depth < 1:
      raise ValueError(f"depth={depth!r}: expected a positive integer")
    self._items = iter(items)
    self._prepare = prepare
    self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="engram-prefetch", daemon=True)
    self._thread.start()

  def _put(self, value) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(value, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self):
    try:
      for item in self._items:
        if self._stop.is_set():
          return
        if not self._put((item, self._prepare(item), None)):
          return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      self._put((None, None, e))
      return
    self._put(self._DONE)

  def __iter__(self) -> Iterator:
    try:
      while True:
        got = self._queue.get()
        if got is self._DONE:
          return
        item, prepared, error = got
        if error is not None:
          raise error
        yield item, prepared
    finally:
      self.close()

  def close(self):
    self._stop.set()
    self._thread.join(timeout=10)
