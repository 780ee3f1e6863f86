"""Train state, the pure train step, and the training loop (train.py is a thin absl main over it).

The step is one jitted function `train_step(state, batch) -> (state, metrics)` with explicit
in/out shardings derived from the params' logical axes, and a donated state. Everything the loop
does besides calling it (data, checkpoints, logging, evaluation) happens on the host around it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from engram_jax import checkpoint as ckpt_lib
from engram_jax import data as data_lib
from engram_jax import host_training, memory
from engram_jax import runlock
from engram_jax.config import Config, to_dict
from engram_jax.model import abstract_variables, forward, init_variables, param_counts, token_nll
from engram_jax.moe import BALANCE_COLLECTION, update_balance_bias
from engram_jax.optim import learning_rate_schedule, make_optimizer, opt_state_shardings
from engram_jax.sharding import LOGICAL_RULES, batch_devices, batch_sharding, make_mesh, place_batch, tree_shardings
from engram_jax.tables import batch as batch_rows



@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any
  model_state: Any  # non-trained collections (the MoE balancing bias)
  nonfinite_run: jax.Array  # int32 scalar: consecutive steps skipped for non-finite loss/grads
  engram_opt: Any = None  # {table name: memory.SparseAdamState} with row-sparse table updates, else {}


# ----------------------------------------------------------------------------------------------
# Loss.


def cross_entropy(logits, targets, mask, z_loss: float = 0.0):
  """Masked mean token cross-entropy (+ z-loss * mean log(Z)^2); returns (loss, ce, z, tokens)."""
  nll, log_z = token_nll(logits, targets)
  mask = mask.astype(jnp.float32)
  tokens = jnp.maximum(mask.sum(), 1.0)
  ce = (nll * mask).sum() / tokens
  z = (jnp.square(log_z) * mask).sum() / tokens
  return ce + z_loss * z, ce, z, mask.sum()


# ----------------------------------------------------------------------------------------------
# State construction.


def batch_shapes(cfg: Config, batch: int):
  """The train batch's arrays as ShapeDtypeStructs, `batch` rows of `cfg.data.seq_len` tokens."""
  T = cfg.data.seq_len
  shapes = {k: jax.ShapeDtypeStruct((batch, T), jnp.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
  shapes["loss_mask"] = jax.ShapeDtypeStruct((batch, T), jnp.float32)
  if cfg.model.engram is not None:
    e = cfg.model.engram
    shapes["engram_ids"] = jax.ShapeDtypeStruct((batch, T, len(e.layer_ids), e.num_heads), jnp.int32)
  return shapes


def sparse_tables(cfg: Config) -> bool:
  return cfg.model.engram is not None and cfg.train.engram_sparse_updates


def host_tables(cfg: Config) -> bool:
  """Whether the Engram tables train off the devices (`train.engram_tables` host or disk): then the
  train state holds the backbone alone and host_training.py holds the tables and their moments."""
  return cfg.model.engram is not None and cfg.train.engram_tables != "device"


def state_shardings(cfg: Config, mesh, tx=None):
  """(optimizer, TrainState of shardings, abstract TrainState with shardings on every leaf).

  With row-sparse table updates the optax optimizer covers every param but the Engram tables,
  whose lazy Adam state (moments like the table, a per-row step count) lives in `engram_opt`. With
  tables off the devices (`host_tables`) the state's params are the backbone alone (no empty
  sub-dicts where the tables were) and `engram_opt` is empty: host_training.py holds both.
  """
  abstract = abstract_variables(cfg.model)
  var_shardings = tree_shardings(abstract, mesh)
  plain = nn.meta.unbox(abstract)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  engram_opt, engram_opt_shard = {}, {}
  if sparse_tables(cfg):
    tx = tx or make_optimizer(cfg.train, memory.split(abstract["params"])[0])
    backbone, tables = memory.split(plain["params"])
    backbone_shard, table_shard = memory.split(var_shardings["params"])
    if host_tables(cfg):
      backbone, backbone_shard = _prune_empty(backbone), _prune_empty(backbone_shard)
      plain = {**plain, "params": backbone}
      var_shardings = {**var_shardings, "params": backbone_shard}
    else:
      engram_opt = jax.eval_shape(memory.sparse_init, tables)
      engram_opt_shard = memory.sparse_state_shardings(table_shard)
    opt_abstract = jax.eval_shape(tx.init, backbone)
    opt_shard = opt_state_shardings(opt_abstract, backbone_shard, replicated)
  else:
    tx = tx or make_optimizer(cfg.train, abstract["params"])
    opt_abstract = jax.eval_shape(tx.init, plain["params"])
    opt_shard = opt_state_shardings(opt_abstract, var_shardings["params"], replicated)
  model_state = {k: v for k, v in plain.items() if k != "params"}
  shardings = TrainState(
      step=replicated, params=var_shardings["params"], opt_state=opt_shard,
      model_state={k: v for k, v in var_shardings.items() if k != "params"}, nonfinite_run=replicated,
      engram_opt=engram_opt_shard)
  abstract_state = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32), params=plain["params"], opt_state=opt_abstract,
      model_state=model_state, nonfinite_run=jax.ShapeDtypeStruct((), jnp.int32), engram_opt=engram_opt)
  with_shardings = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
                                shardings)
  return tx, shardings, with_shardings


def init_state(cfg: Config, mesh, tx, shardings) -> TrainState:
  def init():
    variables = nn.meta.unbox(init_variables(cfg.model, jax.random.key(cfg.train.seed)))
    params = variables.pop("params")
    engram_opt = {}
    if host_tables(cfg):  # the tables are dropped here, so XLA never computes them on the devices
      params = _prune_empty(memory.split(params)[0])
      opt_state = tx.init(params)
    elif sparse_tables(cfg):
      backbone, tables = memory.split(params)
      opt_state = tx.init(backbone)
      engram_opt = memory.sparse_init(tables)
    else:
      opt_state = tx.init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      model_state=dict(variables), nonfinite_run=jnp.zeros((), jnp.int32), engram_opt=engram_opt)

  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    return jax.jit(init, out_shardings=shardings)()


# ----------------------------------------------------------------------------------------------
# The train step.


def _update_balance_biases(cfg: Config, model_state, moe_aux):
  if cfg.model.moe is None or not moe_aux:
    return model_state
  biases = dict(model_state[BALANCE_COLLECTION])
  for seg, stats in moe_aux.items():
    bias = biases[seg]["moe"]["balance_bias"]
    load = stats["load"].reshape(bias.shape)
    biases[seg] = {"moe": {"balance_bias": update_balance_bias(bias, load, cfg.model.moe.bias_update_rate)}}
  return {**model_state, BALANCE_COLLECTION: biases}


def make_grads(cfg: Config):
  """grads_of(params, model_state, batch) -> (loss, (ce, z, tokens, aux), grads of the optax params,
  grads of the gathered Engram rows {table name: [B,T,H,d]} or {}): the step's differentiation.

  With row-sparse table updates (`train.engram_sparse_updates`, the default) the rows are gathered
  (memory.gather) before the differentiated function and the gradient is taken with respect to them,
  so no [rows, d] table gradient exists; otherwise the tables are differentiated through the gather
  like any other parameter. With tables off the devices (`host_tables`) the params are the backbone
  and the rows come with the batch (`batch["engram_rows"]`, host_training.RowFeed's arrays for one
  micro-batch), assembled in-graph by tables.batch.assemble_rows; the gradient is taken with respect to
  the assembled rows as on the devices.
  """
  sparse = sparse_tables(cfg)
  host = host_tables(cfg)

  def loss_fn(params, model_state, batch, rows=None):
    (logits, aux) = forward(cfg.model, params, model_state, batch, rows=rows)
    loss, ce, z, tokens = cross_entropy(logits, batch["targets"], batch["loss_mask"], cfg.train.z_loss)
    return loss + aux["aux_loss"], (ce, z, tokens, aux)

  def grads_of(params, model_state, batch):
    if not sparse:
      (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model_state, batch)
      return loss, extra, grads, {}
    if host:
      backbone = params
      rows = batch_rows.assemble_rows(batch["engram_rows"], None, jnp.dtype(cfg.model.param_dtype))
    else:
      backbone, tables = memory.split(params)
      rows = memory.gather(tables, cfg.model.engram, batch["engram_ids"])  # {name: [B,T,H,d]}
    (loss, extra), (g_backbone, g_rows) = jax.value_and_grad(
        lambda b, r: loss_fn(b, model_state, batch, r), argnums=(0, 1), has_aux=True)(backbone, rows)
    return loss, extra, g_backbone, g_rows

  return grads_of


def _owned_rows(feed):
  """RowFeed rows [S, A, U, d] as placed (`_HostTableInputs._place`); several processes'
  contributions (`parts` [devices, S, A, U, d]) summed exactly by `batch.owned_rows`."""
  return {n: {"index": e["index"], "rows": batch_rows.owned_rows(e)[0]} for n, e in feed.items()}


def make_train_step(cfg: Config, tx):
  """The pure step: grads (accumulated over `grad_accum_steps` micro-batches), one optimizer update,
  the MoE bias update, and metrics. A step whose loss or gradients are not finite changes nothing
  but the step counter and `nonfinite_run`.

  Engram tables (memory.py): with row-sparse updates the gradient is taken with respect to the rows
  read (`make_grads`) and lazy Adam updates only those rows (memory.sparse_update), so step cost does
  not grow with the table; otherwise optax's Adam updates the tables densely. Global-norm clipping
  applies to the optax params; Adam's update is invariant to the gradient's scale (up to eps), so row
  gradients are left out of it rather than paying a de-duplication for an exact joint norm.

  Tables off the devices (`host_tables`): the batch carries the rows (`engram_rows`, RowFeed.ready's
  arrays) and the step returns a third output, {"row_grads": {table: [..., H, d]} (the gradients of
  the rows read, divided by the micro-batch count like the device update's), "lr": the tables'
  learning rate}, for host_training.HostTrainTables.update; nothing else differs.
  """
  accum = cfg.train.grad_accum_steps
  host = host_tables(cfg)
  schedule = learning_rate_schedule(cfg.train)
  sparse = sparse_tables(cfg)
  engram = cfg.model.engram
  tcfg = cfg.train
  grads_of = make_grads(cfg)

  def step_fn(state: TrainState, batch):
    feed = _owned_rows(batch["engram_rows"]) if host else None  # {table: {"index" [B,T,H], "rows" [S, A, U, d]}}
    batch = {k: v for k, v in batch.items() if k != "engram_rows"}
    if accum == 1:
      if feed is not None:
        batch = {**batch, "engram_rows": {n: {"index": e["index"], "rows": e["rows"][:, 0]} for n, e in feed.items()}}
      loss, (ce, z, tokens, aux), grads, g_rows = grads_of(state.params, state.model_state, batch)
      engram_ids = batch.get("engram_ids")
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)
      if feed is not None:
        micro["engram_rows"] = {n: {"index": e["index"].reshape((accum, -1) + e["index"].shape[1:]),
                                    "rows": jnp.moveaxis(e["rows"], 1, 0)} for n, e in feed.items()}

      def body(carry, mb):
        l, (c, zz, n, a), g, gr = grads_of(state.params, state.model_state, mb)
        acc_g, acc = carry
        return (jax.tree.map(jnp.add, acc_g, g), jax.tree.map(jnp.add, acc, (l, c, zz, n))), (a, gr)

      grad_params = memory.split(state.params)[0] if sparse and not host else state.params
      zeros = jax.tree.map(jnp.zeros_like, grad_params)
      (grads, (loss, ce, z, tokens)), (auxs, g_rows) = jax.lax.scan(body, (zeros, (0.0, 0.0, 0.0, 0.0)), micro)
      grads = jax.tree.map(lambda g: g / accum, grads)
      g_rows = jax.tree.map(lambda g: g / accum, g_rows)  # [accum, b, T, H, d]
      engram_ids = micro.get("engram_ids")  # [accum, b, T, L, H]
      loss, ce, z = loss / accum, ce / accum, z / accum
      aux = jax.tree.map(lambda x: jnp.sum(x, 0) if x.dtype.kind in "iu" else jnp.mean(x, 0), auxs)
      aux["moe"] = jax.tree.map(lambda x: jnp.sum(x, 0), auxs["moe"])
    grad_norm = optax.tree.norm(grads)
    row_grad_norm = optax.tree.norm(g_rows) if sparse else jnp.zeros(())
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(row_grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    engram_opt = state.engram_opt
    table_lr = schedule(state.step) * tcfg.engram_lr_multiplier
    if host:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = keep(optax.apply_updates(state.params, updates), state.params)
    elif sparse:
      backbone, tables = memory.split(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, backbone)
      backbone = keep(optax.apply_updates(backbone, updates), backbone)
      hyper = dict(lr=table_lr, b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps)
      tables, engram_opt = jax.lax.cond(
          finite, lambda a: memory.sparse_update(*a, engram, engram_ids, g_rows, **hyper), lambda a: a,
          (tables, state.engram_opt))
      params = memory.merge(backbone, tables)
    else:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = keep(optax.apply_updates(state.params, updates), state.params)
    model_state = _update_balance_biases(cfg, state.model_state, aux["moe"])
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,  # apply_if_finite inside tx already kept it for a non-finite step
        model_state=keep(model_state, state.model_state),
        nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
        engram_opt=engram_opt)
    metrics = {"loss": loss, "ce": ce, "z_loss": z, "aux_loss": aux["aux_loss"], "grad_norm": grad_norm,
               "lr": schedule(state.step), "tokens": tokens, "finite": finite.astype(jnp.float32),
               "engram_gate_mean": jnp.mean(aux["engram_gate_mean"], axis=-1)}
    if sparse:
      metrics["engram_row_grad_norm"] = row_grad_norm
    if aux["moe"]:
      loads = jnp.concatenate([s["load"].reshape(-1, s["load"].shape[-1]) for s in aux["moe"].values()])  # [L, E]
      metrics["moe_max_over_mean_load"] = jnp.mean(jnp.max(loads, -1) / jnp.maximum(jnp.mean(loads, -1), 1e-9))
      metrics["moe_dropped"] = sum(jnp.sum(s["dropped"]) for s in aux["moe"].values())
    if host:
      return new_state, metrics, {"row_grads": g_rows, "lr": table_lr}
    return new_state, metrics

  return step_fn


def make_eval_step(cfg: Config):
  """eval_step(params, model_state, batch) -> per-token loss; with tables off the devices the batch
  carries its rows (`engram_rows`, as the train step's with one micro-batch)."""
  host = host_tables(cfg)

  def eval_step(params, model_state, batch, engram_scale=None):
    rows = None
    if host:
      feed = {n: {"index": e["index"], "rows": e["rows"][:, 0]} for n, e in _owned_rows(batch["engram_rows"]).items()}
      rows = batch_rows.assemble_rows(feed, None, jnp.dtype(cfg.model.param_dtype))
    (logits, _) = forward(cfg.model, params, model_state, batch, engram_scale=engram_scale, rows=rows)
    return token_nll(logits, batch["targets"])[0] * batch["loss_mask"]  # [B, T] per-token loss, 0 where masked

  return eval_step


# ----------------------------------------------------------------------------------------------
# Throughput accounting.


def flops_per_token(cfg: Config) -> float:
  """Training FLOPs per token: 6 x activated matmul params (embedding lookups are free, the LM head is
  not) + attention's score and value matmuls (causal: half of 12 * layers * heads * width * T)."""
  counts = param_counts(cfg.model)
  head = cfg.model.d_model * cfg.model.vocab_size
  a = cfg.model.attention
  width = (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) / 2 if a.kind == "mla" else a.head_dim
  attn = 6 * cfg.model.num_layers * a.num_heads * width * cfg.data.seq_len
  return 6.0 * (counts["activated"] + head) + attn


_PEAK_FLOPS = {  # dense bf16 per device, for MFU
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
    "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops_per_device() -> Optional[float]:
  kind = jax.devices()[0].device_kind
  for name, flops in _PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


# ----------------------------------------------------------------------------------------------
# Metrics output.


class MetricsWriter:
  """JSONL + TensorBoard event files, written by process 0 only.

  `replay_from`: the step training (re)starts from. Rows of later steps, written by an earlier
  attempt that crashed or was stopped before its next checkpoint, are dropped from metrics.jsonl
  (and purged from TensorBoard's view) because the resumed run writes those steps again: readers
  see each step once. None keeps everything (appending only).
  """

  def __init__(self, workdir: str, replay_from: Optional[int] = None):
    self.enabled = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tensorboard")
    if self.enabled:
      os.makedirs(self.tb_dir, exist_ok=True)
      import logging

      from tensorboardX import SummaryWriter

      # A NaN loss is recorded as such (and the loop reports divergence itself): not one warning per scalar.
      logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)

      if replay_from is not None:
        drop_rows_after(self.jsonl_path, replay_from)
      self._tb = SummaryWriter(self.tb_dir, purge_step=None if replay_from is None else replay_from + 1)
      self._jsonl = open(self.jsonl_path, "a")

  def write(self, step: int, metrics: Dict[str, Any]):
    if not self.enabled:
      return
    flat = {}
    for key, value in metrics.items():
      value = np.asarray(value)
      if value.ndim == 0:
        flat[key] = float(value)
      else:
        for i, v in enumerate(value.reshape(-1)):
          flat[f"{key}/{i}"] = float(v)
    for key, value in flat.items():
      self._tb.add_scalar(key, value, step)
    self._jsonl.write(json.dumps({"step": step, **flat}) + "\n")
    self._jsonl.flush()

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def drop_rows_after(jsonl_path: str, step: int) -> int:
  """Rewrite a metrics.jsonl without the rows whose step is after `step` (and without a torn last
  line left by a killed writer); returns how many rows were dropped. Atomic: written to a temporary
  file, then renamed over the original."""
  if not os.path.exists(jsonl_path):
    return 0
  kept, dropped = [], 0
  with open(jsonl_path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        dropped += 1
        continue
      if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] > step:
        dropped += 1
      else:
        kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    tmp = jsonl_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, jsonl_path)
  return dropped


# ----------------------------------------------------------------------------------------------
# The loop.


class _DataPosition:
  """The data iterator's position recorded before the loop read ahead (what a checkpoint saves)."""

  def __init__(self, state):
    self._state = state

  def get_state(self) -> bytes:  # grain's checkpoint handler writes it as the iterator's own state
    return json.dumps(self._state, indent=4).encode()


class _StepInputs:
  """The loop's batches placed on the mesh, and the half of the table update the step does not do.

  Device tables (this class; also models without Engram): the next batch of the data iterator; the
  step reads the table rows it needs and applies their lazy Adam update itself, so nothing happens
  after it. `_HostTableInputs` keeps the tables off the devices. The loop calls, per step: `next()`
  (the placed batch, with its rows where the tables are elsewhere), the jitted step, `look_ahead()`
  (right after the step is dispatched), `apply_row_update(table_out, finite)`; and `eval_batch`,
  `take_times`, `tables_finite`, `data_position` and `saved_state` (what a checkpoint saves) as needed.
  """

  def __init__(self, cfg: Config, mesh, data_iter):
    self.cfg, self.mesh, self.data_iter = cfg, mesh, data_iter

  def jit_step(self, step_fn, shardings, data_shardings):
    return jax.jit(step_fn, in_shardings=(shardings, data_shardings), out_shardings=(shardings, None),
                   donate_argnums=(0,))

  def next(self):
    return place_batch(next(self.data_iter), self.mesh)

  def look_ahead(self):
    pass

  def apply_row_update(self, table_out, finite: bool):
    pass

  def eval_batch(self, local):
    return place_batch(local, self.mesh)

  def take_times(self, steps: int) -> Dict[str, float]:
    return {}

  def tables_finite(self) -> bool:
    return True  # device tables are in the train state, checked with it

  def data_position(self):
    return self.data_iter

  def saved_state(self, state: TrainState) -> TrainState:
    return state

  def close(self):
    pass


class _HostTableInputs(_StepInputs):
  """Tables off the devices (host_training.py, `store`): one batch is read ahead (`look_ahead`,
  right after a step is dispatched) and its rows gathered on a thread while the step runs; `next`
  brings them up to date (rows the previous update wrote are read again) and places them;
  `apply_row_update` applies the step's lazy Adam update on the host. A checkpoint saves the data
  position from before the read-ahead (`data_position`) and the tables and moments from the host
  (`saved_state`).
  """

  _END = object()

  def __init__(self, cfg: Config, mesh, data_iter, store, tx):
    import concurrent.futures

    super().__init__(cfg, mesh, data_iter)
    self.store = store
    self._pending = None  # (local batch or _END, its global hash ids, future of its prepared rows)
    self._current_ids = None
    self._position = None
    shards = batch_devices(mesh)  # the global batch's shards: with several processes every one
    # gathers the ids of the whole batch and contributes the rows it owns (`_place`)
    self._processes = jax.process_count()
    self.feed = host_training.RowFeed(store, shards, cfg.train.grad_accum_steps)
    self.eval_feed = host_training.RowFeed(store, shards, 1)
    self.chunks = host_training.mesh_chunks(mesh)
    self.times = dict.fromkeys(("rows_gather", "rows_ready", "rows_place", "grads_fetch", "host_update"), 0.0)
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engram-rows")
    # Device training's optimizer state keeps empty sub-trees where the tables were; checkpoints
    # are saved in that structure (same leaves, same order) so either placement restores them.
    backbone = memory.split(nn.meta.unbox(abstract_variables(cfg.model))["params"])[0]
    self._opt_structure = jax.tree.structure(jax.eval_shape(tx.init, backbone))

  def jit_step(self, step_fn, shardings, data_shardings):
    # The rows' shapes vary with the step's distinct rows: their placement gives their shardings.
    # Several processes: the row gradients come back whole to every process, which updates its rows.
    grads_out = None if self._processes == 1 else jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    return jax.jit(step_fn, out_shardings=(shardings, None, grads_out), donate_argnums=(0,))

  def next(self):
    if self._pending is None:
      local = next(self.data_iter)
      ids = self._global_ids(local)
      prepared = self._prepare(ids)
    else:
      local, ids, future = self._pending
      self._pending = None
      if local is self._END:
        raise StopIteration
      prepared = future.result()
    self._current_ids = ids
    t0 = time.perf_counter()
    rows = self.feed.ready(prepared)
    t1 = time.perf_counter()
    batch = place_batch(local, self.mesh)
    batch["engram_rows"] = self._place(rows)
    self.times["rows_ready"] += t1 - t0
    self.times["rows_place"] += time.perf_counter() - t1
    return batch

  def _global_ids(self, local) -> np.ndarray:
    """The hash ids of the global batch (every process's rows, in process order): one process's own;
    with several, a small int32 all-gather on the main thread (the same order on every process)."""
    if self._processes == 1:
      return np.asarray(local["engram_ids"])
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(local["engram_ids"]), tiled=True))

  def _prepare(self, ids):
    t0 = time.perf_counter()
    prepared = self.feed.prepare({"engram_ids": ids})
    self.times["rows_gather"] += time.perf_counter() - t0
    return prepared

  def _place(self, rows):
    """RowFeed.ready's arrays on the mesh. One process: index and rows split over the batch shards.
    Several: each process's slice of the index; the rows as [devices, S, A, U, d], each process's
    contribution (the rows it owns, zeros elsewhere) on one of its devices and zeros on the others,
    (`parts`), which the step sums (`_owned_rows`): every row comes from its one owner."""
    if self._processes == 1:
      return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(self.mesh, x.ndim)), rows)
    pi, b = jax.process_index(), self.cfg.data.batch_size // self._processes
    return {name: {"index": jax.make_array_from_process_local_data(batch_sharding(self.mesh, 3),
                                                                   entry["index"][pi * b:(pi + 1) * b]),
                   "parts": batch_rows.place_contribution(self.mesh, entry["rows"])} for name, entry in rows.items()}

  def look_ahead(self):
    self._position = self.data_iter.get_state()
    try:
      local = next(self.data_iter)
    except StopIteration:
      self._pending = (self._END, None, None)
      return
    ids = self._global_ids(local)
    self._pending = (local, ids, self._pool.submit(self._prepare, ids))

  def apply_row_update(self, table_out, finite: bool):
    if not finite:  # a skipped step changes no row, as on the devices
      return
    t0 = time.perf_counter()
    out = jax.device_get(table_out[0])
    t1 = time.perf_counter()
    t = self.cfg.train
    written = self.store.update(self._current_ids, out["row_grads"], out["lr"], chunks=self.chunks,
                                b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps)
    self.feed.record(written)
    self.times["grads_fetch"] += t1 - t0
    self.times["host_update"] += time.perf_counter() - t1

  def take_times(self, steps: int) -> Dict[str, float]:
    """Seconds per step of each host stage since the last call, for the metrics: rows_gather (on
    the prefetch thread, overlapping the step), rows_ready (re-reading rows written since),
    rows_place (transfer to the devices), grads_fetch (the step's row gradients to the host, once
    the step is done), host_update (the lazy Adam step)."""
    if steps < 1:
      return {}
    out = {f"time/{k}_s": v / steps for k, v in self.times.items()}
    self.times = dict.fromkeys(self.times, 0.0)
    return out

  def eval_batch(self, local):
    batch = place_batch(local, self.mesh)
    batch["engram_rows"] = self._place(self.eval_feed.ready(self.eval_feed.prepare(
        {"engram_ids": self._global_ids(local)})))
    return batch

  def tables_finite(self) -> bool:
    return self.store.all_finite()

  def data_position(self):
    if self._position is None:
      return self.data_iter
    return _DataPosition(self._position)

  def saved_state(self, state: TrainState) -> TrainState:
    tables, opt = self.store.snapshot()  # each process writes its own rows
    opt_state = jax.tree.unflatten(self._opt_structure, jax.tree.leaves(state.opt_state))
    return state.replace(params=memory.merge(state.params, tables), opt_state=opt_state, engram_opt=opt)

  def close(self):
    self._pool.shutdown(wait=True, cancel_futures=True)
    self.store.flush()


def step_inputs(cfg: Config, mesh, data_iter, store=None, tx=None) -> _StepInputs:
  """The loop's inputs for the run's table placement: `store` (host_training.HostTrainTables) for
  tables off the devices, None for device tables."""
  return _StepInputs(cfg, mesh, data_iter) if store is None else _HostTableInputs(cfg, mesh, data_iter, store, tx)


def check_batch_divides_mesh(cfg: Config, mesh):
  shards = batch_devices(mesh)
  per_step = cfg.data.batch_size
  if per_step % (shards * cfg.train.grad_accum_steps):
    raise ValueError(
        f"data.batch_size={per_step} must divide into train.grad_accum_steps={cfg.train.grad_accum_steps} "
        f"micro-batches, each a multiple of the {shards} batch shards of mesh {dict(mesh.shape)}")


class NonFiniteError(RuntimeError):
  """Training diverged: `train.max_consecutive_nonfinite` steps in a row had a non-finite loss or
  gradient, or the train state itself holds NaN/inf. No checkpoint is ever written from such a
  state, so `last_good_step` (the newest checkpoint; None if there is none) is where a rerun resumes.
  """

  def __init__(self, message: str, *, step: Optional[int] = None, last_good_step: Optional[int] = None):
    super().__init__(message)
    self.step = step
    self.last_good_step = last_good_step


def _nonfinite_message(cfg: Config, step: int, run: int, last_good: Optional[int], checkpoint_dir) -> str:
  steps = f"steps {step - run + 1}-{step}" if run > 1 else f"step {step}"
  message = (f"training diverged at step {step}: {steps} ({run} in a row, train.max_consecutive_nonfinite="
             f"{cfg.train.max_consecutive_nonfinite}) had a non-finite loss or gradient and were skipped. ")
  return message + _last_good_text(cfg, last_good, checkpoint_dir)


def _last_good_text(cfg: Config, last_good: Optional[int], checkpoint_dir) -> str:
  if not cfg.train.checkpoint.enabled:
    where = "Checkpointing is off (train.checkpoint.enabled=False), so there is no state to resume from. "
  elif last_good is None:
    where = ("No checkpoint was written before it (none is ever written from a non-finite state or in "
             "the middle of skipped steps), so a rerun starts from scratch. ")
  else:
    where = (f"The last good checkpoint is step {last_good} in {checkpoint_dir} (none is ever written from a "
             f"non-finite state or in the middle of skipped steps); a rerun resumes from it. ")
  return where + ("Lower train.learning_rate (or lengthen train.warmup_steps), or check the data the "
                  "failing steps read.")


def _check_run_args(cfg: Config, max_steps, resume_step):
  for name, value in (("max_steps", max_steps), ("resume_step", resume_step)):
    if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
      raise ValueError(f"{name}={value!r}: expected a positive step number (or None)")
  if resume_step is not None and not cfg.train.checkpoint.enabled:
    raise ValueError(f"resume_step={resume_step}: checkpointing is off (train.checkpoint.enabled=False), so "
                     "there is nothing to resume from")


def _state_is_finite_fn(shardings):
  """Jitted state -> bool: every float leaf of the train state is finite (checked before each save)."""

  def all_finite(state):
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)

  return jax.jit(all_finite, in_shardings=(shardings,))


def _sync_processes(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _lock_workdir(lock: runlock.WorkdirLock):
  """Take the workdir's run lock: in a multi-process run process 0 alone takes it (one lock per run)
  and tells the others whether it got it, so every process refuses together."""
  if jax.process_count() == 1:
    lock.acquire()
    return
  from jax.experimental import multihost_utils

  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except runlock.WorkdirBusyError as e:
      error = e
  got = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
  if error is not None:
    raise error
  if not got:
    raise runlock.WorkdirBusyError(f"workdir {lock.workdir} is in use by another training run (process 0's "
                                   "error names it); this run did not start")


def _resume(cfg: Config, manager, abstract_state, data_iter, resume_step: Optional[int], state_is_finite,
            log, store=None) -> Optional[Tuple[TrainState, int, Dict[str, Any]]]:
  """(state, step, metadata) from `resume_step` or else the newest checkpoint; None for a fresh start.

  A step that cannot be restored, or that holds NaN/inf (written by a version without the save-time
  check), raises CheckpointRestoreError saying which older step is intact (restored once as a check,
  then dropped) and how to resume from it; nothing is deleted or chosen silently. With
  `resume_step`, the steps after it are moved to `<checkpoints>.superseded/` once it restored.
  """
  if not cfg.train.checkpoint.enabled:
    return None
  step = manager.latest_step() if resume_step is None else resume_step
  if step is None:
    return None
  partial = store is not None  # the tables and their moments are read into the host store instead
  finite = lambda s: bool(state_is_finite(s)) and (store is None or store.all_finite())  # noqa: E731
  if partial:  # an empty dict in a partial target reads as a mismatched leaf: leave the field out
    abstract_state = abstract_state.replace(engram_opt=None)
  try:
    state = manager.restore(step, abstract_state, data_iter, partial=partial)
    if partial:
      state = state.replace(engram_opt={})
    meta = manager.read_metadata(step) or {}
    if store is not None:
      host_training.fill_from_checkpoint(store, str(manager.directory), step)
    problem = None
    if not finite(state):
      problem = "holds NaN or infinite values (a diverged state)"
      jax.tree.map(lambda x: x.delete(), state)  # free the devices for the search below
  except ckpt_lib.CheckpointNotFoundError:
    raise
  except ckpt_lib.CheckpointRestoreError as e:
    problem, cause = None, e
  else:
    cause = None
  if cause is not None or problem is not None:
    intact = manager.find_intact(abstract_state, below=step, partial=partial,
                                 accept=lambda s: bool(state_is_finite(s.replace(engram_opt={}) if partial else s)))
    if intact is None:
      hint = ("No older step restores intact into this config either" if any(s < step for s in manager.all_steps())
              else "There is no older step")
      hint += ": start afresh in a new workdir (or restore with the config this checkpoint was written with)."
    else:
      hint = (f"Step {intact} is intact (checked by restoring it): resume from it with resume_step={intact} "
              f"(train.py --resume_step {intact}), which moves the newer steps to "
              f"{manager.directory}.superseded/ rather than deleting them.")
    first = (str(cause) if cause is not None else
             f"checkpoint {manager.step_path(step)} {problem}; it was left untouched.")
    raise ckpt_lib.CheckpointRestoreError(f"{first.rstrip('.')}. {hint}", directory=manager.directory, step=step,
                                          available=manager.all_steps(), intact=intact) from cause
  if resume_step is not None:
    moved = manager.set_aside_after(step) if jax.process_index() == 0 else ()
    _sync_processes("engram_jax_resume_step")
    manager.reload()
    if moved:
      log(f"Resuming from step {step}: moved the {len(moved)} newer step(s) to {os.path.dirname(moved[0])}")
  return state, step, meta


def evaluate(state: TrainState, eval_fn, batches) -> Dict[str, float]:
  """Held-out loss over placed `batches` (`_StepInputs.eval_batch`: with their rows where the tables
  are off the devices)."""
  total, count = 0.0, 0.0
  for batch in batches:
    token_loss = eval_fn(state.params, state.model_state, batch)
    total += float(jnp.sum(token_loss))
    count += float(jnp.sum(batch["loss_mask"]))  # the global batch: every process's rows
  loss = total / max(count, 1.0)
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


def train(cfg: Config, workdir: str, *, progress: Optional[bool] = None, log=print,
          max_steps: Optional[int] = None, devices=None, resume_step: Optional[int] = None) -> Dict[str, Any]:
  """Train (resuming from `workdir` if it holds a checkpoint); returns a summary dict.

  `max_steps` stops early (at a step, with a checkpoint) as if preempted; `resume_step` resumes from
  that saved step instead of the newest (the newer steps are moved to `<workdir>/checkpoints.superseded/`,
  not deleted); `devices` restricts the mesh to some devices (default: all). Tests use all three.

  Safety: nothing is written into `workdir` before the config, mesh and data have been checked; one
  run at a time holds `<workdir>/train.lock` (a second raises runlock.WorkdirBusyError naming the
  first); the non-finite counter is read after every step (a host sync per step), so a divergence
  raises NonFiniteError on the step it reaches `train.max_consecutive_nonfinite`, naming the last
  good checkpoint; no checkpoint is written in the middle of a run of skipped steps nor from a state
  holding NaN/inf, so the checkpoints kept are good ones; metrics.jsonl holds each step once (rows
  after the step a run resumes from are dropped, since it writes them again).

  Summary keys: preset, step, stopped_by ("completed", "max_steps", "preempted" or "end_of_data",
  when `data.num_epochs` runs out), signal (the signal that preempted it, else None),
  checkpoint_step (the newest checkpoint), skipped_steps, checkpoint_dir, metrics_jsonl,
  tensorboard_dir, first_eval, last_eval, history.
  """
  _check_run_args(cfg, max_steps, resume_step)
  mesh = make_mesh(cfg.mesh, devices)
  check_batch_divides_mesh(cfg, mesh)
  lock = runlock.WorkdirLock(workdir)
  if jax.process_count() == 1 and os.path.isdir(workdir):
    lock.acquire()  # an existing workdir may be in use: refuse before the slow setup
  data_iter = None
  try:
    tx, shardings, abstract_state = state_shardings(cfg, mesh)
    data_iter = data_lib.make_train_iterator(cfg.data, engram=cfg.model.engram, vocab_size=cfg.model.vocab_size)
    eval_local = (data_lib.eval_batches(cfg.data, engram=cfg.model.engram, vocab_size=cfg.model.vocab_size)
                  if cfg.train.eval_every > 0 else [])[:cfg.train.eval_max_batches]
    if host_tables(cfg):  # not enough RAM, or a disk table directory that is not this run's
      host_training.check_placement(cfg.model.engram, cfg.train.engram_tables, workdir)
    os.makedirs(workdir, exist_ok=True)  # only now: a config or data error leaves no workdir behind
    _lock_workdir(lock)
    return _train_locked(cfg, workdir, mesh, tx, shardings, abstract_state, data_iter, eval_local,
                         progress=progress, log=log, max_steps=max_steps, resume_step=resume_step)
  finally:
    lock.release()
    close = getattr(data_iter, "close", None)
    if close is not None:  # stops grain's worker processes now rather than at garbage collection
      close()


def _train_locked(cfg: Config, workdir: str, mesh, tx, shardings, abstract_state, data_iter, eval_local, *,
                  progress, log, max_steps, resume_step) -> Dict[str, Any]:
  """The body of `train` once the workdir is locked and the data is ready."""
  is_main = jax.process_index() == 0
  state_is_finite = _state_is_finite_fn(shardings)
  if is_main:
    for partial in ckpt_lib.remove_partial_saves(os.path.join(workdir, "checkpoints")):
      log(f"removed {partial}: a checkpoint whose save did not finish (a full disk, a killed run)")
  manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"), cfg.train.checkpoint,
                                       config=to_dict(cfg))
  store = None
  try:
    if host_tables(cfg):
      store = host_training.HostTrainTables.allocate(cfg.model.engram, cfg.train.engram_tables, workdir)
    restored = _resume(cfg, manager, abstract_state, data_iter, resume_step, state_is_finite, log, store=store)
  except BaseException:
    manager.close()
    raise
  if restored is not None:
    state, start, meta = restored
    log(f"Resumed from step {start} in {manager.directory}")
  else:
    state, start, meta = init_state(cfg, mesh, tx, shardings), 0, {}
    if store is not None:
      store.initialize(cfg)
  inputs = step_inputs(cfg, mesh, data_iter, store, tx)

  data_shardings = {k: batch_sharding(mesh, len(v.shape)) for k, v in batch_shapes(cfg, 1).items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    step_fn = inputs.jit_step(make_train_step(cfg, tx), shardings, data_shardings)
    eval_fn = jax.jit(make_eval_step(cfg))

  writer = MetricsWriter(workdir, replay_from=start)
  preemption = ckpt_lib.install_preemption_handler()
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  fpt = flops_per_token(cfg)
  peak = peak_flops_per_device()
  end = cfg.train.steps if max_steps is None else min(cfg.train.steps, max_steps)
  if progress is None:
    progress = is_main and sys.stderr.isatty()
  bar = None
  if progress and is_main:
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.train.steps, initial=start, desc=f"train {cfg.name}", unit="step", dynamic_ncols=True)

  history = []
  first_eval = last_eval = None
  step = start
  skipped = int(meta.get("skipped_steps", 0))  # every skipped step of the run so far, across resumes
  run = 0  # skipped steps in a row up to `step`
  last_good = start if restored is not None else None  # the newest checkpoint (all are finite)
  t_last, steps_since = time.perf_counter(), 0
  stopped_by = "completed"

  def save(force: bool = False):
    nonlocal last_good
    if not cfg.train.checkpoint.enabled or not manager.would_save(step, force=force):
      return
    if run:
      if is_main:
        newest = f"the newest checkpoint stays step {last_good}" if last_good is not None else "no checkpoint yet"
        log(f"step {step}: not checkpointed, the last {run} step(s) were skipped for a non-finite loss or "
            f"gradient ({newest})")
      return
    if not bool(state_is_finite(state)) or not inputs.tables_finite():
      raise NonFiniteError(f"the train state holds NaN or infinite values at step {step} although its loss and "
                           "gradients were finite. " + _last_good_text(cfg, last_good, manager.directory),
                           step=step, last_good_step=last_good)
    manager.save(step, inputs.saved_state(state), inputs.data_position(), force=force,
                 metadata={"skipped_steps": skipped})
    last_good = step

  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
      while step < end:
        try:
          batch = inputs.next()
        except StopIteration:  # a finite data.num_epochs ran out
          stopped_by = "end_of_data"
          break
        state, metrics, *table_out = step_fn(state, batch)
        inputs.look_ahead()  # host tables: the next step's rows are gathered while this one runs
        step += 1
        steps_since += 1
        run = int(jax.device_get(state.nonfinite_run))
        inputs.apply_row_update(table_out, finite=run == 0)
        skipped += run > 0
        diverged = run >= max(cfg.train.max_consecutive_nonfinite, 1)
        if step % cfg.train.log_every == 0 or step == end or diverged:
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - t_last
          tok_s = steps_since * tokens_per_step / max(elapsed, 1e-9)
          metrics["tokens_per_sec"] = tok_s
          if peak:
            metrics["mfu"] = tok_s * fpt / (peak * jax.device_count())
          metrics["skipped_steps"] = float(skipped)
          metrics.update(inputs.take_times(steps_since))
          metrics["nonfinite_run"] = float(run)
          writer.write(step, metrics)
          history.append({"step": step, "loss": float(metrics["loss"])})
          t_last, steps_since = time.perf_counter(), 0
          if bar is not None:
            bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{tok_s:,.0f}")
          elif is_main:
            log(f"step {step:>6}  loss {float(metrics['loss']):.4f}  lr {float(metrics['lr']):.2e}  "
                f"grad_norm {float(metrics['grad_norm']):.3f}  tok/s {tok_s:,.0f}")
        if diverged:
          raise NonFiniteError(_nonfinite_message(cfg, step, run, last_good, manager.directory), step=step,
                               last_good_step=last_good)
        if bar is not None:
          bar.update(1)
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps) and eval_local:
          ev = evaluate(state, eval_fn, map(inputs.eval_batch, eval_local))
          writer.write(step, ev)
          first_eval = first_eval or {"step": step, **ev}
          last_eval = {"step": step, **ev}
          if bar is None and is_main:
            log(f"step {step:>6}  eval_loss {ev['eval_loss']:.4f}  eval_ppl {ev['eval_ppl']:.2f}")
        save(force=step == cfg.train.steps)
        if preemption.should_stop():
          stopped_by = "preempted"
          break
      if step < cfg.train.steps and stopped_by == "completed":
        stopped_by = "max_steps"
      if step > start:
        save(force=True)
  finally:
    if bar is not None:
      bar.close()
    inputs.close()
    try:
      manager.close()  # waits for a pending save: a failed one raises CheckpointWriteError here
    finally:
      writer.close()
      preemption.uninstall()

  signum = preemption.received if stopped_by == "preempted" else None
  if stopped_by == "preempted" and signum is None:  # another process of this run got the signal
    signum = int(signal.SIGTERM)
  summary = {
      "preset": cfg.name, "step": step, "stopped_by": stopped_by, "signal": signum,
      "checkpoint_step": last_good if cfg.train.checkpoint.enabled else None, "skipped_steps": skipped,
      "checkpoint_dir": os.path.abspath(manager.directory) if cfg.train.checkpoint.enabled else None,
      "metrics_jsonl": os.path.abspath(writer.jsonl_path), "tensorboard_dir": os.path.abspath(writer.tb_dir),
      "first_eval": first_eval, "last_eval": last_eval, "history": history,
  }
  return summary


def summary_lines(summary: Dict[str, Any], cfg: Config, workdir: str) -> List[str]:
  """train.py's closing lines: how the run ended, the held-out loss (first and last evaluation, one
  value when there was one), where the checkpoints and metrics are, and what to run next."""
  import shlex

  lines = [f"Done: {summary['stopped_by']} at step {summary['step']} ({cfg.name})."]
  first, last = summary["first_eval"], summary["last_eval"]
  if first and last:
    if first["step"] == last["step"]:
      lines.append(f"Held-out loss: {last['eval_loss']:.3f} (step {last['step']})")
    else:
      lines.append(f"Held-out loss: {first['eval_loss']:.3f} (step {first['step']}) -> {last['eval_loss']:.3f} "
                   f"(step {last['step']})")
  if summary["checkpoint_dir"]:
    newest = summary["checkpoint_step"]
    lines.append(f"Checkpoints:  {summary['checkpoint_dir']} "
                 f"({'newest: step ' + str(newest) if newest is not None else 'none saved'})")
  lines.append(f"Metrics:      {summary['metrics_jsonl']}")
  lines.append(f"TensorBoard:  {summary['tensorboard_dir']}")
  if summary["checkpoint_step"] is not None:  # eval.py reads the run's config (overrides included) from it
    lines.append(f"Evaluate:     python eval.py --workdir {shlex.quote(workdir)}")
  if summary["stopped_by"] == "preempted":
    lines.append(f"Preempted by signal {summary['signal']}: rerun the same command to resume.")
  return lines


def _prune_empty(tree):
  """A nested dict without its empty sub-dicts (orbax's partial restore reads `{}` as a mismatched leaf)."""
  if not isinstance(tree, dict):
    return tree
  out = {k: _prune_empty(v) for k, v in tree.items()}
  return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}


def restore_for_eval(cfg: Config, checkpoint_dir: str, mesh=None, step: Optional[int] = None, *,
                     tables: bool = True):
  """(params, model_state, step) from a checkpoint directory (`<workdir>/checkpoints`), restored onto
  `mesh` (default: every local device, resharding as needed). Only the parameters and the model
  state are read: the optimizer state (twice the parameters' bytes under Adam) stays on disk; with
  `tables=False` the Engram tables stay there too (params hold the backbone: for tables kept on the
  host, engram_jax/tables/). A missing or empty directory is a FileNotFoundError naming it; a step
  it does not hold a CheckpointNotFoundError listing those it does; a damaged or incompatible one a
  CheckpointRestoreError that names the newest older step whose parameters do restore (`intact`)."""
  mesh = mesh or make_mesh(cfg.mesh)
  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} does not exist (expected <workdir>/checkpoints "
                            "written by train.py)")
  _, _, abstract_state = state_shardings(cfg, mesh)
  params = abstract_state.params if tables else _prune_empty(memory.split(abstract_state.params)[0])
  target = {"params": params, "model_state": abstract_state.model_state}
  manager = ckpt_lib.CheckpointManager(checkpoint_dir, dataclasses.replace(cfg.train.checkpoint, async_save=False))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} holds no checkpoint")
    try:
      state = manager.restore(step, target, partial=True)
    except ckpt_lib.CheckpointNotFoundError:
      raise
    except ckpt_lib.CheckpointRestoreError as e:
      intact = manager.find_intact(target, below=step, partial=True)
      hint = (f"Step {intact}'s parameters are intact (checked by reading them): evaluate it with step={intact} "
              f"(eval.py --step {intact})." if intact is not None else
              "No older step restores into this config either.")
      raise ckpt_lib.CheckpointRestoreError(f"{str(e).rstrip('.')}. {hint}", directory=manager.directory, step=step,
                                            available=manager.all_steps(), intact=intact) from e
  finally:
    manager.close()
  return state["params"], state["model_state"], step
