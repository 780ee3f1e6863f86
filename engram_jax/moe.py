"""DeepSeekMoE: shared experts, a sigmoid router with aux-loss-free balancing, expert parallelism.

Routing (DeepSeek-V3): affinities s = sigmoid(x W_r); the top-k experts are chosen by s + bias,
where the bias only steers *selection* toward under-loaded experts and never scales an output, so
balancing costs no gradient interference (the reason V3 dropped the auxiliary balance loss). The
bias is not a param: it lives in the "moe_state" collection and the trainer moves it with
`update_balance_bias` from the step's per-expert load, outside the optimizer.

The router runs on the global [B, T, D] activations (plain jnp, GSPMD shards it over the batch):
the sequence-wise balance loss needs whole sequences and the load statistics need the whole batch,
both awkward inside a per-shard body. Only dispatch, the expert matmuls and combine run in
`jax.shard_map`, because GSPMD cannot express "send each token to the device owning its expert".

Dispatch is sort-based, not one-hot: assignments are sorted by expert and the experts run as one
grouped matmul (`jax.lax.ragged_dot`) over contiguous groups, so work and memory scale with
tokens*top_k rather than tokens*experts*capacity as in the GShard einsum formulation.

Capacity semantics. Capacity applies per *dispatch group*: the tokens one device holds (on the
local path, all tokens). A group sends at most C = ceil(capacity_factor * group_tokens * top_k / E)
assignments to each expert, first come first served in (token, slot) order; the rest are dropped
and counted. A global capacity would make results independent of the mesh but needs every
device's buffers sized for the whole batch, which defeats the purpose of a capacity.

Expert-parallel buffers must have static shapes. Each device reserves, per destination device,
`pair_rows = group_tokens * min(top_k, experts_per_device)` rows when dropless: a token picks k
distinct experts, at most min(k, experts_per_device) of them on one device, so no routing can
overflow it (the only drops are capacity drops). With a capacity the bound is also
experts_per_device * C and the smaller one is used. The receive buffer is
expert_shards * pair_rows rows, the worst case of every device routing to one owner; set a
capacity_factor to bound it when that is too much memory.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from engram_jax.config import ModelConfig
from engram_jax.sharding import rule_axes, spec_entry

# Linen collection of the (non-trained) selection bias; scanned decoders give it a layer axis too.
BALANCE_COLLECTION = "moe_state"

RaggedAllToAll = Callable[..., jax.Array]


# ----------------------------------------------------------------------------------------------
# Routing and balancing (pure functions; the trainer and tests use them directly).


def route(x: jax.Array, router_kernel: jax.Array, bias: jax.Array, top_k: int,
          route_scale: float = 1.0) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Sigmoid affinities, bias-steered top-k, normalised weights.

  x [..., D], router_kernel [D, E], bias [E] -> (scores [..., E] float32, expert_ids [..., k] int32,
  weights [..., k] float32 summing to route_scale). Routing runs in float32 whatever the compute
  dtype (float64 for float64 inputs): in bf16 near-ties flip between steps and the load statistics
  become noise.
  """
  num_experts = router_kernel.shape[-1]
  if bias.shape != (num_experts,):
    raise ValueError(f"balance bias shape {bias.shape}: expected ({num_experts},), one per expert")
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  logits = jnp.einsum("...d,de->...e", x.astype(dtype), router_kernel.astype(dtype))
  scores = jax.nn.sigmoid(logits)
  _, expert_ids = jax.lax.top_k(scores + jax.lax.stop_gradient(bias.astype(dtype)), top_k)
  chosen = jnp.take_along_axis(scores, expert_ids, axis=-1)  # [..., k]
  # Sigmoids are positive, but can underflow to 0 together for extreme logits.
  total = jnp.maximum(jnp.sum(chosen, axis=-1, keepdims=True), jnp.finfo(dtype).tiny)
  weights = chosen / total * route_scale
  return scores, expert_ids.astype(jnp.int32), weights


def expert_load(expert_ids: jax.Array, num_experts: int) -> jax.Array:
  """Assignments per expert (float32 [E]); float so it averages cleanly over steps and layers."""
  return jnp.zeros((num_experts,), jnp.float32).at[expert_ids.reshape(-1)].add(1.0)


def update_balance_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
  """Aux-loss-free balancing step: bias += rate * sign(mean_load - load) per expert.

  bias and load are [..., E] (a scanned decoder stacks them as [layers, E]); the mean is over the
  expert axis. The sign (not the load difference itself) keeps the step size independent of the
  batch size, as in DeepSeek-V3; balanced experts get a zero step.
  """
  load = jnp.asarray(load, jnp.float32)
  if bias.shape != load.shape:
    raise ValueError(f"balance bias shape {bias.shape} and load shape {load.shape}: expected equal shapes")
  mean_load = jnp.mean(load, axis=-1, keepdims=True)
  return bias + rate * jnp.sign(mean_load - load).astype(bias.dtype)


def seq_balance_loss(scores: jax.Array, expert_ids: jax.Array) -> jax.Array:
  """DeepSeek-V3's sequence-wise balance loss (unweighted), averaged over sequences.

  scores [B, T, E] (sigmoid affinities), expert_ids [B, T, k]. Per sequence:
  f_i = E / (k T) * #tokens choosing i, P_i = mean over tokens of s_i / sum_j s_j, L = sum_i f_i P_i
  (1.0 when perfectly balanced). Gradients reach the router through P only.
  """
  _, seq_len, num_experts = scores.shape
  top_k = expert_ids.shape[-1]
  chosen = jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32), axis=-2)  # [B, T, E]
  frac = jnp.sum(chosen, axis=1) * (num_experts / (top_k * seq_len))  # [B, E]
  probs = jnp.mean(scores / jnp.sum(scores, axis=-1, keepdims=True), axis=1)  # [B, E]
  return jnp.mean(jnp.sum(frac * probs, axis=-1))


def group_capacity(group_tokens: int, top_k: int, num_experts: int,
                   capacity_factor: Optional[float]) -> Optional[int]:
  """Assignments one dispatch group may send to one expert; None = dropless."""
  if capacity_factor is None:
    return None
  return max(1, math.ceil(capacity_factor * group_tokens * top_k / num_experts))


# ----------------------------------------------------------------------------------------------
# Shared pieces of the local and expert-parallel paths.


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
  return jnp.cumsum(x, axis=axis) - x


def _inverse_permutation(perm: jax.Array) -> jax.Array:
  return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def _sort_by_expert(expert_flat: jax.Array, num_experts: int, capacity: Optional[int]):
  """Order assignments by expert, capacity-dropped ones (and padding, id == E) last.

  expert_flat [A] -> (order [A] int32, sorted_experts [A] with E for unsent, counts [E] int32 sent
  per expert, keep [A] bool in input order, dropped scalar int32).
  """
  size = expert_flat.shape[0]
  routed = expert_flat < num_experts
  if capacity is None:
    keep = routed
  else:
    first = jnp.argsort(expert_flat, stable=True)
    first_sorted = expert_flat[first]
    starts = _exclusive_cumsum(jnp.bincount(expert_flat, length=num_experts + 1))
    rank = jnp.arange(size) - starts[first_sorted]  # position within its expert, in token order
    keep = (rank < capacity)[_inverse_permutation(first)] & routed
    expert_flat = jnp.where(keep, expert_flat, num_experts)
  order = jnp.argsort(expert_flat, stable=True).astype(jnp.int32)
  counts = jnp.bincount(expert_flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
  dropped = (jnp.sum(routed) - jnp.sum(keep)).astype(jnp.int32)
  return order, expert_flat[order], counts, keep, dropped


def _grouped_swiglu(x_sorted: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                    w_down: jax.Array) -> jax.Array:
  """Rows [R, D] sorted by expert, groups [G] -> [R, D]; rows past sum(group_sizes) are not used."""
  gate = jax.lax.ragged_dot(x_sorted, w_gate, group_sizes)  # [R, H]
  up = jax.lax.ragged_dot(x_sorted, w_up, group_sizes)
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)  # [R, D]


def _combine(y_sorted: jax.Array, order: jax.Array, keep: jax.Array, weights: jax.Array) -> jax.Array:
  """Expert outputs in sorted order [A, D] -> weighted sum per token [N, D] (dropped rows add 0)."""
  tokens, top_k = weights.shape
  y_flat = y_sorted[_inverse_permutation(order)]  # [N*k, D]
  # where, not a multiply: rows nobody computed may hold garbage (even NaN) on some backends.
  y_flat = jnp.where(keep[:, None], y_flat, 0).reshape(tokens, top_k, -1)  # [N, k, D]
  out = jnp.einsum("nkd,nk->nd", y_flat, weights.astype(y_flat.dtype),
                   preferred_element_type=jnp.promote_types(y_flat.dtype, jnp.float32))
  return out.astype(y_sorted.dtype)


def _routed_local(x, expert_ids, weights, num_experts, capacity, expert_fn):
  """All experts on this device: sort, one grouped matmul, unsort. No collectives."""
  top_k = expert_ids.shape[1]
  order, _, counts, keep, dropped = _sort_by_expert(expert_ids.reshape(-1), num_experts, capacity)
  y_sorted = expert_fn(x[order // top_k], counts)  # [N*k, D]
  return _combine(y_sorted, order, keep, weights), dropped


# ----------------------------------------------------------------------------------------------
# Expert parallelism: per-shard body (names ending in `_` are per-shard values).


def _exchange_fixed(x_sorted_, sorted_experts_, counts_, counts_all, me, *, pair_rows, experts_local,
                    expert_axes, expert_fn):
  """Dispatch/combine with fixed-size chunks per device pair (`all_to_all`, runs everywhere).

  x_sorted_ [A, D] by global expert -> expert outputs for the same rows [A, D].
  """
  shards = counts_all.shape[0]
  rows_, dim = x_sorted_.shape
  dest_sizes_ = counts_.reshape(shards, experts_local).sum(axis=1)  # [S]
  dest_starts_ = _exclusive_cumsum(dest_sizes_)
  slot = jnp.arange(pair_rows)
  src_rows = jnp.minimum(dest_starts_[:, None] + slot[None, :], rows_ - 1)  # [S, pair]
  send_ = jnp.where((slot[None, :] < dest_sizes_[:, None])[..., None], x_sorted_[src_rows], 0)
  recv_ = jax.lax.all_to_all(send_, expert_axes, 0, 0, tiled=True)  # [S(sender), pair, D]

  # Sender s packed my experts' rows compactly in expert order: recover each row's local expert.
  my_counts = jax.lax.dynamic_slice_in_dim(counts_all, me * experts_local, experts_local, axis=1)
  bounds = jnp.cumsum(my_counts, axis=1)  # [S, E_local]
  row_expert = jax.vmap(lambda b: jnp.searchsorted(b, slot, side="right"))(bounds)  # [S, pair]
  perm = jnp.argsort(row_expert.reshape(-1), stable=True)  # expert-major, padding last
  y_recv_ = expert_fn(recv_.reshape(shards * pair_rows, dim)[perm], my_counts.sum(axis=0))
  y_recv_ = y_recv_[_inverse_permutation(perm)].reshape(shards, pair_rows, dim)
  back_ = jax.lax.all_to_all(y_recv_, expert_axes, 0, 0, tiled=True)  # [S(owner), pair, D]

  dest = jnp.minimum(sorted_experts_ // experts_local, shards - 1)  # [A]
  pos = jnp.clip(jnp.arange(rows_) - dest_starts_[dest], 0, pair_rows - 1)
  return jnp.where((sorted_experts_ < shards * experts_local)[:, None], back_[dest, pos], 0)


def _varying_zeros(shape, dtype, axes: Tuple[str, ...]) -> jax.Array:
  """A zero buffer typed as varying over `axes` (the token shards' axes).

  ragged_all_to_all types its result like its `output` argument; a plain jnp.zeros is typed
  invariant, and autodiff would then transpose the implicit broadcast of that "invariant" result
  into a psum, summing gradients across devices.
  """
  return jax.lax.pcast(jnp.zeros(shape, dtype), axes, to="varying")


def _exchange_ragged(x_sorted_, counts_, counts_all, me, *, pair_rows, experts_local, expert_axes,
                     batch_axes, expert_fn, ragged_all_to_all):
  """Dispatch/combine with `ragged_all_to_all`: only the routed rows travel.

  One slice per (device, expert): the owner receives them straight into expert-major,
  sender-minor order, so its rows are already grouped for `ragged_dot` with no re-sort.
  """
  shards, num_experts = counts_all.shape
  rows_, dim = x_sorted_.shape
  my_block = lambda a: jax.lax.dynamic_slice_in_dim(a, me * experts_local, experts_local, axis=1)
  before_me = _exclusive_cumsum(counts_all, axis=0)  # [S, E]: rows from earlier senders
  group_sizes_all = counts_all.sum(axis=0).reshape(shards, experts_local)
  group_starts_all = _exclusive_cumsum(group_sizes_all, axis=1).reshape(num_experts)  # [E]
  my_counts = my_block(counts_all)  # [S(sender), E_local]
  group_sizes_ = my_counts.sum(axis=0)

  recv_ = ragged_all_to_all(
      x_sorted_, _varying_zeros((shards * pair_rows, dim), x_sorted_.dtype, batch_axes),
      _exclusive_cumsum(counts_), counts_, group_starts_all + before_me[me], my_counts.reshape(-1),
      axis_name=expert_axes)
  y_recv_ = expert_fn(recv_, group_sizes_)
  back_in = _exclusive_cumsum(group_sizes_)[None, :] + my_block(before_me)  # [S(dest), E_local]
  back_out = my_block(_exclusive_cumsum(counts_all, axis=1))  # where dest keeps my experts' rows
  return ragged_all_to_all(
      y_recv_, _varying_zeros((rows_, dim), y_recv_.dtype, batch_axes), back_in.reshape(-1),
      my_counts.reshape(-1), back_out.reshape(-1), counts_, axis_name=expert_axes)


def _routed_ep_body(x_, expert_ids_, weights_, w_gate_, w_up_, w_down_, *, expert_axes, mlp_axes,
                    batch_axes, shards, capacity_factor, mode, ragged_all_to_all):
  tokens_, top_k = expert_ids_.shape
  experts_local = w_gate_.shape[0]
  num_experts = experts_local * shards
  capacity = group_capacity(tokens_, top_k, num_experts, capacity_factor)

  def expert_fn(rows, group_sizes):
    y = _grouped_swiglu(rows, group_sizes, w_gate_, w_up_, w_down_)
    return jax.lax.psum(y, mlp_axes) if mlp_axes else y  # hidden dim split over tensor shards

  if shards == 1:  # every expert here: sort this shard's tokens only, nothing to exchange
    y_, dropped_ = _routed_local(x_, expert_ids_, weights_, num_experts, capacity, expert_fn)
    return y_, jax.lax.psum(dropped_, batch_axes) if batch_axes else dropped_

  pair_rows = tokens_ * min(top_k, experts_local)
  if capacity is not None:
    pair_rows = min(pair_rows, experts_local * capacity)
  me = jax.lax.axis_index(expert_axes)
  order_, sorted_experts_, counts_, keep_, dropped_ = _sort_by_expert(
      expert_ids_.reshape(-1), num_experts, capacity)
  x_sorted_ = x_[order_ // top_k]  # [N_*k, D] by global expert
  counts_all = jax.lax.all_gather(counts_, expert_axes)  # [S, E]: every sender's per-expert rows

  common = dict(pair_rows=pair_rows, experts_local=experts_local, expert_axes=expert_axes,
                expert_fn=expert_fn)
  fixed = lambda x, e, c, ca, i: _exchange_fixed(x, e, c, ca, i, **common)  # noqa: E731
  ragged = lambda x, e, c, ca, i: _exchange_ragged(  # noqa: E731
      x, c, ca, i, batch_axes=batch_axes, ragged_all_to_all=ragged_all_to_all or jax.lax.ragged_all_to_all,
      **common)
  args = (x_sorted_, sorted_experts_, counts_, counts_all, me)
  if mode == "per_platform":  # see resolve_dispatch
    y_sorted_ = jax.lax.platform_dependent(*args, cpu=fixed, default=ragged)
  else:
    y_sorted_ = (ragged if mode == "ragged" else fixed)(*args)
  y_ = _combine(y_sorted_, order_, keep_, weights_)
  return y_, jax.lax.psum(dropped_, batch_axes)


def resolve_dispatch(dispatch: str) -> str:
  """The exchange for `dispatch`: "ragged", "capacity" or, for "auto" on a CPU host, "per_platform".

  "auto" means the ragged all-to-all on TPU/GPU and the fixed-capacity all_to_all on CPU (XLA:CPU
  has no ragged all-to-all), for the platform the program is *lowered* for. On an accelerator host
  that is "ragged". A CPU host may lower for CPU (tests, CPU runs) or for TPU/GPU (`jax.export`,
  AOT lowering, memory plans), which tracing cannot tell apart, so there "auto" traces both
  exchanges under `jax.lax.platform_dependent` and only the lowering platform's is lowered
  (a multi-platform export keeps both). Not on accelerator hosts too: under autodiff, JAX's
  partial evaluation moves the platform index out of the scanned layers, and XLA then keeps a
  one-branch conditional around the exchange's collectives (seen in CPU-compiled train steps),
  which a step on the accelerator should not pay for.
  """
  if dispatch == "auto":
    return "per_platform" if jax.default_backend() == "cpu" else "ragged"
  if dispatch not in ("ragged", "capacity"):
    raise ValueError(f"dispatch={dispatch!r}: expected 'auto', 'ragged' or 'capacity'")
  return dispatch


def routed_experts(x: jax.Array, expert_ids: jax.Array, weights: jax.Array, w_gate: jax.Array,
                   w_up: jax.Array, w_down: jax.Array, *, capacity_factor: Optional[float] = None,
                   dispatch: str = "auto",
                   ragged_all_to_all: Optional[RaggedAllToAll] = None) -> Tuple[jax.Array, jax.Array]:
  """Routed SwiGLU experts: x [N, D], expert_ids [N, k], weights [N, k] -> (y [N, D], dropped).

  w_gate/w_up [E, D, H], w_down [E, H, D]. `dropped` counts (token, expert) assignments cut by
  capacity. Uses the mesh from context (`jax.set_mesh`): with no mesh (or one device) a plain
  grouped matmul; otherwise a shard_map over the token shards, exchanging tokens over the rules'
  "expert" axes when their size is > 1. A mesh whose expert axis has size 1 still goes through
  shard_map (each shard sorts its own tokens): left to GSPMD, the sort would gather all tokens.
  Ids equal to E mean "no expert" (padding). `ragged_all_to_all` replaces
  `jax.lax.ragged_all_to_all` on the ragged path (tests pass an all-gather emulation to check its
  bookkeeping on CPU).
  """
  tokens, dim = x.shape
  num_experts = w_gate.shape[0]
  if expert_ids.shape != weights.shape or expert_ids.shape[0] != tokens:
    raise ValueError(f"expert_ids {expert_ids.shape} and weights {weights.shape}: "
                     f"expected both ({tokens}, top_k)")
  if (w_gate.shape[1] != dim or w_up.shape != w_gate.shape
      or w_down.shape != (num_experts, w_gate.shape[2], dim)):
    raise ValueError(f"expert weights {w_gate.shape}, {w_up.shape}, {w_down.shape}: expected "
                     f"[E, {dim}, H], [E, {dim}, H], [E, H, {dim}]")
  mode = resolve_dispatch(dispatch)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    capacity = group_capacity(tokens, expert_ids.shape[1], num_experts, capacity_factor)
    expert_fn = lambda rows, group_sizes: _grouped_swiglu(rows, group_sizes, w_gate, w_up, w_down)
    return _routed_local(x, expert_ids, weights, num_experts, capacity, expert_fn)

  expert_axes = rule_axes("expert", mesh)
  shards = math.prod(mesh.shape[a] for a in expert_axes)

  if num_experts % shards:
    raise ValueError(f"num_experts={num_experts}: expected a multiple of the expert-parallel size "
                     f"{shards} (mesh axes {expert_axes})")
  mlp_axes = rule_axes("expert_mlp", mesh)
  mlp_shards = math.prod(mesh.shape[a] for a in mlp_axes)
  if w_gate.shape[2] % mlp_shards:
    raise ValueError(f"expert_hidden={w_gate.shape[2]}: expected a multiple of {mlp_shards} "
                     f"(mesh axes {mlp_axes} of the 'expert_mlp' rule)")
  batch_axes = rule_axes("batch", mesh)
  if set(batch_axes) & set(mlp_axes):
    raise ValueError(f"'batch' axes {batch_axes} and 'expert_mlp' axes {mlp_axes} overlap: "
                     "tokens must be replicated over the shards of an expert's hidden dim")
  if mode == "ragged" and shards > 1 and ragged_all_to_all is None and jax.default_backend() == "cpu":
    raise ValueError("dispatch='ragged' needs jax.lax.ragged_all_to_all, which XLA:CPU lacks: "
                     "use 'capacity' or 'auto' on CPU")

  # Every batch shard must hold the same token count: pad with "no expert" rows.
  groups = math.prod(mesh.shape[a] for a in batch_axes)
  padded = -tokens % groups
  if padded:
    x = jnp.pad(x, ((0, padded), (0, 0)))
    expert_ids = jnp.pad(expert_ids, ((0, padded), (0, 0)), constant_values=num_experts)
    weights = jnp.pad(weights, ((0, padded), (0, 0)))

  rows = PartitionSpec(spec_entry(batch_axes), None)
  expert_entry, mlp_entry = spec_entry(expert_axes), spec_entry(mlp_axes)
  # Embed dims enter whole: the fsdp all-gather of the weights happens before the body, as in FSDP.
  w_in = PartitionSpec(expert_entry, None, mlp_entry)
  w_out = PartitionSpec(expert_entry, mlp_entry, None)
  body = jax.shard_map(
      lambda *args: _routed_ep_body(
          *args, expert_axes=spec_entry(expert_axes), mlp_axes=spec_entry(mlp_axes),
          batch_axes=batch_axes, shards=shards, capacity_factor=capacity_factor, mode=mode,
          ragged_all_to_all=ragged_all_to_all),
      mesh=mesh, in_specs=(rows, rows, rows, w_in, w_in, w_out), out_specs=(rows, PartitionSpec()))
  y, dropped = body(x, expert_ids, weights, w_gate, w_up, w_down)
  return y[:tokens], dropped


# ----------------------------------------------------------------------------------------------
# The module.


class MoE(nn.Module):
  """Shared SwiGLU (always on) plus routed experts; returns (y, stats).

  stats (arrays only, so nn.scan can stack them): "load" [E] assignments per expert before
  capacity drops (what `update_balance_bias` wants), "max_load", "mean_load", "dropped"
  (assignments cut by capacity) and "aux_loss" (seq_aux_loss_coef * sequence balance loss, 0 when
  disabled; add it to the training loss as is).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    cfg, moe = self.cfg, self.cfg.moe
    if moe is None:
      raise ValueError("ModelConfig.moe=None: MoE needs a MoEConfig")
    if x.ndim != 3 or x.shape[-1] != cfg.d_model:
      raise ValueError(f"MoE input shape {x.shape}: expected [batch, seq, d_model={cfg.d_model}]")
    batch, seq, dim = x.shape
    num_experts, hidden = moe.num_experts, moe.expert_hidden
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    init = nn.initializers.normal(cfg.init_std)
    param = lambda name, shape, names: self.param(
        name, nn.with_logical_partitioning(init, names), shape, param_dtype)

    router_kernel = param("router", (dim, num_experts), ("embed", None))
    bias = self.variable(BALANCE_COLLECTION, "balance_bias",
                         nn.with_logical_partitioning(jnp.zeros, (None,)), (num_experts,), jnp.float32)
    w_gate = param("w_gate", (num_experts, dim, hidden), ("expert", "expert_embed", "expert_mlp"))
    w_up = param("w_up", (num_experts, dim, hidden), ("expert", "expert_embed", "expert_mlp"))
    w_down = param("w_down", (num_experts, hidden, dim), ("expert", "expert_mlp", "expert_embed"))

    x = nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))
    scores, expert_ids, weights = route(x, router_kernel, bias.value, moe.top_k, moe.route_scale)
    xc = x.astype(dtype)
    routed, dropped = routed_experts(
        xc.reshape(batch * seq, dim), expert_ids.reshape(batch * seq, moe.top_k),
        weights.reshape(batch * seq, moe.top_k), w_gate.astype(dtype), w_up.astype(dtype),
        w_down.astype(dtype), capacity_factor=moe.capacity_factor, dispatch=moe.dispatch)
    y = routed.reshape(batch, seq, dim)  # [B, T, D]

    if moe.num_shared_experts:
      shared_hidden = moe.num_shared_experts * hidden
      s_gate = param("shared_gate", (dim, shared_hidden), ("embed", "mlp"))
      s_up = param("shared_up", (dim, shared_hidden), ("embed", "mlp"))
      s_down = param("shared_down", (shared_hidden, dim), ("mlp", "embed"))
      gate = jnp.einsum("btd,dh->bth", xc, s_gate.astype(dtype))
      up = jnp.einsum("btd,dh->bth", xc, s_up.astype(dtype))
      h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
      y = y + jnp.einsum("bth,hd->btd", h, s_down.astype(dtype))
    y = nn.with_logical_constraint(y.astype(dtype), ("batch", "seq", "act_embed"))

    load = expert_load(expert_ids, num_experts)
    if moe.seq_aux_loss_coef > 0:
      aux_loss = moe.seq_aux_loss_coef * seq_balance_loss(scores, expert_ids)
    else:
      aux_loss = jnp.zeros((), jnp.float32)
    stats = {
        "load": load,
        "max_load": jnp.max(load),
        "mean_load": jnp.mean(load),
        "dropped": dropped.astype(jnp.float32),
        "aux_loss": aux_loss,
    }
    return y, stats
