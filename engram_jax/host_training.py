"""Training with the Engram tables off the accelerators: in host RAM (`host`) or memory-mapped on
disk (`disk`), with their lazy Adam moments beside them (`train.engram_tables`).

A step's rows are addressed by hash ids the data pipeline computed on the host, so the host knows
them before the step runs. The trainer then works like this (trainer.py, `engram_tables != "device"`):

  1. `RowFeed.prepare` (on the prefetch thread, while the previous step runs) gathers the distinct
     rows of every batch shard from the host tables (`tables.batch.prepare_rows`, the serving path's
     host gather) and remembers which rows it read and at which table version;
  2. `RowFeed.ready` (on the main thread, once the previous step's update is applied) re-reads the
     rows that updates made after the gather wrote (read-after-write stays exact), and places the
     rows on the batch's devices;
  3. the jitted step assembles them (`tables.batch.assemble_rows`), differentiates with respect to them
     and returns the row gradients instead of updating a table;
  4. `HostTrainTables.update` applies the row-sparse (lazy) Adam step on the host: the same
     arithmetic as the device update (`memory.adam_rows_math`, run by XLA on the host CPU), with
     duplicate rows summed in the same order as the device update on the step's mesh, so host,
     disk and device training give bitwise-equal float32 tables on CPU.

Several processes (multi-host): each process holds and updates only its rows of each table
(`process_rows`, the row ownership serving uses). The trainer all-gathers each batch's hash
ids (small int32 arrays), every process gathers the rows it owns for the whole global batch and puts
them on one of its devices (zeros on the others; the step adds the contributions, exactly, since
each row has one owner), the step returns the row gradients whole to every process, and each
applies the update to its own rows, with duplicates summed over the whole step as one process does.
A checkpoint writes each table and moment as one global array, each process its own rows, chunk by
chunk from its snapshot (`checkpoint.ChunkedArray`: chunks cut on the processes' row boundaries).

The tables are `tables.host.HostTables` (the serving class: float32 rows, here writable), so one
placement concept covers training and serving. Checkpoints hold the tables and moments under the
same names as device training (`params/<layer>/engram/memory/table`, `engram_opt/<layer>/{m,v,count}`),
written by orbax chunk by chunk from a copy-on-write snapshot of the host arrays (`snapshot`:
asynchronous, no second copy of a table in RAM, so a table bigger than RAM checkpoints) and read
back with tensorstore chunk by chunk, so a run can resume with another placement and eval.py /
generate.py / patch.py read its checkpoints unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import threading
from typing import Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import memory
from engram_jax.config import Config, EngramConfig
from engram_jax.tables import batch as batch_rows
from engram_jax.tables import host as table_host
from engram_jax.tables.host import HostTables, process_rows, random_access

# The disk placement's directory under the workdir, and its manifest.
TABLES_DIR = "engram_tables"
_MANIFEST = "manifest.json"
_KIND = "engram_jax training tables"
# Rows copied per chunk when tables are filled from a checkpoint or checked for non-finite values.
_CHUNK_ROWS = 1 << 16
# The arrays kept per table: the rows and their lazy Adam state.
_KINDS = ("rows", "m", "v", "count")


class TableStoreError(ValueError):
  """A host or disk table store that cannot be used for this run; nothing was written."""


def table_shapes(cfg: EngramConfig) -> Dict[str, Tuple[int, int]]:
  """{table name: (rows, head_dim)} of every Engram table (all rows, whatever a process holds)."""
  return {memory.table_name(l): (int(memory.table_layout(cfg, l)[2]), int(cfg.head_dim)) for l in cfg.layer_ids}


def _ranges(cfg: EngramConfig, process_index: int, process_count: int) -> Dict[str, Tuple[int, int]]:
  """Per table the rows [lo, hi) this process holds and updates (`process_rows`, the row
  ownership serving uses): every row with one process's count."""
  return {n: process_rows(rows, process_index, process_count) for n, (rows, _) in table_shapes(cfg).items()}


def _processes(process_index: Optional[int], process_count: Optional[int]) -> Tuple[int, int]:
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def bytes_needed(cfg: EngramConfig, process_index: Optional[int] = None, process_count: Optional[int] = None) -> int:
  """Bytes of this process's rows of the tables plus their lazy Adam state (float32 rows, m and v,
  an int32 count per row)."""
  pi, pc = _processes(process_index, process_count)
  dims = {n: d for n, (_, d) in table_shapes(cfg).items()}
  return sum((hi - lo) * (3 * dims[n] * 4 + 4) for n, (lo, hi) in _ranges(cfg, pi, pc).items())


def mesh_chunks(mesh) -> int:
  """How many pieces the device update splits a step's ids into on `mesh` (its table shards; 1 on
  one device): the host update sums duplicates over the same pieces in the same order."""
  if mesh is None or math.prod(mesh.shape.values()) == 1:
    return 1
  from engram_jax.sharding import rule_axes

  return int(math.prod(mesh.shape[a] for a in rule_axes("table_rows", mesh)))


# ----------------------------------------------------------------------------------------------
# The host lazy Adam step.


def _host_cpu():
  """(this process's first CPU device, a one-device mesh of it): where host-side programs run, under
  their own mesh rather than the training mesh the loop runs under."""
  cpu = jax.local_devices(backend="cpu")[0]
  return cpu, jax.sharding.Mesh(np.array([cpu]), ("host",))


@functools.lru_cache(maxsize=None)
def _adam_program(b1: float, b2: float, eps: float):
  """(rows, m, v, count, grads, lr) numpy -> numpy: `memory.adam_rows_math` compiled by XLA for the
  host CPU (the same float32 operations as the device update; numpy's pow could round differently)."""
  cpu, host_mesh = _host_cpu()
  fn = jax.jit(lambda r, m, v, c, g, lr: memory.adam_rows_math(r, m, v, c, g, lr=lr, b1=b1, b2=b2, eps=eps))

  def run(*arrays):
    with jax.set_mesh(host_mesh):
      return [np.asarray(x) for x in fn(*(jax.device_put(a, cpu) for a in arrays))]

  return run


def sum_duplicates(flat_ids: np.ndarray, flat_grads: np.ndarray, chunks: int) -> Tuple[np.ndarray, np.ndarray]:
  """(sorted distinct ids [U], summed gradients [U, d]) in the device update's order of addition:
  the ids are cut into `chunks` contiguous pieces (the device update's per-device pieces), repeats
  are summed within each piece in id order, then the pieces' sums are added in piece order."""
  flat_ids = np.asarray(flat_ids, np.int64)
  flat_grads = np.asarray(flat_grads, np.float32)
  per = -(-len(flat_ids) // max(chunks, 1))
  ids, sums = [], []
  for start in range(0, len(flat_ids), per):
    uniq, inv = np.unique(flat_ids[start:start + per], return_inverse=True)
    total = np.zeros((len(uniq), flat_grads.shape[1]), np.float32)
    np.add.at(total, inv.reshape(-1), flat_grads[start:start + per])
    ids.append(uniq)
    sums.append(total)
  if len(ids) == 1:
    return ids[0], sums[0]
  uniq, inv = np.unique(np.concatenate(ids), return_inverse=True)
  total = np.zeros((len(uniq), flat_grads.shape[1]), np.float32)
  np.add.at(total, inv.reshape(-1), np.concatenate(sums))
  return uniq, total


# ----------------------------------------------------------------------------------------------
# The tables and their moments.


@dataclasses.dataclass
class HostTrainTables:
  """The Engram tables being trained, on the host: `tables` (HostTables, float32 rows) and
  per table the lazy Adam moments `m`, `v` [R, d] and step counts `count` [R] (numpy arrays for
  `host`, memory maps of files under `directory` for `disk`). `version` counts applied updates;
  `lock` serializes the prefetch thread's reads with the updates."""

  cfg: EngramConfig
  tables: HostTables
  m: Dict[str, np.ndarray]
  v: Dict[str, np.ndarray]
  count: Dict[str, np.ndarray]
  directory: Optional[str] = None
  fresh: bool = True  # every array newly allocated, so all zeros
  row_range: Optional[Dict[str, Tuple[int, int]]] = None  # several processes: the rows this one holds
  processes: int = 1  # how many processes hold the tables' rows between them
  version: int = 0
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)
  _snapshots: List["_Snapshot"] = dataclasses.field(default_factory=list, repr=False)  # saves in progress

  @property
  def placement(self) -> str:
    return self.tables.placement

  @property
  def names(self) -> Tuple[str, ...]:
    return memory.table_names(self.cfg)

  @classmethod
  def allocate(cls, cfg: EngramConfig, placement: str, workdir: str, *, process_index: Optional[int] = None,
               process_count: Optional[int] = None) -> "HostTrainTables":
    """Zeroed tables and moments for `placement` ("host": RAM, checked against what is available;
    "disk": files under `<workdir>/engram_tables` (with several processes, one subdirectory per
    process), which must be absent, empty or this format). Each process allocates its own rows."""
    pi, pc = _processes(process_index, process_count)
    check_placement(cfg, placement, workdir, process_index=pi, process_count=pc)
    ranges = _ranges(cfg, pi, pc)
    directory = None
    if placement == "host":
      dims = {n: d for n, (_, d) in table_shapes(cfg).items()}
      arrays = {kind: {n: np.zeros((hi - lo, dims[n]) if kind != "count" else (hi - lo,),
                                   np.float32 if kind != "count" else np.int32)
                       for n, (lo, hi) in ranges.items()} for kind in _KINDS}
      fresh = True
    else:
      directory = disk_directory(workdir, pi, pc)
      arrays, fresh = _open_disk(cfg, directory, ranges)
    row_range = ranges if pc > 1 else None
    tables = HostTables(cfg, placement, "float32", arrays["rows"], {n: None for n in arrays["rows"]},
                        directory=directory, row_range=row_range)
    return cls(cfg, tables, arrays["m"], arrays["v"], arrays["count"], directory=directory, fresh=fresh,
               row_range=row_range, processes=pc)

  def _lo(self, name: str) -> int:
    return 0 if self.row_range is None else self.row_range[name][0]

  def initialize(self, cfg: Config):
    """A fresh run's values: the device init's tables (`init_values`), zero moments (left as
    allocated when the arrays are new, so a new disk store writes its tables only)."""
    self.fill(init_values(cfg), ("rows",) if self.fresh else _KINDS)

  def fill(self, read: Callable[[str, str, int, int], np.ndarray], kinds: Tuple[str, ...] = _KINDS):
    """Fill tables and moments chunk by chunk from `read(kind, table, start, stop)` (kind: rows, m, v,
    count; global row ids [start, stop), only this process's rows are asked for), e.g. a checkpoint's
    saved arrays; `kinds` limits it to some of them."""
    with self.lock:
      if self._snapshots:
        raise RuntimeError("HostTrainTables.fill while a checkpoint of the tables is being written: wait for it")
      for kind in kinds:
        for name in self.names:
          target = self._array(kind, name)
          lo = self._lo(name)
          for start in range(0, target.shape[0], _CHUNK_ROWS):
            stop = min(target.shape[0], start + _CHUNK_ROWS)
            chunk = np.asarray(read(kind, name, lo + start, lo + stop))
            if chunk.shape != target[start:stop].shape:
              raise TableStoreError(f"{kind} of table {name}: rows [{start}, {stop}) came back with shape {chunk.shape}; "
                                    f"expected {target[start:stop].shape}")
            target[start:stop] = chunk
      self.version += 1

  def _array(self, kind: str, name: str) -> np.ndarray:
    return {"rows": self.tables.rows, "m": self.m, "v": self.v, "count": self.count}[kind][name]

  def all_finite(self) -> bool:
    for name in self.names:
      for kind in ("rows", "m", "v"):
        a = self._array(kind, name)
        for start in range(0, a.shape[0], _CHUNK_ROWS):
          if not np.all(np.isfinite(a[start:start + _CHUNK_ROWS])):
            return False
    return True

  def update(self, engram_ids: np.ndarray, row_grads: Dict[str, np.ndarray], lr, *, chunks: int, b1: float,
             b2: float, eps: float) -> Dict[str, np.ndarray]:
    """One lazy Adam step at the rows a step read: engram_ids [..., L, H] (the step's hash ids of the
    global batch, any leading axes), row_grads {table: [..., H, d]} in the same order, `lr` the step's
    table learning rate (float32). `chunks`: `mesh_chunks` of the step's mesh. Duplicates are summed
    over the whole step as on the devices, then this process updates the rows it owns. Returns
    {table: global ids written}."""
    ids = memory.row_ids(self.cfg, np.asarray(engram_ids))
    program = _adam_program(float(b1), float(b2), float(eps))
    lr = np.asarray(lr, np.float32)
    written = {}
    with self.lock:
      for name in self.names:
        table = self.tables.rows[name]
        flat = np.clip(np.asarray(ids[name]).reshape(-1), 0, table_shapes(self.cfg)[name][0] - 1)  # global ids
        uniq, grads = sum_duplicates(flat, np.asarray(row_grads[name]).reshape(len(flat), -1), chunks)
        written[name] = uniq
        if self.row_range is not None:
          own = self.tables.owns(name, uniq)
          written[name], uniq, grads = uniq[own], uniq[own] - self._lo(name), grads[own]
        bucket = batch_rows.row_bucket(len(uniq))  # few shapes compile
        pad = lambda a: np.concatenate([a, np.zeros((bucket - len(a),) + a.shape[1:], a.dtype)])  # noqa: E731
        new = program(pad(table[uniq]), pad(self.m[name][uniq]), pad(self.v[name][uniq]),
                      pad(self.count[name][uniq]), pad(grads), lr)
        rows, m, v, count = (x[:len(uniq)] for x in new)
        for snap in self._snapshots:
          snap.keep(name, uniq)
        table[uniq], self.m[name][uniq], self.v[name][uniq], self.count[name][uniq] = rows, m, v, count
      self.version += 1
    return written

  def snapshot(self):
    """({table: rows}, {table: memory.SparseAdamState}) as they are now, for a checkpoint: each leaf
    a `checkpoint.ChunkedArray` that orbax's writer reads chunk by chunk, in the background, while
    training goes on. Copy-on-write keeps it exact without copying a table: until the writer has
    passed a row, an update first keeps the row's current values (`_Snapshot.keep`), so the
    snapshot holds only the rows updated during the save (a table bigger than RAM saves in bounded
    memory). The snapshot releases itself once every array is written. With several processes each
    leaf is the global array of which this process writes its own rows."""
    snap = _Snapshot(self)
    if any(self._array(k, n).shape[0] for k in _KINDS for n in self.names):  # else nothing to write
      with self.lock:
        self._snapshots.append(snap)
    leaf = snap.leaf
    opt = {n: memory.SparseAdamState(m=leaf("m", n), v=leaf("v", n), count=leaf("count", n)) for n in self.names}
    return {n: leaf("rows", n) for n in self.names}, opt

  def flush(self):
    """Writes memory-mapped tables and moments through to their files (disk placement)."""
    for name in self.names:
      for kind in _KINDS:
        a = self._array(kind, name)
        if isinstance(a, np.memmap):
          a.flush()


class _Snapshot:
  """The tables and moments of a `HostTrainTables` at one moment, read back chunk by chunk.

  `done[(kind, name)]`: rows [0, done) of that array have been handed to the writer; `kept[name]`:
  (sorted local row ids, {kind: their values at the snapshot}) of the rows updated since, before
  the writer passed them. Called with the store's lock held (`keep` from `update`, `read` takes it).
  """

  def __init__(self, store: HostTrainTables):
    self.store = store
    self.done = {(k, n): 0 for k in _KINDS for n in store.names}
    self.kept: Dict[str, Tuple[np.ndarray, Dict[str, np.ndarray]]] = {}

  def leaf(self, kind: str, name: str):
    from engram_jax.checkpoint import ChunkedArray

    store = self.store
    array, lo = store._array(kind, name), store._lo(name)
    rows = table_shapes(store.cfg)[name][0]
    starts = tuple(process_rows(rows, p, store.processes)[0] for p in range(store.processes))
    return ChunkedArray((rows,) + array.shape[1:], array.dtype, lambda a, b: self.read(kind, name, a - lo, b - lo),
                        rows=(lo, lo + array.shape[0]), starts=starts)

  def keep(self, name: str, local_ids: np.ndarray):
    """Before rows `local_ids` (distinct) are written: keep the current values of those the writer
    has not passed in every array and that are not kept already."""
    low = min(self.done[(k, name)] for k in _KINDS)
    ids = np.asarray(local_ids, np.int64)
    ids = ids[ids >= low]
    old_ids, old = self.kept.get(name, (np.zeros(0, np.int64), None))
    ids = ids[~np.isin(ids, old_ids)]
    if not len(ids):
      return
    values = {k: self.store._array(k, name)[ids] for k in _KINDS}
    all_ids = np.concatenate([old_ids, ids])
    order = np.argsort(all_ids, kind="stable")
    merged = {k: (np.concatenate([old[k], values[k]]) if old is not None else values[k])[order] for k in _KINDS}
    self.kept[name] = (all_ids[order], merged)

  def read(self, kind: str, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of one array as they were at the snapshot (called in increasing order)."""
    with self.store.lock:
      out = np.array(self.store._array(kind, name)[start:stop])
      if name in self.kept:
        ids, values = self.kept[name]
        a, b = np.searchsorted(ids, [start, stop])
        out[ids[a:b] - start] = values[kind][a:b]
      self.done[(kind, name)] = stop
      if all(self.done[key] == self.store._array(*key).shape[0] for key in self.done) and self in self.store._snapshots:
        self.store._snapshots.remove(self)
      return out


def disk_directory(workdir: str, process_index: int = 0, process_count: int = 1) -> str:
  """The disk placement's directory of one process: `<workdir>/engram_tables`, with several processes
  its subdirectory `process<i>of<n>` (processes sharing a filesystem keep apart)."""
  base = os.path.join(workdir, TABLES_DIR)
  return base if process_count == 1 else os.path.join(base, f"process{process_index}of{process_count}")


def check_placement(cfg: EngramConfig, placement: str, workdir: str, *, process_index: Optional[int] = None,
                    process_count: Optional[int] = None):
  """Raises before anything is written when `placement` cannot hold this run's tables: "host" needs
  more RAM than is available (MemoryError naming the bytes and the disk alternative); "disk" finds
  `<workdir>/engram_tables` not empty and not a training table directory of this layout, or a disk
  with too little free space (TableStoreError)."""
  if placement not in ("host", "disk"):
    raise ValueError(f"placement={placement!r}: host training tables live in 'host' or 'disk'")
  pi, pc = _processes(process_index, process_count)
  need = bytes_needed(cfg, pi, pc)
  if placement == "host":
    free = table_host.available_memory()
    if free is not None and need > free:
      raise MemoryError(
          f"train.engram_tables='host' needs {need / 2**30:.2f} GiB of RAM for the Engram tables and their Adam "
          f"moments but only {free / 2**30:.2f} GiB is available: use train.engram_tables='disk' (memory-mapped "
          f"files under the workdir, the page cache as the RAM tier) or smaller tables. Nothing was written.")
    return
  directory = disk_directory(workdir, pi, pc)
  if os.path.isdir(directory) and os.listdir(directory):
    _check_ours(cfg, directory, _ranges(cfg, pi, pc))
    return
  probe = workdir if os.path.isdir(workdir) else os.path.dirname(os.path.abspath(workdir))
  while not os.path.isdir(probe):
    probe = os.path.dirname(probe)
  free = shutil.disk_usage(probe).free
  if need > free:
    raise TableStoreError(f"train.engram_tables='disk' needs {need / 2**30:.2f} GiB under {directory!r} for the "
                          f"tables and their Adam moments; the disk has {free / 2**30:.2f} GiB free. Nothing was "
                          f"written.")


def _manifest(cfg: EngramConfig, ranges: Dict[str, Tuple[int, int]]) -> dict:
  out = {"kind": _KIND, "tables": {n: {"rows": r, "dim": d} for n, (r, d) in table_shapes(cfg).items()}}
  if any(hi - lo != table_shapes(cfg)[n][0] for n, (lo, hi) in ranges.items()):  # one process's rows
    for n, (lo, hi) in ranges.items():
      out["tables"][n]["range"] = [lo, hi]
  return out


def _check_ours(cfg: EngramConfig, directory: str, ranges: Dict[str, Tuple[int, int]]):
  try:
    with open(os.path.join(directory, _MANIFEST), encoding="utf-8") as f:
      have = json.load(f)
  except (OSError, ValueError):
    have = None
  if not isinstance(have, dict) or have.get("kind") != _KIND:
    raise TableStoreError(
        f"train.engram_tables='disk' keeps its tables in {directory!r}, which is not empty and not an engram_jax "
        f"training table directory (no {_MANIFEST} of that kind): move it away or use another workdir. Nothing "
        f"was written.")
  want = _manifest(cfg, ranges)["tables"]
  if have.get("tables") != want:
    raise TableStoreError(
        f"{directory!r} holds training tables of another layout ({have.get('tables')}); this run's Engram layers "
        f"need {want}: use another workdir, or the config that wrote them. Nothing was written.")


def _open_disk(cfg: EngramConfig, directory: str,
               ranges: Dict[str, Tuple[int, int]]) -> Tuple[Dict[str, Dict[str, np.ndarray]], bool]:
  """(memory maps of the disk placement's files, whether every file was new): created, or reopened
  when the directory is ours. `ranges`: the rows of each table this process holds."""
  layout = table_shapes(cfg)
  manifest = _manifest(cfg, ranges)
  path = os.path.join(directory, _MANIFEST)
  reopen = os.path.isdir(directory) and bool(os.listdir(directory))
  if reopen:
    _check_ours(cfg, directory, ranges)
  os.makedirs(directory, exist_ok=True)
  arrays = {kind: {} for kind in _KINDS}
  fresh = True
  for name, (_, dim) in layout.items():
    rows = ranges[name][1] - ranges[name][0]
    for kind in arrays:
      shape, dtype = ((rows,), np.int32) if kind == "count" else ((rows, dim), np.float32)
      file = os.path.join(directory, f"{name}.{kind}")
      exists = os.path.exists(file) and os.path.getsize(file) == math.prod(shape) * np.dtype(dtype).itemsize
      arrays[kind][name] = np.memmap(file, dtype=dtype, mode="r+" if exists else "w+", shape=shape)
      fresh &= not exists
      random_access(arrays[kind][name])
  if not reopen:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)
  return arrays, fresh


def init_values(cfg: Config, memory_budget: Optional[int] = None) -> Callable[[str, str, int, int], np.ndarray]:
  """read(kind, table, start, stop) of a fresh run's tables and zero moments.

  A table whose float32 rows take at most a quarter of `memory_budget` (default: the RAM available)
  gets the device init's values, computed by XLA on the host CPU one table at a time, so host and
  device runs start equal. A bigger one (a disk table beyond RAM) is drawn chunk by chunk
  (`_CHUNK_ROWS` rows, each from the layer's init key folded with the chunk index): the same
  distribution, N(0, table_init_std), but not the device init's values, which only exist whole.
  """
  from engram_jax.model import _TABLE_KEY

  e = cfg.model.engram
  dtype = jnp.dtype(cfg.model.param_dtype)
  budget = table_host.available_memory() if memory_budget is None else memory_budget
  cpu, host_mesh = _host_cpu()
  cache: Dict[str, np.ndarray] = {}

  def layer_of(name: str) -> int:
    return next(l for l in e.layer_ids if memory.table_name(l) == name)

  def base_key():
    return jax.random.fold_in(jax.random.key(cfg.train.seed), _TABLE_KEY)

  def whole(name: str) -> np.ndarray:
    if name not in cache:
      cache.clear()  # one table in memory at a time
      one = dataclasses.replace(e, layer_ids=(layer_of(name),))  # init_tables folds the layer id into the key
      init = lambda: nn.meta.unbox(memory.init_tables(one, base_key(), dtype))[name]  # noqa: E731
      with jax.set_mesh(host_mesh), jax.default_device(cpu):
        cache[name] = np.asarray(jax.jit(init)())
    return cache[name]

  @functools.lru_cache(maxsize=None)
  def chunk_program(rows: int):
    def draw(layer, chunk):
      key = jax.random.fold_in(jax.random.fold_in(base_key(), layer), chunk)
      return (jax.random.normal(key, (rows, e.head_dim), jnp.float32) * e.table_init_std).astype(dtype)

    return jax.jit(draw)

  def chunked(name: str, start: int, stop: int) -> np.ndarray:
    out = []
    for chunk in range(start // _CHUNK_ROWS, -(-stop // _CHUNK_ROWS)):
      lo = chunk * _CHUNK_ROWS
      with jax.set_mesh(host_mesh), jax.default_device(cpu):
        values = np.asarray(chunk_program(_CHUNK_ROWS)(layer_of(name), chunk))
      out.append(values[max(start - lo, 0):stop - lo])
    return np.concatenate(out)

  def read(kind: str, name: str, start: int, stop: int) -> np.ndarray:
    if kind == "rows":
      rows = int(memory.table_layout(e, layer_of(name))[2])
      if budget is not None and rows * e.head_dim * 4 > budget // 4:
        return chunked(name, start, stop)
      return whole(name)[start:stop]
    return np.zeros((stop - start,), np.int32) if kind == "count" else np.zeros((stop - start, e.head_dim), np.float32)

  return read


def checkpoint_values(checkpoint_dir: str, step: int) -> Callable[[str, str, int, int], np.ndarray]:
  """read(kind, table, start, stop) of a checkpoint's tables and lazy Adam state, read with
  tensorstore from the saved arrays (never through an accelerator)."""
  from engram_jax import checkpoint as ckpt_lib

  reader = ckpt_lib.saved_array_reader(checkpoint_dir, step)
  paths = {"rows": memory.saved_table_path, "m": lambda n: ("engram_opt", n, "m"),
           "v": lambda n: ("engram_opt", n, "v"), "count": lambda n: ("engram_opt", n, "count")}

  def read(kind: str, name: str, start: int, stop: int) -> np.ndarray:
    return reader(paths[kind](name), start, stop)

  read.has = lambda kind, name: reader.has(paths[kind](name))  # type: ignore[attr-defined]
  read.shape = lambda kind, name: reader.shape(paths[kind](name))  # type: ignore[attr-defined]
  return read


def fill_from_checkpoint(store: HostTrainTables, checkpoint_dir: str, step: int):
  """Read a checkpoint's tables and lazy Adam state into `store` (chunk by chunk, host only). A
  checkpoint of dense-Adam training (no `engram_opt`), or one whose tables have other shapes, is a
  CheckpointRestoreError naming the difference; `store` is then left as it was."""
  from engram_jax.checkpoint import CheckpointRestoreError

  read = checkpoint_values(checkpoint_dir, step)
  for name in store.names:
    for kind in _KINDS:
      if not read.has(kind, name):
        raise CheckpointRestoreError(
            f"checkpoint {checkpoint_dir} step {step} has no {'table' if kind == 'rows' else 'lazy Adam ' + kind} for "
            f"{name}: it was written by a run with other Engram layers or with dense table updates "
            f"(train.engram_sparse_updates=False); tables off the devices resume only from row-sparse training",
            directory=checkpoint_dir, step=step)
      saved = read.shape(kind, name)
      want = (table_shapes(store.cfg)[name][0],) + store._array(kind, name).shape[1:]  # global rows
      if saved != want:
        raise CheckpointRestoreError(f"checkpoint {checkpoint_dir} step {step}: {kind} of table {name} is {saved}; "
                                     f"this run's layout needs {want}", directory=checkpoint_dir, step=step)
  store.fill(read)


# ----------------------------------------------------------------------------------------------
# Feeding rows to the steps.


@dataclasses.dataclass
class Prepared:
  """One step's rows gathered on the host: per micro-batch the prepare_rows arrays, the distinct
  ids of each batch shard (to re-read rows written after the gather), and the table version."""

  micro: List[Dict[str, dict]]
  ids: List[Dict[str, List[np.ndarray]]]
  version: int


class RowFeed:
  """Gathers steps' rows from `store` ahead of the steps (`prepare`, any thread) and hands them to a
  step exact (`ready`, main thread): rows that updates applied after the gather wrote are read again.

  `shards`: the batch shards of the mesh (per process); `accum`: micro-batches per step."""

  def __init__(self, store: HostTrainTables, shards: int, accum: int = 1):
    self.store = store
    self.shards = shards
    self.accum = accum
    self._written: List[Tuple[int, Dict[str, np.ndarray]]] = []  # (version after the update, ids)
    self._bucket: Dict[str, int] = {}

  def prepare(self, local: Dict[str, np.ndarray]) -> Prepared:
    ids = np.asarray(local["engram_ids"])
    per = ids.shape[0] // self.accum
    with self.store.lock:
      version = self.store.version
      micro, shard_ids = [], []
      for j in range(self.accum):
        distinct: Dict[str, list] = {}
        micro.append(batch_rows.prepare_rows(self.store.tables, None, ids[j * per:(j + 1) * per], self.shards,
                                             distinct=distinct))
        shard_ids.append(distinct)
    return Prepared(micro, shard_ids, version)

  def record(self, written: Dict[str, np.ndarray]):
    """Call after each update with what it wrote (`HostTrainTables.update`'s result)."""
    self._written.append((self.store.version, written))

  def ready(self, prepared: Prepared) -> Dict[str, dict]:
    """{table: {"index" int32 [B, T, H], "rows" float32 [S, A, U, d]}} with every row current."""
    stale = [ids for version, ids in self._written if version > prepared.version]
    self._written = [(v, ids) for v, ids in self._written if v > prepared.version]
    out = {}
    for name in self.store.names:
      written = np.unique(np.concatenate([w[name] for w in stale])) if stale else None
      rows = []
      for j, entry in enumerate(prepared.micro):
        r = entry[name]["rows"]
        if written is not None and len(written):
          with self.store.lock:
            for s, uniq in enumerate(prepared.ids[j][name]):
              redo = np.isin(uniq, written, assume_unique=True)
              if redo.any():
                r[s, :len(uniq)][redo] = self.store.tables.take(name, uniq[redo])
        rows.append(r)
      width = max(self._bucket.get(name, 0), max(r.shape[1] for r in rows))  # the bucket only grows
      self._bucket[name] = width
      rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
      out[name] = {"index": np.concatenate([e[name]["index"] for e in prepared.micro]), "rows": np.stack(rows, 1)}
    return out
