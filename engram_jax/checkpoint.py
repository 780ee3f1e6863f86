"""Checkpoints: orbax CheckpointManager over (train state, grain iterator state, JSON metadata).

One step directory holds three items written together and committed atomically by orbax:
  state/  the train-state pytree: tensorstore zarr3 arrays in one OCDBT key-value store per step
          (a few large files instead of one file per array chunk, which matters at thousands of
          leaves and on object stores);
  data/   the grain iterator's state (one small JSON per process), so a resumed run reads exactly
          the batches it would have read;
  meta/   JSON: step, the run's config, anything the caller adds.

Saves are asynchronous: `save` returns once arrays are copied to host memory and tensorstore writes
them in background threads while training goes on. The data item is captured synchronously inside
`save` (grain's handler is not asynchronous), so it matches the saved step even though the
iterator keeps advancing. Host arrays too big to copy (the Engram tables of host and disk training)
are handed over as `ChunkedArray`s instead, read and written chunk by chunk by the writer thread.

Restore targets an abstract tree (`jax.ShapeDtypeStruct` leaves with shardings, e.g. from
`jax.eval_shape` plus the trainer's shardings), and orbax reads each shard straight into its new
placement, so a checkpoint written on one mesh restores onto another. The array item is handled by
`PyTreeCheckpointHandler` rather than `StandardCheckpointHandler` because only the former exposes
the zarr3 switch in this orbax version; its save/restore args are the PyTree ones accordingly.

Several hosts: each process writes only shards it holds (every shard once, by one of its
replicas) into its own OCDBT store under `state/` (`ocdbt.process_<i>/`, merged by one top-level
manifest), and every zarr3 chunk is one saved shard (an Engram table saved on D devices has
chunks of rows / D rows). A restore onto another mesh or process count therefore reads, in each
process, only the chunks that overlap its new shards: exactly its share of the bytes when the new
shard boundaries fall on saved ones (as many or fewer devices), the whole saved chunks its shards
fall in when they are finer (a compressed chunk is read whole). Checked, not assumed:
tests/test_multihost.py (each of two processes writes about half of a table, and reads about
half of one saved by a single process), bench/bench_checkpoint.py (chunk shape on disk; a
quarter of the rows reads 25.0% of the bytes, a sixteenth reads its whole chunk, 12.5%).

A checkpoint that cannot be read into the target (wrong tree, wrong shapes, damaged files) raises
`CheckpointRestoreError` naming its directory, the root cause in one line (not tensorstore's spec
dump) and the steps the directory holds; asking for a step that is not there says so and lists
them. Nothing here ever deletes or rewrites a step it failed to read (silently falling back to an
older step, or starting from scratch, would hide a bug and then overwrite the evidence with new
saves): `find_intact` tells the caller which older step does restore, and `set_aside_after` moves
newer steps out of the way (into `<directory>.superseded/`, never deleting them) when a run is
resumed from an older step on purpose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import threading
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from engram_jax.config import CheckpointConfig

_STATE, _DATA, _META = "state", "data", "meta"
# The bytes of one saved chunk of a `ChunkedArray` (rows per chunk: the power of two that fits).
CHUNK_BYTES = 32 << 20


class ChunkedArray:
  """A host array saved chunk by chunk, never whole in memory: `read(start, stop)` gives rows
  [start, stop) (numpy, shape `(stop - start,) + shape[1:]`), called once per chunk in increasing
  order from orbax's writer thread. The Engram tables of host and disk training are saved this way
  (`host_training.HostTrainTables.snapshot`: a table bigger than RAM, and no second copy of one in
  RAM); each is stored as a numpy array is, in chunks of `chunk_rows` rows, so every reader
  (orbax restores, tensorstore row ranges) reads it like any other saved array.

  With several processes each writes its own rows, `rows` = [lo, hi) of the global `shape` (its
  `read` is called only inside them), and `starts` lists where every process's rows begin: the
  chunks are cut on those boundaries (their size divides each), so no chunk has two writers."""

  def __init__(self, shape: Tuple[int, ...], dtype, read: Callable[[int, int], np.ndarray], *,
               rows: Optional[Tuple[int, int]] = None, starts: Tuple[int, ...] = (0,)):
    self.shape = tuple(int(s) for s in shape)
    self.dtype = np.dtype(dtype)
    self.read = read
    self.rows = (0, self.shape[0]) if rows is None else (int(rows[0]), int(rows[1]))
    self.starts = tuple(int(b) for b in starts)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def chunk_rows(self) -> int:
    """Rows per saved chunk: at most CHUNK_BYTES of them, a power of two for one writer; with several,
    the largest divisor of every process boundary within that size."""
    row_bytes = max(1, int(np.prod(self.shape[1:])) * self.dtype.itemsize)
    cap = max(1, CHUNK_BYTES // row_bytes)
    inner = [s for s in self.starts if 0 < s < self.shape[0]]
    if not inner:
      return max(1, min(self.shape[0], 1 << (cap.bit_length() - 1)))
    g = math.gcd(*inner)
    return max(c for d in range(1, math.isqrt(g) + 1) if g % d == 0 for c in (d, g // d) if c <= cap)


class _ChunkedArrayHandler(ocp.type_handlers.NumpyHandler):
  """Writes a `ChunkedArray` as the numpy handler writes an array (same tensorstore layout and
  metadata, so the stock handler restores it), but in chunks of `chunk_rows` rows, each read from
  the source just before it is written: no copy of the whole array is ever made. With several
  processes, as orbax writes a sharded jax.Array: process 0 creates the array, every process writes
  the chunks of its rows into its own OCDBT store, and the checkpoint's finalization merges them."""

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def _background_serialize(self, values, infos, args=None):
    import asyncio

    import tensorstore as ts
    from orbax.checkpoint._src.serialization import ocdbt_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    args = args or [ocp.type_handlers.SaveArgs()] * len(values)

    async def write(value: ChunkedArray, info, arg):
      await info.await_path_creation()
      rows = value.chunk_rows
      spec = ts.Spec(ts_utils.build_array_write_spec(
          info=info, arg=arg, global_shape=value.shape, local_shape=(rows,) + value.shape[1:], dtype=value.dtype,
          use_ocdbt=info.is_ocdbt_checkpoint,
          process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint),
          metadata_key=self._metadata_key).json)
      if jax.process_index() == 0:
        await ts.open(spec, create=True, open=True, context=info.ts_context)
      store = await ts.open(spec, open=True, assume_metadata=True, context=info.ts_context)
      lo, hi = value.rows
      for start in range(lo, hi, rows):
        stop = min(hi, start + rows)
        await store[start:stop].write(np.asarray(value.read(start, stop), value.dtype))

    await asyncio.gather(*(write(v, i, a) for v, i, a in zip(values, infos, args)))


def _type_handlers():
  """orbax's standard handlers plus the `ChunkedArray` one (registered first, so the saved type
  string "np.ndarray" still restores through the stock numpy handler)."""
  standard = (int, float, bytes, np.number, np.ndarray, jax.Array, str, type(ocp.PLACEHOLDER))
  return ocp.type_handlers.create_type_handler_registry(
      (ChunkedArray, _ChunkedArrayHandler()),
      *((t, ocp.type_handlers.get_type_handler(t)) for t in standard))


class CheckpointRestoreError(RuntimeError):
  """A checkpoint exists but cannot be restored into the requested target; it was left as is.

  `step` is the step that failed (None if not one step), `available` the steps the directory
  holds, and `intact` a step that was checked to restore (set by callers that looked for one).
  """

  def __init__(self, message: str, *, directory=None, step: Optional[int] = None,
               available: Tuple[int, ...] = (), intact: Optional[int] = None):
    super().__init__(message)
    self.directory = None if directory is None else str(directory)
    self.step = step
    self.available = tuple(available)
    self.intact = intact


class CheckpointNotFoundError(CheckpointRestoreError):
  """The requested step is not in the checkpoint directory (`available` lists the ones that are)."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (a full disk, a directory that refuses writes). The steps
  saved before it are intact (`intact`: the newest of them, None if none) and the run resumes from
  there; `disk_full` tells a full disk from other failures."""

  def __init__(self, message: str, *, directory: str, step: Optional[int], intact: Optional[int], disk_full: bool):
    super().__init__(message)
    self.directory, self.step, self.intact, self.disk_full = directory, step, intact, disk_full


def _is_disk_full(e: BaseException) -> bool:
  text = str(e)
  return (getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in text
          or "os_error_code='28'" in text)


def _is_write_failure(e: BaseException) -> bool:
  """A failure of the file system under a save (as opposed to a bug): orbax and tensorstore report
  them as ValueError / RuntimeError text, so the text decides."""
  if isinstance(e, OSError) or _is_disk_full(e):
    return True
  text = str(e)
  return any(s in text for s in ("Failed writing", "Failed to write", "Permission denied", "Read-only file system"))


def _du(path: str) -> int:
  total = 0
  for root, _, names in os.walk(path):
    for name in names:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:
        pass
  return total


def remove_partial_saves(checkpoint_dir: str) -> Tuple[str, ...]:
  """Deletes the temporary directories of saves that never finished (orbax writes a step under
  `<step>.orbax-checkpoint-tmp*` and renames it when complete): they hold no usable state and their
  space is what a full disk needs back. Only the run holding the workdir's lock may call this (a
  save in progress looks the same); returns what it removed."""
  if not os.path.isdir(checkpoint_dir):
    return ()
  removed = []
  for name in sorted(os.listdir(checkpoint_dir)):
    if re.fullmatch(r"\d+\.orbax-checkpoint-tmp.*", name):
      shutil.rmtree(os.path.join(checkpoint_dir, name), ignore_errors=True)
      removed.append(os.path.join(checkpoint_dir, name))
  return tuple(removed)


def short_error(e: BaseException, limit: int = 600) -> str:
  """`Type: first line of the message`, without the tensorstore spec that orbax's errors append
  (one JSON line of several kilobytes per array), cut to `limit` characters."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = re.sub(r"\s*\[tensorstore_spec=.*$", "", text)
  if len(text) > limit:
    text = text[:limit - 3].rstrip() + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _steps_text(steps) -> str:
  return ", ".join(str(s) for s in sorted(steps)) if steps else "none"


def _jsonable(obj):
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.integer, np.floating, np.bool_)):
    return obj.item()
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  return repr(obj)


def _abstract(tree):
  """Concrete arrays -> ShapeDtypeStructs with the same sharding; abstract leaves pass through.

  Every leaf needs a sharding: without one orbax hands back host numpy arrays, which would only
  fail later, far from the cause (note that `jax.eval_shape` drops shardings).
  """

  def leaf(path, x):
    if isinstance(x, jax.Array):
      x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if not isinstance(x, jax.ShapeDtypeStruct):
      raise TypeError(f"restore target {_keystr(path)}: {x!r}; expected a jax.ShapeDtypeStruct with a "
                      f"sharding, or a jax.Array")
    if getattr(x, "sharding", None) is None:
      raise ValueError(f"restore target {_keystr(path)}: {x} has no sharding; expected "
                       f"jax.ShapeDtypeStruct(shape, dtype, sharding=...) so the arrays land on devices")
    return x

  return jax.tree_util.tree_map_with_path(leaf, tree)


def _keystr(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


class CheckpointManager:
  """Periodic, asynchronous, resumable checkpoints of one training run.

  `directory` holds one subdirectory per saved step. `config` (any dataclass or JSON-like value,
  typically the run's configs) is written into each step's metadata.
  """

  def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig = CheckpointConfig(),
               config: Any = None):
    self.cfg = cfg
    directory = str(directory)
    if "://" not in directory:
      directory = os.path.abspath(directory)
    self.directory = epath.Path(directory)
    self._config_json = _jsonable(config)
    self._manager: Optional[ocp.CheckpointManager] = None
    if not cfg.enabled:
      return
    policies = [ocp.checkpoint_managers.LatestN(n=cfg.keep_last_n)]
    if cfg.keep_every_k:
      policies.append(ocp.checkpoint_managers.EveryNSteps(interval_steps=cfg.keep_every_k))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(cfg.every_n_steps),
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=cfg.async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={
            _STATE: ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True, type_handler_registry=_type_handlers()),
            _DATA: grain.checkpoint.CheckpointHandler(),
            _META: ocp.JsonCheckpointHandler(),
        },
        options=options,
    )

  # ----------------------------------------------------------------------------------- saving

  def should_save(self, step: int) -> bool:
    return self._manager is not None and self._manager.should_save(step)

  def would_save(self, step: int, *, force: bool = False) -> bool:
    """Whether `save(step, ..., force=force)` would write (so a caller can check the state first)."""
    if self._manager is None or int(step) in self._manager.all_steps():
      return False
    return force or self._manager.should_save(int(step))

  def save(self, step: int, state, data_iter=None, *, force: bool = False,
           metadata: Optional[Dict[str, Any]] = None) -> bool:
    """Start saving `state` (and the iterator's position) as `step`; True if a save started.

    Without `force` only steps that are multiples of `every_n_steps` are saved; `force` saves any
    step (end of training, preemption). A step that is already saved is never written twice.
    Returns before the arrays reach disk when `async_save` is on; `wait()` blocks until they do.
    """
    if not self.would_save(step, force=force):
      return False
    step = int(step)
    meta = {"step": step, "config": self._config_json}
    if metadata:
      meta.update(_jsonable(metadata))
    items = {_STATE: ocp.args.PyTreeSave(state), _META: ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items[_DATA] = grain.checkpoint.CheckpointSave(data_iter)
    self._state_bytes = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(state))
    with self._writing(step):
      started = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))
    self._pending = step if started else self._pending
    return started

  def wait(self):
    """Block until pending asynchronous saves are on disk (raises if one of them failed:
    CheckpointWriteError for a full disk or a directory that refuses writes)."""
    if self._manager is not None:
      with self._writing(None):
        self._manager.wait_until_finished()

  def close(self):
    if self._manager is not None:
      try:
        with self._writing(None):
          self._manager.wait_until_finished()
      finally:
        self._manager.close()
        self._manager = None

  _state_bytes = 0
  _pending: Optional[int] = None  # the newest step whose save started

  @contextlib.contextmanager
  def _writing(self, step: Optional[int]):
    """Turns a file-system failure of a save (this one, or an asynchronous one still pending) into a
    CheckpointWriteError naming the directory, the space needed and free, and the newest intact step."""
    try:
      yield
    except CheckpointWriteError:
      raise
    except Exception as e:  # noqa: BLE001 - only file-system failures are translated; the rest re-raise
      if not _is_write_failure(e):
        raise
      raise self._write_error(e, step) from e

  def _write_error(self, e: BaseException, step: Optional[int]) -> CheckpointWriteError:
    directory = str(self.directory)
    match = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(e))
    failed = int(match.group(1)) if match else (self._pending if self._pending is not None else step)
    try:
      intact = [s for s in self._manager.all_steps() if s != failed]
    except Exception:  # noqa: BLE001 - the listing is a courtesy here; the write error is the news
      intact = []
    newest = max(intact) if intact else None
    resume = (f"the newest intact checkpoint is step {newest}, which a rerun resumes from" if newest is not None
              else "no checkpoint of this run is intact yet, so a rerun starts from step 0")
    if _is_disk_full(e):
      need = _du(os.path.join(directory, str(newest))) if newest is not None else self._state_bytes
      try:
        free = shutil.disk_usage(directory).free
      except OSError:
        free = 0
      message = (f"checkpoint step {failed} could not be written to {directory}: no space left on device (a "
                 f"checkpoint needs about {need / 2**20:,.0f} MiB there, {free / 2**20:,.0f} MiB is free); {resume}. "
                 "Free space or move the workdir, then rerun the same command.")
    else:
      reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
      message = (f"checkpoint step {failed} could not be written to {directory} ({reason[:300]}); {resume}. Fix "
                 "the directory (permissions, mount), then rerun the same command.")
    return CheckpointWriteError(message, directory=directory, step=failed, intact=newest, disk_full=_is_disk_full(e))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # ---------------------------------------------------------------------------------- restoring

  def all_steps(self) -> Tuple[int, ...]:
    return tuple(self._manager.all_steps()) if self._manager is not None else ()

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step() if self._manager is not None else None

  def step_path(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def read_metadata(self, step: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """The JSON metadata saved with `step` (default: the latest), or None without checkpoints."""
    if self._manager is None:
      return None
    self._manager.wait_until_finished()
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    self.check_step_exists(step)
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    except Exception as e:  # noqa: BLE001 - re-raised with the path
      raise CheckpointRestoreError(
          f"checkpoint {self.step_path(step)}: cannot read its metadata ({short_error(e)}); it was left "
          f"untouched. Steps in {self.directory}: {_steps_text(self.all_steps())}",
          directory=self.directory, step=step, available=self.all_steps()) from e

  def check_step_exists(self, step: int):
    """CheckpointNotFoundError listing the saved steps unless `step` is one of them."""
    steps = self.all_steps()
    if int(step) not in steps:
      raise CheckpointNotFoundError(
          f"checkpoint directory {self.directory} has no step {step}; available: {_steps_text(steps)}",
          directory=self.directory, step=int(step), available=steps)

  def saved_shapes(self, step: int) -> Dict[str, Tuple[int, ...]]:
    """{leaf path ("params/layer_1/engram/memory/table"): shape} of the state saved as `step`, read
    from its metadata (no array is read)."""
    if self._manager is None:
      raise ValueError("CheckpointManager: checkpointing is disabled (CheckpointConfig.enabled=False)")
    try:
      saved = self._manager.item_metadata(step)[_STATE]
    except Exception as e:  # noqa: BLE001 - re-raised with the path
      raise CheckpointRestoreError(f"checkpoint {self.step_path(step)}: cannot read the state's metadata "
                                   f"({type(e).__name__}: {e})") from e
    tree = saved.tree if hasattr(saved, "tree") else saved
    return {_keystr(p): tuple(getattr(x, "shape", ())) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

  def restore_latest(self, abstract_state, data_iter=None) -> Optional[Tuple[Any, int]]:
    """(state, step) from the newest checkpoint, or None when there is none (fresh start).

    `abstract_state` gives the tree, shapes, dtypes and target shardings (leaves are
    `jax.ShapeDtypeStruct`s with `.sharding`, or arrays whose sharding is reused). `data_iter`, a
    grain iterator, is moved in place to the saved position.
    """
    if self._manager is None:
      return None
    self._manager.wait_until_finished()
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract_state, data_iter), step

  def restore(self, step: int, abstract_state, data_iter=None, *, partial: bool = False):
    """The state saved as `step`, read into `abstract_state`'s shapes and shardings.

    `partial=True` reads only the leaves `abstract_state` names (a nested dict whose keys follow
    the saved tree, e.g. `{"params": ..., "model_state": ...}` of a saved `TrainState`): the
    other arrays, such as optimizer moments, are never read from disk nor placed on devices.
    """
    if self._manager is None:
      raise ValueError("CheckpointManager: checkpointing is disabled (CheckpointConfig.enabled=False)")
    self._manager.wait_until_finished()  # a step still being written by this manager is not readable yet
    self.check_step_exists(step)
    path = self.step_path(step)
    abstract_state = _abstract(abstract_state)
    self._check_compatible(step, abstract_state, partial)
    items = {_STATE: ocp.args.PyTreeRestore(
        item=abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
        partial_restore=partial)}
    if data_iter is not None:
      if not (path / _DATA).exists():
        raise CheckpointRestoreError(
            f"checkpoint {path} has no data iterator state (it was saved without data_iter); "
            f"restore without data_iter or start the data pipeline from scratch",
            directory=self.directory, step=step, available=self.all_steps())
      written = {f.name.rsplit("-of-", 1)[1][:-len(".json")] for f in (path / _DATA).glob("process_*-of-*.json")}
      if written and written != {str(jax.process_count())}:
        raise CheckpointRestoreError(
            f"checkpoint {path} was written by {' or '.join(sorted(written))} processes and each saved its own data "
            f"iterator position, but this run has {jax.process_count()}: resume it with that many processes (its "
            f"parameters restore on any count: eval.py, generate.py and patch.py do not read the iterator). It was "
            f"left untouched.", directory=self.directory, step=step, available=self.all_steps())
      items[_DATA] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - any failure to read is reported with the path
      raise CheckpointRestoreError(
          f"checkpoint {path} cannot be restored into the given target ({short_error(e)}); the checkpoint "
          f"may be damaged and was left untouched. Steps in {self.directory}: {_steps_text(self.all_steps())}",
          directory=self.directory, step=step, available=self.all_steps()) from e
    return restored[_STATE]

  def find_intact(self, abstract_state, below: int, *, partial: bool = False,
                  accept: Optional[Callable[[Any], bool]] = None) -> Optional[int]:
    """The newest step older than `below` that restores into `abstract_state` (and that `accept`,
    given the restored state, approves), or None.

    Each candidate is read in full (what `restore` with the same target reads) and dropped: this
    is the check that an older step is intact, for an error message, not a silent fallback.
    """
    for step in sorted((s for s in self.all_steps() if s < below), reverse=True):
      try:
        restored = self.restore(step, abstract_state, partial=partial)
      except CheckpointRestoreError:
        continue
      ok = accept is None or accept(restored)
      for leaf in jax.tree.leaves(restored):
        if isinstance(leaf, jax.Array):
          leaf.delete()
      if ok:
        return step
    return None

  def set_aside_after(self, step: int) -> Tuple[str, ...]:
    """Move every step newer than `step` into `<directory>.superseded/` (renamed, never deleted), so
    a run resumed from `step` saves its own steps and later resumes from them. Returns the new
    paths. Call it from one process; in a multi-process run the others must then `reload()`."""
    if self._manager is None:
      return ()
    self._manager.wait_until_finished()
    newer = [s for s in self.all_steps() if s > step]
    if not newer:
      return ()
    aside = self.directory.parent / f"{self.directory.name}.superseded"
    aside.mkdir(parents=True, exist_ok=True)
    moved = []
    for s in sorted(newer):
      target, n = aside / str(s), 1
      while target.exists():
        target, n = aside / f"{s}-{n}", n + 1
      self.step_path(s).rename(target)
      moved.append(str(target))
    self.reload()
    return tuple(moved)

  def reload(self):
    """Re-read the steps on disk (after another process changed the directory)."""
    if self._manager is not None:
      self._manager.reload()

  def _check_compatible(self, step: int, abstract_state, partial: bool = False):
    """Compare tree paths and shapes with the saved metadata, listing every difference at once
    (orbax reports only the first, and with padding enabled would not report shapes at all).
    A partial target may leave saved leaves out, but every leaf it names must be saved."""
    path = self.step_path(step)
    try:
      saved = self._manager.item_metadata(step)[_STATE]
      saved_tree = saved.tree if hasattr(saved, "tree") else saved
    except Exception as e:  # noqa: BLE001
      raise CheckpointRestoreError(
          f"checkpoint {path}: cannot read the state's metadata ({short_error(e)}); the checkpoint may be "
          f"damaged or incomplete and was left untouched. Steps in {self.directory}: "
          f"{_steps_text(self.all_steps())}", directory=self.directory, step=step, available=self.all_steps()) from e
    if saved_tree is None:
      raise CheckpointRestoreError(f"checkpoint {path}: has no readable state item; it was left untouched",
                                   directory=self.directory, step=step, available=self.all_steps())
    saved_shapes = {_keystr(p): tuple(getattr(x, "shape", ())) for p, x in
                    jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
    want_shapes = {_keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    problems = [f"missing from checkpoint: {k}" for k in sorted(set(want_shapes) - set(saved_shapes))]
    if not partial:
      problems += [f"not in target: {k}" for k in sorted(set(saved_shapes) - set(want_shapes))]
    problems += [f"shape of {k}: checkpoint {saved_shapes[k]}, target {want_shapes[k]}"
                 for k in sorted(set(saved_shapes) & set(want_shapes)) if saved_shapes[k] != want_shapes[k]]
    if problems:
      shown = "; ".join(problems[:10]) + (f"; ... ({len(problems) - 10} more)" if len(problems) > 10 else "")
      raise CheckpointRestoreError(
          f"checkpoint {path} does not match the target state: {shown}. The checkpoint was left "
          f"untouched; restore with the config it was written with",
          directory=self.directory, step=step, available=self.all_steps())


# ----------------------------------------------------------------------------------- preemption


def saved_array_reader(checkpoint_dir: str, step: int):
  """read(path, start, stop) -> numpy rows [start, stop) (the whole array without them) of the array saved at key path `path` (a
  tuple such as ("params", "layer_1", "engram", "memory", "table")) in step `step` of a checkpoint
  directory, read with tensorstore from the step's zarr3 arrays in its OCDBT store: no device is
  involved, and only the saved chunks overlapping the rows are read. `read.paths` lists the saved
  arrays, `read.has(path)` and `read.shape(path)` answer without reading one.

  Raises CheckpointRestoreError when the step's metadata cannot be read, and when a path is not saved.
  """
  import ast

  import tensorstore as ts

  state = os.path.abspath(os.path.join(checkpoint_dir, str(step), _STATE))
  meta_path = os.path.join(state, "_METADATA")
  try:
    with open(meta_path, encoding="utf-8") as f:
      tree = json.load(f)["tree_metadata"]
  except (OSError, ValueError, KeyError) as e:
    raise CheckpointRestoreError(f"checkpoint {checkpoint_dir!r} step {step}: cannot read {meta_path!r} ({e})",
                                 directory=checkpoint_dir, step=step) from None
  names = {tuple(ast.literal_eval(key)): ".".join(ast.literal_eval(key)) for key in tree}
  opened = {}

  def array(path):
    path = tuple(path)
    if path not in names:
      raise CheckpointRestoreError(f"checkpoint {checkpoint_dir!r} step {step} saved no array {'/'.join(path)}",
                                   directory=checkpoint_dir, step=step)
    if path not in opened:
      spec = {"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": "file://" + state, "path": names[path]}}
      opened[path] = ts.open(spec, read=True).result()
    return opened[path]

  def read(path, start: Optional[int] = None, stop: Optional[int] = None) -> np.ndarray:
    a = array(path)
    return np.asarray((a if start is None and stop is None else a[start:stop]).read().result())

  read.paths = tuple(names)  # type: ignore[attr-defined]
  read.has = lambda path: tuple(path) in names  # type: ignore[attr-defined]
  read.shape = lambda path: tuple(array(path).shape)  # type: ignore[attr-defined]
  return read


STATE_FINGERPRINT_MAX_ELEMENTS = 1 << 20


def state_fingerprint(checkpoint_dir: str, step: int) -> str:
  """sha256 of a saved state's small parameter arrays (norm scales, biases, gates: every saved
  parameter of at most STATE_FINGERPRINT_MAX_ELEMENTS values that is not an Engram table): what
  identifies one saved state of one run, cheaply. Every train step changes them (each receives a
  gradient), two runs of one config differ in them from the first step, and they are a few MB even
  for the paper's models, where hashing the tables themselves would read hundreds of GB. Things read
  beside a checkpoint (exported table directories) record it and are checked against it."""
  from engram_jax import memory

  read = saved_array_reader(checkpoint_dir, step)
  h = hashlib.sha256()
  for path in sorted(read.paths):
    if not path or path[0] != "params" or memory.saved_table_name(path):
      continue
    if int(np.prod(read.shape(path))) > STATE_FINGERPRINT_MAX_ELEMENTS:
      continue
    value = np.ascontiguousarray(read(path))
    h.update("/".join(path).encode() + b"\0" + str(value.dtype).encode() + str(value.shape).encode())
    h.update(value.tobytes())
  return h.hexdigest()


def step_to_read(checkpoint_dir: str, step: Optional[int] = None) -> int:
  """`step`, or the newest step of a checkpoint directory; FileNotFoundError when there is none."""
  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} does not exist (expected <workdir>/checkpoints "
                            "written by train.py)")
  if step is not None:
    return step
  from engram_jax.config import CheckpointConfig

  manager = CheckpointManager(checkpoint_dir, CheckpointConfig(async_save=False))
  try:
    step = manager.latest_step()
  finally:
    manager.close()
  if step is None:
    raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} holds no checkpoint")
  return step


class PreemptionHandler:
  """Turns SIGTERM / SIGINT into a flag that the training loop polls between steps.

  Exiting inside a signal handler would kill the process in the middle of a step or of an
  asynchronous write; instead the loop sees `should_stop()`, saves with `force=True`, waits and
  returns. A second signal of the same kind restores the previous handlers and re-delivers it, so
  a stuck run can still be interrupted (Ctrl-C twice).
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)):
    self.signals = tuple(signals)
    self._event = threading.Event()
    self._previous: Dict[int, Any] = {}
    self.received: Optional[int] = None

  def install(self) -> "PreemptionHandler":
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("install_preemption_handler: signal handlers can only be installed from the main thread")
    for sig in self.signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self):
    """Put back the handlers that were there before `install`."""
    for sig, previous in self._previous.items():
      signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self._event.is_set() and self.received == signum:
      self.uninstall()
      signal.raise_signal(signum)
      return
    self.received = signum
    self._event.set()

  @property
  def requested(self) -> bool:
    """This process received a signal (local; no communication)."""
    return self._event.is_set()

  def should_stop(self) -> bool:
    """Whether any process received a signal.

    With several processes this is a collective (every process must call it at the same step),
    because a checkpoint save is one too: if only the signalled host stopped to save, the others
    would wait for it forever.
    """
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # local import: only multi-process runs need it
    return bool(np.max(multihost_utils.process_allgather(np.int32(local))))

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.uninstall()


def install_preemption_handler(signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> PreemptionHandler:
  """Install and return a `PreemptionHandler`; call `.uninstall()` (or use it as a context manager)
  to restore the previous handlers."""
  return PreemptionHandler(signals).install()
