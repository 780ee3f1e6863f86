"""Backbone layers: RMSNorm, rotary position embedding (with YaRN), causal attention (GQA and
DeepSeek's multi-head latent attention) and the dense SwiGLU MLP.

Conventions shared by every module here:
- params are kept in `cfg.param_dtype` and cast to `cfg.dtype` at use, so bf16 compute never
  rounds the master weights;
- reductions that decide numerics (norm statistics, softmax, RoPE angles) run in float32, or in
  float64 when the inputs are float64 (the reference tests need that);
- projections are raw `self.param` arrays used through einsums whose subscripts name the shapes,
  rather than `nn.DenseGeneral`, so every weight's logical axes sit next to its einsum;
- no biases anywhere in the backbone (DeepSeek-V3 has none either).

RoPE uses the half-split convention (GPT-NeoX / Llama): dimension i is paired with i + dim/2.
The interleaved convention (pairs (2i, 2i+1), DeepSeek's reference code) is the same rotation
under a fixed permutation of the projection's output columns, so for a model trained here it is
only a layout choice; half-split was chosen because both halves are contiguous slices, where the
interleaved form needs a strided gather or a reshape to pairs on every call.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.config import AttentionConfig, ModelConfig

Array = jax.Array
DType = Any


def _compute_dtype(dtype: DType) -> DType:
  """float32 for low-precision inputs, the input's own dtype when it is wider (float64 tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def _param(module: nn.Module, name: str, shape, names, std: float, dtype: DType) -> Array:
  init = nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)
  return module.param(name, init, shape, dtype)


# ----------------------------------------------------------------------------------------------
# RMSNorm


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned per-channel scale (no mean subtraction, no bias).

  The statistics are computed in float32 whatever the input dtype: in bf16 the mean of squares
  over a few thousand channels loses most of its mantissa. The output is cast back to `dtype`
  (default: the input's dtype) so the caller's compute dtype is preserved.

  `eps=None` uses the machine epsilon of the input dtype, which is what torch's RMSNorm does with
  `eps=None` (the official Engram module relies on that).
  """

  eps: Optional[float] = 1e-6
  dtype: Optional[DType] = None
  param_dtype: DType = jnp.float32
  # Logical axis name of the scale vector (a rule for it must exist in sharding.LOGICAL_RULES).
  scale_axis: Optional[str] = "norm"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.asarray(x)
    out_dtype = x.dtype if self.dtype is None else jnp.dtype(self.dtype)
    eps = float(jnp.finfo(x.dtype).eps) if self.eps is None else self.eps
    if not eps > 0:
      raise ValueError(f"RMSNorm.eps={self.eps!r}: expected None or a positive float")
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.scale_axis,)),
                       (x.shape[-1],), self.param_dtype)
    compute = _compute_dtype(x.dtype)
    x_ = x.astype(compute)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x_), axis=-1, keepdims=True) + eps)
    return (x_ * inv_rms * scale.astype(compute)).astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# Rotary position embedding with YaRN


def rope_frequencies(dim: int, theta: float = 10000.0, scaling_factor: float = 1.0,
                     original_max_len: int = 4096, beta_fast: float = 32.0,
                     beta_slow: float = 1.0) -> np.ndarray:
  """Inverse wavelengths [dim // 2] (float64 numpy, a compile-time constant) of RoPE, YaRN-scaled.

  YaRN ("NTK-by-parts") treats the frequency pairs differently depending on how many full
  rotations they make over the original training context L: pairs that rotate more than
  `beta_fast` times already saw every phase during training and keep their frequency
  (extrapolation); pairs that rotate fewer than `beta_slow` times would see unseen phases at long
  range, so their frequency is divided by `scaling_factor` (position interpolation); pairs in
  between are blended linearly. Pair i rotates L / (2 pi theta^(2i/dim)) times over L, so the pair
  index that makes r rotations is dim * ln(L / (2 pi r)) / (2 ln theta); the ramp runs between
  those indices for r = beta_fast (floored) and r = beta_slow (ceiled), clamped to [0, dim - 1]
  as in DeepSeek-V3. The attention temperature that goes with it is `yarn_mscale`.

  With `scaling_factor == 1` this returns plain RoPE frequencies exactly.
  """
  if not isinstance(dim, (int, np.integer)) or dim < 2 or dim % 2:
    raise ValueError(f"rope_frequencies dim={dim!r}: expected an even integer >= 2")
  if not theta > 1.0:
    raise ValueError(f"rope_frequencies theta={theta!r}: expected a float > 1.0")
  if not scaling_factor >= 1.0:
    raise ValueError(f"rope_frequencies scaling_factor={scaling_factor!r}: expected a float >= 1.0")
  if not 0 < beta_slow < beta_fast:
    raise ValueError(f"rope_frequencies beta_slow={beta_slow!r}, beta_fast={beta_fast!r}: "
                     "expected 0 < beta_slow < beta_fast")
  if not original_max_len >= 1:
    raise ValueError(f"rope_frequencies original_max_len={original_max_len!r}: expected a positive length")
  inv_freq = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)  # [dim/2]
  if scaling_factor == 1.0:
    return inv_freq

  def pair_index_for(rotations: float) -> float:
    return dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low = max(math.floor(pair_index_for(beta_fast)), 0)
  high = min(math.ceil(pair_index_for(beta_slow)), dim - 1)
  if high <= low:  # degenerate ramp: make it a step at `low` instead of dividing by zero
    high = low + 1e-3
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
  # ramp 0: fast pairs keep their frequency; ramp 1: slow pairs are interpolated.
  return inv_freq * (1.0 - ramp) + (inv_freq / scaling_factor) * ramp


def yarn_mscale(scaling_factor: float) -> float:
  """YaRN's attention temperature 0.1 ln(s) + 1 (1 without scaling).

  YaRN multiplies both q and k by it, i.e. the logits by its square; like DeepSeek-V3 we fold
  that square into the softmax scale instead of into cos/sin, so RoPE stays a pure rotation and
  the MLA non-rope dims (which get no cos/sin) are scaled the same as the rope dims.
  """
  if scaling_factor <= 1.0:
    return 1.0
  return 0.1 * math.log(scaling_factor) + 1.0


def apply_rope(x: Array, positions: Array, inv_freq) -> Array:
  """Rotates x [..., T, heads, dim] by angles positions [..., T] * inv_freq [dim // 2].

  Half-split convention: the pair (x[i], x[i + dim/2]) is rotated by positions * inv_freq[i].
  Positions come from the batch (packed documents restart at 0), never from an arange, so a
  document's encoding does not depend on where it was packed. Angles and the rotation are
  computed in float32 (float64 for float64 inputs); the result has x's dtype.
  """
  x = jnp.asarray(x)
  positions = jnp.asarray(positions)
  inv_freq = np.asarray(inv_freq) if not isinstance(inv_freq, jax.Array) else inv_freq
  if x.ndim < 3:
    raise ValueError(f"apply_rope: x has shape {x.shape}; expected [..., T, heads, dim]")
  dim = x.shape[-1]
  if dim % 2 or inv_freq.shape != (dim // 2,):
    raise ValueError(f"apply_rope: x width {dim} and inv_freq shape {inv_freq.shape}: expected an "
                     f"even width and inv_freq of shape ({dim // 2},)")
  if positions.shape != x.shape[:-2]:
    raise ValueError(f"apply_rope: positions shape {positions.shape}: expected x's leading shape "
                     f"{x.shape[:-2]} (x is [..., T, heads, dim])")
  if not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"apply_rope: positions dtype {positions.dtype}: expected integers")
  compute = _compute_dtype(x.dtype)
  angles = positions.astype(compute)[..., None] * jnp.asarray(inv_freq, compute)  # [..., T, dim/2]
  cos = jnp.cos(angles)[..., None, :]  # [..., T, 1, dim/2]
  sin = jnp.sin(angles)[..., None, :]
  x_ = x.astype(compute)
  x1, x2 = x_[..., : dim // 2], x_[..., dim // 2:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def _rope_for(acfg: AttentionConfig, dim: int) -> np.ndarray:
  return rope_frequencies(dim, acfg.rope_theta, acfg.rope_scaling_factor, acfg.rope_original_max_len,
                          acfg.yarn_beta_fast, acfg.yarn_beta_slow)


# ----------------------------------------------------------------------------------------------
# Attention core (shared by GQA and MLA)

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "einsum")


def attention_mask(segment_ids: Optional[Array], length: int) -> Array:
  """Boolean mask [B or 1, 1, T, T]: True where query t may attend to key s.

  Causal, and within a segment: packed documents never see each other. Segment id 0 is padding;
  a padding token attends only to itself (the diagonal), so every row keeps at least one key and
  nothing becomes NaN, while padding outputs depend on nothing but their own token.
  """
  t_idx = jnp.arange(length)
  causal = t_idx[:, None] >= t_idx[None, :]  # [T, S]
  if segment_ids is None:
    return causal[None, None]
  seg = jnp.asarray(segment_ids)
  same = seg[:, :, None] == seg[:, None, :]  # [B, T, S]
  real_or_self = (seg[:, :, None] != 0) | (t_idx[:, None] == t_idx[None, :])[None]
  return (causal[None] & same & real_or_self)[:, None]  # [B, 1, T, S]


def _cudnn_can_take(q: Array, width: int, length: int, with_mask: bool) -> bool:
  """Whether cuDNN flash attention (through jax.nn.dot_product_attention) accepts these shapes.

  Mirrors the documented cuDNN limits rather than catching its error at run time: fp16/bf16 only,
  head width a multiple of 8 and at most 128 (256 from Hopper on), and, with a segment mask, an even
  sequence length (the mask reaches cuDNN as a bias, and biased training needs even lengths).
  """
  if jax.default_backend() != "gpu":
    return False
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return False
  try:
    capability = tuple(int(c) for c in str(jax.devices()[0].compute_capability).split("."))
  except (AttributeError, ValueError):
    return False
  max_width = 256 if capability >= (9, 0) else 128
  return width % 8 == 0 and width <= max_width and (not with_mask or length % 2 == 0)


def _einsum_attention(q: Array, k: Array, v: Array, mask: Array, scale: float) -> Array:
  """Plain XLA attention: materialised [B, K, G, T, S] logits, float32 softmax.

  Kept next to the fused path as the readable reference and as the path for shapes no fused
  kernel takes; it computes what jax.nn.dot_product_attention(implementation="xla") computes.
  """
  batch, length, num_heads, width = q.shape
  num_kv = k.shape[2]
  groups = num_heads // num_kv
  logits_dtype = _compute_dtype(q.dtype)
  q_ = q.reshape(batch, length, num_kv, groups, width)  # [B, T, K, G, H]
  logits = jnp.einsum("btkgh,bskh->bkgts", q_, k, preferred_element_type=logits_dtype)
  logits = logits * jnp.asarray(scale, logits_dtype)
  large_negative = jnp.asarray(0.7 * jnp.finfo(logits_dtype).min, logits_dtype)
  logits = jnp.where(mask[:, :, None], logits, large_negative)  # mask [B, 1, 1, T, S]
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=logits_dtype)
  return out.reshape(batch, length, num_heads, v.shape[-1]).astype(q.dtype)  # [B, T, N, Hv]


def attention_core(q: Array, k: Array, v: Array, segment_ids: Optional[Array], scale: float,
                   implementation: str = "auto") -> Array:
  """Causal, segment-masked attention: q [B,T,N,Hqk], k [B,T,K,Hqk], v [B,T,K,Hv] -> [B,T,N,Hv].

  `implementation`: "auto" picks cuDNN flash attention on GPU when `_cudnn_can_take` says so and
  XLA's fused-op path otherwise; "xla" / "cudnn" force jax.nn.dot_product_attention's
  implementation; "einsum" is the plain fallback. N must be a multiple of K (GQA); `scale`
  multiplies q.k (it is passed explicitly because MLA's and YaRN's scales are not 1/sqrt(width)).

  jax.nn.dot_product_attention wants v as wide as q and k, which MLA breaks (q/k are nope+rope
  wide, v is v_head_dim wide): the narrower side is zero-padded to the wider width and the output
  sliced back. Zero columns in q and k add nothing to q.k, and zero columns in v give zero outputs
  that are dropped, so the numbers are unchanged; the cost is the padded width in the kernel
  (192 vs 128 for DeepSeek-V3's shapes), which is cheaper than falling back to materialised
  logits.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention_core implementation={implementation!r}: expected one of {IMPLEMENTATIONS}")
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention_core: q {q.shape}, k {k.shape}, v {v.shape}: expected 4-d [B, T, heads, width]")
  batch, length, num_heads, width = q.shape
  if k.shape[:2] != (batch, length) or v.shape[:3] != k.shape[:3] or k.shape[3] != width:
    raise ValueError(f"attention_core: q {q.shape}, k {k.shape}, v {v.shape}: expected k [B, T, K, {width}] "
                     "and v [B, T, K, Hv] matching q's batch and length (self-attention)")
  if num_heads % k.shape[2]:
    raise ValueError(f"attention_core: {num_heads} query heads and {k.shape[2]} kv heads: expected a multiple")
  if segment_ids is not None and jnp.shape(segment_ids) != (batch, length):
    raise ValueError(f"attention_core: segment_ids shape {jnp.shape(segment_ids)}: expected ({batch}, {length})")

  if implementation == "einsum":
    return _einsum_attention(q, k, v, attention_mask(segment_ids, length), scale)

  v_width = v.shape[-1]
  padded = max(width, v_width)
  if implementation == "auto":
    implementation = "cudnn" if _cudnn_can_take(q, padded, length, segment_ids is not None) else "xla"

  def pad_to(x: Array) -> Array:
    extra = padded - x.shape[-1]
    return x if extra == 0 else jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))

  # Without segments the causal flag alone says it all, and cuDNN then needs no dense mask.
  mask = None if segment_ids is None else attention_mask(segment_ids, length)
  out = jax.nn.dot_product_attention(pad_to(q), pad_to(k), pad_to(v), mask=mask, scale=scale,
                                     is_causal=True, implementation=implementation)
  return out[..., :v_width]


# ----------------------------------------------------------------------------------------------
# Attention layer


def softmax_scale(acfg: AttentionConfig) -> float:
  """1/sqrt(q.k width), times YaRN's mscale^2 when the context is extended."""
  width = acfg.head_dim if acfg.kind == "gqa" else acfg.qk_nope_head_dim + acfg.qk_rope_head_dim
  return yarn_mscale(acfg.rope_scaling_factor) ** 2 / math.sqrt(width)


def _check_attention_inputs(cfg: ModelConfig, x, positions, segment_ids):
  if x.ndim != 3 or x.shape[-1] != cfg.d_model:
    raise ValueError(f"Attention: x shape {x.shape}: expected [B, T, d_model={cfg.d_model}]")
  if positions.shape != x.shape[:2] or not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"Attention: positions {positions.shape} {positions.dtype}: expected integers of "
                     f"shape {x.shape[:2]}")
  if segment_ids is not None and (segment_ids.shape != x.shape[:2]
                                  or not jnp.issubdtype(segment_ids.dtype, jnp.integer)):
    raise ValueError(f"Attention: segment_ids {segment_ids.shape} {segment_ids.dtype}: expected None or "
                     f"integers of shape {x.shape[:2]}")


CACHE_MODES = (None, "prefill", "decode")
# The collection that holds decoding caches (attention keys/values or MLA latents, Engram conv
# state). Scanned block runs stack it along the layer axis like their params.
CACHE_COLLECTION = "cache"


def cache_variable(module: nn.Module, name: str, shape, dtype, names) -> nn.Variable:
  """A decoding cache in CACHE_COLLECTION, boxed with logical axis names so the mesh shards it through
  sharding.LOGICAL_RULES like every param and activation. Prefill creates it (zeros of `shape`);
  decoding needs the one prefill returned."""
  if module.cache_mode == "decode" and not module.has_variable(CACHE_COLLECTION, name):
    raise ValueError(f"{module.__class__.__name__} {module.path}: cache_mode='decode' without a '{name}' cache: "
                     f"pass the '{CACHE_COLLECTION}' collection that prefill returned")
  return module.variable(CACHE_COLLECTION, name, nn.with_logical_partitioning(jnp.zeros, names), shape, dtype)


def write_prefill(cache: nn.Variable, x: Array, names) -> None:
  """Writes x [B, T, ...] at cache positions [0, T) (the cache is [B, S, ...], S >= T)."""
  if x.shape[1] > cache.value.shape[1]:
    raise ValueError(f"prefill of {x.shape[1]} positions into a cache of {cache.value.shape[1]}: expected a "
                     "cache at least as long as the prompts")
  value = jax.lax.dynamic_update_slice_in_dim(cache.value, x.astype(cache.value.dtype), 0, axis=1)
  cache.value = nn.with_logical_constraint(value, names)


def write_decode(cache: nn.Variable, x: Array, index: Array, names) -> Array:
  """Writes x [B, 1, ...] at each row's own position index [B] of the cache [B, S, ...]; returns it.

  A per-row dynamic_update_slice (vmapped: a scatter whose batch dimension XLA partitions like
  the batch, and which updates the donated cache in place) rather than a one-hot select, which
  would rewrite the whole cache every step.
  """
  write = jax.vmap(lambda c, v, i: jax.lax.dynamic_update_slice_in_dim(c, v, i, axis=0))
  value = nn.with_logical_constraint(write(cache.value, x.astype(cache.value.dtype), index), names)
  cache.value = value
  return value


def _decode_mask(index: Array, length: int) -> Array:
  """[B, S] True where cache position s holds a token row b may attend to (s <= its own position)."""
  return jnp.arange(length)[None, :] <= index[:, None]


def _masked_softmax(logits: Array, mask: Array) -> Array:
  """Softmax over the last axis where mask, as _einsum_attention does it (finite large negative)."""
  large_negative = jnp.asarray(0.7 * jnp.finfo(logits.dtype).min, logits.dtype)
  return jax.nn.softmax(jnp.where(mask, logits, large_negative), axis=-1)


class Attention(nn.Module):
  """Causal self-attention over packed sequences, GQA or MLA by `cfg.attention.kind`.

  Called as `attn(x [B,T,D], positions [B,T] int, segment_ids [B,T] int or None) -> [B,T,D]`; the
  caller applies the pre-norm and the residual. `segment_ids=None` means one unpadded document
  per row.

  MLA (DeepSeek-V2/V3) is computed in its training form: the latent is expanded to per-head keys
  and values and attention runs as ordinary multi-head attention. The "absorbed" form (attending
  in latent space, folding k_up into the query and v_up into the output) saves memory only when
  keys are cached across steps, so only decoding uses it, with the same params.

  Decoding (`cache_mode`; the params are the same in every mode):
  - "prefill": attention over x exactly as in training (right-padded prompts, padding masked by
    segment id 0), and what later tokens need written into the cache at positions [0, T) of a cache
    `cache_length` long: GQA keys (after RoPE) and values; MLA the normalised latent and the rotary
    key, never per-head keys or values.
  - "decode": one new token per row, x [B,1,D] at `positions` [B,1] (each row's own position), is
    written into the cache at that position and attends to cache positions <= it. MLA decodes in the
    absorbed form: the query's non-rotary part is projected into the latent space through k_up, the
    scores are q_lat . latent + q_rope . rope_key, the probabilities average the latents, and v_up
    takes the result back to per-head values. The softmax scale stays 1/sqrt(nope + rope).
  """

  cfg: ModelConfig
  cache_mode: Optional[str] = None  # None (training, scoring), "prefill" or "decode"
  cache_length: int = 0  # prefill: positions the cache holds (prompt bucket + tokens to generate)

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Optional[Array] = None) -> Array:
    cfg, acfg = self.cfg, self.cfg.attention
    x, positions = jnp.asarray(x), jnp.asarray(positions)
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
    _check_attention_inputs(cfg, x, positions, segment_ids)
    if self.cache_mode not in CACHE_MODES:
      raise ValueError(f"Attention.cache_mode={self.cache_mode!r}: expected one of {CACHE_MODES}")
    if self.cache_mode == "decode" and x.shape[1] != 1:
      raise ValueError(f"Attention: decoding takes one token per row, got x of shape {x.shape}: expected [B, 1, D]")
    dtype, pdtype, std = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), cfg.init_std
    d_model, num_heads = cfg.d_model, acfg.num_heads
    heads_spec = ("batch", "seq", "act_heads", None)
    batch = x.shape[0]
    cache_len = self.cache_length if self.cache_mode == "prefill" else 0

    x = nn.with_logical_constraint(x.astype(dtype), ("batch", "seq", "act_embed"))
    if acfg.kind == "gqa":
      num_kv, width = acfg.num_kv_heads, acfg.head_dim
      w_q = _param(self, "q_proj", (d_model, num_heads, width), ("embed", "heads", "head_dim"), std, pdtype)
      w_k = _param(self, "k_proj", (d_model, num_kv, width), ("embed", "kv_heads", "head_dim"), std, pdtype)
      w_v = _param(self, "v_proj", (d_model, num_kv, width), ("embed", "kv_heads", "head_dim"), std, pdtype)
      q = jnp.einsum("btd,dnh->btnh", x, w_q.astype(dtype))
      k = jnp.einsum("btd,dkh->btkh", x, w_k.astype(dtype))
      v = jnp.einsum("btd,dkh->btkh", x, w_v.astype(dtype))
      inv_freq = _rope_for(acfg, width)
      q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
      v_width = width
      if self.cache_mode is not None:
        names = ("batch", "cache_seq", "cache_heads", None)
        k_cache = cache_variable(self, "key", (batch, cache_len, num_kv, width), dtype, names)
        v_cache = cache_variable(self, "value", (batch, cache_len, num_kv, width), dtype, names)
        if self.cache_mode == "prefill":
          write_prefill(k_cache, k, names)
          write_prefill(v_cache, v, names)
        else:
          index = positions[:, 0]
          keys, values = write_decode(k_cache, k, index, names), write_decode(v_cache, v, index, names)
          out = _gqa_decode(q[:, 0], keys, values, _decode_mask(index, keys.shape[1]), softmax_scale(acfg))
    else:
      nope, rope, v_width = acfg.qk_nope_head_dim, acfg.qk_rope_head_dim, acfg.v_head_dim
      kv_rank = acfg.kv_lora_rank
      if acfg.q_lora_rank > 0:
        w_q_down = _param(self, "q_down", (d_model, acfg.q_lora_rank), ("embed", "lora"), std, pdtype)
        w_q_up = _param(self, "q_up", (acfg.q_lora_rank, num_heads, nope + rope), ("lora", "heads", "head_dim"),
                        std, pdtype)
        q_latent = jnp.einsum("btd,dr->btr", x, w_q_down.astype(dtype))
        q_latent = RMSNorm(eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name="q_norm")(q_latent)
        q = jnp.einsum("btr,rnh->btnh", q_latent, w_q_up.astype(dtype))
      else:
        w_q = _param(self, "q_proj", (d_model, num_heads, nope + rope), ("embed", "heads", "head_dim"), std, pdtype)
        q = jnp.einsum("btd,dnh->btnh", x, w_q.astype(dtype))
      # One down-projection yields both the KV latent and the head-shared RoPE key.
      w_kv_down = _param(self, "kv_down", (d_model, kv_rank + rope), ("embed", "lora"), std, pdtype)
      w_kv_up = _param(self, "kv_up", (kv_rank, num_heads, nope + v_width), ("lora", "heads", "head_dim"),
                       std, pdtype)
      kv_down = jnp.einsum("btd,dr->btr", x, w_kv_down.astype(dtype))  # [B, T, kv_rank + rope]
      kv_latent = RMSNorm(eps=cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name="kv_norm")(kv_down[..., :kv_rank])
      inv_freq = _rope_for(acfg, rope)
      q_rope = apply_rope(q[..., nope:], positions, inv_freq)
      k_rope = apply_rope(kv_down[..., None, kv_rank:], positions, inv_freq)  # [B, T, 1, rope], shared by heads
      if self.cache_mode is not None:
        names = ("batch", "cache_seq", "cache_latent")
        latent_cache = cache_variable(self, "latent", (batch, cache_len, kv_rank), dtype, names)
        rope_cache = cache_variable(self, "rope_key", (batch, cache_len, rope), dtype, names)
        if self.cache_mode == "prefill":
          write_prefill(latent_cache, kv_latent, names)
          write_prefill(rope_cache, k_rope[:, :, 0], names)
        else:
          index = positions[:, 0]
          latents = write_decode(latent_cache, kv_latent, index, names)
          rope_keys = write_decode(rope_cache, k_rope[:, :, 0], index, names)
          out = _mla_absorbed_decode(q[:, 0, :, :nope], q_rope[:, 0], latents, rope_keys, w_kv_up.astype(dtype),
                                     nope, _decode_mask(index, latents.shape[1]), softmax_scale(acfg))
      if self.cache_mode != "decode":
        kv = jnp.einsum("btr,rnh->btnh", kv_latent, w_kv_up.astype(dtype))  # [B, T, N, nope + v]
        k_nope, v = kv[..., :nope], kv[..., nope:]
        q = jnp.concatenate([q[..., :nope], q_rope], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, k_nope.shape[:-1] + (rope,))], axis=-1)

    if self.cache_mode != "decode":
      q = nn.with_logical_constraint(q, heads_spec)
      k = nn.with_logical_constraint(k, heads_spec)
      v = nn.with_logical_constraint(v, heads_spec)
      out = attention_core(q, k, v, segment_ids, softmax_scale(acfg), acfg.implementation)
    out = nn.with_logical_constraint(out, heads_spec)  # [B, T, N, Hv]
    w_o = _param(self, "o_proj", (num_heads, v_width, d_model), ("heads", "head_dim", "embed"), std, pdtype)
    y = jnp.einsum("btnh,nhd->btd", out, w_o.astype(dtype))
    return nn.with_logical_constraint(y, ("batch", "seq", "act_embed"))


def _gqa_decode(q: Array, keys: Array, values: Array, mask: Array, scale: float) -> Array:
  """One query per row against the cache: q [B,N,H], keys/values [B,S,K,H], mask [B,S] -> [B,1,N,H].

  The same arithmetic as _einsum_attention (logits and softmax in float32, or float64 for float64
  inputs), for a single query position.
  """
  batch, num_heads, width = q.shape
  num_kv = keys.shape[2]
  compute = _compute_dtype(q.dtype)
  q_ = q.reshape(batch, num_kv, num_heads // num_kv, width)  # [B, K, G, H]
  logits = jnp.einsum("bkgh,bskh->bkgs", q_, keys, preferred_element_type=compute) * jnp.asarray(scale, compute)
  probs = _masked_softmax(logits, mask[:, None, None, :]).astype(values.dtype)
  out = jnp.einsum("bkgs,bskh->bkgh", probs, values, preferred_element_type=compute)
  return out.reshape(batch, 1, num_heads, values.shape[-1]).astype(q.dtype)


def _mla_absorbed_decode(q_nope: Array, q_rope: Array, latents: Array, rope_keys: Array, w_kv_up: Array,
                         nope: int, mask: Array, scale: float) -> Array:
  """MLA attention for one query per row, in latent space (no per-head keys or values).

  q_nope [B,N,nope], q_rope [B,N,rope] (rotated), latents [B,S,r], rope_keys [B,S,rope] (rotated),
  w_kv_up [r,N,nope+v], mask [B,S] -> [B,1,N,v]. Training form: k_n = latent . W_k[:, n], so
  q_n . k_n = (W_k[:, n] q_n) . latent; and sum_s p_s v_{s,n} = (sum_s p_s latent_s) . W_v[:, n].
  """
  compute = _compute_dtype(q_nope.dtype)
  w_k, w_v = w_kv_up[..., :nope], w_kv_up[..., nope:]  # [r, N, nope], [r, N, v]
  q_latent = jnp.einsum("bnh,rnh->bnr", q_nope, w_k, preferred_element_type=compute).astype(latents.dtype)
  logits = (jnp.einsum("bnr,bsr->bns", q_latent, latents, preferred_element_type=compute)
            + jnp.einsum("bnh,bsh->bns", q_rope, rope_keys, preferred_element_type=compute))
  probs = _masked_softmax(logits * jnp.asarray(scale, compute), mask[:, None, :]).astype(latents.dtype)
  out_latent = jnp.einsum("bns,bsr->bnr", probs, latents, preferred_element_type=compute).astype(latents.dtype)
  out = jnp.einsum("bnr,rnh->bnh", out_latent, w_v, preferred_element_type=compute)
  return out[:, None].astype(q_nope.dtype)


# ----------------------------------------------------------------------------------------------
# Dense MLP


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(x W_gate) * (x W_up)).

  `hidden` is a field rather than read from `cfg.mlp_hidden` so the same module serves the dense
  blocks, the MoE's shared experts (whose widths add up) and any other width.
  """

  hidden: int
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    x = jnp.asarray(x)
    if x.ndim != 3 or x.shape[-1] != cfg.d_model:
      raise ValueError(f"MLP: x shape {x.shape}: expected [B, T, d_model={cfg.d_model}]")
    if not isinstance(self.hidden, int) or self.hidden < 1:
      raise ValueError(f"MLP.hidden={self.hidden!r}: expected a positive integer")
    dtype, pdtype, std = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), cfg.init_std
    w_gate = _param(self, "gate_proj", (cfg.d_model, self.hidden), ("embed", "mlp"), std, pdtype)
    w_up = _param(self, "up_proj", (cfg.d_model, self.hidden), ("embed", "mlp"), std, pdtype)
    w_down = _param(self, "down_proj", (self.hidden, cfg.d_model), ("mlp", "embed"), std, pdtype)
    x = nn.with_logical_constraint(x.astype(dtype), ("batch", "seq", "act_embed"))
    gate = jnp.einsum("btd,dh->bth", x, w_gate.astype(dtype))
    up = jnp.einsum("btd,dh->bth", x, w_up.astype(dtype))
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
    y = jnp.einsum("bth,hd->btd", h, w_down.astype(dtype))
    return nn.with_logical_constraint(y, ("batch", "seq", "act_embed"))
