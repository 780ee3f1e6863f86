"""The Engram module: gated N-gram memory plus a short causal conv, over M hyper-connection branches.

For hidden states h [B,T,M,D] and the H head rows [B,T,H,d] read for this layer's hash ids
(memory.gather; the module never touches the table, so where the rows come from, device or host,
and whether the table or the rows are differentiated is the caller's choice):
  e       = concat of the H head rows                                    [B,T,d_mem]
  k_m     = W_K^m e + b_K^m,  v = W_V e + b_V                            (M key projections, one value)
  alpha_m = sigmoid(signed_sqrt(<RMSNorm(k_m), RMSNorm(h_m)> / sqrt(D)))  [B,T,M]
  u_m     = alpha_m * v
  Y       = u + SiLU(DepthwiseCausalConv(concat_m RMSNorm_m(u_m)))       (kernel K, dilation max_n)
The caller adds the residual (H <- H + Y). Parameters are kept in float32; the matmuls and the conv
run in the compute dtype, the norms and the gate's reduction in float32 (bf16 would round the gate's
dot product over D terms).

Decoding (`cache_mode`): everything but the conv is per token. The conv's state is its last
(K-1) x dilation inputs per branch (the normalised u, [B, W, M, D] with W = (K-1) * max_n), kept in
the "cache" collection: prefill (right-padded prompts, segment id 0 marks padding) leaves each row's
window ending at its own last real token; a decode step (one token per row) convolves the new input
with the window and slides it by one. Positions before a sequence's start are zeros, as in training.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax.config import EngramConfig
from engram_jax.layers import CACHE_MODES, cache_variable


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x * rsqrt(mean(x^2) + eps) * scale over the last axis, in float32 (or float64 if given)."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(dtype)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * scale.astype(dtype)


def signed_sqrt(s: jax.Array, floor: float = 1e-6) -> jax.Array:
  return jnp.sign(s) * jnp.sqrt(jnp.maximum(jnp.abs(s), floor))


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array, dilation: int, history: Optional[jax.Array] = None) -> jax.Array:
  """y[t] = sum_j kernel[j] * x[t - (K-1-j)*dilation] (zeros before the start); x [B,T,C], kernel [K,C].

  `history` [B, (K-1)*dilation, C]: the inputs just before x[:, 0] (a decoding conv state); None means
  x starts the sequence (zeros before it).

  Written as K shifted multiply-adds rather than `lax.conv_general_dilated`: K is 4, the channel
  count is M*D, and the shifted form is exact, layout-free and cheap on every backend.
  """
  if history is not None:
    width = history.shape[1]
    return causal_depthwise_conv(jnp.concatenate([history.astype(x.dtype), x], axis=1), kernel, dilation)[:, width:]
  K = kernel.shape[0]
  T = x.shape[1]
  y = jnp.zeros_like(x)
  for j in range(K):
    shift = (K - 1 - j) * dilation
    if shift >= T:
      continue
    shifted = jnp.pad(x, ((0, 0), (shift, 0), (0, 0)))[:, :T] if shift else x
    y = y + shifted * kernel[j]
  return y


def conv_window(history: jax.Array, x: jax.Array, new: jax.Array) -> jax.Array:
  """The next conv state: the last W inputs of each row after appending its first `new[b]` inputs of x.

  history [B,W,C] (inputs before x), x [B,T,C], new [B] int (real inputs at the start of each row of
  x: a prompt's length, or 1 for a decode step) -> [B,W,C].
  """
  width = history.shape[1]
  seq = jnp.concatenate([history, x.astype(history.dtype)], axis=1)  # [B, W+T, C]; x[t] at W + t
  index = new[:, None] + jnp.arange(width)[None, :]  # [B, W]: inputs new-W .. new-1 of x
  return jnp.take_along_axis(seq, index[:, :, None], axis=1)


class Engram(nn.Module):
  """One Engram layer for M branches of width D (see the module docstring for the equations)."""

  cfg: EngramConfig
  d_model: int
  num_branches: int = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  cache_mode: Optional[str] = None  # None (training, scoring), "prefill" or "decode": see the module docstring

  @nn.compact
  def __call__(self, hidden: jax.Array, rows: jax.Array, return_gates: bool = False,
               segment_ids: Optional[jax.Array] = None):
    """hidden [B,T,M,D], rows [B,T,H,d] -> Y [B,T,M,D] (and the gates [B,T,M]). `segment_ids` [B,T]
    tell prefill where each right-padded prompt ends (its nonzero ids come first)."""
    cfg, D, M = self.cfg, self.d_model, self.num_branches
    if self.cache_mode not in CACHE_MODES:
      raise ValueError(f"Engram.cache_mode={self.cache_mode!r}: expected one of {CACHE_MODES}")
    if self.cache_mode == "prefill" and segment_ids is None:
      raise ValueError("Engram: cache_mode='prefill' needs segment_ids [B, T] (0 marks each prompt's right padding)")
    if self.cache_mode == "decode" and hidden.shape[1] != 1:
      raise ValueError(f"Engram: decoding takes one token per row, got hidden states of shape {hidden.shape}: "
                       f"expected [B, 1, {M}, {D}]")
    if hidden.ndim != 4 or hidden.shape[2:] != (M, D):
      raise ValueError(f"hidden states have shape {hidden.shape}; expected [B, T, {M}, {D}] (branches, width)")
    if rows.shape != hidden.shape[:2] + (cfg.num_heads, cfg.head_dim):
      raise ValueError(f"rows have shape {rows.shape}; expected [B, T, heads, head_dim] = "
                       f"{hidden.shape[:2] + (cfg.num_heads, cfg.head_dim)}")
    dtype = jnp.dtype(self.dtype)
    d_mem = cfg.d_mem
    param = lambda name, init, shape, axes: self.param(  # noqa: E731
        name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)
    fan_in = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1)
    ones, zeros = nn.initializers.ones, nn.initializers.zeros

    e = rows.reshape(rows.shape[:2] + (cfg.d_mem,)).astype(dtype)  # [B,T,d_mem]

    w_key = param("key_proj", fan_in, (M, d_mem, D), ("branch", "mem", "embed"))
    b_key = param("key_bias", zeros, (M, D), ("branch", "embed"))
    w_value = param("value_proj", fan_in, (d_mem, D), ("mem", "embed"))
    b_value = param("value_bias", zeros, (D,), ("embed",))
    key_norm = param("key_norm", ones, (M, D), ("branch", "embed"))
    query_norm = param("query_norm", ones, (M, D), ("branch", "embed"))
    conv_norm = param("conv_norm", ones, (M, D), ("branch", "embed"))
    conv_init = zeros if cfg.conv_zero_init else nn.initializers.normal(1.0 / math.sqrt(cfg.kernel_size))
    conv_kernel = param("conv_kernel", conv_init, (cfg.kernel_size, M, D), ("conv_kernel", "branch", "embed"))

    key = jnp.einsum("btk,mkd->btmd", e, w_key.astype(dtype)) + b_key.astype(dtype)  # [B,T,M,D]
    value = jnp.einsum("btk,kd->btd", e, w_value.astype(dtype)) + b_value.astype(dtype)  # [B,T,D]

    gate_eps = cfg.gate_norm_eps if cfg.gate_norm_eps is not None else float(jnp.finfo(dtype).eps)
    nk = rms_norm(key, key_norm, gate_eps)
    nq = rms_norm(hidden, query_norm, gate_eps)
    score = jnp.sum(nk * nq, axis=-1) / math.sqrt(D)  # [B,T,M]
    gates = jax.nn.sigmoid(signed_sqrt(score))  # [B,T,M]
    if cfg.gate == "open":  # ablation: the memory's value passes whatever the context
      gates = jnp.ones_like(gates)
    self.sow("intermediates", "gates", gates)

    u = gates.astype(dtype)[..., None] * value[:, :, None, :]  # [B,T,M,D]
    u_normed = rms_norm(u, conv_norm, cfg.conv_norm_eps).astype(dtype)
    B, T = u.shape[:2]
    conv_in = u_normed.reshape(B, T, M * D)
    history = None
    if self.cache_mode is not None:
      width = (cfg.kernel_size - 1) * cfg.max_ngram_size
      names = ("batch", "cache_seq", "act_branch", "act_embed")
      state = cache_variable(self, "conv_state", (B, width, M, D), dtype, names)
      history = state.value.reshape(B, width, M * D)
      new = jnp.ones((B,), jnp.int32) if self.cache_mode == "decode" else jnp.sum(segment_ids != 0, axis=1)
      state.value = nn.with_logical_constraint(conv_window(history, conv_in, new).reshape(B, width, M, D), names)
    conv = causal_depthwise_conv(conv_in, conv_kernel.reshape(cfg.kernel_size, M * D).astype(dtype),
                                 dilation=cfg.max_ngram_size, history=history)
    y = u + jax.nn.silu(conv).reshape(B, T, M, D)
    y = nn.with_logical_constraint(y, ("batch", "seq", "act_branch", "act_embed"))
    return (y, gates) if return_gates else y
