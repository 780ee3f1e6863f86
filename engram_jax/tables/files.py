"""The table directory format: write (chunk by chunk), export a checkpoint's tables, read and check
the manifest.

A table directory holds one raw row-major file per table (`<table>.rows`, the storage dtype) plus
`<table>.scale` (float32 per row) for int8 / float8, and `manifest.json` with the model's row
fingerprint (`patches.fingerprint`: everything that gives a row its meaning), each table's rows,
width, dtype, byte size and sha256. Opening one (`host.HostTables.open`) checks the fingerprint and
every file's size (a truncated file is an error, not a short read); the checksums are read back with
`verify=True` (a pass over every byte: minutes for tens of GB). Directories are written under a
temporary name and renamed when complete, and an existing directory is never written over.

A directory exported from a checkpoint is bound to it: the manifest's `source` names the checkpoint
directory, the step and the saved state's fingerprint (`checkpoint.state_fingerprint`), and
`check_source` refuses it for any other saved state (another step, another run of the same config:
same layout, other rows) unless the mismatch is asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Dict, Optional

import numpy as np

from engram_jax import memory
from engram_jax.config import EngramConfig, ModelConfig
from engram_jax.tables.quant import SCALED, bytes_per_row, check_quantize, quantize_rows

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class TableFileError(ValueError):
  """A table directory that cannot be used for this model: missing, damaged or another layout.
  Nothing was written."""


class TableSourceError(TableFileError):
  """A table directory exported from another checkpoint than the one being restored."""


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      block = f.read(chunk)
      if not block:
        return h.hexdigest()
      h.update(block)


def layout(cfg: EngramConfig) -> Dict[str, Dict[str, int]]:
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
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename: a directory made as mkdir makes one
  try:
    tables = {}
    for name, shape in layout(cfg.engram).items():
      rows, dim = shape["rows"], shape["dim"]
      files = {"rows": f"{name}.rows"} | ({"scale": f"{name}.scale"} if quantize in SCALED else {})
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
  paths = {memory.saved_table_name(p): p for p in arrays.paths if memory.saved_table_name(p)}

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
  for name, shape in layout(cfg.model.engram).items():
    if name not in reader.names:
      raise TableFileError(f"checkpoint {checkpoint_dir!r} step {step} has no table {name!r}: the config's Engram "
                           f"layers {cfg.model.engram.layer_ids} do not match it (it has {list(reader.names)})")
    saved = reader.shape(name)
    if saved != (shape["rows"], shape["dim"]):
      raise TableFileError(f"checkpoint {checkpoint_dir!r} step {step}: table {name} is {saved}; the config's layout "
                           f"is {(shape['rows'], shape['dim'])}")
  if hashing is None:
    hashing = data_lib.engram_hashing(data_lib.load_tokenizer(cfg.data.tokenizer_path), cfg.model.engram)
  source = {"checkpoint_dir": os.path.abspath(checkpoint_dir), "checkpoint_step": int(step),
            "state_fingerprint": ckpt_lib.state_fingerprint(checkpoint_dir, step)}
  return write_table_dir(out_dir, cfg.model, fingerprint(cfg.model, hashing), reader, quantize=quantize,
                         chunk_rows=chunk_rows, log=log, extra={"source": source})


def check_source(manifest: dict, table_dir: str, checkpoint_dir: str, step: int, *, force: bool = False) -> dict:
  """Whether a table directory was exported from `checkpoint_dir`'s step `step`: the record results
  carry ({table_dir, source, matches, forced}); TableSourceError naming both and the re-export command
  when it was not, unless `force`. A directory written before sources carried a state fingerprint is
  checked by its step alone (`matches` None when the step agrees: it cannot tell two runs apart)."""
  from engram_jax import checkpoint as ckpt_lib

  source = manifest.get("source") or {}
  record = {"table_dir": os.path.abspath(table_dir), "source": source, "matches": None, "forced": bool(force)}
  if "state_fingerprint" in source:
    record["matches"] = source["state_fingerprint"] == ckpt_lib.state_fingerprint(checkpoint_dir, step)
  elif "checkpoint_step" in source and source["checkpoint_step"] != step:
    record["matches"] = False
  if record["matches"] is False and not force:
    where = source.get("checkpoint_dir", "a checkpoint")
    raise TableSourceError(
        f"table directory {table_dir!r} was exported from {where} step {source.get('checkpoint_step', '?')}, but the "
        f"checkpoint restored is {os.path.abspath(checkpoint_dir)} step {step}, whose saved state differs: its rows "
        f"belong to another model. Export this checkpoint's tables (python eval.py --checkpoint {checkpoint_dir} "
        f"--step {step} --export_tables NEW_DIR), or pass --force_tables to use these rows anyway (recorded in "
        "results.json)")
  return record


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
  want = layout(cfg.engram)
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
