"""Tokenizer compression and multiplicative-XOR N-gram hashing (numpy and jax.numpy backends).

One mechanism, several recipes. The mechanism: suffix N-grams of token ids, positions before the
start read a pad id, `mix = (x_t*m_0) ^ (x_{t-1}*m_1) ^ ...` in wrapping int64, then Python-style
`mix % p` per head, and optionally a reset token after which older look-backs read the pad id. A
recipe (`HashRecipe`) is the data that fills it in: which ids are hashed (compressed or raw), the
multipliers, the prime head sizes, the pad and reset ids, and the table padding. Two recipes exist:
the official demo's (`demo_recipe`: compressed ids, numpy-Generator multipliers, no reset) and
Qwen4Exp's per-layer embedding (`ple_recipe`: raw ids, splitmix64 multipliers, consecutive primes,
EOS as pad and reset). Recipes are data rather than subclasses or a family switch, so both backends,
the decode history and the fingerprints treat every recipe alike.

The numpy backend feeds the data pipeline (hashing on the host, ahead of the step, is the
deterministic prefetch the paper relies on). The jnp backend is for in-graph use (generation); it
emulates int64 with pairs of uint32 words instead of enabling `jax_enable_x64`, because x64 is a
process-wide switch that would double every float in the model and TPUs have no native 64-bit
integer multiply.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

import jax.numpy as jnp
import numpy as np
import sympy

from engram_jax.config import EngramConfig

_INT64_MAX = np.iinfo(np.int64).max
_LAYER_SEED_STRIDE = 10007
_SENTINEL = "\ue000"
_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15


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


class RawIds:
  """The identity map standing where a `CompressedTokenizer` stands, for recipes that hash raw ids
  (no compression): the same `lookup` / `compress` surface, so the hashing object, the decode
  history and the fingerprints need no second path."""

  def __init__(self, vocab_size: int):
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
      raise ValueError(f"vocab_size={vocab_size!r}: expected a positive integer")
    self.vocab_size = int(vocab_size)
    self.compressed_vocab_size = int(vocab_size)
    self.lookup = np.arange(vocab_size, dtype=np.int64)

  def __len__(self) -> int:
    return self.vocab_size

  def compress(self, ids) -> np.ndarray:
    """Raw ids -> the same ids (int64), range-checked."""
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
      raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.max() >= self.vocab_size or arr.min() < 0):
      bad = int(arr.max()) if arr.max() >= self.vocab_size else int(arr.min())
      raise ValueError(f"token id {bad} is out of range: the vocabulary has {self.vocab_size} tokens "
                       f"(ids 0..{self.vocab_size - 1})")
    return arr

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


def splitmix64(value: int) -> int:
  """One splitmix64 output (Steele, Lea and Flood 2014) for a 64-bit state, in Python ints."""
  mask = (1 << 64) - 1
  value = (value + _SPLITMIX_GAMMA) & mask
  value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & mask
  value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & mask
  return value ^ (value >> 31)


def splitmix64_multipliers(seed: int, index: int, max_ngram_size: int, vocab_size: int) -> np.ndarray:
  """The `max_ngram_size` odd int64 multipliers of Qwen4Exp's PLE layer number `index` (its place in
  `ple_layer_ids`, not its decoder layer): multiplier i is 2 * (splitmix64(base + gamma*(i+1)) mod
  half_bound) + 1 with base = seed + 10007 * index, and the bound taken over the raw vocabulary."""
  half_bound = max(1, (_INT64_MAX // max(int(vocab_size), 1)) // 2)
  base = int(seed) + _LAYER_SEED_STRIDE * int(index)
  out = [2 * (splitmix64((base + _SPLITMIX_GAMMA * (i + 1)) & ((1 << 64) - 1)) % half_bound) + 1
         for i in range(max_ngram_size)]
  return np.array(out, dtype=np.int64)


def consecutive_primes(start: int, count: int, skip: int = 0) -> List[int]:
  """`count` consecutive primes above `start - 1`, after skipping the first `skip` of them."""
  out, p = [], int(start) - 1
  for _ in range(skip + count):
    p = int(sympy.nextprime(p))
    out.append(p)
  return out[skip:]


# ----------------------------------------------------------------------------------------------
# Recipes: the data that makes the one hasher a dialect.


@dataclasses.dataclass(frozen=True, eq=False)
class HashRecipe:
  """Everything that gives a hash id its meaning, per Engram layer (keyed by decoder layer id).

  Built by `demo_recipe` or `ple_recipe`; `NgramHasher` runs any recipe with the same code. A recipe
  whose `name` is not the demo's adds `fingerprint_fields()` to table and patch fingerprints, so rows
  of one dialect are never read as rows of another (the demo's fields are empty: its fingerprints
  predate recipes and saved patches and tables must keep loading).
  """

  # Short stable name; part of every non-demo fingerprint.
  name: str
  # Orders, heads per order and layer ids (the table layout and the model read the same config).
  cfg: EngramConfig
  # Ids the hash takes lie in [0, vocab_size): the compressed vocabulary, or the raw one.
  vocab_size: int
  # Id (in the hashed id space) that positions before the start, and reset look-backs, read.
  pad_id: int
  # Id after which older look-backs read `pad_id` (n-grams restart after it); None: never.
  reset_id: Optional[int]
  # {layer id: int64 [max_ngram_size] odd multipliers}.
  multipliers: Mapping[int, np.ndarray]
  # {layer id: [order][head] prime table sizes}.
  head_sizes: Mapping[int, List[List[int]]]
  # Rows of a layer's table are padded to a multiple of this in the dialect's own checkpoints.
  table_pad_multiple: int
  # What the hashed ids are called in errors ("compressed token id" or "token id").
  id_name: str = "compressed token id"

  def rows(self, layer_id: int) -> int:
    """Rows of the layer's table as the dialect stores it: the primes' sum, padded."""
    total = sum(p for order in self.head_sizes[layer_id] for p in order)
    return -(-total // self.table_pad_multiple) * self.table_pad_multiple

  def fingerprint_fields(self) -> Dict[str, object]:
    if self.name == DEMO_RECIPE:
      return {}
    return {"recipe": self.name, "reset_id": self.reset_id, "table_pad_multiple": self.table_pad_multiple,
            "hashed_vocab_size": self.vocab_size}


DEMO_RECIPE = "engram_demo_v1"
PLE_RECIPE = "qwen4exp_ple"


def demo_recipe(cfg: EngramConfig, compressed_vocab_size: int, pad_id: int) -> HashRecipe:
  """The official demo's dialect: compressed ids, Generator-drawn multipliers per decoder layer id,
  primes searched per order (restarting at each order's size, never reusing one), no reset."""
  if compressed_vocab_size < 1:
    raise ValueError(f"compressed_vocab_size={compressed_vocab_size}: expected a positive vocabulary size")
  if not 0 <= pad_id < compressed_vocab_size:
    raise ValueError(f"pad_id={pad_id}: expected a compressed id in [0, {compressed_vocab_size})")
  return HashRecipe(
      name=DEMO_RECIPE, cfg=cfg, vocab_size=int(compressed_vocab_size), pad_id=int(pad_id), reset_id=None,
      multipliers={l: layer_multipliers(cfg.seed, l, cfg.max_ngram_size, compressed_vocab_size)
                   for l in cfg.layer_ids},
      head_sizes=head_table_sizes(cfg), table_pad_multiple=1)


def ple_recipe(cfg: EngramConfig, vocab_size: int, table_pad_multiple: int = 128) -> HashRecipe:
  """Qwen4Exp's per-layer-embedding dialect: raw token ids below `vocab_size`, EOS (`cfg.pad_id`)
  fills the history and resets n-grams after every EOS, splitmix64 multipliers seeded by the layer's
  index i in `cfg.layer_ids` (seed + 10007 i), and the heads of layer i (order-major, head-minor) are
  the primes number 16i+1..16i+16 (for 16 heads) from `vocab_size_per_ngram[0]`: one run of
  consecutive primes, not restarted per order."""
  sizes = set(cfg.vocab_size_per_ngram)
  if len(sizes) != 1:
    raise ValueError(f"EngramConfig.vocab_size_per_ngram={cfg.vocab_size_per_ngram}: the PLE recipe takes one "
                     "base (ngram_vocab_size_base) for every order")
  if cfg.rows_per_head is not None:
    raise ValueError(f"EngramConfig.rows_per_head={cfg.rows_per_head}: the PLE recipe has prime-sized heads only")
  if not 0 <= cfg.pad_id < vocab_size:
    raise ValueError(f"EngramConfig.pad_id={cfg.pad_id} (the EOS id): expected a raw id in [0, {vocab_size})")
  if not isinstance(table_pad_multiple, int) or table_pad_multiple < 1:
    raise ValueError(f"table_pad_multiple={table_pad_multiple!r}: expected a positive integer")
  (base,) = sizes
  multipliers, head_sizes = {}, {}
  for index, layer in enumerate(cfg.layer_ids):
    multipliers[layer] = splitmix64_multipliers(cfg.seed, index, cfg.max_ngram_size, vocab_size)
    primes = consecutive_primes(base, cfg.num_heads, skip=index * cfg.num_heads)
    head_sizes[layer] = [primes[o * cfg.n_head_per_ngram:(o + 1) * cfg.n_head_per_ngram]
                         for o in range(cfg.num_orders)]
  return HashRecipe(name=PLE_RECIPE, cfg=cfg, vocab_size=int(vocab_size), pad_id=int(cfg.pad_id),
                    reset_id=int(cfg.pad_id), multipliers=multipliers, head_sizes=head_sizes,
                    table_pad_multiple=table_pad_multiple, id_name="token id")


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
  """Per-layer, per-head hash ids of the suffix N-grams of token ids, for one `HashRecipe`.

  Output ids are local to each head's table ([0, p_head)); `memory.py` adds the heads' row offsets.
  `NgramHasher(cfg, compressed_vocab_size, pad_id)` is the demo recipe (what every caller before
  recipes built); `NgramHasher.from_recipe` runs any recipe.
  """

  def __init__(self, cfg: EngramConfig, compressed_vocab_size: int, pad_id: int):
    self._use(demo_recipe(cfg, compressed_vocab_size, pad_id))

  @classmethod
  def from_recipe(cls, recipe: HashRecipe) -> "NgramHasher":
    hasher = cls.__new__(cls)
    hasher._use(recipe)
    return hasher

  def _use(self, recipe: HashRecipe):
    self.recipe = recipe
    self.cfg = recipe.cfg
    self.compressed_vocab_size = recipe.vocab_size  # the size of the hashed id space, whatever its ids
    self.pad_id = recipe.pad_id
    self.reset_id = recipe.reset_id
    self.head_sizes = recipe.head_sizes
    self.multipliers = recipe.multipliers
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
    name = self.recipe.id_name
    if arr.dtype.kind not in "iu":
      raise TypeError(f"{name}s must be an integer array, got dtype {arr.dtype}")
    if arr.ndim < 1:
      raise ValueError(f"{name}s must have a sequence axis (rank >= 1), got shape {arr.shape}")
    if arr.size and arr.max() >= self.compressed_vocab_size:
      space = name.replace("token id", "vocabulary")  # "compressed vocabulary" or "vocabulary"
      raise ValueError(f"{name} {int(arr.max())} is out of range: expected ids below the {space} size "
                       f"{self.compressed_vocab_size}")
    return arr.astype(np.int64, copy=False)

  def hash_layer_numpy(self, compressed_ids, layer_id: int) -> np.ndarray:
    """int64 [..., T, heads] hash ids of one layer (the official per-layer output layout)."""
    x = self._check_numpy_ids(compressed_ids)
    out = np.empty(x.shape + (self.cfg.num_heads,), np.int64)
    self._hash_layer_numpy(self._lookbacks_numpy(x), layer_id, out)
    return out

  def _lookbacks_numpy(self, x: np.ndarray) -> List[np.ndarray]:
    """[x_t, x_{t-1}, ..., x_{t-max_n+1}] as arrays like x: the pad id before the start, and with a
    reset id, the pad id for every look-back at or beyond a reset token strictly before t (a latch:
    once an older look-back is cut, all older ones are)."""
    n, T = self.cfg.max_ngram_size, x.shape[-1]
    padded = np.concatenate([np.full(x.shape[:-1] + (n - 1,), self.pad_id, np.int64), x], axis=-1)
    # Token t-k sits at padded index t + (n - 1) - k.
    back = [padded[..., n - 1 - k:n - 1 - k + T] for k in range(n)]
    if self.reset_id is None:
      return back
    cut = np.zeros(x.shape, bool)  # look-back 1 is never cut: a token's own left neighbour stays
    for k in range(2, n):
      cut = cut | (back[k - 1] == self.reset_id)
      back[k] = np.where(cut, self.pad_id, back[k])
    return back

  def _hash_layer_numpy(self, back: List[np.ndarray], layer_id: int, out: np.ndarray):
    """Writes one layer's ids into out [..., T, heads]: one mix per order, one broadcast remainder
    over that order's heads (written straight into `out`, whatever its integer dtype)."""
    cfg = self.cfg
    m = self.multipliers[layer_id]
    mix = back[0] * m[0]
    for k in range(1, cfg.max_ngram_size):
      mix = mix ^ (back[k] * m[k])
      heads = slice((k - 1) * cfg.n_head_per_ngram, k * cfg.n_head_per_ngram)
      np.remainder(mix[..., None], self.primes[layer_id][heads], out=out[..., heads], casting="unsafe")

  def hash_numpy(self, compressed_ids) -> np.ndarray:
    """int32 [..., T, num_layers, heads]: hash ids of every Engram layer (positions before index 0 of
    the last input axis hash as the pad id)."""
    x = self._check_numpy_ids(compressed_ids)
    back = self._lookbacks_numpy(x)
    out = np.empty(x.shape + (len(self.cfg.layer_ids), self.cfg.num_heads), np.int32)
    for i, layer_id in enumerate(self.cfg.layer_ids):
      self._hash_layer_numpy(back, layer_id, out[..., i, :])
    return out

  # -- jax.numpy backend ------------------------------------------------------------------------

  def hash_jnp(self, compressed_ids) -> jnp.ndarray:
    """int32 [..., T, num_layers, heads], bit-identical to `hash_numpy`; jittable, no x64 needed.

    No range check happens in-graph: an id >= the hashed vocabulary (or negative) is hashed
    exactly as the int64 numpy arithmetic would hash it, so the result is still a valid row of each
    head's table, but it is a meaningless row. Validate ids on the host where that matters.
    """
    x = jnp.asarray(compressed_ids)
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"{self.recipe.id_name}s must be integers, got dtype {x.dtype}")
    if x.ndim < 1:
      raise ValueError(f"{self.recipe.id_name}s must have a sequence axis (rank >= 1), got shape {x.shape}")
    for layer_id in self.cfg.layer_ids:
      if int(self.primes[layer_id].max()) >= 1 << 31:
        raise ValueError(f"layer {layer_id} has a head table of {int(self.primes[layer_id].max())} rows: the jnp "
                         "hashing backend supports tables below 2^31 rows")
    x = x.astype(jnp.int32)
    n = self.cfg.max_ngram_size
    T = x.shape[-1]

    def shift(k):
      pad = jnp.full(x.shape[:-1] + (k,), self.pad_id, jnp.int32)
      return jnp.concatenate([pad, x[..., :T - k]], axis=-1) if k < T else jnp.broadcast_to(pad[..., :T], x.shape)

    back = [x] + [shift(k) for k in range(1, n)]
    if self.reset_id is not None:  # the latch of `_lookbacks_numpy`
      cut = jnp.zeros(x.shape, bool)
      for k in range(2, n):
        cut = cut | (back[k - 1] == self.reset_id)
        back[k] = jnp.where(cut, jnp.int32(self.pad_id), back[k])
    # int32 -> (hi, lo) uint32 words of the sign-extended int64.
    words = [(jnp.where(b < 0, jnp.uint32(0xFFFFFFFF), jnp.uint32(0)), b.astype(jnp.uint32)) for b in back]
    per_layer = []
    for layer_id in self.cfg.layer_ids:
      m_words = [_split_u64(int(v)) for v in self.multipliers[layer_id]]
      mix_hi, mix_lo = _mul64(*words[0], *m_words[0])
      heads = []
      for k in range(1, n):
        p_hi, p_lo = _mul64(*words[k], *m_words[k])
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

  Built once per (Engram config, tokenizer) (`data.engram_hashing` caches it), or from a raw-id
  recipe (`from_recipe`: the lookup is the identity), and shared by the data
  pipeline (numpy, on the host), the model runner (numpy, for custom rows) and decoding (jnp, in the
  step: `hash_jnp` compresses with `lookup_array()`, a device array, then hashes). Both backends give
  the same ids, so a decode step's ids equal what the pipeline gives for the whole sequence.
  """

  def __init__(self, cfg: EngramConfig, tokenizer):
    compressed = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer(tokenizer)
    self._use(cfg, compressed, NgramHasher.from_tokenizer(cfg, compressed))

  @classmethod
  def from_recipe(cls, recipe: HashRecipe) -> "EngramHashing":
    """A recipe over raw ids (`RawIds`: no tokenizer needed), e.g. `ple_recipe`'s."""
    hashing = cls.__new__(cls)
    hashing._use(recipe.cfg, RawIds(recipe.vocab_size), NgramHasher.from_recipe(recipe))
    return hashing

  def _use(self, cfg: EngramConfig, compressed, hasher: NgramHasher):
    self.cfg = cfg
    self.compressed = compressed
    self.hasher = hasher
    self.recipe = hasher.recipe
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
