"""Tokenizer compression and multiplicative-XOR N-gram hashing (numpy and jax.numpy backends).

Both backends implement one spec, the official demo's: compressed ids, suffix N-grams padded with the
compressed pad id, `mix = (x_t*m_0) ^ (x_{t-1}*m_1) ^ ...` in wrapping int64, then Python-style
`mix % p` per head. The numpy backend feeds the data pipeline (hashing on the host, ahead of the
step, is the deterministic prefetch the paper relies on). The jnp backend is for in-graph use
(generation); it emulates int64 with pairs of uint32 words instead of enabling `jax_enable_x64`,
because x64 is a process-wide switch that would double every float in the model and TPUs have no
native 64-bit integer multiply.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Union

import jax.numpy as jnp
import numpy as np
import sympy

from engram_jax.config import EngramConfig

_INT64_MAX = np.iinfo(np.int64).max
_LAYER_SEED_STRIDE = 10007
_SENTINEL = "\ue000"


# ----------------------------------------------------------------------------------------------
# Tokenizer compression.


def _normalizer():
  """The official normaliser: NFKC, NFD, strip accents, lowercase, whitespace runs -> one space,
  strip; a token that is only whitespace stays one space (protected by a private-use sentinel)."""
  from tokenizers import Regex, normalizers

  return normalizers.Sequence([
      normalizers.NFKC(),
      normalizers.NFD(),
      normalizers.StripAccents(),
      normalizers.Lowercase(),
      normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
      normalizers.Replace(Regex(r"^ $"), _SENTINEL),
      normalizers.Strip(),
      normalizers.Replace(_SENTINEL, " "),
  ])


class CompressedTokenizer:
  """A surjective map raw token id -> canonical id, merging tokens whose text normalises equally.

  Built from a Hugging Face `tokenizers.Tokenizer` (or a path to its `tokenizer.json`) by decoding
  every token alone; tokens whose decode contains U+FFFD (partial UTF-8 bytes) are keyed by their raw
  token string so distinct byte pieces never merge.
  """

  def __init__(self, tokenizer: Union["tokenizers.Tokenizer", str, os.PathLike]):  # noqa: F821
    from tokenizers import Tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
      path = os.fspath(tokenizer)
      if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path!r} does not exist (expected a tokenizer.json)")
      try:
        tokenizer = Tokenizer.from_file(path)
      except Exception as e:  # tokenizers raises a bare Exception on malformed JSON.
        raise ValueError(f"tokenizer file {path!r} is not a valid tokenizer.json: {e}") from e
    if not hasattr(tokenizer, "decode") or not hasattr(tokenizer, "id_to_token"):
      raise TypeError(f"expected a tokenizers.Tokenizer or a tokenizer.json path, got {type(tokenizer).__name__}")
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    normalizer = _normalizer()
    key_to_new: Dict[str, int] = {}
    lookup = np.empty(self.vocab_size, dtype=np.int64)
    for tid in range(self.vocab_size):
      text = tokenizer.decode([tid], skip_special_tokens=False)
      if "\ufffd" in text:
        key = tokenizer.id_to_token(tid)
      else:
        key = normalizer.normalize_str(text) or text
      lookup[tid] = key_to_new.setdefault(key, len(key_to_new))
    self.lookup = lookup
    self.compressed_vocab_size = len(key_to_new)

  def __len__(self) -> int:
    return self.compressed_vocab_size

  def compress(self, ids) -> np.ndarray:
    """Raw ids (any shape, integer) -> compressed ids (int64); ids < 0 pass through unchanged."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
      raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.max() >= self.vocab_size:
      bad = int(arr.max())
      raise ValueError(f"token id {bad} is out of range: the tokenizer has {self.vocab_size} tokens (ids 0..{self.vocab_size - 1})")
    return np.where(arr >= 0, self.lookup[np.maximum(arr, 0)], arr)

  __call__ = compress


# ----------------------------------------------------------------------------------------------
# Hash parameters.


def layer_multipliers(seed: int, layer_id: int, max_ngram_size: int, compressed_vocab_size: int) -> np.ndarray:
  """The `max_ngram_size` odd int64 multipliers of one layer, drawn as the official demo does."""
  half_bound = max(1, (_INT64_MAX // compressed_vocab_size) // 2)
  rng = np.random.default_rng(int(seed + _LAYER_SEED_STRIDE * int(layer_id)))
  r = rng.integers(low=0, high=half_bound, size=(max_ngram_size,), dtype=np.int64)
  return r * 2 + 1


def head_table_sizes(cfg: EngramConfig) -> Dict[int, List[List[int]]]:
  """Prime table size of every head: per layer (in layer_ids order), per order, per head, the next
  prime above the previous one, starting from `vocab_size_per_ngram[n-2] - 1`, never reusing a prime
  taken by any head of any layer. With `rows_per_head` set (an ablation control) every head has
  exactly that many rows instead."""
  if cfg.rows_per_head is not None:
    return {layer_id: [[cfg.rows_per_head] * cfg.n_head_per_ngram for _ in range(cfg.num_orders)]
            for layer_id in cfg.layer_ids}
  seen = set()
  sizes: Dict[int, List[List[int]]] = {}
  for layer_id in cfg.layer_ids:
    per_order = []
    for order_index in range(cfg.num_orders):
      start = cfg.vocab_size_per_ngram[order_index] - 1
      heads = []
      for _ in range(cfg.n_head_per_ngram):
        p = int(sympy.nextprime(start))
        while p in seen:
          p = int(sympy.nextprime(p))
        seen.add(p)
        heads.append(p)
        start = p
      per_order.append(heads)
    sizes[layer_id] = per_order
  return sizes


# ----------------------------------------------------------------------------------------------
# int64 arithmetic on pairs of uint32 words (for the jnp backend).


def _split_u64(value: int):
  value &= (1 << 64) - 1
  return np.uint32(value >> 32), np.uint32(value & 0xFFFFFFFF)


def _mul32_wide(a, b):
  """uint32 x uint32 -> (hi, lo) uint32 words of the 64-bit product, via 16-bit limbs."""
  mask = jnp.uint32(0xFFFF)
  a0, a1 = a & mask, a >> 16
  b0, b1 = b & mask, b >> 16
  p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
  mid = (p00 >> 16) + (p01 & mask) + (p10 & mask)
  lo = (p00 & mask) | (mid << 16)
  hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
  return hi, lo


def _mul64(x_hi, x_lo, m_hi, m_lo):
  """(x * m) mod 2^64 on (hi, lo) uint32 words."""
  hi, lo = _mul32_wide(x_lo, m_lo)
  return hi + x_lo * m_hi + x_hi * m_lo, lo


def _bits(hi, lo, start: int, width: int):
  """Bits [start, start+width) of the 64-bit value (hi, lo), as uint32 (static start/width)."""
  mask = jnp.uint32((1 << width) - 1)
  if start >= 32:
    return (hi >> (start - 32)) & mask
  if start + width <= 32:
    return (lo >> start) & mask
  return ((lo >> start) | (hi << (32 - start))) & mask


def _signed_mod64(hi, lo, primes: np.ndarray):
  """Python-style `int64 % p` (result in [0, p)) of (hi, lo) words for each prime (last axis).

  The unsigned value is reduced by Horner's rule over chunks of `c` bits with `p * 2^c <= 2^32`, so
  every intermediate fits one uint32 word; a set sign bit then subtracts 2^64 mod p.
  """
  chunk = 32 - int(primes.max()).bit_length()  # p < 2^bits, so p * 2^chunk < 2^32
  p = jnp.asarray(primes, jnp.uint32)
  hi, lo = hi[..., None], lo[..., None]
  r = jnp.zeros(jnp.broadcast_shapes(hi.shape, p.shape), jnp.uint32)
  top = 64
  while top > 0:
    width = min(chunk, top)
    top -= width
    r = ((r << width) | _bits(hi, lo, top, width)) % p
  wrap = jnp.asarray(np.array([(1 << 64) % int(q) for q in primes]), jnp.uint32)
  negative = (hi >> 31) == 1
  r_neg = jnp.where(r >= wrap, r - wrap, r + p - wrap)
  return jnp.where(negative, r_neg, r)


# ----------------------------------------------------------------------------------------------
# The hasher.


class NgramHasher:
  """Per-layer, per-head hash ids of the suffix N-grams of compressed token ids.

  Output ids are local to each head's table ([0, p_head)); `memory.py` adds the heads' row offsets.
  """

  def __init__(self, cfg: EngramConfig, compressed_vocab_size: int, pad_id: int):
    if compressed_vocab_size < 1:
      raise ValueError(f"compressed_vocab_size={compressed_vocab_size}: expected a positive vocabulary size")
    if not 0 <= pad_id < compressed_vocab_size:
      raise ValueError(f"pad_id={pad_id}: expected a compressed id in [0, {compressed_vocab_size})")
    self.cfg = cfg
    self.compressed_vocab_size = int(compressed_vocab_size)
    self.pad_id = int(pad_id)
    self.head_sizes = head_table_sizes(cfg)
    self.multipliers = {
        layer_id: layer_multipliers(cfg.seed, layer_id, cfg.max_ngram_size, compressed_vocab_size)
        for layer_id in cfg.layer_ids
    }
    # Flat per-layer prime vectors in head order [order 2 heads..., order 3 heads..., ...].
    self.primes = {layer_id: np.array([p for order in sizes for p in order], dtype=np.int64)
                   for layer_id, sizes in self.head_sizes.items()}

  @classmethod
  def from_tokenizer(cls, cfg: EngramConfig, tokenizer: CompressedTokenizer) -> "NgramHasher":
    if cfg.pad_id >= tokenizer.vocab_size:
      raise ValueError(f"EngramConfig.pad_id={cfg.pad_id} is not a token of the tokenizer ({tokenizer.vocab_size} tokens)")
    return cls(cfg, tokenizer.compressed_vocab_size, int(tokenizer.lookup[cfg.pad_id]))

  @property
  def layer_ids(self) -> Sequence[int]:
    return self.cfg.layer_ids

  # -- numpy backend ----------------------------------------------------------------------------

  def _check_numpy_ids(self, ids) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
      raise TypeError(f"compressed token ids must be an integer array, got dtype {arr.dtype}")
    if arr.ndim < 1:
      raise ValueError(f"compressed token ids must have a sequence axis (rank >= 1), got shape {arr.shape}")
    if arr.size and arr.max() >= self.compressed_vocab_size:
      raise ValueError(f"compressed token id {int(arr.max())} is out of range: expected ids below the "
                       f"compressed vocabulary size {self.compressed_vocab_size}")
    return arr.astype(np.int64, copy=False)

  def hash_layer_numpy(self, compressed_ids, layer_id: int) -> np.ndarray:
    """int64 [..., T, heads] hash ids of one layer (the official per-layer output layout)."""
    x = self._check_numpy_ids(compressed_ids)
    out = np.empty(x.shape + (self.cfg.num_heads,), np.int64)
    self._hash_layer_numpy(x, layer_id, out)
    return out

  def _hash_layer_numpy(self, x: np.ndarray, layer_id: int, out: np.ndarray):
    """Writes one layer's ids into out [..., T, heads]: one mix per order, one broadcast remainder
    over that order's heads (written straight into `out`, whatever its integer dtype)."""
    cfg = self.cfg
    m = self.multipliers[layer_id]
    T = x.shape[-1]
    padded = np.concatenate(
        [np.full(x.shape[:-1] + (cfg.max_ngram_size - 1,), self.pad_id, np.int64), x], axis=-1)
    mix = x * m[0]
    for k in range(1, cfg.max_ngram_size):
      # Token t-k sits at padded index t + (max_n - 1) - k.
      start = cfg.max_ngram_size - 1 - k
      mix = mix ^ (padded[..., start:start + T] * m[k])
      heads = slice((k - 1) * cfg.n_head_per_ngram, k * cfg.n_head_per_ngram)
      np.remainder(mix[..., None], self.primes[layer_id][heads], out=out[..., heads], casting="unsafe")

  def hash_numpy(self, compressed_ids) -> np.ndarray:
    """int32 [..., T, num_layers, heads]: hash ids of every Engram layer (positions before index 0 of
    the last input axis hash as the pad id)."""
    x = self._check_numpy_ids(compressed_ids)
    out = np.empty(x.shape + (len(self.cfg.layer_ids), self.cfg.num_heads), np.int32)
    for i, layer_id in enumerate(self.cfg.layer_ids):
      self._hash_layer_numpy(x, layer_id, out[..., i, :])
    return out

  # -- jax.numpy backend ------------------------------------------------------------------------

  def hash_jnp(self, compressed_ids) -> jnp.ndarray:
    """int32 [..., T, num_layers, heads], bit-identical to `hash_numpy`; jittable, no x64 needed.

    No range check happens in-graph: an id >= the compressed vocabulary (or negative) is hashed
    exactly as the int64 numpy arithmetic would hash it, so the result is still a valid row of each
    head's table, but it is a meaningless row. Validate ids on the host where that matters.
    """
    x = jnp.asarray(compressed_ids)
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"compressed token ids must be integers, got dtype {x.dtype}")
    if x.ndim < 1:
      raise ValueError(f"compressed token ids must have a sequence axis (rank >= 1), got shape {x.shape}")
    for layer_id in self.cfg.layer_ids:
      if int(self.primes[layer_id].max()) >= 1 << 31:
        raise ValueError(f"layer {layer_id} has a head table of {int(self.primes[layer_id].max())} rows: the jnp "
                         "hashing backend supports tables below 2^31 rows")
    x = x.astype(jnp.int32)
    x_lo = x.astype(jnp.uint32)
    x_hi = jnp.where(x < 0, jnp.uint32(0xFFFFFFFF), jnp.uint32(0))  # sign extension to 64 bits
    n = self.cfg.max_ngram_size
    T = x.shape[-1]

    def shift(word, k, pad_word):
      pad = jnp.full(word.shape[:-1] + (k,), pad_word, jnp.uint32)
      return jnp.concatenate([pad, word[..., :T - k]], axis=-1) if k < T else jnp.broadcast_to(pad[..., :T], word.shape)

    shifted = [(x_hi, x_lo)] + [(shift(x_hi, k, np.uint32(0)), shift(x_lo, k, np.uint32(self.pad_id)))
                                for k in range(1, n)]
    per_layer = []
    for layer_id in self.cfg.layer_ids:
      words = [_split_u64(int(v)) for v in self.multipliers[layer_id]]
      mix_hi, mix_lo = _mul64(*shifted[0], *words[0])
      heads = []
      for k in range(1, n):
        p_hi, p_lo = _mul64(*shifted[k], *words[k])
        mix_hi, mix_lo = mix_hi ^ p_hi, mix_lo ^ p_lo
        order = k - 1
        primes = self.primes[layer_id][order * self.cfg.n_head_per_ngram:(order + 1) * self.cfg.n_head_per_ngram]
        heads.append(_signed_mod64(mix_hi, mix_lo, primes))
      per_layer.append(jnp.concatenate(heads, axis=-1))
    return jnp.stack(per_layer, axis=-2).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# The one object that turns raw token ids into hash ids.


class EngramHashing:
  """Raw token ids -> Engram hash ids: the compressed-id lookup, the N-gram hasher and the pad ids.

  Built once per (Engram config, tokenizer) (`data.engram_hashing` caches it) and shared by the data
  pipeline (numpy, on the host), the model runner (numpy, for custom rows) and decoding (jnp, in the
  step: `hash_jnp` compresses with `lookup_array()`, a device array, then hashes). Both backends give
  the same ids, so a decode step's ids equal what the pipeline gives for the whole sequence.
  """

  def __init__(self, cfg: EngramConfig, tokenizer):
    self.cfg = cfg
    self.compressed = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer(tokenizer)
    self.hasher = NgramHasher.from_tokenizer(cfg, self.compressed)
    self.pad_id = int(cfg.pad_id)  # raw id that positions before a sequence's start stand for
    self.compressed_pad_id = self.hasher.pad_id
    self.vocab_size = self.compressed.vocab_size

  @property
  def max_ngram_size(self) -> int:
    return self.cfg.max_ngram_size

  def compress(self, ids) -> np.ndarray:
    """Raw ids -> compressed ids (int64; range-checked)."""
    return self.compressed.compress(ids)

  def hash_numpy(self, ids) -> np.ndarray:
    """int32 [..., T, num_layers, heads] from raw ids [..., T] (positions before the start: the pad id)."""
    return self.hasher.hash_numpy(self.compress(ids))

  def lookup_array(self) -> jnp.ndarray:
    """The compressed-id lookup [raw vocab] as an int32 device array, to pass into a jitted step."""
    return jnp.asarray(self.compressed.lookup.astype(np.int32))

  def hash_jnp(self, ids, lookup=None) -> jnp.ndarray:
    """`hash_numpy` in-graph (bit-identical): raw ids [..., T] -> int32 [..., T, num_layers, heads].

    `lookup` is `lookup_array()` (pass it as an argument of a jitted function rather than letting it
    become a constant of every compiled program). Out-of-range raw ids are clamped, not checked:
    validate them on the host.
    """
    lookup = self.lookup_array() if lookup is None else lookup
    ids = jnp.clip(jnp.asarray(ids, jnp.int32), 0, lookup.shape[0] - 1)
    return self.hasher.hash_jnp(jnp.take(lookup, ids, axis=0))

  # -- decoding: the n-gram history ---------------------------------------------------------------
  #
  # A token's hash ids depend on itself and the max_n-1 tokens before it (compressed), so a decoder
  # keeps those per sequence: hashing the window [history, new token] and keeping its last position
  # gives exactly what `hash_numpy` gives that token in the whole sequence.

  def history_numpy(self, ids, lengths) -> np.ndarray:
    """int32 [B, max_n-1]: the compressed ids of each row's last max_n-1 tokens (raw ids [B, T],
    right-padded, row b's first lengths[b] real); positions before the start are the compressed pad id."""
    ids, lengths = np.asarray(ids), np.asarray(lengths)
    if ids.ndim != 2 or lengths.shape != ids.shape[:1]:
      raise ValueError(f"history_numpy: ids {ids.shape} and lengths {lengths.shape}: expected [B, T] and [B]")
    if lengths.size and (lengths.min() < 0 or lengths.max() > ids.shape[1]):
      raise ValueError(f"history_numpy: lengths {lengths.tolist()}: expected values in [0, {ids.shape[1]}]")
    compressed = self.compress(ids)
    width = self.max_ngram_size - 1
    index = lengths[:, None] - width + np.arange(width)[None, :]  # [B, max_n-1]
    taken = np.take_along_axis(compressed, np.maximum(index, 0), axis=1)
    return np.where(index >= 0, taken, self.compressed_pad_id).astype(np.int32)

  def next_ids(self, history, ids, lookup):
    """In-graph, one new raw token per row: (hash ids int32 [B, 1, num_layers, heads], the next
    history [B, max_n-1]) from the history [B, max_n-1] and raw ids [B]; `lookup` is `lookup_array()`."""
    ids = jnp.clip(jnp.asarray(ids, jnp.int32), 0, lookup.shape[0] - 1)
    window = jnp.concatenate([jnp.asarray(history, jnp.int32), jnp.take(lookup, ids, axis=0)[:, None]], axis=1)
    return self.hasher.hash_jnp(window)[:, -1:], window[:, 1:]
