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
import sys
import time
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from engram_jax import checkpoint as ckpt_lib
from engram_jax import data as data_lib
from engram_jax import memory
from engram_jax.config import Config, to_dict
from engram_jax.model import abstract_variables, forward, init_variables, param_counts, token_nll
from engram_jax.moe import BALANCE_COLLECTION, update_balance_bias
from engram_jax.optim import learning_rate_schedule, make_optimizer, opt_state_shardings
from engram_jax.sharding import LOGICAL_RULES, batch_devices, batch_sharding, make_mesh, place_batch, tree_shardings



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


def state_shardings(cfg: Config, mesh, tx=None):
  """(optimizer, TrainState of shardings, abstract TrainState with shardings on every leaf).

  With row-sparse table updates the optax optimizer covers every param but the Engram tables,
  whose lazy Adam state (moments like the table, a per-row step count) lives in `engram_opt`.
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
    if sparse_tables(cfg):
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
  like any other parameter. That is the only difference between the two.
  """
  sparse = sparse_tables(cfg)

  def loss_fn(params, model_state, batch, rows=None):
    (logits, aux) = forward(cfg.model, params, model_state, batch, rows=rows)
    loss, ce, z, tokens = cross_entropy(logits, batch["targets"], batch["loss_mask"], cfg.train.z_loss)
    return loss + aux["aux_loss"], (ce, z, tokens, aux)

  def grads_of(params, model_state, batch):
    if not sparse:
      (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model_state, batch)
      return loss, extra, grads, {}
    backbone, tables = memory.split(params)
    rows = memory.gather(tables, cfg.model.engram, batch["engram_ids"])  # {name: [B,T,H,d]}
    (loss, extra), (g_backbone, g_rows) = jax.value_and_grad(
        lambda b, r: loss_fn(b, model_state, batch, r), argnums=(0, 1), has_aux=True)(backbone, rows)
    return loss, extra, g_backbone, g_rows

  return grads_of


def make_train_step(cfg: Config, tx):
  """The pure step: grads (accumulated over `grad_accum_steps` micro-batches), one optimizer update,
  the MoE bias update, and metrics. A step whose loss or gradients are not finite changes nothing
  but the step counter and `nonfinite_run`.

  Engram tables (memory.py): with row-sparse updates the gradient is taken with respect to the rows
  read (`make_grads`) and lazy Adam updates only those rows (memory.sparse_update), so step cost does
  not grow with the table; otherwise optax's Adam updates the tables densely. Global-norm clipping
  applies to the optax params; Adam's update is invariant to the gradient's scale (up to eps), so row
  gradients are left out of it rather than paying a de-duplication for an exact joint norm.
  """
  accum = cfg.train.grad_accum_steps
  schedule = learning_rate_schedule(cfg.train)
  sparse = sparse_tables(cfg)
  engram = cfg.model.engram
  tcfg = cfg.train
  grads_of = make_grads(cfg)

  def step_fn(state: TrainState, batch) -> Tuple[TrainState, Dict[str, jax.Array]]:
    if accum == 1:
      loss, (ce, z, tokens, aux), grads, g_rows = grads_of(state.params, state.model_state, batch)
      engram_ids = batch.get("engram_ids")
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

      def body(carry, mb):
        l, (c, zz, n, a), g, gr = grads_of(state.params, state.model_state, mb)
        acc_g, acc = carry
        return (jax.tree.map(jnp.add, acc_g, g), jax.tree.map(jnp.add, acc, (l, c, zz, n))), (a, gr)

      grad_params = memory.split(state.params)[0] if sparse else state.params
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
    if sparse:
      backbone, tables = memory.split(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, backbone)
      backbone = keep(optax.apply_updates(backbone, updates), backbone)
      hyper = dict(lr=schedule(state.step) * tcfg.engram_lr_multiplier, b1=tcfg.adam_b1, b2=tcfg.adam_b2,
                   eps=tcfg.adam_eps)
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
    return new_state, metrics

  return step_fn


def make_eval_step(cfg: Config):
  def eval_step(params, model_state, batch, engram_scale=None):
    (logits, _) = forward(cfg.model, params, model_state, batch, engram_scale=engram_scale)
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
  """JSONL + TensorBoard event files, written by process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, "tensorboard")
    if self.enabled:
      os.makedirs(self.tb_dir, exist_ok=True)
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(self.tb_dir)
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


# ----------------------------------------------------------------------------------------------
# The loop.


def check_batch_divides_mesh(cfg: Config, mesh):
  shards = batch_devices(mesh)
  per_step = cfg.data.batch_size
  if per_step % (shards * cfg.train.grad_accum_steps):
    raise ValueError(
        f"data.batch_size={per_step} must divide into train.grad_accum_steps={cfg.train.grad_accum_steps} "
        f"micro-batches, each a multiple of the {shards} batch shards of mesh {dict(mesh.shape)}")


class NonFiniteError(RuntimeError):
  pass


def evaluate(cfg: Config, state: TrainState, mesh, eval_fn, batches) -> Dict[str, float]:
  total, count = 0.0, 0.0
  for local in batches:
    batch = place_batch(local, mesh)
    token_loss = eval_fn(state.params, state.model_state, batch)
    total += float(jnp.sum(token_loss))
    count += float(jnp.sum(batch["loss_mask"]))  # the global batch: every process's rows
  loss = total / max(count, 1.0)
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


def train(cfg: Config, workdir: str, *, progress: Optional[bool] = None, log=print,
          max_steps: Optional[int] = None, devices=None) -> Dict[str, Any]:
  """Train (resuming from `workdir` if it holds a checkpoint); returns a summary dict.

  `max_steps` stops early (at a step, with a checkpoint) as if preempted; `devices` restricts the
  mesh to some devices (default: all). Tests use both.
  """
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh(cfg.mesh, devices)
  check_batch_divides_mesh(cfg, mesh)
  is_main = jax.process_index() == 0
  tx, shardings, abstract_state = state_shardings(cfg, mesh)
  data_iter = data_lib.make_train_iterator(cfg.data, engram=cfg.model.engram, vocab_size=cfg.model.vocab_size)
  eval_local = (data_lib.eval_batches(cfg.data, engram=cfg.model.engram, vocab_size=cfg.model.vocab_size)
                if cfg.train.eval_every > 0 else [])[:cfg.train.eval_max_batches]

  manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"), cfg.train.checkpoint,
                                       config=to_dict(cfg))
  restored = manager.restore_latest(abstract_state, data_iter) if cfg.train.checkpoint.enabled else None
  if restored is not None:
    state, start = restored
    log(f"Resumed from step {start} in {manager.directory}")
  else:
    state = init_state(cfg, mesh, tx, shardings)
    start = 0

  data_shardings = {k: batch_sharding(mesh, len(v.shape)) for k, v in batch_shapes(cfg, 1).items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    step_fn = jax.jit(make_train_step(cfg, tx), in_shardings=(shardings, data_shardings),
                      out_shardings=(shardings, None), donate_argnums=(0,))
    eval_fn = jax.jit(make_eval_step(cfg))

  writer = MetricsWriter(workdir)
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
  t_last, steps_since = time.perf_counter(), 0
  stopped_by = "completed"
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
      while step < end:
        local = next(data_iter)
        state, metrics = step_fn(state, place_batch(local, mesh))
        step += 1
        steps_since += 1
        if step % cfg.train.log_every == 0 or step == end:
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - t_last
          tok_s = steps_since * tokens_per_step / max(elapsed, 1e-9)
          metrics["tokens_per_sec"] = tok_s
          if peak:
            metrics["mfu"] = tok_s * fpt / (peak * jax.device_count())
          metrics["skipped_steps"] = float(jax.device_get(state.nonfinite_run))
          writer.write(step, metrics)
          history.append({"step": step, "loss": float(metrics["loss"])})
          t_last, steps_since = time.perf_counter(), 0
          if bar is not None:
            bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", tok_s=f"{tok_s:,.0f}")
          elif is_main:
            log(f"step {step:>6}  loss {float(metrics['loss']):.4f}  lr {float(metrics['lr']):.2e}  "
                f"grad_norm {float(metrics['grad_norm']):.3f}  tok/s {tok_s:,.0f}")
          if int(jax.device_get(state.nonfinite_run)) >= max(cfg.train.max_consecutive_nonfinite, 1):
            raise NonFiniteError(
                f"{int(jax.device_get(state.nonfinite_run))} consecutive steps had a non-finite loss or gradient "
                f"(train.max_consecutive_nonfinite={cfg.train.max_consecutive_nonfinite}) at step {step}: "
                "lower the learning rate or check the data; the last good state is in the latest checkpoint")
        if bar is not None:
          bar.update(1)
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.steps) and eval_local:
          ev = evaluate(cfg, state, mesh, eval_fn, eval_local)
          writer.write(step, ev)
          first_eval = first_eval or {"step": step, **ev}
          last_eval = {"step": step, **ev}
          if bar is None and is_main:
            log(f"step {step:>6}  eval_loss {ev['eval_loss']:.4f}  eval_ppl {ev['eval_ppl']:.2f}")
        if cfg.train.checkpoint.enabled:
          manager.save(step, state, data_iter, force=step == cfg.train.steps)
        if preemption.should_stop():
          stopped_by = "preempted"
          break
      if step < cfg.train.steps and stopped_by == "completed":
        stopped_by = "max_steps"
      if cfg.train.checkpoint.enabled and step > start:
        manager.save(step, state, data_iter, force=True)
  finally:
    if bar is not None:
      bar.close()
    manager.wait()
    manager.close()
    writer.close()
    preemption.uninstall()
    close = getattr(data_iter, "close", None)
    if close is not None:  # stops grain's worker processes now rather than at garbage collection
      close()

  summary = {
      "preset": cfg.name, "step": step, "stopped_by": stopped_by,
      "checkpoint_dir": os.path.abspath(manager.directory) if cfg.train.checkpoint.enabled else None,
      "metrics_jsonl": os.path.abspath(writer.jsonl_path), "tensorboard_dir": os.path.abspath(writer.tb_dir),
      "first_eval": first_eval, "last_eval": last_eval, "history": history,
  }
  return summary


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
  host, engram_jax/offload.py). A
  missing or empty directory is a FileNotFoundError naming it; a damaged or incompatible one a
  CheckpointRestoreError."""
  mesh = mesh or make_mesh(cfg.mesh)
  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} does not exist (expected <workdir>/checkpoints "
                            "written by train.py)")
  _, _, abstract_state = state_shardings(cfg, mesh)
  manager = ckpt_lib.CheckpointManager(checkpoint_dir, dataclasses.replace(cfg.train.checkpoint, async_save=False))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} holds no checkpoint")
    params = abstract_state.params if tables else _prune_empty(memory.split(abstract_state.params)[0])
    state = manager.restore(step, {"params": params, "model_state": abstract_state.model_state}, partial=True)
  finally:
    manager.close()
  return state["params"], state["model_state"], step
