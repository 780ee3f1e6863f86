"""Knowledge patches: new facts written into Engram table rows only, shipped as a small directory,
applied at load time, stacked and reverted exactly.

Why rows only: Engram's addresses depend only on the input tokens, so the rows a facts corpus can
ever read are known before training (hash the corpus). Training only those rows, with the backbone,
projections, gates, conv and the MoE balancing bias frozen, changes nothing else in the model; the
patch is the changed rows (row ids, new values, the base values they replace), so its size scales
with the rows changed, never with the table.

Training (`train_rows`): the rows the facts read are gathered once into a compact [U, d] array per
table; each step reads rows from it (host-side remapped ids), takes the gradient with respect to
that compact array only (the backbone's weight gradients are never formed, and blocks before the
first Engram layer get no backward pass), and Adam updates it. The base model's ordinary traffic is
counted by hashing a sample of its text (`rows_read`): every row of a hashed table is read by some
of it (shared n-grams such as "was born in", and collisions), so by default (`protect="traffic"`)
each trained row is pulled back towards its base value in proportion to how often that traffic reads
it; "freeze" leaves the rows read at least `protect_min_count` times exactly as they were (the
traffic's outputs are then bit-identical), "l2" pulls them back uniformly, "none" trains every row
alike. Question/answer batches (`answer_batches`) put the loss on the answers only, and
`max_answers` freezes the rows that pairs of many distinct answers read (templates).

The format (a directory, `FORMAT_VERSION` 1):
  manifest.json   format version; `fingerprint` (sha256 of everything that gives a row its meaning:
                  the model config, each layer's table layout, hash multipliers and primes, the
                  compressed-tokenizer lookup, pad ids); `base_fingerprint` (sha256 of the base
                  values of the changed rows); per table the row count and the sha256 of its files;
                  `training` (what it was trained on and how).
  <table>.ids.npy   int64 [K] row ids (sorted), <table>.new.npy / <table>.base.npy  [K, d] values.
A patch is written to a temporary directory and renamed into place; an existing directory is never
written over.

Applying (`apply_patches`) refuses a patch whose fingerprint differs from the model's (its rows would
mean other n-grams) and, unless forced, one whose base values differ from the model's rows; rows that
several patches change are reported and resolved by a stated policy: "sum" (base + the sum of every
patch's delta, the default: disjoint facts that share template rows add up), "last" (the last patch
listed wins) or "refuse". It returns the patched params and an `Undo`; `revert` restores the base rows
bit for bit. `resolve_patches` is the same logic for any holder of the tables: the runner uses it for
host and disk tables (tables/host.py), whose patched rows become an overlay the host gather reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from engram_jax import data as data_lib
from engram_jax import memory
from engram_jax.config import Config, ModelConfig, to_dict
from engram_jax.hashing import EngramHashing
from engram_jax.model import forward, token_nll
from engram_jax.tables import triggers as trigger_lib

FORMAT_VERSION = 2  # 2: trigger rows (mechanism "triggers"); version 1 patches (hashed rows) still load
READABLE_VERSIONS = (1, 2)
MECHANISMS = ("triggers", "rows")
POLICIES = ("sum", "last", "refuse")


class PatchError(ValueError):
  """A patch that cannot be read or applied; the message says which and why."""


# ----------------------------------------------------------------------------------------------
# Fingerprints.


def _sha256(*chunks: bytes) -> str:
  h = hashlib.sha256()
  for chunk in chunks:
    h.update(chunk)
  return h.hexdigest()


def fingerprint(cfg: ModelConfig, hashing: EngramHashing) -> str:
  """sha256 of everything that gives a table row its meaning: the model config, each layer's table
  layout (head sizes, offsets, padded rows, head width), hash multipliers and primes, the compressed
  tokenizer's lookup (the identity for raw-id recipes), the pad ids and the hashing recipe (its name,
  reset id and padding; the demo recipe adds nothing, so fingerprints from before recipes still
  match). Two models with equal fingerprints address the same n-gram with the same row."""
  if cfg.engram is None:
    raise PatchError("the model has no Engram layers (model.engram is None): it has no table rows to patch")
  e = cfg.engram
  layout = {}
  for layer in e.layer_ids:
    sizes, offsets, rows = memory.table_layout(e, layer)
    layout[str(layer)] = {"sizes": sizes.tolist(), "offsets": offsets.tolist(), "rows": rows,
                          "head_dim": e.head_dim, "multipliers": hashing.hasher.multipliers[layer].tolist(),
                          "primes": hashing.hasher.primes[layer].tolist()}
  desc = {"model": to_dict(cfg), "layout": layout, "pad_id": hashing.pad_id,
          "compressed_pad_id": hashing.compressed_pad_id}
  desc.update(hashing.recipe.fingerprint_fields())  # the recipe's name and dialect (none for the demo's)
  return _sha256(json.dumps(desc, sort_keys=True).encode(), np.ascontiguousarray(hashing.compressed.lookup,
                                                                                  np.int64).tobytes())


# ----------------------------------------------------------------------------------------------
# The patch.


@dataclasses.dataclass
class TableRows:
  """The changed rows of one table: ids int64 [K] (sorted, unique), new and base values [K, d]."""

  ids: np.ndarray
  new: np.ndarray
  base: np.ndarray

  def __post_init__(self):
    if self.ids.ndim != 1 or self.new.shape != self.base.shape or self.new.shape[:1] != self.ids.shape:
      raise PatchError(f"rows of shapes ids {self.ids.shape}, new {self.new.shape}, base {self.base.shape}: "
                       "expected ids [K] and values [K, d]")


@dataclasses.dataclass
class TriggerRows:
  """A patch's triggers: tokens int32 [N, width] (`triggers.pack`: right-aligned, distinct), and per
  table the rows each supplies [N, H, d] (new) and the hashed rows it shadows (base)."""

  tokens: np.ndarray
  new: Dict[str, np.ndarray]
  base: Dict[str, np.ndarray]

  def __post_init__(self):
    n = self.tokens.shape[0] if self.tokens.ndim == 2 else -1
    for name in self.new:
      if name not in self.base or self.new[name].shape != self.base[name].shape or self.new[name].ndim != 3 \
          or self.new[name].shape[0] != n:
        raise PatchError(f"trigger rows of {name}: tokens {self.tokens.shape}, new {self.new[name].shape}, base "
                         f"{self.base.get(name, np.zeros(0)).shape}: expected tokens [N, width], values [N, H, d]")

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def nbytes(self) -> int:
    return self.tokens.nbytes + sum(v.nbytes for v in self.new.values()) + sum(v.nbytes for v in self.base.values())


@dataclasses.dataclass
class Patch:
  manifest: dict
  tables: Dict[str, TableRows]
  triggers: Optional[TriggerRows] = None

  @property
  def num_rows(self) -> int:
    """Rows the patch supplies: hashed rows changed, plus a row per head of each trigger's tables."""
    rows = sum(len(t.ids) for t in self.tables.values())
    if self.triggers is not None:
      rows += sum(v.shape[0] * v.shape[1] for v in self.triggers.new.values())
    return rows

  @property
  def nbytes(self) -> int:
    return sum(t.ids.nbytes + t.new.nbytes + t.base.nbytes for t in self.tables.values()) + (
        self.triggers.nbytes if self.triggers is not None else 0)


def make_patch(cfg: ModelConfig, hashing: EngramHashing, tables: Dict[str, TableRows], training: dict,
               triggers: Optional[TriggerRows] = None) -> Patch:
  base_fp = _sha256(*(t.base.tobytes() for _, t in sorted(tables.items())))
  manifest = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint(cfg, hashing),
              "base_fingerprint": base_fp, "training": training,
              "mechanism": "triggers" if triggers is not None else "rows",
              "tables": {name: {"rows": int(len(t.ids)), "dim": int(t.new.shape[1]) if t.new.ndim == 2 else None,
                                "dtype": str(t.new.dtype),
                                "table_rows": int(memory.table_layout(cfg.engram, int(name.split("_")[-1]))[2])}
                         for name, t in tables.items()}}
  if triggers is not None:
    lengths = (triggers.tokens != trigger_lib.PAD).sum(axis=1)
    manifest["triggers"] = {"count": len(triggers), "width": int(triggers.tokens.shape[1]),
                            "length_histogram": {str(k): int(v) for k, v in zip(*np.unique(lengths, return_counts=True))},
                            "tables": {name: {"shape": list(v.shape), "dtype": str(v.dtype)}
                                       for name, v in triggers.new.items()}}
  return Patch(manifest, tables, triggers)


_FILES = ("ids", "new", "base")


def save_patch(patch: Patch, out_dir: str) -> str:
  """Writes the patch directory (refusing an existing path); returns its path."""
  if os.path.exists(out_dir):
    raise FileExistsError(f"patch directory {out_dir!r} already exists: choose another --out (nothing was written)")
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".patch-", dir=parent)
  try:
    manifest = json.loads(json.dumps(patch.manifest))
    for name, rows in patch.tables.items():
      entry = manifest["tables"][name]
      for kind in _FILES:
        path = os.path.join(tmp, f"{name}.{kind}.npy")
        np.save(path, getattr(rows, kind), allow_pickle=False)
        with open(path, "rb") as f:
          entry[f"{kind}_sha256"] = _sha256(f.read())
    if patch.triggers is not None:
      files = {"triggers.tokens.npy": patch.triggers.tokens}
      for name in patch.triggers.new:
        files[f"{name}.trigger_new.npy"] = patch.triggers.new[name]
        files[f"{name}.trigger_base.npy"] = patch.triggers.base[name]
      sums = {}
      for file, array in files.items():
        path = os.path.join(tmp, file)
        np.save(path, array, allow_pickle=False)
        with open(path, "rb") as f:
          sums[file] = _sha256(f.read())
      manifest["triggers"]["sha256"] = sums
    with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
      f.write("\n")
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  patch.manifest = manifest
  return out_dir


def load_patch(path: str) -> Patch:
  """Reads and verifies a patch directory: every file present, its checksum, shapes and dtypes."""
  manifest_path = os.path.join(path, "manifest.json")
  if not os.path.isdir(path):
    raise PatchError(f"patch {path!r} does not exist (expected a directory written by `patch.py create`)")
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise PatchError(f"patch {path!r} has no manifest.json: not a patch directory, or an incomplete copy") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise PatchError(f"patch {path!r}: manifest.json is not valid JSON ({e}); the patch is damaged") from None
  version = manifest.get("format_version") if isinstance(manifest, dict) else None
  if version not in READABLE_VERSIONS:
    raise PatchError(f"patch {path!r} has format_version {version!r}; this engram_jax reads versions "
                     f"{READABLE_VERSIONS}")
  for key in ("fingerprint", "base_fingerprint", "tables"):
    if key not in manifest:
      raise PatchError(f"patch {path!r}: manifest.json lacks {key!r}; the patch is damaged")
  tables = {}
  for name, entry in manifest["tables"].items():
    arrays = {}
    for kind in _FILES:
      file = os.path.join(path, f"{name}.{kind}.npy")
      try:
        with open(file, "rb") as f:
          raw = f.read()
      except FileNotFoundError:
        raise PatchError(f"patch {path!r} lacks {os.path.basename(file)} (listed in manifest.json)") from None
      if _sha256(raw) != entry.get(f"{kind}_sha256"):
        raise PatchError(f"patch {path!r}: {os.path.basename(file)} does not match its checksum in manifest.json "
                         "(truncated or modified); the patch is damaged")
      arrays[kind] = np.load(file, allow_pickle=False)
    if len(arrays["ids"]) != entry.get("rows"):
      raise PatchError(f"patch {path!r}: {name} has {len(arrays['ids'])} rows; manifest.json says {entry.get('rows')}")
    tables[name] = TableRows(arrays["ids"].astype(np.int64), arrays["new"], arrays["base"])
  patch = Patch(manifest, tables, _load_triggers(path, manifest.get("triggers")))
  base_fp = _sha256(*(t.base.tobytes() for _, t in sorted(tables.items())))
  if base_fp != manifest["base_fingerprint"]:
    raise PatchError(f"patch {path!r}: base rows do not match base_fingerprint; the patch is damaged")
  return patch


def _load_triggers(path: str, entry: Optional[dict]) -> Optional[TriggerRows]:
  if entry is None:
    return None
  arrays = {}
  for file, digest in (entry.get("sha256") or {}).items():
    try:
      with open(os.path.join(path, file), "rb") as f:
        raw = f.read()
    except FileNotFoundError:
      raise PatchError(f"patch {path!r} lacks {file} (listed in manifest.json)") from None
    if _sha256(raw) != digest:
      raise PatchError(f"patch {path!r}: {file} does not match its checksum in manifest.json (truncated or "
                       "modified); the patch is damaged")
    arrays[file] = np.load(os.path.join(path, file), allow_pickle=False)
  if "triggers.tokens.npy" not in arrays:
    raise PatchError(f"patch {path!r}: manifest.json lists triggers but no triggers.tokens.npy; the patch is damaged")
  names = sorted(f[:-len(".trigger_new.npy")] for f in arrays if f.endswith(".trigger_new.npy"))
  triggers = TriggerRows(arrays["triggers.tokens.npy"].astype(np.int32),
                         {n: arrays[f"{n}.trigger_new.npy"] for n in names},
                         {n: arrays[f"{n}.trigger_base.npy"] for n in names})
  if len(triggers) != entry.get("count"):
    raise PatchError(f"patch {path!r}: {len(triggers)} triggers; manifest.json says {entry.get('count')}")
  return triggers


def describe(patch: Patch, max_triggers: int = 20, decode: Optional[Callable[[Sequence[int]], str]] = None) -> str:
  """What `patch.py info` prints."""
  m = patch.manifest
  lines = [f"format version {m['format_version']}", f"fingerprint {m['fingerprint'][:16]}...",
           f"rows changed {patch.num_rows} ({patch.nbytes / 1e6:.2f} MB of row data)"]
  lines.insert(1, f"mechanism {m.get('mechanism', 'rows')}")
  t = patch.triggers
  if t is not None:
    lengths = (t.tokens != trigger_lib.PAD).sum(axis=1)
    hist = ", ".join(f"{k}: {v}" for k, v in m["triggers"]["length_histogram"].items())
    lines.append(f"triggers {len(t)} (tokens per trigger {hist}; mean {lengths.mean() if len(t) else 0:.2f}), "
                 f"{t.nbytes / 1e6:.3f} MB, {t.nbytes / max(len(t), 1):.0f} bytes per trigger")
    for i, seq in enumerate(trigger_lib.unpack(t.tokens[:max_triggers])):
      lines.append(f"  trigger {i}: {list(seq)}" + (f"  {decode(seq)!r}" if decode is not None else ""))
    if len(t) > max_triggers:
      lines.append(f"  ... {len(t) - max_triggers} more")
  for name, entry in sorted(m["tables"].items()):
    share = entry["rows"] / entry["table_rows"] if entry.get("table_rows") else float("nan")
    lines.append(f"  {name}: {entry['rows']} of {entry['table_rows']} rows ({100 * share:.2f}%), dim {entry['dim']}, "
                 f"{entry['dtype']}")
  training = m.get("training") or {}
  c = training.get("collateral")
  if c:
    lines.append(f"collateral on {c.get('text', 'reference text')} ({c['tokens']} tokens): KL(base || patched) "
                 f"{c['kl_per_token']:.4g} nats/token, loss {c['heldout_loss_base']:.4f} -> "
                 f"{c['heldout_loss_patched']:.4f} ({100 * c['heldout_loss_change']:+.2f}%)")
  share = training.get("rows_base_traffic_share")
  if share:
    text = (training.get("traffic") or {}).get("text", "the reference text")
    lines.append(f"rows the base traffic ({text}) reads: {100 * share['all']:.1f}% of the patch's rows")
  share = training.get("rows_heldout_share")
  if share:
    lines.append(f"rows the held-out text reads: {100 * share['all']:.1f}% of the patch's rows")
  for name, r in sorted((training.get("recall") or {}).items()):
    lines.append(f"recall of {name.replace('_', ' ')} ({r['questions']} questions): multiple choice "
                 f"{r['base']['mc']:.3f} -> {r['patched']['mc']:.3f}, greedy exact {r['base']['greedy_exact']:.3f} "
                 f"-> {r['patched']['greedy_exact']:.3f}")
  shown = ("collateral", "rows_base_traffic_share", "rows_heldout_share", "recall", "traffic", "trigger_choice")
  for key in sorted(k for k in training if k not in shown):
    lines.append(f"training.{key}: {json.dumps(training[key])[:200]}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Apply, stack, revert.


@dataclasses.dataclass
class Undo:
  """The base values of every row a set of patches changed: `revert` writes them back."""

  tables: Dict[str, TableRows]


@dataclasses.dataclass
class ApplyReport:
  patches: List[str]
  rows_changed: Dict[str, int]
  overlapping_rows: Dict[str, int]  # rows changed by more than one patch, per table
  policy: str
  triggers: int = 0  # distinct triggers applied
  identical_triggers: int = 0  # triggers several patches supply (resolved by the policy)


def _resolve(patches: Sequence[Tuple[str, Patch]], name: str, policy: str):
  """(ids [K], base [K, d], new [K, d], overlapping row count) of one table over every patch."""
  present = [(label, p.tables[name]) for label, p in patches if name in p.tables and len(p.tables[name].ids)]
  if not present:
    return None
  all_ids = np.unique(np.concatenate([t.ids for _, t in present]))
  dim = present[0][1].new.shape[1]
  base = np.zeros((len(all_ids), dim), present[0][1].base.dtype)
  new = None
  seen = np.zeros(len(all_ids), np.int64)
  delta = np.zeros((len(all_ids), dim), np.float64)
  last = np.zeros((len(all_ids), dim), present[0][1].new.dtype)
  for label, t in present:
    at = np.searchsorted(all_ids, t.ids)
    earlier = seen[at] > 0
    if np.any(earlier & np.any(base[at] != t.base, axis=1)):
      raise PatchError(f"patch {label!r} and an earlier one disagree on the base values of {name} rows: they were "
                       "trained from different models")
    base[at] = t.base
    seen[at] += 1
    delta[at] += t.new.astype(np.float64) - t.base.astype(np.float64)
    last[at] = t.new
  overlap = int(np.sum(seen > 1))
  if overlap and policy == "refuse":
    raise PatchError(f"{overlap} rows of {name} are changed by more than one patch and patch_policy='refuse'; "
                     "use 'sum' (add the deltas) or 'last' (the last patch wins)")
  new = (base.astype(np.float64) + delta).astype(base.dtype) if policy == "sum" else last
  # A row changed by one patch only gets that patch's value exactly, whatever the policy.
  single = seen == 1
  new[single] = last[single]
  return all_ids, base, new, overlap


def _write_rows(table: jax.Array, ids: np.ndarray, values: np.ndarray) -> jax.Array:
  """A copy of `table` with rows `ids` set to `values`, on the table's sharding."""
  write = jax.jit(lambda t, i, v: t.at[i].set(v.astype(t.dtype), mode="drop"),
                  out_shardings=getattr(table, "sharding", None))
  return write(table, jnp.asarray(ids, jnp.int32), jnp.asarray(values))


def check_model(patch: Patch, cfg: ModelConfig, hashing: EngramHashing, label: str,
                want: Optional[str] = None) -> None:
  """PatchError when `patch` was made for another model (another hashing, tokenizer or table layout):
  needs no checkpoint, so the tools check it before restoring one."""
  want = want or fingerprint(cfg, hashing)
  if patch.manifest["fingerprint"] != want:
    raise PatchError(f"patch {label!r} was made for another model (fingerprint {patch.manifest['fingerprint'][:16]}... "
                     f"vs this model's {want[:16]}...): its rows would mean different n-grams")


def resolve_patches(cfg: ModelConfig, hashing: EngramHashing, patches: Sequence[Patch | str],
                    read_rows: Callable[[str, np.ndarray], np.ndarray], num_rows: Dict[str, int], *,
                    policy: str = "sum", force: bool = False, labels: Optional[Sequence[str]] = None
                    ) -> Tuple[Dict[str, TableRows], ApplyReport]:
  """The rows a list of patches sets, whatever holds the tables: ({table name: TableRows(ids, new,
  base as the model has it now)}, report). `read_rows(name, ids)` returns the model's current float
  rows, `num_rows` each table's row count. Checks fingerprints, ids and (unless `force`) base rows."""
  if policy not in POLICIES:
    raise PatchError(f"patch_policy={policy!r}: expected one of {POLICIES}")
  loaded = [load_patch(p) if isinstance(p, str) else p for p in patches]
  labels = list(labels) if labels is not None else [p if isinstance(p, str) else f"patch {i}"
                                                     for i, p in enumerate(patches)]
  want = fingerprint(cfg, hashing)
  for label, p in zip(labels, loaded):
    check_model(p, cfg, hashing, label, want)
    for name, rows in p.tables.items():
      if name not in num_rows:
        raise PatchError(f"patch {label!r} changes table {name!r}, which this model does not have ({sorted(num_rows)})")
      if len(rows.ids) and (rows.ids.min() < 0 or rows.ids.max() >= num_rows[name]):
        raise PatchError(f"patch {label!r}: {name} row ids outside [0, {num_rows[name]})")
      if len(rows.ids) and not force:
        bad = int(np.sum(np.any(read_rows(name, rows.ids) != rows.base, axis=1)))
        if bad:
          raise PatchError(f"patch {label!r}: {bad} of its {len(rows.ids)} {name} rows differ from this model's "
                           "(it was trained from another checkpoint, another patch is applied already, or the "
                           "tables are stored quantized): apply it anyway with --force_patches (force=True)")
  pairs = list(zip(labels, loaded))
  changes, changed, overlapping = {}, {}, {}
  for name in num_rows:
    resolved = _resolve(pairs, name, policy)
    if resolved is None:
      continue
    ids, base, new, overlap = resolved
    if force:  # the undo must restore what the model had, which may differ from the patches' base
      base = np.asarray(read_rows(name, ids))
    changes[name] = TableRows(ids, new, base)
    changed[name], overlapping[name] = int(len(ids)), overlap
  return changes, ApplyReport(labels, changed, overlapping, policy)


def apply_patches(params, cfg: ModelConfig, hashing: EngramHashing, patches: Sequence[Patch | str], *,
                  policy: str = "sum", force: bool = False, labels: Optional[Sequence[str]] = None,
                  log: Callable[[str], None] = lambda s: None) -> Tuple[dict, Undo, ApplyReport]:
  """(patched params, Undo, report) for tables in the parameters (on the devices); `patches` are
  Patch objects or directories. The base params are not modified (tables are copied where rows change)."""
  backbone, tables = memory.split(params)
  read = lambda name, ids: np.asarray(jax.device_get(jnp.take(tables[name], jnp.asarray(ids, jnp.int32), axis=0)))  # noqa: E731
  changes, report = resolve_patches(cfg, hashing, patches, read, {n: t.shape[0] for n, t in tables.items()},
                                    policy=policy, force=force, labels=labels)
  new_tables = dict(tables)
  for name, rows in changes.items():
    new_tables[name] = _write_rows(tables[name], rows.ids, rows.new)
    overlap = report.overlapping_rows[name]
    log(f"{name}: {len(rows.ids)} rows patched" + (f", {overlap} changed by several patches ({policy})" if overlap else ""))
  return memory.merge(backbone, new_tables), Undo(changes), report


def revert(params, undo: Undo) -> dict:
  """The params with every row an `apply_patches` call changed set back to its base value."""
  backbone, tables = memory.split(params)
  tables = dict(tables)
  for name, rows in undo.tables.items():
    tables[name] = _write_rows(tables[name], rows.ids, rows.base)
  return memory.merge(backbone, tables)


def resolve_triggers(cfg: ModelConfig, hashing: EngramHashing, patches: Sequence[Patch], labels: Sequence[str], *,
                     policy: str = "sum") -> Tuple[Optional[trigger_lib.TriggerSet], int]:
  """The triggers a list of patches supplies, as one set (None: none), and how many token sequences
  several patches supply. Disjoint triggers are kept as they are (each patch's rows exactly);
  identical ones are resolved by `policy` as rows are: "sum" (the shadowed rows plus every patch's
  delta), "last" (the last patch listed wins), "refuse" (PatchError)."""
  if policy not in POLICIES:
    raise PatchError(f"patch_policy={policy!r}: expected one of {POLICIES}")
  e = cfg.engram
  want = fingerprint(cfg, hashing)
  names = memory.table_names(e)
  index: Dict[Tuple[int, ...], int] = {}
  seqs: List[Tuple[int, ...]] = []
  count: List[int] = []
  base: Dict[str, List[np.ndarray]] = {n: [] for n in names}
  delta: Dict[str, List[np.ndarray]] = {n: [] for n in names}
  last: Dict[str, List[np.ndarray]] = {n: [] for n in names}
  for label, p in zip(labels, patches):
    if p.triggers is None or not len(p.triggers):
      continue
    check_model(p, cfg, hashing, label, want)
    t = p.triggers
    if sorted(t.new) != sorted(names):
      raise PatchError(f"patch {label!r} has trigger rows for tables {sorted(t.new)}; this model's tables are "
                       f"{sorted(names)}")
    for name in names:
      expected = (len(t), e.num_heads, e.head_dim)
      if t.new[name].shape != expected:
        raise PatchError(f"patch {label!r}: trigger rows of {name} have shape {t.new[name].shape}; expected {expected}")
    for i, seq in enumerate(trigger_lib.unpack(t.tokens)):
      if len(seq) < e.max_ngram_size:
        raise PatchError(f"patch {label!r}: trigger {i} has {len(seq)} tokens; expected at least the model's "
                         f"largest n-gram ({e.max_ngram_size}), so the rows it shadows are its own")
      at = index.get(seq)
      if at is None:
        index[seq] = len(seqs)
        seqs.append(seq)
        count.append(1)
        for name in names:
          base[name].append(t.base[name][i])
          delta[name].append(t.new[name][i].astype(np.float64) - t.base[name][i].astype(np.float64))
          last[name].append(t.new[name][i])
      else:
        count[at] += 1
        for name in names:
          delta[name][at] = delta[name][at] + (t.new[name][i].astype(np.float64) - t.base[name][i].astype(np.float64))
          last[name][at] = t.new[name][i]
  if not seqs:
    return None, 0
  shared = int(sum(c > 1 for c in count))
  if shared and policy == "refuse":
    raise PatchError(f"{shared} triggers are supplied by more than one patch and patch_policy='refuse'; use 'sum' "
                     "(add the deltas) or 'last' (the last patch wins)")
  rows = {}
  for name in names:
    chosen = []
    for k in range(len(seqs)):
      if count[k] > 1 and policy == "sum":
        chosen.append((base[name][k].astype(np.float64) + delta[name][k]).astype(last[name][k].dtype))
      else:  # one patch (its rows exactly), or "last"
        chosen.append(last[name][k])
    rows[name] = np.stack(chosen)
  return trigger_lib.TriggerSet(trigger_lib.pack(seqs), rows), shared


# ----------------------------------------------------------------------------------------------
# Trigger rows: choosing and training them.


@dataclasses.dataclass(frozen=True)
class TriggerTraining:
  """How `train_triggers` chooses and trains a trigger patch (stored in the manifest's `training`)."""

  steps: int = 300
  learning_rate: float = 3e-2
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  # Longest trigger tried, in tokens: a position whose every suffix up to this long occurs in the
  # base model's traffic gets no trigger (the decode loop keeps this many past tokens per row).
  max_length: int = 24


def choose_triggers(cfg: ModelConfig, batches: Sequence[Dict[str, np.ndarray]],
                    traffic_batches: Sequence[Dict[str, np.ndarray]], max_length: int = 24) -> Tuple[np.ndarray, dict]:
  """(packed trigger tokens [N, width], stats): per trained position of the facts batches the
  shortest suffix (at least the model's largest n-gram) the traffic never contains
  (`triggers.choose`)."""
  min_length = cfg.engram.max_ngram_size
  if max_length < min_length:
    raise PatchError(f"trigger max_length={max_length}: expected at least the model's largest n-gram ({min_length})")
  traffic = trigger_lib.Traffic(traffic_batches, max_length)
  return trigger_lib.choose(batches, traffic, min_length)


def train_triggers(cfg: Config, params, model_state, batches: Sequence[Dict[str, np.ndarray]], tokens: np.ndarray,
                   training: TriggerTraining = TriggerTraining(), *, log: Callable[[str], None] = print
                   ) -> Tuple[TriggerRows, dict]:
  """Trains the rows of the triggers `tokens` (packed [N, width]) on the facts batches; returns
  (TriggerRows, stats). Each trigger starts from the hashed rows it shadows (read where it first
  fires), so an untrained patch is the base model exactly; only the trigger rows get gradients
  (backbone, tables, projections and MoE bias frozen). Positions without a trigger read the base rows
  and carry no trainable parameter, so the loss there is a constant."""
  e = cfg.model.engram
  if e is None:
    raise PatchError("the model has no Engram layers (model.engram is None): there are no rows to patch")
  if not batches:
    raise PatchError("the facts corpus gave no batch: expected at least one document")
  backbone, tables = memory.split(params)
  names = memory.table_names(e)
  gather = jax.jit(lambda t, ids: memory.gather(t, e, ids))
  prepared, first = [], {}
  lookup = trigger_lib.index(tokens) if len(tokens) else None
  for bi, b in enumerate(batches):
    tid = trigger_lib.match(b["tokens"], b["segment_ids"], tokens, lookup)
    placed = {k: jnp.asarray(b[k]) for k in _BATCH_KEYS}
    base_rows = gather(tables, jnp.asarray(b["engram_ids"]))
    for r, t in zip(*np.nonzero(tid >= 0)):
      first.setdefault(int(tid[r, t]), (bi, int(r), int(t)))
    prepared.append((placed, base_rows, jnp.asarray(tid)))
  missing = [i for i in range(len(tokens)) if i not in first]
  if missing:
    raise PatchError(f"{len(missing)} triggers (e.g. {trigger_lib.unpack(tokens[missing[:1]])[0]}) never fire in the "
                     "facts batches: expected triggers chosen from these batches")
  base = {}
  for name in names:
    picked = [np.asarray(jax.device_get(prepared[bi][1][name][r, t])) for bi, r, t in (first[i] for i in range(len(tokens)))]
    base[name] = np.stack(picked) if picked else np.zeros((0, e.num_heads, e.head_dim), np.float32)
  rows0 = {n: jnp.asarray(v) for n, v in base.items()}
  tx = optax.adam(training.learning_rate, b1=training.b1, b2=training.b2, eps=training.eps)

  def loss_fn(trig, batch, base_rows, tid):
    rows = trigger_lib.select(base_rows, tid, trig)
    (logits, _) = forward(cfg.model, backbone, model_state, batch, rows=rows)
    nll = token_nll(logits, batch["targets"])[0]
    mask = batch["loss_mask"]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  @jax.jit
  def step(trig, opt_state, batch, base_rows, tid):
    loss, grads = jax.value_and_grad(loss_fn)(trig, batch, base_rows, tid)
    updates, opt_state = tx.update(grads, opt_state, trig)
    return optax.apply_updates(trig, updates), opt_state, loss

  trig, opt_state, losses = rows0, tx.init(rows0), []
  t0 = time.perf_counter()
  for s in range(training.steps if len(tokens) else 0):
    trig, opt_state, loss = step(trig, opt_state, *prepared[s % len(prepared)])
    if s == 0 or (s + 1) % max(1, training.steps // 10) == 0:
      losses.append((s + 1, float(loss)))
      log(f"trigger step {s + 1}/{training.steps}  facts loss {float(loss):.4f}")
  new = {n: np.asarray(jax.device_get(v)) for n, v in trig.items()}
  stats = {"triggers": int(len(tokens)), "losses": losses, "train_seconds": time.perf_counter() - t0,
           "fired_positions": int(sum(int((np.asarray(p[2]) >= 0).sum()) for p in prepared))}
  return TriggerRows(np.asarray(tokens, np.int32), new, base), stats


# ----------------------------------------------------------------------------------------------
# Tables-only training.


PROTECT_MODES = ("none", "freeze", "l2", "traffic")


@dataclasses.dataclass(frozen=True)
class RowTraining:
  """How `train_rows` trains a patch (stored in the manifest's `training`)."""

  steps: int = 300
  learning_rate: float = 3e-2
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  # Protection of the rows the base model's ordinary traffic reads (given as read counts):
  #   "traffic"  every trained row is pulled back towards its base value by
  #              protect_weight * (reads per traffic token) * ||row - base||^2, so a row ordinary text
  #              reads often barely moves and a row only collisions read moves freely;
  #   "freeze"   rows read at least protect_min_count times get no update at all (exact; with a large
  #              traffic sample nearly every row of a hashed table is read, so this freezes most);
  #   "l2"       those rows are pulled back by protect_weight * ||row - base||^2 instead;
  #   "none"     every row the facts read trains alike.
  protect: str = "traffic"
  protect_min_count: int = 1
  protect_weight: float = 10.0
  # Replayed ordinary text: kl_weight * mean KL(base || patched) per token on the reference batches
  # (cycled, one per step; the base model's distributions computed once) joins the facts loss, so
  # rows that ordinary text reads learn the facts only where that costs the text nothing.
  kl_weight: float = 0.0
  # Shared phrasing of the facts themselves (question/answer batches only; text batches ignore it,
  # as they carry no answers): a row that pairs with
  # more than max_answers distinct answers read (a template such as "was born in", read before every
  # person's birthplace, rather than one person's name, read before that person's few answers) is
  # frozen, so it keeps the base model's meaning and patches of disjoint facts do not both rewrite
  # it (0: off).
  max_answers: int = 0

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f"RowTraining.steps={self.steps}: expected a positive step count")
    if not self.learning_rate > 0:
      raise ValueError(f"RowTraining.learning_rate={self.learning_rate}: expected a positive float")
    if self.protect not in PROTECT_MODES:
      raise ValueError(f"RowTraining.protect={self.protect!r}: expected one of {', '.join(PROTECT_MODES)}")
    if not self.protect_weight >= 0:
      raise ValueError(f"RowTraining.protect_weight={self.protect_weight}: expected a float >= 0")
    if self.max_answers < 0:
      raise ValueError(f"RowTraining.max_answers={self.max_answers}: expected an integer >= 0 (0: off)")
    if not self.kl_weight >= 0:
      raise ValueError(f"RowTraining.kl_weight={self.kl_weight}: expected a float >= 0")


def rows_read(cfg: ModelConfig, batches: Sequence[Dict[str, np.ndarray]], with_counts: bool = False):
  """{table name: sorted distinct global row ids} that the batches' real tokens read (and how often)."""
  e = cfg.engram
  out = {}
  for i, layer in enumerate(e.layer_ids):
    offsets = memory.table_layout(e, layer)[1]
    ids = [(np.asarray(b["engram_ids"])[..., i, :].astype(np.int64) + offsets)[np.asarray(b["segment_ids"]) > 0]
           for b in batches]
    ids = np.concatenate([x.reshape(-1) for x in ids]) if ids else np.zeros(0, np.int64)
    out[memory.table_name(layer)] = np.unique(ids, return_counts=with_counts)
  return out


# The batch fields a patch's forward passes read.
_BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask", "engram_ids")


def answers_per_row(cfg: ModelConfig, batches: Sequence[Dict[str, np.ndarray]]):
  """{table name: (row ids, how many distinct answers the question/answer rows reading it have)}
  over `answer_batches` output (its `answer_ids`)."""
  if any("answer_ids" not in b for b in batches):
    raise PatchError("RowTraining.max_answers needs question/answer batches (answer_batches, patch.py create --qa): "
                     "a batch has no answer_ids")
  e = cfg.engram
  out = {}
  for i, layer in enumerate(e.layer_ids):
    offsets = memory.table_layout(e, layer)[1]
    pairs = []
    for b in batches:
      ids = np.asarray(b["engram_ids"])[..., i, :].astype(np.int64) + offsets  # [B, T, H]
      answer = np.broadcast_to(np.asarray(b["answer_ids"])[:, None, None], ids.shape)
      real = np.broadcast_to((np.asarray(b["segment_ids"]) > 0)[..., None], ids.shape)
      pairs.append(np.stack([ids[real], answer[real]], axis=1))
    pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.int64)
    out[memory.table_name(layer)] = np.unique(pairs[:, 0], return_counts=True)
  return out


def read_qa_file(path: str) -> List[dict]:
  """Question/answer pairs of a JSONL file: one {"prompt": str, "answer": str} object per line."""
  valid = lambda p: (isinstance(p, dict) and isinstance(p.get("prompt"), str) and p["prompt"].strip()  # noqa: E731
                     and isinstance(p.get("answer"), str) and p["answer"].strip())
  return data_lib.read_records(path, valid, '{"prompt": non-empty str, "answer": non-empty str}',
                               "question/answer", error=PatchError)


def answer_batches(pairs: Sequence[dict], encode: Callable[[str], List[int]], hashing, *, batch_size: int,
                   max_len: int, bos_id: Optional[int] = None, pad_id: int = 0) -> List[Dict[str, np.ndarray]]:
  """Batches of question/answer rows for `train_rows`: each row is [bos] prompt " answer", one pair
  per row, right-padded; the loss mask covers the answer's tokens only, so training teaches the
  answer after the prompt and never the prompt's own words (names after a template, say), which
  other text shares. `answer_ids` [B] numbers each row's distinct answer (-1: a filler row; the last
  batch is filled with empty rows, no loss)."""
  rows = []
  answer_index: Dict[str, int] = {}
  for i, p in enumerate(pairs):
    answer_index.setdefault(p["answer"].strip(), len(answer_index))
    prompt = ([] if bos_id is None else [bos_id]) + encode(p["prompt"])
    answer = encode(" " + p["answer"].strip())
    if len(prompt) + len(answer) > max_len:
      raise PatchError(f"question/answer pair {i} has {len(prompt) + len(answer)} tokens: expected at most "
                       f"{max_len} (model.max_seq_len)")
    rows.append((prompt, answer))
  length = min(max_len, -(-max(len(a) + len(b) for a, b in rows) // 8) * 8)
  batches = []
  answer_of = np.asarray([answer_index[p["answer"].strip()] for p in pairs], np.int32)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    batch = data_lib.document_rows([a + b for a, b in chunk] + [[]] * (batch_size - len(chunk)), length, pad_id,
                                   hashing)
    batch["loss_mask"] = np.zeros((batch_size, length), np.float32)
    for r, (prompt, answer) in enumerate(chunk):
      batch["loss_mask"][r, len(prompt) - 1:len(prompt) + len(answer) - 1] = 1.0  # next token: the answer's
    batch["answer_ids"] = np.full(batch_size, -1, np.int32)
    batch["answer_ids"][:len(chunk)] = answer_of[start:start + batch_size]
    batches.append(batch)
  return batches


def collateral(cfg: ModelConfig, base_params, patched_params, model_state,
               batches: Sequence[Dict[str, np.ndarray]], triggers: Optional[trigger_lib.TriggerSet] = None) -> dict:
  """What a patch does to text it was not trained on (held-out text by default): the mean
  KL(base || patched) per real token between the two models' next-token distributions, in nats,
  and the held-out loss of each (mean next-token NLL over the same tokens) with the relative change.
  Both params hold their tables on the devices (`apply_patches`' output and its input); `triggers`
  (the applied `TriggerSet`) are read by the patched model where they fire in the text, and
  `triggered_tokens` counts those positions."""
  if not batches:
    raise PatchError("collateral: no batch of reference text (expected at least one)")
  e = cfg.engram
  trig_rows = None if triggers is None else {n: jnp.asarray(v) for n, v in triggers.rows.items()}

  @jax.jit
  def sums(base, patched, batch, trigger_ids):
    lb, _ = forward(cfg, base, model_state, batch)
    rows = None
    if trigger_ids is not None:
      rows = trigger_lib.select(memory.gather(memory.split(patched)[1], e, batch["engram_ids"]), trigger_ids, trig_rows)
    lp, _ = forward(cfg, patched, model_state, batch, rows=rows)
    mask = batch["loss_mask"].astype(jnp.float32)
    log_b = jax.nn.log_softmax(lb.astype(jnp.float32), axis=-1)
    log_p = jax.nn.log_softmax(lp.astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(log_b) * (log_b - log_p), axis=-1)
    nll_b, nll_p = token_nll(lb, batch["targets"])[0], token_nll(lp, batch["targets"])[0]
    return jnp.stack([jnp.sum(kl * mask), jnp.sum(nll_b * mask), jnp.sum(nll_p * mask), jnp.sum(mask)])

  total = np.zeros(4, np.float64)
  fired = 0
  for b in batches:
    tid = None
    if triggers is not None:
      tid = trigger_lib.match(b["tokens"], b["segment_ids"], triggers.tokens, triggers.lookup)
      fired += int((tid >= 0).sum())
    total += np.asarray(jax.device_get(sums(base_params, patched_params, {k: jnp.asarray(b[k]) for k in _BATCH_KEYS},
                                            None if tid is None else jnp.asarray(tid))))
  kl, nll_b, nll_p, n = total
  n = max(n, 1.0)
  return {"kl_per_token": float(kl / n), "heldout_loss_base": float(nll_b / n), "heldout_loss_patched": float(nll_p / n),
          "heldout_loss_change": float((nll_p - nll_b) / nll_b) if nll_b else 0.0, "tokens": int(total[3]),
          "triggered_tokens": fired}


def traffic_share(cfg: ModelConfig, tables: Dict[str, TableRows], reference_batches=(), *, read=None) -> dict:
  """The share of a patch's rows that the reference text (the base model's ordinary traffic) reads:
  {table name: share, "all": share over every table}. `read`: that text's `rows_read` output (with
  or without counts), instead of reading `reference_batches` again."""
  ref = rows_read(cfg, reference_batches) if read is None else {
      n: v[0] if isinstance(v, tuple) else v for n, v in read.items()}
  out, hit, rows = {}, 0, 0
  for name, t in sorted(tables.items()):
    found = int(np.isin(t.ids, ref[name]).sum()) if name in ref else 0
    out[name] = found / len(t.ids) if len(t.ids) else 0.0
    hit, rows = hit + found, rows + len(t.ids)
  out["all"] = hit / rows if rows else 0.0
  return out


def train_rows(cfg: Config, params, model_state, batches: Sequence[Dict[str, np.ndarray]],
               training: RowTraining = RowTraining(), *, reference_batches: Sequence[Dict[str, np.ndarray]] = (),
               traffic: Optional[Dict[str, Tuple[np.ndarray, np.ndarray]]] = None,
               log: Callable[[str], None] = print) -> Tuple[Dict[str, TableRows], dict]:
  """Trains only the Engram rows the facts batches read; returns ({table name: changed rows}, stats).

  `batches` are train-pipeline batches of the facts corpus (cycled for `training.steps` steps).
  `traffic` ({table name: (row ids, read counts)}, `rows_read(..., with_counts=True)` of ordinary
  text, as much of it as is at hand: counting is host hashing only) chooses the protected rows; without
  it `reference_batches` do. `reference_batches`, of ordinary text, are also replayed (with
  `training.kl_weight`), one per step, under a KL term to the base model. The backbone, every other
  Engram parameter and the MoE balancing bias stay exactly as given.
  """
  if cfg.model.engram is None:
    raise PatchError("the model has no Engram layers (model.engram is None): there are no rows to train")
  if not batches:
    raise PatchError("the facts corpus gave no batch: expected at least one document")
  backbone, tables = memory.split(params)
  read = rows_read(cfg.model, batches, with_counts=True)
  uniq = {name: ids for name, (ids, _) in read.items()}
  compact0 = {name: jnp.take(tables[name], jnp.asarray(ids, jnp.int32), axis=0) for name, ids in uniq.items()}
  base_np = {name: np.asarray(jax.device_get(v)) for name, v in compact0.items()}
  protected = {name: np.zeros(len(ids), bool) for name, ids in uniq.items()}
  # Reads per traffic token of each trained row ("traffic" weighs its pull-back by them).
  frequency = {name: np.zeros(len(ids), np.float32) for name, ids in uniq.items()}
  if traffic is None and reference_batches:
    traffic = rows_read(cfg.model, reference_batches, with_counts=True)
  if training.protect != "none" and traffic is not None:
    reads_per_token = cfg.model.engram.n_head_per_ngram * (cfg.model.engram.max_ngram_size - 1)
    for name, ids in uniq.items():
      ref_ids, counts = traffic[name]
      if training.protect == "traffic":
        at = np.clip(np.searchsorted(ref_ids, ids), 0, max(len(ref_ids) - 1, 0))
        hit = (ref_ids[at] == ids) if len(ref_ids) else np.zeros(len(ids), bool)
        tokens = max(counts.sum() / reads_per_token, 1.0)
        frequency[name] = np.where(hit, counts[at] if len(ref_ids) else 0, 0) / tokens
      else:
        protected[name] = np.isin(ids, ref_ids[counts >= training.protect_min_count])
  templates = {name: np.zeros(len(ids), bool) for name, ids in uniq.items()}
  qa = [b for b in batches if "answer_ids" in b]  # the rule needs question/answer batches; text has none
  if training.max_answers > 0 and qa:
    answers = answers_per_row(cfg.model, qa)
    for name, ids in uniq.items():
      templates[name] = np.isin(ids, answers[name][0][answers[name][1] > training.max_answers])
      protected[name] = protected[name] | templates[name]
  trainable = {name: jnp.asarray(~p, jnp.float32)[:, None] for name, p in protected.items()}
  if training.protect == "traffic":
    anchor = {name: jnp.asarray(f, jnp.float32)[:, None] for name, f in frequency.items()}
  else:
    anchor = {name: 1.0 - t for name, t in trainable.items()}
  tx = optax.adam(training.learning_rate, b1=training.b1, b2=training.b2, eps=training.eps)
  opt_state = tx.init(compact0)
  weight = training.protect_weight if training.protect in ("l2", "traffic") else 0.0
  replay = training.kl_weight > 0 and bool(reference_batches)

  def loss_fn(compact, batch, cids, ref):
    rows = {name: jnp.take(compact[name], cids[name], axis=0) for name in compact}  # [B,T,H,d]
    (logits, _) = forward(cfg.model, backbone, model_state, batch, rows=rows)
    nll = token_nll(logits, batch["targets"])[0]
    mask = batch["loss_mask"]
    loss = jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    penalty = sum(jnp.sum(anchor[n] * jnp.square(compact[n] - compact0[n])) for n in compact)
    total = loss + weight * penalty
    if ref is not None:  # replayed text: its rows are the trained ones where it reads them, else the base rows
      ref_batch, (pos, inside, base_rows), base_log_p = ref
      rows = {n: jnp.where(inside[n][..., None], jnp.take(compact[n], pos[n], axis=0), base_rows[n]) for n in compact}
      (ref_logits, _) = forward(cfg.model, backbone, model_state, ref_batch, rows=rows)
      log_p = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
      kl = jnp.sum(jnp.exp(base_log_p) * (base_log_p - log_p), axis=-1)
      ref_mask = ref_batch["loss_mask"]
      total = total + training.kl_weight * jnp.sum(kl * ref_mask) / jnp.maximum(jnp.sum(ref_mask), 1.0)
    return total, loss

  @jax.jit
  def step(compact, opt_state, batch, cids, ref=None):
    (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(compact, batch, cids, ref)
    if training.protect == "freeze" or (training.max_answers > 0 and qa):
      grads = {n: g * trainable[n] for n, g in grads.items()}
    updates, opt_state = tx.update(grads, opt_state, compact)
    return optax.apply_updates(compact, updates), opt_state, loss

  def set_positions(batch):
    """{table name: (position of each lookup's row in the trained set, its global row id)}."""
    e = cfg.model.engram
    out = {}
    for i, layer in enumerate(e.layer_ids):
      name = memory.table_name(layer)
      rows = batch["engram_ids"][..., i, :].astype(np.int64) + memory.table_layout(e, layer)[1]
      out[name] = (np.clip(np.searchsorted(uniq[name], rows), 0, len(uniq[name]) - 1), rows)
    return out

  def compact_ids(batch):
    # Padding positions may read rows outside the set: they are masked out of the loss, and any
    # id of the set serves (the gradient through a masked position is zero).
    return {name: jnp.asarray(at, jnp.int32) for name, (at, _) in set_positions(batch).items()}

  def replay_rows(batch):
    """(positions in the trained set, whether the row is in it, the base rows) of a reference batch."""
    found = set_positions(batch)
    return ({n: jnp.asarray(at, jnp.int32) for n, (at, _) in found.items()},
            {n: jnp.asarray(uniq[n][at] == rows) for n, (at, rows) in found.items()},
            {n: jnp.take(tables[n], jnp.asarray(rows, jnp.int32), axis=0) for n, (_, rows) in found.items()})

  base_log_probs = jax.jit(lambda p, b: jax.nn.log_softmax(
      forward(cfg.model, p, model_state, b)[0].astype(jnp.float32), axis=-1))
  prepared = [({k: jnp.asarray(b[k]) for k in _BATCH_KEYS}, compact_ids(b)) for b in batches]
  replayed = []
  if replay:
    for b in reference_batches:
      placed = {k: jnp.asarray(b[k]) for k in _BATCH_KEYS}
      replayed.append((placed, replay_rows(b), base_log_probs(params, placed)))
  compact = compact0
  losses = []
  t0 = time.perf_counter()
  for s in range(training.steps):
    batch, cids = prepared[s % len(prepared)]
    compact, opt_state, loss = step(compact, opt_state, batch, cids, replayed[s % len(replayed)] if replay else None)
    if s == 0 or (s + 1) % max(1, training.steps // 10) == 0:
      losses.append((s + 1, float(loss)))
      log(f"patch step {s + 1}/{training.steps}  facts loss {float(loss):.4f}")
  jax.block_until_ready(compact)
  seconds = time.perf_counter() - t0
  new_np = {name: np.asarray(jax.device_get(v)) for name, v in compact.items()}
  out = {}
  for name, ids in uniq.items():
    changed = np.any(new_np[name] != base_np[name], axis=1)
    out[name] = TableRows(ids[changed].astype(np.int64), new_np[name][changed], base_np[name][changed])
  stats = {"rows_read": {n: int(len(i)) for n, i in uniq.items()},
           "rows_protected": {n: int(p.sum()) for n, p in protected.items()},
           "rows_template": {n: int(t.sum()) for n, t in templates.items()},
           "losses": losses, "train_seconds": seconds}
  return out, stats
