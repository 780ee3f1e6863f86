"""Trigger rows: Engram rows keyed by an exact token sequence instead of a hash bucket.

A hashed row is shared: every n-gram that hashes to it (a template such as "was born in", or a
collision) reads it, so writing a fact into it changes other text. A trigger is a token sequence
(a suffix ending at a position) with the rows it supplies there, for every head of every Engram
table; a position whose suffix equals a trigger reads the trigger's rows, every other position
reads the base rows, selected with `where`, so the base tables are never written and text without a
trigger gives bitwise the base model's outputs. Matching is on raw token ids (not the compressed ids
the hash reads, which merge case and accents) and is exact: a fingerprint narrows the candidates,
token equality decides, so neither a hash collision nor a near-match (one token off, a prefix, a
shorter suffix) fires a trigger. When several triggers end at a position (one a suffix of the
other), the longest fires.

A trigger never reaches across a document boundary or before a sequence's start, and is at least as
long as the model's largest n-gram, so the rows it shadows are a function of its own tokens (an
untrained trigger, whose rows are the ones it shadows, is the base model bit for bit).

Where matching runs: on the host for every batch that is hashed on the host (`match`: evaluation,
scoring, prefill, patch training), and in-graph in the decode loop (`match_last`: the last
`width` tokens of each row against the padded [N, width] trigger table). Both give the same ids.
Everything here works on rows {table name: [B, T, H, d]}, so it is blind to the model family.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

PAD = -1  # left padding of a trigger in the [N, width] table; also "before the sequence" in a decode window
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: the fingerprint's polynomial base


@dataclasses.dataclass
class TriggerSet:
  """The triggers a model reads: tokens int32 [N, width] right-aligned (PAD on the left, each row
  distinct), rows {table name: [N, H, d]}."""

  tokens: np.ndarray
  rows: Dict[str, np.ndarray]

  def __post_init__(self):
    if self.tokens.ndim != 2:
      raise ValueError(f"trigger tokens of shape {self.tokens.shape}: expected [N, width]")
    n = self.tokens.shape[0]
    for name, r in self.rows.items():
      if r.ndim != 3 or r.shape[0] != n:
        raise ValueError(f"trigger rows of {name} have shape {r.shape}: expected [{n}, heads, head_dim]")

  @property
  def width(self) -> int:
    return int(self.tokens.shape[1])

  @property
  def lengths(self) -> np.ndarray:
    return (self.tokens != PAD).sum(axis=1)

  def __len__(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def lookup(self) -> dict:
    """`index(tokens)`, built on first use."""
    if getattr(self, "_lookup", None) is None:
      self._lookup = index(self.tokens)
    return self._lookup


def pack(sequences: Sequence[Sequence[int]], width: int = 0) -> np.ndarray:
  """int32 [N, max(width, longest)]: each sequence right-aligned, PAD on the left."""
  width = max([width] + [len(s) for s in sequences])
  out = np.full((len(sequences), width), PAD, np.int32)
  for i, s in enumerate(sequences):
    if len(s):
      out[i, width - len(s):] = np.asarray(s, np.int32)
  return out


def unpack(tokens: np.ndarray) -> List[Tuple[int, ...]]:
  """The token tuples of a packed table (PAD dropped)."""
  return [tuple(int(t) for t in row[row != PAD]) for row in tokens]


def _windows(tokens: np.ndarray, segment_ids: Optional[np.ndarray], max_length: int):
  """Yields (length, fingerprint uint64 [B, T] of the `length` tokens ending at each position, valid
  bool [B, T]: the window lies inside one document, after the sequence's start) for length = 1 ..
  max_length, one pass: a window's fingerprint extends the one a token shorter."""
  tokens = np.asarray(tokens, np.int64)
  B, T = tokens.shape
  seg = np.ones((B, T), np.int64) if segment_ids is None else np.asarray(segment_ids, np.int64)
  fp = np.zeros((B, T), np.uint64)
  valid = seg > 0
  with np.errstate(over="ignore"):
    for j in range(min(max_length, T)):  # fp = sum_j (tok[t-j] + 1) * MULT^(length-j), wrapping
      shifted = np.zeros((B, T), np.uint64)
      shifted[:, j:] = (tokens[:, :T - j] + 1).astype(np.uint64)
      fp = (fp + shifted) * _MULT
      if j:
        same = np.zeros((B, T), bool)
        same[:, j:] = seg[:, :T - j] == seg[:, j:]
        valid = valid & same
      yield j + 1, fp, valid


def _windows_fingerprint(tokens: np.ndarray, segment_ids: Optional[np.ndarray], length: int):
  """(fingerprint, valid) of the windows of one length (`_windows`)."""
  B, T = np.shape(tokens)
  if length > T:
    return np.zeros((B, T), np.uint64), np.zeros((B, T), bool)
  for n, fp, valid in _windows(tokens, segment_ids, length):
    if n == length:
      return fp, valid


def fingerprints(sequences: np.ndarray) -> np.ndarray:
  """uint64 [N] fingerprints of token rows [N, L] (no PAD), equal to `_windows_fingerprint`'s."""
  if not len(sequences):
    return np.zeros(0, np.uint64)
  return _windows_fingerprint(np.asarray(sequences), None, sequences.shape[1])[0][:, -1]


def index(triggers: np.ndarray) -> Dict[int, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """{length: (sorted fingerprints, trigger ids, their tokens [K, length])} of a packed table: what
  `match` looks windows up in (built once per trigger set)."""
  lengths = (triggers != PAD).sum(axis=1)
  out = {}
  for length in sorted(set(lengths.tolist())):
    which = np.flatnonzero(lengths == length)
    body = triggers[which][:, triggers.shape[1] - length:]
    fp = fingerprints(body)
    order = np.argsort(fp, kind="stable")
    out[length] = (fp[order], which[order], body[order])
  return out


def match(tokens: np.ndarray, segment_ids: Optional[np.ndarray], triggers: np.ndarray,
          lookup: Optional[dict] = None) -> np.ndarray:
  """Host: the trigger each position's suffix equals (int32 [B, T], -1: none; the longest when
  several do), for token ids [B, T] (`segment_ids` [B, T]: 0 marks padding, a change a document
  boundary; None: one document per row). `triggers`: a packed table [N, width]; `lookup`: its
  `index` (built here when not given)."""
  tokens = np.asarray(tokens)
  out = np.full(tokens.shape, -1, np.int32)
  if not len(triggers):
    return out
  lookup = index(triggers) if lookup is None else lookup
  windows = {n: (fp.copy(), valid) for n, fp, valid in _windows(tokens, segment_ids, max(lookup)) if n in lookup}
  for length in sorted(windows, reverse=True):  # longest first: it wins
    fp_sorted, which, body = lookup[length]
    wfp, valid = windows[length]
    valid = valid & (out < 0)
    b, t = np.nonzero(valid)
    if not len(b):
      continue
    lo = np.searchsorted(fp_sorted, wfp[b, t], side="left")
    hi = np.searchsorted(fp_sorted, wfp[b, t], side="right")
    # Token equality decides; a fingerprint shared by several triggers is walked candidate by candidate.
    window = np.stack([tokens[b, t - length + 1 + j] for j in range(length)], axis=1)  # [K, length]
    for k in range(int((hi - lo).max(initial=0))):
      cand = lo + k
      live = cand < hi
      if not live.any():
        break
      c = np.where(live, cand, 0)
      equal = live & np.all(body[c] == window, axis=1)
      out[b[equal], t[equal]] = which[c[equal]]
  return out


def match_last(window: jax.Array, triggers: jax.Array) -> jax.Array:
  """In-graph: the trigger each row's last `width` tokens end with (int32 [B], -1: none; the longest
  when several do). `window` int32 [B, width]: the row's tokens up to the current one, PAD before
  its start; `triggers` int32 [N, width] packed. B x N x width comparisons, token equality only."""
  if triggers.shape[0] == 0:
    return jnp.full(window.shape[:1], -1, jnp.int32)
  same = (triggers[None] == window[:, None]) | (triggers[None] == PAD)  # [B, N, width]
  hit = jnp.all(same, axis=-1)
  lengths = jnp.sum(triggers != PAD, axis=-1)  # [N]
  score = jnp.where(hit, lengths[None], 0)
  return jnp.where(jnp.max(score, axis=-1) > 0, jnp.argmax(score, axis=-1), -1).astype(jnp.int32)


def push(window: jax.Array, tokens: jax.Array) -> jax.Array:
  """The decode window after each row's new token: [B, width] shifted left by one."""
  if window.shape[1] == 0:
    return window
  return jnp.concatenate([window[:, 1:], tokens[:, None].astype(window.dtype)], axis=1)


def window_numpy(tokens: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
  """Host: each row's last `width` tokens (int32 [B, width], PAD before its start), of a right-padded
  prompt batch [B, T] with per-row lengths: the decode loop's window after prefill."""
  B = tokens.shape[0]
  out = np.full((B, width), PAD, np.int32)
  for i in range(B):
    n = int(lengths[i])
    take = min(width, n)
    if take:
      out[i, width - take:] = tokens[i, n - take:n]
  return out


def select(rows: Dict[str, jax.Array], trigger_ids: jax.Array, trigger_rows: Dict[str, jax.Array]):
  """rows {name: [B, T, H, d]} with each triggered position's rows replaced by its trigger's
  (`trigger_ids` [B, T], -1: none; `trigger_rows` {name: [N, H, d]}); the other positions keep the
  base rows exactly (a select, never arithmetic)."""
  out = dict(rows)
  fired = (trigger_ids >= 0)[..., None, None]
  safe = jnp.maximum(trigger_ids, 0)
  for name, table in trigger_rows.items():
    base = rows[name]
    out[name] = jnp.where(fired, jnp.take(table.astype(base.dtype), safe, axis=0), base)
  return out


# ------------------------------------------------------------------------------------------------
# Choosing triggers.


class Traffic:
  """The token windows ordinary text contains, by length (fingerprints, sorted): a trigger must be
  none of them. A fingerprint collision can only make a window look seen, so the chosen trigger is
  at worst longer than needed, never one that ordinary text contains."""

  def __init__(self, batches: Sequence[Dict[str, np.ndarray]], max_length: int):
    self.max_length = max_length
    parts: Dict[int, List[np.ndarray]] = {n: [] for n in range(1, max_length + 1)}
    for b in batches:
      for length, fp, valid in _windows(b["tokens"], b["segment_ids"], max_length):
        parts[length].append(fp[valid])
    self.seen = {n: np.unique(np.concatenate(p)) if p else np.zeros(0, np.uint64) for n, p in parts.items()}

  def contains(self, length: int, fp: np.ndarray) -> np.ndarray:
    seen = self.seen[length]
    if not len(seen):
      return np.zeros(fp.shape, bool)
    at = np.clip(np.searchsorted(seen, fp), 0, len(seen) - 1)
    return seen[at] == fp


def choose(batches: Sequence[Dict[str, np.ndarray]], traffic: Traffic, min_length: int) -> Tuple[np.ndarray, dict]:
  """(packed trigger table, stats): for each position whose prediction the batches train (loss_mask
  > 0, or every real token without one), the shortest suffix of at least `min_length` tokens, inside
  its document, that the traffic never contains; positions with no such suffix up to
  `traffic.max_length` tokens get none. Identical suffixes are one trigger."""
  found: Dict[Tuple[int, ...], None] = {}
  wanted = uncovered = 0
  for b in batches:
    mask = (np.asarray(b["segment_ids"]) > 0)
    if "loss_mask" in b:
      mask &= np.asarray(b["loss_mask"]) > 0
    todo = mask.copy()
    wanted += int(mask.sum())
    tokens = np.asarray(b["tokens"])
    for length, fp, valid in _windows(tokens, b["segment_ids"], traffic.max_length):
      if length < min_length:
        continue
      hit = todo & valid & ~traffic.contains(length, fp)
      for r, t in zip(*np.nonzero(hit)):
        found.setdefault(tuple(int(x) for x in tokens[r, t - length + 1:t + 1]), None)
      todo &= ~hit
      if not todo.any():
        break
    uncovered += int(todo.sum())
  seqs = list(found)
  table = pack(seqs)
  lengths = np.array([len(s) for s in seqs], np.int64)
  stats = {"positions": wanted, "positions_without_trigger": uncovered, "triggers": len(seqs),
           "length_histogram": {int(k): int(v) for k, v in zip(*np.unique(lengths, return_counts=True))}}
  return table, stats
