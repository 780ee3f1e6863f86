"""Qwen4Exp (released as Qwen3.8-Flash-Next): the text decoder, top to bottom.

tokens -> embedding -> hc_count copies (streams [B,T,M,D]) -> layers -> hyper_connection_mixer ->
lm_head (no final norm: the mixer's per-stream norm stands in for it). Each layer:
  [PLE layers: streams += PLE(streams, rows)]                    (every stream, before anything else)
  x, inject = GatedResidual_attn(streams); y = GatedDeltaNet(x) or IndexedAttention(x)
  streams += inject * y                                          (per-stream weights, identity residual)
  x, inject = GatedResidual_mlp(streams); streams += inject * MoE(x)
There are no per-layer input norms: the hyper-connection normalises each stream itself.

Conventions: norms of the `Qwen4ExpTextRMSNorm` kind keep their zero-centred weight `w` and scale by
`1 + w` (so imported weights are stored as they are and weight decay pulls towards the identity);
the GatedDeltaNet output norm scales by its weight directly, as the reference does. Statistics,
softmaxes, the router, the delta-rule recurrence and the gates run in float32 whatever `dtype` is.

The PLE layer consumes rows: `rows` {memory.table_name(layer): [B,T,heads,head_dim]} come from
`memory.gather` over tables created and placed by memory.py (the table of the released model is
51B parameters; it lives wherever the row source puts it). The ids that address them are the
`hashing.ple_recipe` hash of the raw tokens, with padding replaced by EOS (`ple_token_ids`).

Padding (`attention_mask` [B,T], 1 = real token, any side): padded positions are zeroed at the input
of every GatedDeltaNet and at the PLE's gated value, are never attended to, and read EOS for hashing,
so the real positions' outputs do not depend on the padding, as in the reference. Decoding
(`prefill`, `decode_step`, at the end) takes right-padded prompts, the house convention: each
row's caches are cut at its own length and its next token goes to the slot at its position.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import memory
from engram_jax.config import EngramConfig
from engram_jax.engram import causal_depthwise_conv, conv_window, signed_sqrt
from engram_jax.hashing import EngramHashing, HashRecipe, ple_recipe
from engram_jax.layers import CACHE_MODES, apply_rope, cache_variable, write_decode, write_prefill
from engram_jax.moe import routed_experts

LAYER_TYPES = ("linear_attention", "indexed_attention")


# ----------------------------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class Qwen4ExpConfig:
  """The text model's hyper-parameters, named as in the Hugging Face `text_config` where one exists."""

  # Token vocabulary (embedding rows, logits); the PLE multipliers' bound uses it too.
  vocab_size: int = 248320
  # Width D of one residual stream.
  hidden_size: int = 2560
  # Decoder layers.
  num_hidden_layers: int = 48
  # Per layer: "linear_attention" (GatedDeltaNet) or "indexed_attention" (GQA with the QSA indexer).
  layer_types: Tuple[str, ...] = ("linear_attention",) * 3 + ("indexed_attention",)
  # Indexed attention: query heads, key/value heads (GQA) and head width.
  num_attention_heads: int = 16
  num_key_value_heads: int = 2
  head_dim: int = 256
  # RoPE base and the share of head_dim it rotates (the leading dims; the rest carry no position).
  rope_theta: float = 10_000_000.0
  partial_rotary_factor: float = 0.25
  # Epsilon of every RMSNorm.
  rms_norm_eps: float = 1e-6
  # GatedDeltaNet: causal conv width, key/value head widths and counts (each key head serves
  # num_value_heads / num_key_heads consecutive value heads).
  linear_conv_kernel_dim: int = 4
  linear_key_head_dim: int = 128
  linear_value_head_dim: int = 128
  linear_num_key_heads: int = 16
  linear_num_value_heads: int = 32
  # Activation of the GatedDeltaNet output gate: "silu" or "sigmoid".
  output_gate_type: str = "silu"
  # MoE: routed experts, experts per token, their hidden width, the shared expert's hidden width,
  # and whether the top-k probabilities are renormalised to sum to 1.
  num_experts: int = 512
  num_experts_per_tok: int = 10
  moe_intermediate_size: int = 512
  shared_expert_intermediate_size: int = 512
  norm_topk_prob: bool = True
  # Hyper-connections: residual streams M and the rank of the per-channel input mixer.
  hc_count: int = 4
  hc_lowrank: int = 320
  # PLE: one-based decoder layers carrying it, total row width (all heads), conv kernel (its
  # dilation is ngram_size), largest n-gram, hash heads per order, the prime search's start, the
  # table padding multiple, the multipliers' seed, and the checkpoint's table shard count.
  ple_layer_ids: Tuple[int, ...] = (2,)
  ple_embed_dim: int = 2560
  ple_conv_kernel_size: int = 4
  ngram_size: int = 3
  heads_per_ngram: int = 8
  ngram_vocab_size_base: int = 20_000_000
  make_ngram_vocab_size_divisible_by: int = 128
  seed: int = 1234
  split_ngram_parts: int = 128
  # End-of-sequence id: fills the n-gram history and restarts n-grams after it.
  eos_token_id: int = 248044
  # QSA indexer: query heads (one key head), head width, tokens kept from complete blocks per query,
  # and tokens per block.
  indexer_n_heads: int = 16
  indexer_head_dim: int = 128
  indexer_budget: int = 2048
  indexer_compress_ratio: int = 64
  # Stack the repeats of the layer pattern (e.g. 3 GatedDeltaNet + 1 indexed) into one nn.scan, so
  # compile time does not grow with depth; periods holding a PLE layer stay unrolled (`layer_segments`).
  scan_layers: bool = False
  # Chunk length of the delta rule's chunked form, used for sequences longer than one chunk (None:
  # always the plain recurrence, one step per token).
  delta_rule_chunk: Optional[int] = 64
  # Whether lm_head reuses the embedding (the release does not).
  tie_word_embeddings: bool = False
  # Standard deviation of the normal initialisation of projections (the reference's initializer_range).
  initializer_range: float = 0.02
  # Compute and parameter dtypes.
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "layer_types", tuple(self.layer_types))
    object.__setattr__(self, "ple_layer_ids", tuple(sorted(set(self.ple_layer_ids))))
    def fail(field, expected):
      raise ValueError(f"Qwen4ExpConfig.{field}={getattr(self, field)!r}: expected {expected}")
    if len(self.layer_types) != self.num_hidden_layers:
      fail("layer_types", f"{self.num_hidden_layers} entries (num_hidden_layers), one per layer")
    bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
    if bad:
      fail("layer_types", f"only {LAYER_TYPES}; {bad} are not Qwen4Exp layers")
    if self.delta_rule_chunk is not None and (not isinstance(self.delta_rule_chunk, int) or self.delta_rule_chunk < 1):
      fail("delta_rule_chunk", "None (the recurrence) or a positive chunk length")
    if self.output_gate_type not in ("silu", "sigmoid"):
      fail("output_gate_type", "'silu' or 'sigmoid'")
    if self.hc_count < 2:
      fail("hc_count", "an integer > 1 (the mixer needs several streams)")
    if not 0 < self.num_experts_per_tok <= self.num_experts:
      fail("num_experts_per_tok", f"an integer in [1, num_experts={self.num_experts}]")
    if self.linear_num_value_heads % self.linear_num_key_heads:
      fail("linear_num_value_heads", f"a multiple of linear_num_key_heads={self.linear_num_key_heads}")
    if self.num_attention_heads % self.num_key_value_heads:
      fail("num_attention_heads", f"a multiple of num_key_value_heads={self.num_key_value_heads}")
    if self.indexer_budget % self.indexer_compress_ratio:
      fail("indexer_budget", f"a multiple of indexer_compress_ratio={self.indexer_compress_ratio}")
    if self.rotary_dim % 2 or self.rotary_dim > self.indexer_head_dim:
      fail("partial_rotary_factor", f"a rotary width head_dim*factor={self.rotary_dim} that is even and fits "
                                    f"indexer_head_dim={self.indexer_head_dim}")
    for layer in self.ple_layer_ids:
      if not 1 <= layer <= self.num_hidden_layers:
        fail("ple_layer_ids", f"one-based layer ids in [1, {self.num_hidden_layers}]")
      if self.layer_types[layer - 1] != "linear_attention":
        fail("ple_layer_ids", f"linear_attention layers only (layer {layer} is {self.layer_types[layer - 1]})")
    if self.ple_layer_ids and self.ple_embed_dim % self.num_ple_heads:
      fail("ple_embed_dim", f"a multiple of the {self.num_ple_heads} n-gram heads")
    if self.ple_layer_ids and not 0 <= self.eos_token_id < self.vocab_size:
      fail("eos_token_id", f"a token id in [0, {self.vocab_size}) (PLE pads and resets with it)")

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def num_ple_heads(self) -> int:
    return (self.ngram_size - 1) * self.heads_per_ngram

  @property
  def ple_layers(self) -> Tuple[int, ...]:
    """Zero-based decoder layers with a PLE (the Engram layer ids of the table machinery)."""
    return tuple(l - 1 for l in self.ple_layer_ids)

  def engram_config(self) -> Optional[EngramConfig]:
    """The PLE tables in the shared table machinery's terms (memory.py, patches, row sources)."""
    if not self.ple_layer_ids:
      return None
    return EngramConfig(vocab_size_per_ngram=(self.ngram_vocab_size_base,) * (self.ngram_size - 1),
                        max_ngram_size=self.ngram_size, n_embed_per_ngram=self.ple_embed_dim // (self.ngram_size - 1),
                        n_head_per_ngram=self.heads_per_ngram, layer_ids=self.ple_layers, pad_id=self.eos_token_id,
                        seed=self.seed, kernel_size=self.ple_conv_kernel_size, conv_zero_init=True,
                        gate_norm_eps=self.rms_norm_eps, conv_norm_eps=self.rms_norm_eps)

  def hash_recipe(self) -> HashRecipe:
    return ple_recipe(self.engram_config(), self.vocab_size, self.make_ngram_vocab_size_divisible_by)

  def hashing(self) -> EngramHashing:
    return EngramHashing.from_recipe(self.hash_recipe())

  @classmethod
  def from_hf(cls, config: dict, **overrides) -> "Qwen4ExpConfig":
    """From a Hugging Face config.json dict (`Qwen4ExpForCausalLM`'s text config, or
    `Qwen4ExpForConditionalGeneration`'s, whose text part sits under "text_config")."""
    text = config.get("text_config", config)
    if text.get("indexer_kv_heads", 1) != 1:
      raise ValueError(f"indexer_kv_heads={text['indexer_kv_heads']}: Qwen4Exp's QSA indexer has one key head")
    rope = text.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
      raise ValueError(f"rope_parameters.rope_type={rope['rope_type']!r}: only 'default' RoPE is implemented")
    eos = text.get("eos_token_id", config.get("eos_token_id"))
    eos = eos[0] if isinstance(eos, list) else eos
    layer_types = ["indexed_attention" if t == "full_attention" else t for t in text["layer_types"]]
    hidden = text.get("hidden_act", "silu")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in text.items() if k in fields}
    values.update(layer_types=tuple(layer_types), rope_theta=float(rope.get("rope_theta", 10000.0)),
                  partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0)),
                  output_gate_type=text.get("output_gate_type") or hidden,
                  ple_layer_ids=tuple(text.get("ple_layer_ids") or ()),
                  ple_embed_dim=text.get("ple_embed_dim") or text["hidden_size"])
    if eos is not None:
      values["eos_token_id"] = int(eos)
    values.update(overrides)
    return cls(**values)


# ----------------------------------------------------------------------------------------------
# Small pieces.


def _param(module: nn.Module, name: str, shape, axes, init=None):
  init = init or nn.initializers.normal(module.cfg.initializer_range)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(module.cfg.param_dtype))


def rms_norm_offset(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  """x * rsqrt(mean(x^2) + eps) * (1 + w) over the last axis, in float32; `w` is zero-centred."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def rope_inv_freq(cfg: Qwen4ExpConfig) -> np.ndarray:
  """Inverse wavelengths [rotary_dim/2], computed in float32 as the reference does (a float64
  computation rounds a few of them differently, which moves angles at long positions)."""
  d = cfg.rotary_dim
  exponent = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
  return (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponent)).astype(np.float32)


def partial_rope(x: jax.Array, positions: jax.Array, cfg: Qwen4ExpConfig) -> jax.Array:
  """Rotates the leading rotary_dim dims of x [..., T, heads, d] (half-split pairs); the rest pass."""
  d = cfg.rotary_dim
  return jnp.concatenate([apply_rope(x[..., :d], positions, rope_inv_freq(cfg)), x[..., d:]], axis=-1)


# ----------------------------------------------------------------------------------------------
# Hyper-connections.


class GatedResidual(nn.Module):
  """The streams' read and write around one sublayer (or, `combine=False`, the final mixer).

  Read: n_m = RMSNorm_m(h_m) (per stream, 1+w); g = sigmoid(W_up silu(W_down n / M)) per channel;
  x = mean_m(g_m * n_m). Write: inject_m = 2 sigmoid(W_inj n / M), h_m <- h_m + inject_m * y. Unlike
  mHC there is no stream-mixing matrix: the residual is the identity and only the read is learned.
  """

  cfg: Qwen4ExpConfig
  combine: bool = True

  @nn.compact
  def __call__(self, streams: jax.Array):
    cfg = self.cfg
    M, D, r = cfg.hc_count, cfg.hidden_size, cfg.hc_lowrank
    norm = _param(self, "hc_norm", (M, D), ("branch", "embed"), nn.initializers.zeros)
    w_down = _param(self, "mix_down", (M, D, r), ("branch", "embed", "mhc"))
    w_up = _param(self, "mix_up", (r, M, D), ("mhc", "branch", "embed"))
    n = rms_norm_offset(streams, norm, cfg.rms_norm_eps)  # [B,T,M,D]
    low = jax.nn.silu(jnp.einsum("btmd,mdr->btr", n, w_down.astype(n.dtype)) / M)
    gate = jax.nn.sigmoid(jnp.einsum("btr,rmd->btmd", low, w_up.astype(n.dtype)))
    x = jnp.mean(gate * n, axis=2)  # [B,T,D]
    x = nn.with_logical_constraint(x, ("batch", "seq", "act_embed"))
    if not self.combine:
      return x
    w_inj = _param(self, "inject", (M, D, M), ("branch", "embed", "mhc"))
    inject = 2.0 * jax.nn.sigmoid(jnp.einsum("btmd,mdn->btn", n, w_inj.astype(n.dtype)) / M)  # [B,T,M]
    return x, inject

  @staticmethod
  def write(streams: jax.Array, y: jax.Array, inject: jax.Array) -> jax.Array:
    return streams + inject[..., None].astype(y.dtype) * y[:, :, None, :]


# ----------------------------------------------------------------------------------------------
# GatedDeltaNet (the linear_attention layers).


def gated_delta_rule(q, k, v, g, beta, state=None):
  """The gated delta rule as a recurrence over t, in float32: the definition, and the decode step.

  q, k [B,T,H,dk] (already normalised and scaled), v [B,T,H,dv], g (log decay) and beta [B,T,H];
  state [B,H,dk,dv] or None (zeros). Per step: S <- exp(g) S; S <- S + k (beta (v - k^T S))^T;
  o = q^T S. A step with g = 0 and beta = 0 leaves S exactly as it was (how padding is skipped).
  Returns (o [B,T,H,dv], final state).
  """
  B, T, H, dk = k.shape
  dv = v.shape[-1]
  f32 = lambda a: jnp.moveaxis(a.astype(jnp.float32), 1, 0)  # noqa: E731  time-major for the scan
  state = jnp.zeros((B, H, dk, dv), jnp.float32) if state is None else state.astype(jnp.float32)

  def step(s, inputs):
    q_t, k_t, v_t, g_t, b_t = inputs  # [B,H,dk], [B,H,dk], [B,H,dv], [B,H], [B,H]
    s = s * jnp.exp(g_t)[..., None, None]
    read = jnp.einsum("bhkv,bhk->bhv", s, k_t)
    delta = (v_t - read) * b_t[..., None]
    s = s + k_t[..., :, None] * delta[..., None, :]
    return s, jnp.einsum("bhkv,bhk->bhv", s, q_t)

  state, out = jax.lax.scan(step, state, (f32(q), f32(k), f32(v), f32(g), f32(beta)))
  return jnp.moveaxis(out, 0, 1), state


def chunked_gated_delta_rule(q, k, v, g, beta, state=None, chunk_size: int = 64):
  """`gated_delta_rule` for prefill: T/C sequential steps of C-token chunks instead of T steps.

  Within a chunk the C delta-rule updates are one unit-lower-triangular solve (the WY form, as the
  reference computes it): with G the cumulative log decay, D[i,j] = exp(G_i - G_j) for j <= i,
  (I + strict_lower(beta k k^T * D)) U = beta v and W likewise for beta k exp(G); then with the
  state S entering the chunk, V' = U - W S, o = (q exp(G)) S + (q k^T * D) V', and S leaves as
  exp(G_C) S + (k exp(G_C - G))^T V'. Every exponent is <= 0 (masked before exp), so nothing
  overflows; equal to the recurrence up to float32 rounding (checked in the tests). Same arguments
  and results as `gated_delta_rule`; T is padded to a multiple of C with steps that change nothing.
  """
  B, T, H, dk = k.shape
  dv = v.shape[-1]
  C = chunk_size
  pad = -T % C
  n = (T + pad) // C

  def chunks(a):  # [B,T,H,...] -> [n,B,H,C,...] float32, zero-padded (g = beta = 0: no change)
    a = jnp.pad(a.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    a = a.reshape((B, n, C, H) + a.shape[3:])
    return jnp.moveaxis(jnp.moveaxis(a, 1, 0), 3, 2)

  q, k, v, g, beta = chunks(q), chunks(k), chunks(v), chunks(g), chunks(beta)
  G = jnp.cumsum(g, axis=-1)  # [n,B,H,C]
  lower = jnp.tril(jnp.ones((C, C), bool))
  strict = jnp.tril(jnp.ones((C, C), bool), -1)
  decay = jnp.where(lower, jnp.exp(jnp.where(lower, G[..., :, None] - G[..., None, :], 0.0)), 0.0)
  k_beta = k * beta[..., None]
  system = jnp.eye(C) + jnp.where(strict, jnp.einsum("...id,...jd->...ij", k_beta, k) * decay, 0.0)
  rhs = jnp.concatenate([v * beta[..., None], k_beta * jnp.exp(G)[..., None]], axis=-1)  # one solve for both
  solved = jax.scipy.linalg.solve_triangular(system, rhs, lower=True, unit_diagonal=True)
  new_values, k_decayed = solved[..., :dv], solved[..., dv:]  # [n,B,H,C,dv], [n,B,H,C,dk]
  intra = jnp.einsum("...id,...jd->...ij", q, k) * decay  # [n,B,H,C,C]
  q_in = q * jnp.exp(G)[..., None]
  k_out = k * jnp.exp(G[..., -1:] - G)[..., None]
  chunk_decay = jnp.exp(G[..., -1])  # [n,B,H]
  state = jnp.zeros((B, H, dk, dv), jnp.float32) if state is None else state.astype(jnp.float32)

  def step(s, inputs):
    u, w, a, qi, ko, cd = inputs
    corrected = u - jnp.einsum("bhck,bhkv->bhcv", w, s)
    out = jnp.einsum("bhck,bhkv->bhcv", qi, s) + jnp.einsum("bhcj,bhjv->bhcv", a, corrected)
    s = s * cd[..., None, None] + jnp.einsum("bhck,bhcv->bhkv", ko, corrected)
    return s, out

  state, out = jax.lax.scan(step, state, (new_values, k_decayed, intra, q_in, k_out, chunk_decay))
  out = jnp.moveaxis(out, 0, 1)  # [B,n,H,C,dv]
  out = jnp.moveaxis(out, 2, 3).reshape(B, n * C, H, dv)[:, :T]
  return out, state


class GatedDeltaNet(nn.Module):
  """Linear attention with a decaying, delta-rule-updated state per value head.

  q, k, v = SiLU(causal depthwise conv(x W_qkv)); q, k L2-normalised, q scaled by dk^-1/2; each key
  head serves `linear_num_value_heads / linear_num_key_heads` consecutive value heads; beta =
  sigmoid(x W_b), g = -exp(A_log) softplus(x W_a + dt_bias); the state runs through the chunked form
  of the delta rule for sequences longer than a chunk, the recurrence otherwise. Output:
  RMSNorm(o) * weight * act(x W_z), then W_out. The q/k/v projections and their conv are kept apart
  (the reference fuses them into one matrix): the conv is depthwise, so that is the same map, and
  each part shards by its heads.

  Caches (`cache_mode`): each conv's last K-1 inputs and the recurrent state [B,nv,dk,dv] (float32),
  both as of each right-padded prompt's last real token.
  """

  cfg: Qwen4ExpConfig
  cache_mode: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    D, K = cfg.hidden_size, cfg.linear_conv_kernel_dim
    nk, nv, dk, dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                      cfg.linear_value_head_dim)
    conv_init = nn.initializers.normal(1.0 / math.sqrt(K))
    w_q = _param(self, "q_proj", (D, nk, dk), ("embed", "heads", "head_dim"))
    w_k = _param(self, "k_proj", (D, nk, dk), ("embed", "heads", "head_dim"))
    w_v = _param(self, "v_proj", (D, nv, dv), ("embed", "heads", "head_dim"))
    w_z = _param(self, "z_proj", (D, nv, dv), ("embed", "heads", "head_dim"))
    w_b = _param(self, "b_proj", (D, nv), ("embed", "heads"))
    w_a = _param(self, "a_proj", (D, nv), ("embed", "heads"))
    conv_q = _param(self, "conv_q", (K, nk, dk), ("conv_kernel", "heads", "head_dim"), conv_init)
    conv_k = _param(self, "conv_k", (K, nk, dk), ("conv_kernel", "heads", "head_dim"), conv_init)
    conv_v = _param(self, "conv_v", (K, nv, dv), ("conv_kernel", "heads", "head_dim"), conv_init)
    dt_bias = _param(self, "dt_bias", (nv,), ("heads",), nn.initializers.ones)
    a_log = _param(self, "A_log", (nv,), ("heads",),
                   lambda key, shape, dt: jnp.log(jax.random.uniform(key, shape, dt, 0.01, 16.0)))
    norm = _param(self, "norm", (dv,), ("head_dim",), nn.initializers.ones)
    w_out = _param(self, "out_proj", (nv, dv, D), ("heads", "head_dim", "embed"))

    x = (x * valid[..., None].astype(x.dtype)).astype(dtype)  # padding must not reach the conv or the state
    B, T, _ = x.shape
    new = jnp.sum(valid, axis=1).astype(jnp.int32)  # real inputs per row (1 per decode step)

    def conv(name, w, kernel):  # [B,T,h,d]
      y = jnp.einsum("btD,Dhd->bthd", x, w.astype(dtype))
      flat = y.reshape(B, T, -1)
      history = None
      if self.cache_mode is not None:
        state = cache_variable(self, name, (B, K - 1, flat.shape[-1]), dtype, ("batch", "cache_seq", None))
        history = state.value
        state.value = conv_window(history, flat, new)
      c = causal_depthwise_conv(flat, kernel.reshape(K, -1).astype(dtype), dilation=1, history=history)
      return jax.nn.silu(c).reshape(y.shape)

    q, k, v = conv("conv_q", w_q, conv_q), conv("conv_k", w_k, conv_k), conv("conv_v", w_v, conv_v)
    rep = nv // nk
    q = jnp.repeat(l2_normalize(q.astype(jnp.float32)), rep, axis=2) * dk ** -0.5
    k = jnp.repeat(l2_normalize(k.astype(jnp.float32)), rep, axis=2)
    beta = jax.nn.sigmoid(jnp.einsum("btD,Dh->bth", x, w_b.astype(dtype)).astype(jnp.float32))
    a = jnp.einsum("btD,Dh->bth", x, w_a.astype(dtype)).astype(jnp.float32)
    g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(a + dt_bias.astype(jnp.float32))
    # Padding neither decays nor writes the state (g = beta = 0), so a right-padded row's final state
    # is the one after its last real token, which decoding continues from.
    g, beta = jnp.where(valid[..., None], g, 0.0), jnp.where(valid[..., None], beta, 0.0)
    # The chunked form pays off past one chunk; up to it the recurrence is as cheap and compiles faster.
    chunk = cfg.delta_rule_chunk
    rule = (gated_delta_rule if chunk is None or T <= chunk
            else functools.partial(chunked_gated_delta_rule, chunk_size=chunk))
    if self.cache_mode is None:
      o, _ = rule(q, k, v, g, beta)  # [B,T,nv,dv] float32
    else:
      state = cache_variable(self, "recurrent", (B, nv, dk, dv), jnp.float32, ("batch", "cache_heads", None, None))
      o, state.value = rule(q, k, v, g, beta, state.value)

    z = jnp.einsum("btD,Dhd->bthd", x, w_z.astype(dtype)).astype(jnp.float32)
    act = jax.nn.silu if cfg.output_gate_type == "silu" else jax.nn.sigmoid
    o = o * jax.lax.rsqrt(jnp.mean(jnp.square(o), axis=-1, keepdims=True) + cfg.rms_norm_eps)
    o = (norm.astype(jnp.float32) * o * act(z)).astype(dtype)
    y = jnp.einsum("bthd,hdD->btD", o, w_out.astype(dtype))
    return nn.with_logical_constraint(y, ("batch", "seq", "act_embed"))


# ----------------------------------------------------------------------------------------------
# Indexed attention: GQA restricted to the blocks the QSA indexer picks.


def qsa_selection(q: jax.Array, raw_keys: jax.Array, key_norm: jax.Array, positions: jax.Array,
                  valid: jax.Array, cfg: Qwen4ExpConfig, query_slots: Optional[jax.Array] = None) -> jax.Array:
  """Which keys each query may attend to: bool [B, Tq(query), S(key)].

  The real keys of a row, in order, are cut into blocks of `compress_ratio`; a query sees the blocks
  whose last key is at or before it (complete blocks), scores each by sum_h relu(q_h . k_block) /
  sqrt(d) with k_block = RMSNorm(mean of its raw keys) rotated to its first key's position, keeps the
  top `budget / compress_ratio`, and always keeps the tail of visible keys no complete block holds.
  Blocks are formed once per row (a query's visible keys are a prefix of the row's real keys), so
  this is one [B, Tq, blocks] score array instead of a loop over queries.

  q [B,Tq,h,d] (normed, rotated), raw_keys [B,S,d], positions and valid [B,S] (of the keys),
  query_slots [B,Tq]: the key slot each query sits at (default: query t sits at slot t).
  """
  B, Tq, _, d = q.shape
  S = raw_keys.shape[1]
  t = jnp.broadcast_to(jnp.arange(Tq), (B, Tq)) if query_slots is None else query_slots  # [B,Tq]
  r, top = cfg.indexer_compress_ratio, cfg.indexer_budget // cfg.indexer_compress_ratio
  nblk = S // r
  causal = (t[:, :, None] >= jnp.arange(S)[None, None, :]) & valid[:, None, :]  # [B,Tq,S]
  if nblk == 0:
    return causal
  order = jnp.argsort(~valid, axis=1, stable=True)  # [B,S]: real keys first, in order
  members = order[:, :nblk * r].reshape(B, nblk, r)  # key index of each block's members
  count = jnp.sum(valid, axis=1)  # [B]
  complete = (jnp.arange(nblk)[None, :] + 1) * r <= count[:, None]  # [B,nblk]
  take = lambda a, idx: jax.vmap(lambda a_, i_: a_[i_])(a, idx)  # noqa: E731  per-row gather
  pooled = jnp.mean(take(raw_keys.astype(jnp.float32), members), axis=2).astype(raw_keys.dtype)  # [B,nblk,d]
  pooled = rms_norm_offset(pooled, key_norm, cfg.rms_norm_eps)
  block_pos = take(positions, members[:, :, 0])  # [B,nblk]
  block_keys = partial_rope(pooled[:, :, None, :], block_pos, cfg)[:, :, 0, :]
  scores = jnp.einsum("bthd,bnd->btnh", q.astype(jnp.float32), block_keys.astype(jnp.float32))
  scores = jnp.sum(jax.nn.relu(scores), axis=-1) / math.sqrt(d)  # [B,T,nblk]
  last = members[:, :, -1]  # [B,nblk]
  visible = complete[:, None, :] & (last[:, None, :] <= t[:, :, None])  # [B,Tq,nblk]
  k_top = min(top, nblk)
  _, best = jax.lax.top_k(jnp.where(visible, scores, -1.0), k_top)  # scores >= 0 where visible
  chosen = jnp.zeros((B, Tq, nblk), bool).at[
      jnp.arange(B)[:, None, None], jnp.arange(Tq)[None, :, None], best].set(True) & visible
  # Each key's block (nblk for keys past the last block or padding), then the per-query key mask.
  block_of = jnp.full((B, S), nblk, jnp.int32).at[jnp.arange(B)[:, None], members.reshape(B, -1)].set(
      jnp.broadcast_to(jnp.arange(nblk * r, dtype=jnp.int32) // r, (B, nblk * r)))
  in_chosen = jnp.take_along_axis(jnp.pad(chosen, ((0, 0), (0, 0), (0, 1))),
                                  jnp.broadcast_to(block_of[:, None, :], (B, Tq, S)), axis=2)
  in_visible_block = jnp.take_along_axis(jnp.pad(visible, ((0, 0), (0, 0), (0, 1))),
                                         jnp.broadcast_to(block_of[:, None, :], (B, Tq, S)), axis=2)
  return causal & (in_chosen | ~in_visible_block)


class IndexedAttention(nn.Module):
  """GQA whose keys are the causal, real keys the QSA indexer selects for each query.

  Per head, q_proj gives a query and an output gate; q and k get their own RMSNorm (1+w) before a
  partial RoPE; the attention output is multiplied by sigmoid(gate) before o_proj.

  Caches (`cache_mode`): keys (normed, rotated) and values [B,S,nkv,hd], the indexer's raw keys
  [B,S,ihd], and each slot's position and whether it holds a token. A decode step writes its token
  at slot `positions` (right-padded prompts start at 0, so a row's next slot is its position) and
  its query selects among the slots written so far.
  """

  cfg: Qwen4ExpConfig
  cache_mode: Optional[str] = None
  cache_length: int = 0  # prefill: slots the caches hold

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, valid: jax.Array):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    D, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    ih, ihd = cfg.indexer_n_heads, cfg.indexer_head_dim
    zeros = nn.initializers.zeros
    w_q = _param(self, "q_proj", (D, nh, hd), ("embed", "heads", "head_dim"))
    w_gate = _param(self, "gate_proj", (D, nh, hd), ("embed", "heads", "head_dim"))
    w_k = _param(self, "k_proj", (D, nkv, hd), ("embed", "kv_heads", "head_dim"))
    w_v = _param(self, "v_proj", (D, nkv, hd), ("embed", "kv_heads", "head_dim"))
    w_o = _param(self, "o_proj", (nh, hd, D), ("heads", "head_dim", "embed"))
    q_norm = _param(self, "q_norm", (hd,), ("norm",), zeros)
    k_norm = _param(self, "k_norm", (hd,), ("norm",), zeros)
    w_iq = _param(self, "index_q_proj", (D, ih, ihd), ("embed", "heads", "head_dim"))
    w_ik = _param(self, "index_k_proj", (D, ihd), ("embed", "head_dim"))
    iq_norm = _param(self, "index_q_norm", (ihd,), ("norm",), zeros)
    ik_norm = _param(self, "index_k_norm", (ihd,), ("norm",), zeros)

    x = x.astype(dtype)
    proj = lambda w: jnp.einsum("btD,Dhd->bthd", x, w.astype(dtype))  # noqa: E731
    iq = partial_rope(rms_norm_offset(proj(w_iq), iq_norm, cfg.rms_norm_eps), positions, cfg)
    raw_keys = jnp.einsum("btD,Dd->btd", x, w_ik.astype(dtype))
    q = partial_rope(rms_norm_offset(proj(w_q), q_norm, cfg.rms_norm_eps), positions, cfg)
    k = partial_rope(rms_norm_offset(proj(w_k), k_norm, cfg.rms_norm_eps), positions, cfg)
    v = proj(w_v)
    B, T = x.shape[:2]
    key_pos, key_valid, slots = positions, valid, None
    if self.cache_mode is not None:
      k, v, raw_keys, key_pos, key_valid = self._cached(k, v, raw_keys, positions, valid)
      slots = positions if self.cache_mode == "decode" else None
    mask = qsa_selection(iq, raw_keys, ik_norm, key_pos, key_valid, cfg, slots)  # [B,T,S]
    self.sow("intermediates", "qsa_mask", mask)

    qg = q.reshape(B, T, nkv, nh // nkv, hd)  # query head h reads kv head h // (nh / nkv)
    logits = jnp.einsum("bqgrd,bkgd->bgrqk", qg.astype(jnp.float32), k.astype(jnp.float32)) * hd ** -0.5
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", probs, v.astype(jnp.float32)).reshape(B, T, nh, hd)
    out = (out * jax.nn.sigmoid(proj(w_gate).astype(jnp.float32))).astype(dtype)
    y = jnp.einsum("bthd,hdD->btD", out, w_o.astype(dtype))
    return nn.with_logical_constraint(y, ("batch", "seq", "act_embed"))

  def _cached(self, k, v, raw_keys, positions, valid):
    """Writes this call's keys into the caches; returns everything cached (keys, values, raw
    indexer keys, positions, written) [B,S,...]."""
    cfg = self.cfg
    B = k.shape[0]
    S = self.cache_length
    kv_names = ("batch", "cache_seq", "cache_heads", None)
    row_names = ("batch", "cache_seq", None)
    caches = [(cache_variable(self, "keys", (B, S) + k.shape[2:], k.dtype, kv_names), k, kv_names),
              (cache_variable(self, "values", (B, S) + v.shape[2:], v.dtype, kv_names), v, kv_names),
              (cache_variable(self, "index_keys", (B, S, cfg.indexer_head_dim), raw_keys.dtype, row_names),
               raw_keys, row_names),
              (cache_variable(self, "positions", (B, S), jnp.int32, ("batch", "cache_seq")),
               positions.astype(jnp.int32), ("batch", "cache_seq")),
              (cache_variable(self, "written", (B, S), jnp.bool_, ("batch", "cache_seq")), valid,
               ("batch", "cache_seq"))]
    for cache, value, names in caches:
      if self.cache_mode == "prefill":
        write_prefill(cache, value, names)
      else:
        write_decode(cache, value, positions[:, 0], names)
    return tuple(cache.value for cache, _, _ in caches)


# ----------------------------------------------------------------------------------------------
# MoE: a softmax router over every expert, top-k renormalised, plus a sigmoid-gated shared expert.


class SparseMoE(nn.Module):
  """Routed SwiGLU experts through `moe.routed_experts` (dropless; grouped matmul on one device, the
  expert-parallel shard_map on a mesh) plus a shared SwiGLU expert scaled by sigmoid(x . w_gate).

  The router is not moe.py's: softmax over all experts (not sigmoid), no balancing bias, and the
  chosen probabilities renormalised (`norm_topk_prob`). Selections are sown for comparison.
  """

  cfg: Qwen4ExpConfig

  @nn.compact
  def __call__(self, x: jax.Array):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    D, E, I, Is = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    router = _param(self, "router", (D, E), ("embed", None))
    w_gate = _param(self, "w_gate", (E, D, I), ("expert", "expert_embed", "expert_mlp"))
    w_up = _param(self, "w_up", (E, D, I), ("expert", "expert_embed", "expert_mlp"))
    w_down = _param(self, "w_down", (E, I, D), ("expert", "expert_mlp", "expert_embed"))
    s_gate = _param(self, "shared_gate", (D, Is), ("embed", "mlp"))
    s_up = _param(self, "shared_up", (D, Is), ("embed", "mlp"))
    s_down = _param(self, "shared_down", (Is, D), ("mlp", "embed"))
    s_scale = _param(self, "shared_expert_gate", (D,), ("embed",))

    B, T, _ = x.shape
    x = x.astype(dtype)
    probs = jax.nn.softmax(jnp.einsum("btd,de->bte", x.astype(jnp.float32), router.astype(jnp.float32)), axis=-1)
    weights, expert_ids = jax.lax.top_k(probs, cfg.num_experts_per_tok)  # [B,T,k]
    if cfg.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    self.sow("intermediates", "expert_ids", expert_ids)
    routed, _ = routed_experts(x.reshape(B * T, D), expert_ids.reshape(B * T, -1).astype(jnp.int32),
                               weights.reshape(B * T, -1), w_gate.astype(dtype), w_up.astype(dtype),
                               w_down.astype(dtype))
    gate = jnp.einsum("btd,dh->bth", x, s_gate.astype(dtype))
    h = jax.nn.silu(gate) * jnp.einsum("btd,dh->bth", x, s_up.astype(dtype))
    h = nn.with_logical_constraint(h, ("batch", "seq", "act_mlp"))
    shared = jnp.einsum("bth,hd->btd", h, s_down.astype(dtype))
    scale = jax.nn.sigmoid(jnp.einsum("btd,d->bt", x, s_scale.astype(dtype)))[..., None]
    y = routed.reshape(B, T, D) + scale * shared
    return nn.with_logical_constraint(y.astype(dtype), ("batch", "seq", "act_embed"))


# ----------------------------------------------------------------------------------------------
# PLE: the per-layer n-gram embedding, an Engram layer in Qwen's dialect.


class PLE(nn.Module):
  """Gated n-gram value plus a dilated short conv, added to every stream (the caller adds it).

  e = concat of the layer's head rows [B,T,d_mem]; k_m = RMSNorm_m(W_K^m e) (1+w), v = W_V e;
  alpha_m = sigmoid(signed_sqrt(<k_m, RMSNorm_m(h_m)> / sqrt(D))); u_m = alpha_m v;
  out = u + SiLU(depthwise causal conv(RMSNorm_m(u), kernel K, dilation ngram_size)). This is
  engram.Engram's map with no biases, 1+w norms and padding zeroed before the conv; a separate module
  rather than flags on Engram, so each family's file shows its own equations whole.

  Cache (`cache_mode`): the conv's last (K-1) * ngram_size normed inputs. The n-gram history is
  the hasher's (`hashing.history_numpy` / `next_ids`): this layer only sees rows.
  """

  cfg: Qwen4ExpConfig
  cache_mode: Optional[str] = None

  @nn.compact
  def __call__(self, streams: jax.Array, rows: jax.Array, valid: jax.Array):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    M, D, K, d_mem = cfg.hc_count, cfg.hidden_size, cfg.ple_conv_kernel_size, cfg.ple_embed_dim
    B, T = streams.shape[:2]
    if rows.shape != (B, T, cfg.num_ple_heads, d_mem // cfg.num_ple_heads):
      raise ValueError(f"PLE rows have shape {rows.shape}; expected [B, T, heads, head_dim] = "
                       f"{(B, T, cfg.num_ple_heads, d_mem // cfg.num_ple_heads)}")
    zeros = nn.initializers.zeros
    w_key = _param(self, "key_proj", (M, d_mem, D), ("branch", "mem", "embed"))
    w_value = _param(self, "value_proj", (d_mem, D), ("mem", "embed"))
    key_norm = _param(self, "norm_key", (M, D), ("branch", "embed"), zeros)
    query_norm = _param(self, "norm_query", (M, D), ("branch", "embed"), zeros)
    conv_norm = _param(self, "norm_conv", (M, D), ("branch", "embed"), zeros)
    # Zero, as the reference initialises it: the layer starts as its gated value.
    conv_kernel = _param(self, "conv_kernel", (K, M, D), ("conv_kernel", "branch", "embed"), zeros)

    e = rows.reshape(B, T, d_mem).astype(dtype)
    self.sow("intermediates", "rows", e)
    key = rms_norm_offset(jnp.einsum("btk,mkd->btmd", e, w_key.astype(dtype)), key_norm, cfg.rms_norm_eps)
    value = jnp.einsum("btk,kd->btd", e, w_value.astype(dtype))
    query = rms_norm_offset(streams, query_norm, cfg.rms_norm_eps)
    score = jnp.sum(key.astype(jnp.float32) * query.astype(jnp.float32), axis=-1) / math.sqrt(D)  # [B,T,M]
    gates = jax.nn.sigmoid(signed_sqrt(score))
    self.sow("intermediates", "gates", gates)
    u = gates.astype(dtype)[..., None] * value[:, :, None, :]  # [B,T,M,D]
    u_normed = rms_norm_offset(u, conv_norm, cfg.rms_norm_eps)
    keep = valid[:, :, None, None].astype(dtype)
    u, u_normed = u * keep, u_normed * keep
    conv_in = u_normed.reshape(B, T, M * D)
    history = None
    if self.cache_mode is not None:
      width = (K - 1) * cfg.ngram_size
      state = cache_variable(self, "conv_state", (B, width, M * D), dtype, ("batch", "cache_seq", None))
      history = state.value
      state.value = conv_window(history, conv_in, jnp.sum(valid, axis=1).astype(jnp.int32))
    conv = causal_depthwise_conv(conv_in, conv_kernel.reshape(K, M * D).astype(dtype), dilation=cfg.ngram_size,
                                 history=history)
    y = u + jax.nn.silu(conv).reshape(B, T, M, D)
    return nn.with_logical_constraint(y, ("batch", "seq", "act_branch", "act_embed"))


# ----------------------------------------------------------------------------------------------
# The decoder.


class DecoderLayer(nn.Module):
  cfg: Qwen4ExpConfig
  layer: int  # zero-based
  cache_mode: Optional[str] = None
  cache_length: int = 0

  @nn.compact
  def __call__(self, streams, positions, valid, rows):
    cfg, mode = self.cfg, self.cache_mode
    if self.layer in cfg.ple_layers:
      ple = PLE(cfg, cache_mode=mode, name="ple")(streams, rows, valid)
      self.sow("intermediates", "ple_out", ple)
      streams = streams + ple
    x, inject = GatedResidual(cfg, name="attn_hc")(streams)
    self.sow("intermediates", "attn_read", (x, inject))
    if cfg.layer_types[self.layer] == "linear_attention":
      y = GatedDeltaNet(cfg, cache_mode=mode, name="linear_attn")(x, valid)
    else:
      y = IndexedAttention(cfg, cache_mode=mode, cache_length=self.cache_length, name="self_attn")(x, positions, valid)
    self.sow("intermediates", "attn_out", y)
    streams = GatedResidual.write(streams, y, inject)
    x, inject = GatedResidual(cfg, name="mlp_hc")(streams)
    self.sow("intermediates", "mlp_read", (x, inject))
    y = SparseMoE(cfg, name="mlp")(x)
    self.sow("intermediates", "mlp_out", y)
    streams = GatedResidual.write(streams, y, inject)
    return nn.with_logical_constraint(streams, ("batch", "seq", "act_branch", "act_embed"))


@dataclasses.dataclass(frozen=True)
class Segment:
  """Layers [start, start + period * repeats): `repeats` copies of a `period`-layer pattern, scanned
  when repeats > 1; a single layer otherwise (period = repeats = 1)."""

  start: int
  period: int
  repeats: int

  @property
  def name(self) -> str:
    if self.repeats == 1 and self.period == 1:
      return memory.table_name(self.start)  # "layer_{i}": a PLE layer's table is named after it
    return f"layers_{self.start}_{self.start + self.period * self.repeats - 1}"

  def layers(self):
    return range(self.start, self.start + self.period * self.repeats)


def layer_segments(cfg: Qwen4ExpConfig):
  """The decoder as segments. Unscanned: one per layer. Scanned: the shortest period p of
  `layer_types` cuts the layers into periods; consecutive periods without a PLE layer form one
  scanned segment, the others stay single layers (each PLE layer has its own table, so it cannot
  share stacked parameters with another)."""
  L = cfg.num_hidden_layers
  singles = [Segment(i, 1, 1) for i in range(L)]
  if not cfg.scan_layers:
    return singles
  period = next(p for p in range(1, L + 1)
                if L % p == 0 and all(cfg.layer_types[i] == cfg.layer_types[i % p] for i in range(L)))
  segments, run = [], []
  def flush():
    if len(run) > 1:
      segments.append(Segment(run[0], period, len(run)))
    elif run:
      segments.extend(Segment(i, 1, 1) for i in range(run[0], run[0] + period))
    run.clear()
  for start in range(0, L, period):
    if any(l in cfg.ple_layers for l in range(start, start + period)):
      flush()
      segments.extend(Segment(i, 1, 1) for i in range(start, start + period))
    else:
      run.append(start)
  flush()
  return segments


def stack_layers(cfg: Qwen4ExpConfig, params: dict) -> dict:
  """Per-layer params {"layer_i": ...} -> the tree of `cfg`'s segments: each scanned segment's layers
  stacked as [repeats, ...] under "layers_a_b"/"offset_o" (nn.scan's layout); single layers stay."""
  def stack(trees):
    return {k: stack([t[k] for t in trees]) if isinstance(trees[0][k], dict) else np.stack([t[k] for t in trees])
            for k in trees[0]}

  out = dict(params)
  for seg in layer_segments(cfg):
    if seg.repeats > 1:
      out[seg.name] = {f"offset_{o}": stack([out.pop(memory.table_name(seg.start + r * seg.period + o))
                                             for r in range(seg.repeats)]) for o in range(seg.period)}
  return out


class _Period(nn.Module):
  """One period of a scanned segment: its layers in order (named by their offset), streams in and out."""

  cfg: Qwen4ExpConfig
  start: int
  period: int
  cache_mode: Optional[str] = None
  cache_length: int = 0

  @nn.compact
  def __call__(self, streams, positions, valid):
    for offset in range(self.period):
      streams = DecoderLayer(self.cfg, self.start + offset, self.cache_mode, self.cache_length,
                             name=f"offset_{offset}")(streams, positions, valid, None)
    return streams, None


class Qwen4ExpModel(nn.Module):
  """tokens [B,T] (+ positions [B,T], attention_mask [B,T], PLE rows) -> logits [B,T,V] float32.

  `rows` {memory.table_name(layer): [B,T,heads,head_dim]} for each PLE layer (`memory.gather` of
  `ple_ids`; `forward` does both). Segment
  outputs (streams [B,T,M,D]; one per layer unless layers are scanned) are sown as intermediates
  "hidden", and each sublayer's output, the QSA masks and the expert selections likewise (stacked
  over the repeats in scanned segments), for comparison with the reference.

  `cache_mode` "prefill" (right-padded prompts, `cache_length` slots) or "decode" (one token per row
  at its own position) keeps every cache in the mutable "cache" collection: GatedDeltaNet convs
  and states, attention keys/values with the indexer's raw keys, PLE conv states (`prefill`,
  `decode_step`). Every other part is per token.
  """

  cfg: Qwen4ExpConfig
  cache_mode: Optional[str] = None
  cache_length: int = 0

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
               attention_mask: Optional[jax.Array] = None, rows: Optional[Dict[str, jax.Array]] = None):
    cfg = self.cfg
    B, T = tokens.shape
    dtype = jnp.dtype(cfg.dtype)
    rows = rows or {}
    missing = [memory.table_name(l) for l in cfg.ple_layers if memory.table_name(l) not in rows]
    if missing:
      raise ValueError(f"Qwen4ExpModel: no PLE rows for {missing}; pass memory.gather's rows for ple_ids "
                       f"(got {sorted(rows)})")
    if self.cache_mode not in CACHE_MODES:
      raise ValueError(f"Qwen4ExpModel.cache_mode={self.cache_mode!r}: expected one of {CACHE_MODES}")
    if self.cache_mode == "decode" and (T != 1 or positions is None):
      raise ValueError(f"Qwen4ExpModel: decoding takes one token per row and its positions, got tokens {tokens.shape}")
    positions = jnp.broadcast_to(jnp.arange(T), (B, T)) if positions is None else positions
    valid = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)

    embedding = _param(self, "embed_tokens", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    streams = jnp.broadcast_to(x[:, :, None, :], (B, T, cfg.hc_count, cfg.hidden_size))
    for seg in layer_segments(cfg):
      if seg.repeats == 1:
        streams = DecoderLayer(cfg, seg.start, self.cache_mode, self.cache_length, name=seg.name)(
            streams, positions, valid, rows.get(seg.name))
        self.sow("intermediates", "hidden", streams)
        continue
      scanned = nn.scan(_Period, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                        split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast), length=seg.repeats,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      streams, _ = scanned(cfg, seg.start, seg.period, self.cache_mode, self.cache_length, name=seg.name)(
          streams, positions, valid)
      self.sow("intermediates", "hidden", streams)
    h = GatedResidual(cfg, combine=False, name="hyper_connection_mixer")(streams)
    self.sow("intermediates", "final_hidden", h)
    if cfg.tie_word_embeddings:
      return jnp.einsum("btd,vd->btv", h.astype(jnp.float32), embedding.astype(jnp.float32))
    lm_head = _param(self, "lm_head", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
    logits = jnp.einsum("btd,dv->btv", h.astype(jnp.float32), lm_head.astype(jnp.float32))
    return nn.with_logical_constraint(logits, ("batch", "seq", "act_vocab"))


# ----------------------------------------------------------------------------------------------
# Rows for the PLE layers, and the whole forward.


def ple_token_ids(cfg: Qwen4ExpConfig, tokens, attention_mask=None):
  """The ids PLE hashes: tokens, with padding replaced by EOS (which also restarts the n-grams), so a
  padded batch hashes each row's real tokens as the reference does."""
  if attention_mask is None:
    return tokens
  where = np.where if isinstance(tokens, np.ndarray) else jnp.where
  return where(attention_mask.astype(bool), tokens, cfg.eos_token_id)


def ple_ids(cfg: Qwen4ExpConfig, hashing: EngramHashing, tokens, attention_mask=None, lookup=None):
  """Per-head hash ids [B,T,num_ple_layers,heads]: numpy for numpy tokens (the host pipeline),
  in-graph jnp (bit-identical) otherwise."""
  ids = ple_token_ids(cfg, tokens, attention_mask)
  if isinstance(ids, np.ndarray):
    return hashing.hash_numpy(ids)
  return hashing.hash_jnp(ids, lookup)


def init(cfg: Qwen4ExpConfig, key: jax.Array, batch: int = 1, seq: int = 8):
  """(params, tables): boxed backbone params and fresh PLE tables (memory.py's layout)."""
  model = Qwen4ExpModel(cfg)
  ecfg = cfg.engram_config()
  rows = {memory.table_name(l): jnp.zeros((batch, seq, cfg.num_ple_heads, ecfg.head_dim), jnp.float32)
          for l in cfg.ple_layers}
  # Jitted: run eagerly, init would execute the whole forward op by op; jitted, XLA drops it.
  variables = jax.jit(model.init)(jax.random.fold_in(key, 0), jnp.zeros((batch, seq), jnp.int32), rows=rows)
  tables = memory.init_tables(ecfg, jax.random.fold_in(key, 1)) if ecfg is not None else {}
  return variables["params"], tables


def forward(cfg: Qwen4ExpConfig, params, tables, tokens, attention_mask=None, positions=None, *,
            hashing: Optional[EngramHashing] = None, capture: bool = False):
  """Logits [B,T,V] from raw tokens: PLE ids hashed in-graph, rows read with `memory.gather`, then
  the model. With `capture` also the sown intermediates. Jit it with cfg and hashing static."""
  rows = {}
  ecfg = cfg.engram_config()
  if ecfg is not None:
    hashing = hashing or cfg.hashing()
    ids = ple_ids(cfg, hashing, jnp.asarray(tokens), None if attention_mask is None else jnp.asarray(attention_mask))
    rows = memory.gather(tables, ecfg, ids)
  model = Qwen4ExpModel(cfg)
  if not capture:
    return model.apply({"params": params}, tokens, positions, attention_mask, rows)
  logits, state = model.apply({"params": params}, tokens, positions, attention_mask, rows,
                              mutable=["intermediates"])
  return logits, state["intermediates"]


# ----------------------------------------------------------------------------------------------
# Decoding: prefill right-padded prompts into caches, then one token per row per step.


def _ple_rows(cfg, tables, ids):
  ecfg = cfg.engram_config()
  return {} if ecfg is None else memory.gather(tables, ecfg, ids)


def ple_history(cfg: Qwen4ExpConfig, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
  """In-graph `hashing.history_numpy` for raw ids: each row's last ngram_size-1 real tokens [B,n-1],
  EOS before the start (the n-gram context a decode step hashes its token with)."""
  width = cfg.ngram_size - 1
  padded = jnp.concatenate([jnp.full((tokens.shape[0], width), cfg.eos_token_id, jnp.int32),
                            jnp.asarray(tokens, jnp.int32)], axis=1)  # real token t at t + width
  index = jnp.asarray(lengths, jnp.int32)[:, None] + jnp.arange(width)[None, :]
  return jnp.take_along_axis(padded, index, axis=1)


def prefill(cfg: Qwen4ExpConfig, params, tables, tokens, attention_mask, cache_length: int, *,
            hashing: EngramHashing, capture: bool = False):
  """Right-padded prompts [B,T] (attention_mask 1 on each row's leading real tokens) -> (logits
  [B,T,V], the "cache" collection, the n-gram history [B,n-1]) (+ intermediates with `capture`).
  Jit with cfg, hashing and cache_length static."""
  tokens, attention_mask = jnp.asarray(tokens), jnp.asarray(attention_mask)
  rows = _ple_rows(cfg, tables, ple_ids(cfg, hashing, tokens, attention_mask))
  model = Qwen4ExpModel(cfg, cache_mode="prefill", cache_length=cache_length)
  logits, state = model.apply({"params": params}, tokens, None, attention_mask, rows,
                              mutable=["cache", "intermediates"])
  history = ple_history(cfg, ple_token_ids(cfg, tokens, attention_mask), jnp.sum(attention_mask, axis=1))
  out = (logits, state["cache"], history)
  return out + (state["intermediates"],) if capture else out


def decode_step(cfg: Qwen4ExpConfig, params, tables, cache, history, tokens, positions, *,
                hashing: EngramHashing, capture: bool = False):
  """One token per row: tokens [B] at positions [B] (a row's slot; right-padded rows continue at
  their length) -> (logits [B,V], the updated cache, the next history) (+ intermediates)."""
  rows = {}
  if cfg.engram_config() is not None:
    ids, history = hashing.next_ids(history, tokens, hashing.lookup_array())
    rows = _ple_rows(cfg, tables, ids)
  model = Qwen4ExpModel(cfg, cache_mode="decode")
  tokens, positions = jnp.asarray(tokens)[:, None], jnp.asarray(positions, jnp.int32)[:, None]
  logits, state = model.apply({"params": params, "cache": cache}, tokens, positions, None, rows,
                              mutable=["cache", "intermediates"])
  out = (logits[:, 0], state["cache"], history)
  return out + (state["intermediates"],) if capture else out
