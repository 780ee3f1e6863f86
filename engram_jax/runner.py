"""A trained model on a mesh: batch placement, host-side hashing, and the one jitted forward.

`ModelRunner` is what evaluation, the probes and generation run a model through. It holds the params
(restored onto any mesh: `ModelRunner.from_checkpoint`), the tokenizer and its Engram hashing
(`data.engram_hashing`, the object the data pipeline uses), and one jitted forward over batches of a
fixed shape [B, T] that returns the per-token loss, the greedy prediction and every Engram gate, with
the knock-out scale `engram_scale` as an argument (model.py). Custom rows (prompts, multiple-choice
continuations, a text to visualise) are right-padded to `data.seq_len`, so one compilation serves a
whole evaluation; a second one happens only for rows longer than that (padded to `model.max_seq_len`).
Right-padding cannot change a causal model's outputs at earlier positions: attention is causal, Engram
hash ids are suffix n-grams, and the Engram conv is causal. (Left-padding would: the hasher's pad id
is a real token.)

Where the Engram tables live is chosen once (`engram_tables`) and kept in the runner's row source
(`tables/source.py`): "device" (in the params, read in-graph by `memory.gather`), or "host" / "disk"
(`HostTables`: the params hold the backbone only, the host gathers each batch's rows,
optionally minus a hot-row cache on the devices, and the forward assembles them). The runner never
asks which: `prepare(batch)` does the host side of a batch (padding, placement, and the row source's
`rows_for`); `prepared(batches)` runs it on a background thread one or two batches ahead
(`data_lib.Prefetcher`), so batch i+1's rows are gathered and transferred while batch i computes.
Evaluation and scoring go through `prepared`; generation.py reads rows through the same source.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import data as data_lib
from engram_jax import memory
from engram_jax.config import Config
from engram_jax.model import engram_gates, forward, token_nll
from engram_jax.sharding import LOGICAL_RULES, batch_devices, make_mesh, place_batch
from engram_jax.tables import host as table_host
from engram_jax.tables.files import checkpoint_table_reader
from engram_jax.tables.host import PLACEMENTS, HitCounter, HostTables, HotRowCache
from engram_jax.tables.quant import bytes_per_row, check_quantize
from engram_jax.tables.source import RowSource, build_row_source

# (contexts, continuations) -> (log-likelihood of each continuation [N], greedy match [N] bool).
ScoreFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], Tuple[np.ndarray, np.ndarray]]


def gather_global(x) -> np.ndarray:
  """A (possibly multi-process) jax array or local numpy batch -> the global numpy array."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def make_forward(cfg: Config, source: RowSource):
  """forward(params, model_state, batch, engram_scale, feed=None, operand=None) -> {"nll", "argmax"
  [B,T], "gates" [B,T,L,M]}, the Engram rows read through `source` (`feed`: its `rows_for` of the
  batch; `operand`: its `operand()`)."""
  engram = cfg.model.engram is not None

  def run(params, model_state, batch, engram_scale, feed=None, operand=None, triggers=None):
    rows = source.rows(params, feed, operand, batch.get("engram_ids")) if engram else None
    rows = source.with_triggers(rows, batch.get("trigger_ids"), triggers)
    (logits, _), inter = forward(cfg.model, params, model_state, batch, engram_scale=engram_scale, rows=rows,
                                 mutable=["intermediates"])
    nll = token_nll(logits, batch["targets"])[0]  # [B,T]
    argmax = jnp.argmax(logits, -1).astype(jnp.int32)  # [B,T]
    gates = engram_gates(cfg.model, inter["intermediates"], batch["tokens"].shape)
    return {"nll": nll, "argmax": argmax, "gates": gates}

  return run


class Prepared(NamedTuple):
  """A batch ready for the jitted forward: its arrays on the devices and the row source's feed."""

  arrays: Dict[str, jax.Array]
  feed: Optional[Dict[str, Dict[str, jax.Array]]]  # None for device tables
  rows: int  # this process's real rows
  padded_rows: int  # rows after padding to the mesh's batch devices


class ModelRunner:
  """A model with its params on a mesh, and what it takes to feed it rows of token ids.

  `forward(batch, engram_scale)` runs the one jitted function on a batch of [rows, T] numpy arrays
  (the keys of `data.eval_batches`) or on a `prepare`d batch; `score` and `gate_trace` build such
  batches from token lists.

  `tables`: None keeps the Engram tables in `params` on the devices ("device" placement); an
  `HostTables` keeps them on the host ("host" / "disk"), and `params` may then hold the
  backbone alone (tables in it are dropped). `cache`: a `HotRowCache` of those tables.
  Both make the row source, `source` (`tables/source.py`). `prefetch`: prepare batches on a background
  thread (`prepared`).
  """

  def __init__(self, cfg: Config, params, model_state, mesh=None, tokenizer=None, *,
               tables: Optional["HostTables"] = None, cache: Optional["HotRowCache"] = None,
               prefetch: bool = True, prefetch_depth: int = 2):
    self.cfg = cfg
    self.step: Optional[int] = None  # the checkpoint step, when restored by from_checkpoint
    self.patches: List[str] = []  # knowledge patch directories applied (apply_patches)
    self._undo: List[Callable] = []  # per apply_patches: params -> params with its rows reverted
    self._trigger_patches: list = []  # (label, Patch) of every applied patch with triggers
    self.mesh = mesh if mesh is not None else runner_mesh(cfg)
    self.source = build_row_source(cfg.model, self.mesh, tables, cache)
    self.params = self.source.params(params)
    self.model_state = model_state
    self.prefetch = prefetch
    self.prefetch_depth = prefetch_depth
    self.tokenizer = tokenizer if tokenizer is not None else data_lib.load_tokenizer(cfg.data.tokenizer_path)
    engram = cfg.model.engram
    self.engram_layers: Tuple[int, ...] = tuple(engram.layer_ids) if engram is not None else ()
    self.branches = cfg.model.mhc.expansion
    self.pad_id = data_lib.special_id(self.tokenizer, cfg.data.pad_token, "pad_token")
    self.bos_id = data_lib.special_id(self.tokenizer, cfg.data.bos_token, "bos_token") if cfg.data.add_bos else None
    self.hashing = data_lib.engram_hashing(self.tokenizer, engram)  # None without Engram
    # Rows per device batch: a multiple of the batch-sharded devices, so any mesh takes it.
    self.row_multiple = batch_devices(self.mesh)
    self.batch_rows = -(-cfg.data.batch_size // self.row_multiple) * self.row_multiple
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
      self._forward = jax.jit(make_forward(cfg, self.source))

  @property
  def placement(self) -> str:
    return self.source.placement

  @property
  def tables(self) -> Optional["HostTables"]:
    """The host tables (None: the tables are in `params` on the devices)."""
    return self.source.tables

  @property
  def cache(self) -> Optional["HotRowCache"]:
    return self.source.cache

  @property
  def hit_counter(self) -> "HitCounter":
    return self.source.hit_counter

  @classmethod
  def from_checkpoint(cls, cfg: Config, checkpoint_dir: str, *, step: Optional[int] = None, mesh=None,
                      log: Callable[[str], None] = print, engram_tables: str = "device",
                      table_dir: Optional[str] = None, cache_rows: int = 0, quantize: Optional[str] = None,
                      cache_reference: Optional[np.ndarray] = None, verify_tables: bool = False,
                      prefetch: bool = True, force_tables: bool = False) -> "ModelRunner":
    """The parameters (not the optimizer state) of a checkpoint restored onto `mesh` (default: every
    device of this machine, whatever mesh it was trained on); `runner.step` is the step restored.

    engram_tables: "device" (today), "host" (RAM: from `table_dir`, or read from the checkpoint
    straight into host memory) or "disk" (memory-mapped `table_dir`, written by `offload.export_tables`).
    quantize: the row storage for "host" from the checkpoint (float32, bfloat16, int8, float8_e4m3);
    with a table_dir, the stored kind (checked if given). cache_rows: rows per table in a hot-row cache
    on the devices (0: none), chosen by frequency in `cache_reference` (hash ids [..., L, H]; default:
    the start of the training split, `reference_ids`). A table_dir must have been exported from
    this checkpoint's step (`tables.files.check_source`) unless `force_tables`.
    """
    from engram_jax.trainer import restore_for_eval

    if engram_tables not in PLACEMENTS:
      raise ValueError(f"engram_tables={engram_tables!r}: expected one of {PLACEMENTS}")
    if engram_tables == "device" and (table_dir or cache_rows or (quantize not in (None, "float32"))):
      raise ValueError(f"engram_tables='device' keeps the tables in the checkpoint's params: table_dir={table_dir!r}, "
                       f"cache_rows={cache_rows!r}, quantize={quantize!r} need 'host' or 'disk'")
    if engram_tables == "disk" and not table_dir:
      raise ValueError("engram_tables='disk' memory-maps exported table files: pass table_dir (--table_dir DIR; "
                       "write one with `python eval.py --workdir <run> --export_tables DIR`)")
    if not isinstance(cache_rows, int) or cache_rows < 0:
      raise ValueError(f"cache_rows={cache_rows!r}: expected a non-negative integer")
    if quantize is not None:
      check_quantize(quantize)
    tables = None
    if engram_tables != "device":
      if cfg.model.engram is None:
        raise ValueError(f"engram_tables={engram_tables!r}: the model has no Engram layers (model.engram is None)")
      tables = host_tables(cfg, checkpoint_dir, engram_tables, table_dir=table_dir, step=step, quantize=quantize,
                           verify=verify_tables, force=force_tables, log=log)
    mesh = mesh if mesh is not None else runner_mesh(cfg, log)
    params, model_state, step = restore_for_eval(cfg, checkpoint_dir, mesh=mesh, step=step,
                                                 tables=tables is None)
    log(f"restored step {step} from {checkpoint_dir} onto {mesh.devices.size} device(s)"
        + ("" if tables is None else f"; Engram tables on {engram_tables} ({tables.quantize}, "
                                     f"{tables.nbytes / 2**20:.1f} MiB)"))
    runner = cls(cfg, params, model_state, mesh, tables=tables, prefetch=prefetch)
    if cache_rows:
      reference = cache_reference if cache_reference is not None else reference_ids(runner)
      runner.set_cache(HotRowCache.build(tables, reference, cache_rows))
      log(f"hot-row cache: {cache_rows} rows per table from {int(np.prod(reference.shape[:-2]))} reference tokens")
    runner.step = int(step)
    return runner

  def set_cache(self, cache: Optional["HotRowCache"]):
    """Replaces the hot-row cache (None: no cache) and resets the hit counts."""
    self.source.set_cache(cache)

  def table_report(self) -> dict:
    """results.json's "engram_tables": placement, storage and (with a cache) hit rates per layer and order."""
    return self.source.report()

  # -- knowledge patches -------------------------------------------------------------------------

  def apply_patches(self, patches: Sequence[str], *, policy: str = "sum", force: bool = False,
                    log: Callable[[str], None] = print):
    """Applies knowledge patch directories (patches.py) to the tables the row source reads (the
    checkpoint and any table files on disk are not touched): on the devices the rows are written into
    copies of the tables; on `host`/`disk` they become an overlay the host gather reads instead of the
    base rows. `revert_patches` restores the base rows exactly. Returns the ApplyReport."""
    from engram_jax import patches as patches_lib

    if self.hashing is None:
      raise patches_lib.PatchError("the model has no Engram layers: knowledge patches change Engram table rows")
    labels = [p if isinstance(p, str) else f"patch {len(self.patches) + i}" for i, p in enumerate(patches)]
    loaded = [patches_lib.load_patch(p) if isinstance(p, str) else p for p in patches]
    with_rows = [p for p, q in zip(patches, loaded) if q.tables]
    report = patches_lib.ApplyReport(labels, {}, {}, policy)
    undo = lambda p: p  # noqa: E731
    if with_rows:
      self.params, undo, report = self.source.patch(self.params, self.hashing, with_rows, policy=policy,
                                                    force=force, log=log)
    # Triggers of every patch applied so far resolve together (identical ones by the policy).
    before = (list(self._trigger_patches), self.source.triggers)
    applied = self._trigger_patches + [(l, q) for l, q in zip(labels, loaded) if q.triggers is not None]
    triggers, shared = patches_lib.resolve_triggers(self.cfg.model, self.hashing, [q for _, q in applied],
                                                    [l for l, _ in applied], policy=policy)
    self.source.set_triggers(triggers)
    self._trigger_patches = applied
    report.triggers, report.identical_triggers = (len(triggers) if triggers is not None else 0), shared
    if triggers is not None:
      log(f"{len(triggers)} triggers applied" + (f", {shared} supplied by several patches ({policy})" if shared else ""))

    def undo_all(p):
      self._trigger_patches, previous = before[0], before[1]
      self.source.set_triggers(previous)
      return undo(p)

    self._undo.append(undo_all)
    self.patches = self.patches + list(patches)
    return report

  def revert_patches(self):
    """Undoes every `apply_patches`, newest first: the tables read bit-identical to the base again."""
    while self._undo:
      self.params = self._undo.pop()(self.params)
    self.patches = []

  # -- scales ------------------------------------------------------------------------------------

  def scale(self, off: Sequence[int] = ()) -> np.ndarray:
    """engram_scale [num_engram_layers]: 0 for the Engram layers in `off`, 1 elsewhere."""
    unknown = set(off) - set(self.engram_layers)
    if unknown:
      raise ValueError(f"Engram layers {sorted(unknown)} do not exist: the model has {self.engram_layers}")
    return np.array([0.0 if l in off else 1.0 for l in self.engram_layers], np.float32)

  # -- forward -----------------------------------------------------------------------------------

  def prepare(self, batch: Dict[str, np.ndarray]) -> Prepared:
    """The host side of a forward: pads this process's rows to a multiple of its batch devices, asks the
    row source for the batch's rows (`rows_for`: a host gather for host / disk tables) and places
    everything on the mesh."""
    keys = ("tokens", "targets", "segment_ids", "positions") + (("engram_ids",) if self.engram_layers else ())
    rows = len(batch["tokens"])
    local_multiple = max(1, self.row_multiple // jax.process_count())
    padded_rows = -(-rows // local_multiple) * local_multiple
    local = {}
    for key in keys:
      value = np.asarray(batch[key])
      if key in ("tokens", "targets"):
        value = value.astype(np.int32)
      if padded_rows > rows:
        fill = self.pad_id if key in ("tokens", "targets") else 0
        value = np.concatenate([value, np.full((padded_rows - rows,) + value.shape[1:], fill, value.dtype)])
      local[key] = value
    feed = None
    if self.engram_layers:
      trigger_ids = self.source.trigger_ids(local["tokens"], local["segment_ids"])
      if trigger_ids is not None:
        local["trigger_ids"] = trigger_ids
      ids = local["engram_ids"] if self.source.ids_in_graph else local.pop("engram_ids")
      feed = self.source.rows_for(ids, mask=local["segment_ids"] > 0)
    return Prepared(place_batch(local, self.mesh), feed, rows, padded_rows)

  def host_rows(self, engram_ids: np.ndarray, mask: Optional[np.ndarray] = None, pad_to: int = 0):
    """The rows of this process's hash ids [b, T, L, H] as the forward takes them: the row source's
    `rows_for` (for host tables the distinct rows per batch shard, minus the hot-row cache, placed on
    the batch's devices; None for device tables)."""
    return self.source.rows_for(engram_ids, mask=mask, pad_to=pad_to)

  @property
  def cache_arrays(self):
    """The hot-row cache's device arrays {name: (rows, scales)} (None: no cache): the source's operand."""
    return self.source.operand()

  def prepared(self, batches: Iterable[Dict[str, np.ndarray]]) -> Iterator[Tuple[Dict[str, np.ndarray], Prepared]]:
    """(batch, prepare(batch)) for each batch in order; with `prefetch`, prepared on a background thread
    `prefetch_depth` batches ahead, so the host gather and transfer overlap the previous forward.
    (Several processes prepare on the main thread: placing a batch is collective-free, but keeping
    every process's host work in one order is simpler to reason about.)"""
    if self.prefetch and jax.process_count() == 1:
      return iter(data_lib.Prefetcher(batches, self.prepare, self.prefetch_depth))
    return ((b, self.prepare(b)) for b in batches)

  def forward(self, batch, engram_scale=None) -> Dict[str, np.ndarray]:
    """This process's batch of rows [b, T] (numpy, or `prepare`d) -> global numpy {"nll", "argmax"
    [R, T], "gates" [R, T, L, M]}.

    Rows are padded up to a multiple of the mesh's batch devices (and cut off again), so the batch
    size need not divide the device count.
    """
    prepared = batch if isinstance(batch, Prepared) else self.prepare(batch)
    rows, padded_rows = prepared.rows, prepared.padded_rows
    scale = self.scale() if engram_scale is None else np.asarray(engram_scale, np.float32)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
      triggers = self.source.trigger_operand() if "trigger_ids" in prepared.arrays else None
      out = self._forward(self.params, self.model_state, prepared.arrays, jnp.asarray(scale), prepared.feed,
                          self.source.operand(), triggers)
    out = {k: gather_global(v) for k, v in out.items()}
    if padded_rows > rows:
      # Each process padded its own rows: drop the padding rows of every process's slice.
      pc = jax.process_count()
      out = {k: np.concatenate([v[p * padded_rows:p * padded_rows + rows] for p in range(pc)])
             for k, v in out.items()}
    return out

  # -- rows from token lists ---------------------------------------------------------------------

  def row_length(self, longest: int) -> int:
    """The padded row length for rows of up to `longest` tokens: data.seq_len (the eval batches'
    shape, no new compilation) or model.max_seq_len."""
    if longest <= self.cfg.data.seq_len:
      return self.cfg.data.seq_len
    if longest <= self.cfg.model.max_seq_len:
      return self.cfg.model.max_seq_len
    raise ValueError(f"a row of {longest} tokens is longer than model.max_seq_len={self.cfg.model.max_seq_len}")

  def make_batch(self, rows: Sequence[Sequence[int]], length: int) -> Dict[str, np.ndarray]:
    """Global batch [len(rows), length] of single-document rows, right-padded, with hash ids."""
    return data_lib.document_rows(rows, length, self.pad_id, self.hashing if self.engram_layers else None)

  def run_rows(self, rows: Sequence[Sequence[int]], engram_scale=None) -> List[Dict[str, np.ndarray]]:
    """Outputs for each row ({"nll", "argmax" [n], "gates" [n, L, M]} cut to the row's length)."""
    outputs: List[Optional[Dict[str, np.ndarray]]] = [None] * len(rows)
    by_length: Dict[int, List[int]] = {}
    for i, row in enumerate(rows):
      by_length.setdefault(self.row_length(len(row)), []).append(i)
    pi, pc = jax.process_index(), jax.process_count()
    per_batch = -(-self.batch_rows // pc) * pc
    chunks = [(length, index[start:start + per_batch]) for length, index in by_length.items()
              for start in range(0, len(index), per_batch)]

    def local_batch(item):
      length, chunk = item
      group = [rows[i] for i in chunk] + [[self.pad_id]] * (per_batch - len(chunk))
      batch = self.make_batch(group, length)
      b = per_batch // pc
      return {k: v[pi * b:(pi + 1) * b] for k, v in batch.items()}

    for (_, chunk), (_, prepared) in zip(chunks, self.prepared(map(local_batch, chunks))):
      out = self.forward(prepared, engram_scale)
      for j, i in enumerate(chunk):
        n = len(rows[i])
        outputs[i] = {k: v[j, :n] for k, v in out.items()}
    return outputs

  def score(self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
            engram_scale=None) -> Tuple[np.ndarray, np.ndarray]:
    """(log-likelihood of each continuation given its context [N], whether greedy decoding from the
    context would produce the continuation exactly [N]). Teacher forcing makes the two agree: greedy
    decoding emits the continuation iff every continuation token is the argmax at its position."""
    if len(contexts) != len(continuations):
      raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations: expected one each")
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
      if len(ctx) < 1 or len(cont) < 1:
        raise ValueError(f"pair {i}: context of {len(ctx)} and continuation of {len(cont)} tokens; "
                         "expected at least one token each")
    rows = [list(c) + list(x) for c, x in zip(contexts, continuations)]
    outs = self.run_rows(rows, engram_scale)
    logprob = np.zeros(len(rows))
    greedy = np.zeros(len(rows), bool)
    for i, (ctx, cont, out) in enumerate(zip(contexts, continuations, outs)):
      span = slice(len(ctx) - 1, len(ctx) - 1 + len(cont))  # positions predicting the continuation
      logprob[i] = -float(np.sum(out["nll"][span], dtype=np.float64))
      greedy[i] = bool(np.all(out["argmax"][span] == np.asarray(cont)))
    return logprob, greedy

  def score_fn(self, engram_scale=None) -> ScoreFn:
    return lambda contexts, continuations: self.score(contexts, continuations, engram_scale)

  # -- text --------------------------------------------------------------------------------------

  def encode(self, text: str) -> List[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

  def gate_trace(self, text: str, engram_scale=None) -> Tuple[List[str], np.ndarray]:
    """(the text of each token, as its span of `text` ("<bos>" for bos), gates [n, L, M])."""
    if not self.engram_layers:
      raise ValueError("the model has no Engram layer (model.engram is None): there are no gates to show")
    enc = self.tokenizer.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    pieces = [text[a:b] for a, b in enc.offsets]
    # Byte-level pieces of one character share its span: show the character once.
    for i in range(1, len(pieces)):
      if enc.offsets[i] == enc.offsets[i - 1]:
        pieces[i] = ""
    if self.bos_id is not None:
      ids, pieces = [self.bos_id] + ids, [self.cfg.data.bos_token] + pieces
    if len(ids) < 1:
      raise ValueError("gate text is empty: expected some text to tokenise")
    out = self.run_rows([ids], engram_scale)[0]
    return pieces, out["gates"]



def host_tables(cfg: Config, checkpoint_dir: str, placement: str, *, table_dir: Optional[str] = None,
                step: Optional[int] = None, quantize: Optional[str] = None, verify: bool = False,
                force: bool = False, log: Callable[[str], None] = print) -> "HostTables":
  """The Engram tables of a run for `placement` "host" or "disk": a table directory opened (checked
  against the model's fingerprint), or, for "host" without one, the checkpoint's tables read straight
  into host memory (tensorstore, chunk by chunk, never on a device) and stored as `quantize`. A
  table directory exported from another saved state than step `step` is refused unless `force`."""
  from engram_jax import checkpoint as ckpt_lib
  from engram_jax.patches import fingerprint
  from engram_jax.tables.files import check_source, read_manifest

  hashing = data_lib.engram_hashing(data_lib.load_tokenizer(cfg.data.tokenizer_path), cfg.model.engram)
  fp = fingerprint(cfg.model, hashing)
  if table_dir:
    step = ckpt_lib.step_to_read(checkpoint_dir, step)
    record = check_source(read_manifest(table_dir), table_dir, checkpoint_dir, step, force=force)
    if record["matches"] is False:
      log(f"warning: {table_dir} was exported from another checkpoint (step "
          f"{record['source'].get('checkpoint_step')}); used as asked (--force_tables)")
    tables = HostTables.open(table_dir, cfg.model, fp, placement, quantize=quantize, verify=verify)
    tables.source_check = record
    return tables
  if placement != "host":
    raise ValueError(f"placement {placement!r} needs a table_dir")
  step = ckpt_lib.step_to_read(checkpoint_dir, step)
  kind = quantize or "float32"
  e = cfg.model.engram
  need = sum(memory.table_layout(e, l)[2] for l in e.layer_ids) * bytes_per_row(kind, e.head_dim)
  free = table_host.available_memory()
  if free is not None and need > free:
    raise MemoryError(f"placement 'host' needs {need / 2**30:.2f} GiB of RAM for the tables but only "
                      f"{free / 2**30:.2f} GiB is available: export them (`eval.py --export_tables DIR`) and use "
                      "placement 'disk'")
  reader = checkpoint_table_reader(checkpoint_dir, step)
  tables = {}
  for layer in e.layer_ids:
    name = memory.table_name(layer)
    rows = int(memory.table_layout(e, layer)[2])
    tables[name] = np.concatenate([reader(name, a, min(rows, a + (1 << 16))) for a in range(0, rows, 1 << 16)])
  log(f"read the Engram tables of step {step} into host memory ({kind})")
  return HostTables.from_arrays(e, tables, kind, "host")


def reference_ids(runner: "ModelRunner", tokens: int = 1 << 16) -> np.ndarray:
  """Hash ids [rows, seq_len, L, H] of the first `tokens` tokens of the config's training split: the
  reference sample a hot-row cache is chosen from (not the eval text it is then measured on)."""
  corpus = data_lib.tokenized_split(runner.cfg.data, "train", runner.tokenizer)
  T = runner.cfg.data.seq_len
  n = min(tokens, corpus.num_tokens) // T * T
  if n == 0:
    raise ValueError(f"the training split has {corpus.num_tokens} tokens: too few for one reference row of {T}")
  return runner.hashing.hash_numpy(corpus.tokens[:n].reshape(-1, T))


def load_config_from_checkpoint(checkpoint_dir: str, step: Optional[int] = None) -> Config:
  """The Config train.py saved in a checkpoint's metadata (so eval.py can run without --config)."""
  from engram_jax import checkpoint as ckpt_lib
  from engram_jax.config import CheckpointConfig, from_dict

  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} does not exist (expected <workdir>/checkpoints "
                            "written by train.py)")
  manager = ckpt_lib.CheckpointManager(checkpoint_dir, CheckpointConfig(async_save=False))
  try:
    meta = manager.read_metadata(step)
  finally:
    manager.close()
  if meta is None:
    raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} holds no checkpoint")
  if not meta.get("config"):
    raise ValueError(f"checkpoint {checkpoint_dir!r} has no config in its metadata: pass --config")
  return from_dict(Config, meta["config"])


def check_checkpoint_engram(cfg: Config, checkpoint_dir: str, step: Optional[int] = None, *,
                            fix: str = "drop --config to restore it as it was trained") -> None:
  """ValueError when `cfg`'s Engram config is not the one the checkpoint was written with: its saved
  config (train.py writes it) names another model.engram, or its parameters hold tables `cfg` lacks
  (a restore would silently leave them out, or fail listing every parameter path). `fix` says what
  to do instead; the default suits the tools that read the saved config without --config."""
  from engram_jax import checkpoint as ckpt_lib
  from engram_jax.config import CheckpointConfig, from_dict

  manager = ckpt_lib.CheckpointManager(checkpoint_dir, CheckpointConfig(async_save=False))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} holds no checkpoint")
    meta = manager.read_metadata(step) or {}
    saved_tables = sorted(filter(None, map(memory.saved_table_name, manager.saved_shapes(step))))
  except ckpt_lib.CheckpointRestoreError:
    return  # a damaged step: the restore reports it, with the intact step to use instead
  finally:
    manager.close()
  engram = cfg.model.engram
  saved = from_dict(Config, meta["config"]).model.engram if meta.get("config") else None
  if not meta.get("config") and saved_tables == sorted(memory.table_names(engram)):
    return
  if meta.get("config") and saved == engram and saved_tables == sorted(memory.table_names(engram)):
    return
  where = f"checkpoint {checkpoint_dir!r} (step {step})"
  if saved_tables and engram is None:
    problem = (f"{where} has Engram layers (tables {', '.join(saved_tables)}) but the config given has none "
               "(model.engram=None, as the :no_engram variant makes)")
  elif not saved_tables and engram is not None:
    problem = f"{where} has no Engram tables but the config given has Engram layers {list(engram.layer_ids)}"
  elif saved is not None and engram is not None:
    diff = [f"{f.name}={getattr(saved, f.name)!r} saved, {f.name}={getattr(engram, f.name)!r} given"
            for f in dataclasses.fields(engram) if getattr(saved, f.name) != getattr(engram, f.name)]
    problem = f"{where} was trained with another Engram config than the one given ({'; '.join(diff)})"
  else:
    problem = f"{where} holds Engram tables {saved_tables} but the config given expects {sorted(memory.table_names(engram))}"
  raise ValueError(f"{problem}: {fix}")


def runner_mesh(cfg: Config, log: Callable[[str], None] = print):
  """The config's mesh over this machine's devices; if its fixed axis sizes do not fit them (a run
  trained on another machine), every device on the data axis instead: restore reshards either way."""
  from engram_jax.config import MeshConfig

  try:
    return make_mesh(cfg.mesh)
  except ValueError as e:
    log(f"mesh {cfg.mesh} does not fit the {jax.device_count()} devices here ({e}); using data parallelism")
    return make_mesh(MeshConfig())


