"""Grain input pipelines: documents -> tokens -> packed rows with Engram hash ids -> batches.

Design choices, and the alternatives rejected:
- The corpus is tokenised once, up front (the tokenizer's Rust batch encoder, all cores), into one
  flat int32 array with per-document offsets. Packing then becomes arithmetic on document lengths:
  row r of an epoch is stream tokens [r*T, (r+1)*T) of that epoch's document order, so every row is
  random-access. That makes the whole pipeline a grain `MapDataset` up to batching: the iterator
  state is one index (exact, tiny checkpoints), per-process sharding is an index map, and the batches
  do not depend on the number of worker processes or hosts. Streaming packers (grain's
  ConcatThenSplit / FirstFit iter datasets) keep packing state per worker, so their output changes
  with `num_workers` and their state grows with buffers. The price: the tokenised corpus must fit in
  host memory (4 bytes per token), which holds for every corpus this project trains on.
- A document longer than T continues in the next row of the stream; the token at a row's end keeps
  its true next-token target (we have random access to it), so no prediction is lost to packing.
  Positions restart at 0 at every segment of a row (a continued document too): attention never sees
  the previous row, and restarting keeps positions below T.
- Engram hash ids are computed here, on the host, from each token's own document only: an n-gram
  never reaches into the previous document (positions before a document's start hash as the pad
  id), but it does reach into the previous row when the document continues, so a token's hash ids
  equal those of hashing its document alone, whatever the packing. Each row is hashed as one
  sequence, and only the first max_n-1 positions of each later document are re-hashed from explicit
  windows, rather than one hashing call per document segment.
- Worker processes (`num_workers`) assemble and hash batches; they only slice arrays and run numpy.

Text file format: documents separated by a line that holds only a form feed (U+000C), as in the
embedded corpus (`engram_jax/corpus/README.md`); or one document per line (`text_split="line"`).
Documents that are empty after stripping whitespace are not documents and are skipped.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import queue
import re
import threading
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import grain
import numpy as np

from engram_jax.config import DataConfig, EngramConfig

FORMATS = ("text", "jsonl", "parquet", "arrayrecord")
_EXTENSION_FORMATS = {
    ".txt": "text", ".text": "text", ".jsonl": "jsonl", ".parquet": "parquet",
    ".arrayrecord": "arrayrecord", ".array_record": "arrayrecord",
}
_FORMFEED_SEPARATOR = re.compile(r"(?:^|\n)\f[ \t]*(?:\n|$)")
_CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
# Length of an endless stream: a huge multiple of every batch size, still a valid index.
_ENDLESS = 1 << 60

# ----------------------------------------------------------------------------------------------
# The embedded corpus.


def default_corpus_paths() -> Tuple[str, str]:
  """(train, held-out) text files of the embedded corpus (Python documentation, PSF licence)."""
  return os.path.join(_CORPUS_DIR, "train.txt"), os.path.join(_CORPUS_DIR, "heldout.txt")


def default_tokenizer_path() -> str:
  """tokenizer.json of the embedded byte-level BPE (8192 tokens; <pad>=0, <bos>=1, <eos>=2)."""
  return os.path.join(_CORPUS_DIR, "tokenizer.json")


def load_tokenizer(path: Optional[str] = None):
  """A `tokenizers.Tokenizer` from a tokenizer.json path (None = the embedded one)."""
  from tokenizers import Tokenizer

  path = default_tokenizer_path() if path is None else os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer file {path!r} does not exist (expected a tokenizers tokenizer.json; "
                            "DataConfig.tokenizer_path=None uses the embedded one)")
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception on malformed JSON.
    raise ValueError(f"tokenizer file {path!r} is not a valid tokenizer.json: {e}") from e


def split_files(cfg: DataConfig, split: str) -> Tuple[str, ...]:
  """The files of a split ("train" or "eval"); None in the config means the embedded corpus."""
  train, heldout = default_corpus_paths()
  if split == "train":
    return cfg.train_files if cfg.train_files is not None else (train,)
  if split == "eval":
    if cfg.eval_files is not None:
      return cfg.eval_files
    if cfg.train_files is None:
      return (heldout,)
    raise ValueError("DataConfig.eval_files=None with custom train_files: there is no eval split "
                     "(set eval_files; only the embedded train split has an embedded held-out split)")
  raise ValueError(f"split={split!r}: expected 'train' or 'eval'")


# ----------------------------------------------------------------------------------------------
# Reading documents.


def detect_format(path: str, fmt: str = "auto") -> str:
  if fmt != "auto":
    if fmt not in FORMATS:
      raise ValueError(f"format={fmt!r}: expected 'auto' or one of {FORMATS}")
    return fmt
  ext = os.path.splitext(path)[1].lower()
  if ext not in _EXTENSION_FORMATS:
    raise ValueError(f"cannot tell the format of {path!r} from its extension {ext!r}: expected one of "
                     f"{sorted(_EXTENSION_FORMATS)} or an explicit DataConfig.format in {FORMATS}")
  return _EXTENSION_FORMATS[ext]


def _split_text(text: str, text_split: str) -> List[str]:
  if text_split == "formfeed":
    return _FORMFEED_SEPARATOR.split(text)
  if text_split == "line":
    return text.split("\n")
  raise ValueError(f"text_split={text_split!r}: expected 'formfeed' or 'line'")


def _text_of(value, where: str, text_field: str) -> str:
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {text_field!r} is {type(value).__name__}, expected a string")
  return value


def _not_utf8(path: str, line: int, raw: bytes, e: UnicodeDecodeError, offset: int = 0) -> ValueError:
  return ValueError(f"{path}:{line}: not UTF-8 text (byte {offset + e.start} of the file is "
                    f"{raw[e.start:e.start + 1]!r}: {e.reason}); convert the file to UTF-8, e.g. with "
                    "`iconv -f latin1 -t utf-8`")


def _read_utf8(path: str) -> str:
  """A text file's content with universal newlines (as `open(path, encoding="utf-8").read()`), but
  bytes that are not UTF-8 are a ValueError naming the file, line and byte offset rather than a
  UnicodeDecodeError that names neither."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _not_utf8(path, raw.count(b"\n", 0, e.start) + 1, raw, e) from None
  return text.replace("\r\n", "\n").replace("\r", "\n")


def read_jsonl(path: str):
  """(line number, record) for each non-blank line of a JSONL file; a malformed line (or bytes that
  are not UTF-8) is a ValueError naming the file and line."""
  offset = 0
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise _not_utf8(path, lineno, raw, e, offset) from None
      offset += len(raw)
      if not line.strip():
        continue
      try:
        yield lineno, json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not a JSON record ({e})") from e


def document_rows(rows: Sequence[Sequence[int]], length: int, pad_id: int, hashing=None) -> Dict[str, np.ndarray]:
  """A batch [len(rows), length] of single-document rows, right-padded with `pad_id`: tokens,
  targets (the next token), segment_ids (1 on a row's tokens; an empty row is all padding),
  positions, and with `hashing` the Engram hash ids of the tokens."""
  R = len(rows)
  tokens = np.full((R, length), pad_id, np.int32)
  targets = np.full((R, length), pad_id, np.int32)
  segment_ids = np.zeros((R, length), np.int32)
  positions = np.zeros((R, length), np.int32)
  for i, row in enumerate(rows):
    row = np.asarray(row, np.int32)
    n = len(row)
    if n > length:
      raise ValueError(f"row {i} has {n} tokens: expected at most {length}")
    tokens[i, :n] = row
    targets[i, :max(n - 1, 0)] = row[1:]
    segment_ids[i, :n] = 1
    positions[i, :n] = np.arange(n)
  batch = {"tokens": tokens, "targets": targets, "segment_ids": segment_ids, "positions": positions}
  if hashing is not None:
    # Padding after a row's end hashes as pad tokens; suffix n-grams never reach back into it.
    batch["engram_ids"] = hashing.hash_numpy(tokens)
  return batch


def read_records(path: str, valid: Callable[[object], bool], expected: str, what: str, error=ValueError) -> list:
  """The records of a JSONL file, each checked by `valid`: a missing file, a record that fails the
  check (naming the file, line and `expected`) or a file with none is an `error`."""
  if not os.path.isfile(path):
    raise error(f"{what} file {path!r} does not exist (expected JSONL records {expected})")
  records = []
  for lineno, record in read_jsonl(path):
    if not valid(record):
      raise error(f"{path}:{lineno}: expected {expected}, got {json.dumps(record)[:200]}")
    records.append(record)
  if not records:
    raise error(f"{what} file {path!r} holds no record")
  return records


def _read_file(path: str, fmt: str, text_field: str, text_split: str) -> List[str]:
  if fmt == "text":
    return _split_text(_read_utf8(path), text_split)
  if fmt == "jsonl":
    docs = []
    for lineno, record in read_jsonl(path):
      if not isinstance(record, dict) or text_field not in record:
        raise ValueError(f"{path}:{lineno}: expected a JSON object with a {text_field!r} field "
                         "(DataConfig.text_field)")
      docs.append(_text_of(record[text_field], f"{path}:{lineno}", text_field))
    return docs
  if fmt == "parquet":
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if text_field not in names:
      raise ValueError(f"{path}: no column {text_field!r} (DataConfig.text_field); columns are {names}")
    column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    return [_text_of(v, f"{path} row {i}", text_field) for i, v in enumerate(column)]
  if fmt == "arrayrecord":
    source = grain.sources.ArrayRecordDataSource([path])
    docs = []
    for i in range(len(source)):
      record = source[i]
      try:
        docs.append(record.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise ValueError(f"{path} record {i}: not UTF-8 text ({e})") from e
    return docs
  raise ValueError(f"format={fmt!r}: expected one of {FORMATS}")


def read_documents(files: Sequence[str], fmt: str = "auto", text_field: str = "text",
                   text_split: str = "formfeed") -> List[str]:
  """All documents of `files`, in file order then record order; blank documents are skipped."""
  if isinstance(files, str):
    files = (files,)
  docs: List[str] = []
  for path in files:
    path = os.fspath(path)
    kind = detect_format(path, fmt)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data file {path!r} does not exist")
    for doc in _read_file(path, kind, text_field, text_split):
      doc = doc.strip("\n")
      if doc.strip():
        docs.append(doc)
  if not docs:
    raise ValueError(f"empty corpus: the files {list(files)} hold no non-blank document")
  return docs


# ----------------------------------------------------------------------------------------------
# Tokenised corpus.


@dataclasses.dataclass
class TokenizedCorpus:
  """Documents back to back in one flat array (bos/eos included)."""

  tokens: np.ndarray  # int32 [N]
  doc_starts: np.ndarray  # int64 [D]: offset of each document in `tokens`
  doc_lengths: np.ndarray  # int64 [D]: tokens per document (>= 1)
  byte_counts: np.ndarray  # int64 [D]: UTF-8 bytes of each document's text (0 if built from ids)

  @property
  def num_documents(self) -> int:
    return len(self.doc_lengths)

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)

  @classmethod
  def from_token_lists(cls, docs: Sequence[Sequence[int]], byte_counts: Optional[Sequence[int]] = None):
    """From already tokenised documents (each a sequence of ids, bos/eos included if wanted)."""
    arrays = [np.asarray(d, dtype=np.int64).reshape(-1) for d in docs]
    if not arrays or not any(len(a) for a in arrays):
      raise ValueError("empty corpus: no document has any token")
    if any(len(a) == 0 for a in arrays):
      bad = [i for i, a in enumerate(arrays) if len(a) == 0]
      raise ValueError(f"documents {bad[:10]} have no token: every document needs at least one")
    flat = np.concatenate(arrays)
    if flat.min() < 0 or flat.max() > np.iinfo(np.int32).max:
      bad = int(flat.min()) if flat.min() < 0 else int(flat.max())
      raise ValueError(f"token id {bad} is out of range: expected ids in [0, 2^31)")
    lengths = np.array([len(a) for a in arrays], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    counts = np.zeros(len(arrays), np.int64) if byte_counts is None else np.asarray(byte_counts, np.int64)
    return cls(flat.astype(np.int32), starts, lengths, counts)


def special_id(tokenizer, token: str, field: str) -> int:
  tid = tokenizer.token_to_id(token)
  if tid is None:
    raise ValueError(f"DataConfig.{field}={token!r} is not a token of the tokenizer "
                     f"({tokenizer.get_vocab_size()} tokens)")
  return int(tid)


def tokenize_documents(docs: Sequence[str], tokenizer, cfg: DataConfig) -> TokenizedCorpus:
  """Tokenises (batch encoder, no post-processor specials) and adds bos/eos per document."""
  bos = special_id(tokenizer, cfg.bos_token, "bos_token") if cfg.add_bos else None
  eos = special_id(tokenizer, cfg.eos_token, "eos_token") if cfg.add_eos else None
  encodings = tokenizer.encode_batch(list(docs), add_special_tokens=False)
  lists = []
  for enc in encodings:
    ids = enc.ids
    lists.append(([bos] if bos is not None else []) + ids + ([eos] if eos is not None else []))
  return TokenizedCorpus.from_token_lists(lists, [len(d.encode("utf-8")) for d in docs])


# ----------------------------------------------------------------------------------------------
# Packed rows.


class PackedRows:
  """Random-access source of packed rows: index -> dict of per-row numpy arrays.

  Index j is this process's j-th row. Rows form global batches of `global_batch` consecutive rows of
  the stream; process p owns rows [p*b, (p+1)*b) of each global batch (b = global_batch / count).
  The stream is epoch after epoch of `rows_per_epoch` rows; with `shuffle`, each epoch has its own
  document order and row order, both drawn from numpy generators seeded with (seed, epoch), so any
  row can be rebuilt from its index alone.
  """

  def __init__(self, corpus: TokenizedCorpus, seq_len: int, *, pad_id: int, remainder: str = "pad",
               shuffle: bool = False, seed: int = 0, num_epochs: Optional[int] = 1,
               global_batch: int = 1, process_index: int = 0, process_count: int = 1,
               hashing=None,
               vocab_size: Optional[int] = None, with_document_ids: bool = False):
    if remainder not in ("pad", "drop"):
      raise ValueError(f"remainder={remainder!r}: expected 'pad' or 'drop'")
    if seq_len < 1 or global_batch < 1:
      raise ValueError(f"seq_len={seq_len}, global_batch={global_batch}: expected positive integers")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index}: expected an index in [0, process_count={process_count})")
    if global_batch % process_count:
      raise ValueError(f"global batch size {global_batch} does not split over {process_count} processes: "
                       "expected a multiple of the process count")
    if vocab_size is not None and corpus.num_tokens and int(corpus.tokens.max()) >= vocab_size:
      raise ValueError(f"token id {int(corpus.tokens.max())} is out of range: the model's vocabulary has "
                       f"{vocab_size} tokens (ids 0..{vocab_size - 1})")
    self.corpus = corpus
    self.seq_len = seq_len
    self.pad_id = int(pad_id)
    self.remainder = remainder
    self.shuffle = shuffle
    self.seed = seed
    self.num_epochs = num_epochs
    self.global_batch = global_batch
    self.local_batch = global_batch // process_count
    self.process_index = process_index
    self.with_document_ids = with_document_ids
    n = corpus.num_tokens
    self.rows_per_epoch = -(-n // seq_len) if remainder == "pad" else n // seq_len
    if self.rows_per_epoch == 0:
      raise ValueError(f"the corpus has {n} tokens, fewer than one row of seq_len={seq_len}, and "
                       "remainder='drop' would drop them all")
    if num_epochs is None:
      global_rows = _ENDLESS // global_batch * global_batch
    else:
      real = self.rows_per_epoch * num_epochs
      global_rows = (-(-real // global_batch) if remainder == "pad" else real // global_batch) * global_batch
      if global_rows == 0:
        raise ValueError(f"{real} rows are fewer than one global batch of {global_batch}, and "
                         "remainder='drop' would drop them all")
    self.real_rows = None if num_epochs is None else self.rows_per_epoch * num_epochs
    self._len = global_rows // process_count
    # Engram hashing (a hashing.EngramHashing): compressed ids of the whole corpus, once (also the
    # vocabulary range check).
    self.hashing = hashing
    if hashing is not None:
      self._ctokens = hashing.compress(corpus.tokens).astype(np.int32)
      self._cpad = hashing.compressed_pad_id
      self._cpad_token = int(hashing.compress(np.array([self.pad_id]))[0])
      self._max_n = hashing.max_ngram_size
    self._layouts: Dict[int, Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._len

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_lock"]
    state["_layouts"] = {}
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  # -- layout ----------------------------------------------------------------------------------

  def _layout(self, epoch: int):
    """(document order [D], stream end of each slot [D], row order [R] or None) of one epoch."""
    with self._lock:
      if epoch in self._layouts:
        return self._layouts[epoch]
    num_docs = self.corpus.num_documents
    if self.shuffle:
      order = np.random.default_rng([self.seed, epoch, 0]).permutation(num_docs)
      rows = np.random.default_rng([self.seed, epoch, 1]).permutation(self.rows_per_epoch)
    else:
      order, rows = np.arange(num_docs), None
    ends = np.cumsum(self.corpus.doc_lengths[order])
    layout = (order, ends, rows)
    with self._lock:
      if len(self._layouts) >= 4:
        self._layouts.pop(next(iter(self._layouts)))
      self._layouts[epoch] = layout
    return layout

  def global_row(self, index: int) -> int:
    g, i = divmod(index, self.local_batch)
    return g * self.global_batch + self.process_index * self.local_batch + i

  # -- rows ------------------------------------------------------------------------------------

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self._len:
      raise IndexError(f"row {index} out of range [0, {self._len})")
    row = self.global_row(index)
    if self.real_rows is not None and row >= self.real_rows:
      return self._row(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    epoch, r = divmod(row, self.rows_per_epoch)
    order, ends, row_order = self._layout(epoch)
    if row_order is not None:
      r = int(row_order[r])
    start = r * self.seq_len
    stream = np.arange(start, min(start + self.seq_len, self.corpus.num_tokens), dtype=np.int64)
    slot = np.searchsorted(ends, stream, side="right")  # document slot of each stream position
    doc = order[slot]
    offset = stream - (ends[slot] - self.corpus.doc_lengths[doc])
    return self._row(slot, doc, offset, self.corpus.doc_starts[doc] + offset)

  def _row(self, slot, doc, offset, flat) -> Dict[str, np.ndarray]:
    T, n = self.seq_len, len(flat)
    tokens = np.full(T, self.pad_id, np.int32)
    targets = np.full(T, self.pad_id, np.int32)
    loss_mask = np.zeros(T, np.float32)
    segment_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    if n:
      toks = self.corpus.tokens
      tokens[:n] = toks[flat]
      has_next = offset + 1 < self.corpus.doc_lengths[doc]
      targets[:n] = np.where(has_next, toks[np.minimum(flat + 1, len(toks) - 1)], self.pad_id)
      loss_mask[:n] = has_next
      segment_ids[:n] = slot - slot[0] + 1
      idx = np.arange(n)
      seg_start = np.maximum.accumulate(np.where(np.r_[True, slot[1:] != slot[:-1]], idx, 0))
      positions[:n] = idx - seg_start
    out = dict(tokens=tokens, targets=targets, segment_ids=segment_ids, positions=positions,
               loss_mask=loss_mask)
    if self.hashing is not None:
      out["engram_ids"] = self._hash(offset, flat, n)
    if self.with_document_ids:
      document_ids = np.full(T, -1, np.int32)
      document_ids[:n] = doc
      out["document_ids"] = document_ids
    return out

  def _hash(self, offset, flat, n) -> np.ndarray:
    """int32 [T, layers, heads]: hash ids from each token's own document (pad before its start).

    One hashing call over the row as a sequence, preceded by the first segment's in-document
    context, is right everywhere except the first max_n-1 tokens of every later segment, whose
    n-grams would reach into the previous document; those few positions are hashed again from
    explicit [max_n] windows. (Windows for every position would be right too, at max_n times the
    work.) Padding hashes as a document of pad tokens; it is masked anyway.
    """
    max_n, T, ctok = self._max_n, self.seq_len, self._ctokens
    seq = np.full(max_n - 1 + T, self._cpad_token, np.int64)  # [context + T]
    doc_offset = np.empty(T, np.int64)  # offset of each position in its document (or padding run)
    doc_offset[:n], doc_offset[n:] = offset, np.arange(T - n)
    if n:
      seq[max_n - 1:max_n - 1 + n] = ctok[flat]
    for back in range(1, max_n):
      has_context = n and offset[0] - back >= 0
      seq[max_n - 1 - back] = ctok[flat[0] - back] if has_context else self._cpad
    ids = self.hashing.hasher.hash_numpy(seq)[max_n - 1:]  # [T, L, H]
    starts = np.flatnonzero(doc_offset[1:] == 0) + 1
    fix = np.unique((starts[:, None] + np.arange(max_n - 1)[None, :]).ravel())
    fix = fix[fix < T]
    if fix.size:
      windows = np.stack([np.where(doc_offset[fix] - back >= 0, seq[max_n - 1 + fix - back], self._cpad)
                          for back in range(max_n - 1, -1, -1)], axis=-1)  # [F, max_n]
      ids[fix] = self.hashing.hasher.hash_numpy(windows)[:, -1]
    return ids


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, remainder: str = "pad",
                   pad_id: int = 0) -> Dict[str, np.ndarray]:
  """Packs token-id documents in order, without shuffling or hashing: dict of [R, T] arrays."""
  rows = PackedRows(TokenizedCorpus.from_token_lists(docs), seq_len, pad_id=pad_id, remainder=remainder)
  examples = [rows[i] for i in range(len(rows))]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# ----------------------------------------------------------------------------------------------
# Pipelines.


def _process(process_index, process_count) -> Tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


# Tokenised corpora and compressed tokenizers of recent calls: the trainer builds the eval split
# at every evaluation, and tokenising or compressing a vocabulary again each time would cost seconds.
# Keys include each file's size and modification time, so an edited file is read again.
_CACHE: "collections.OrderedDict" = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_ENTRIES = 4


def _cached(key, build):
  with _CACHE_LOCK:
    if key in _CACHE:
      _CACHE.move_to_end(key)
      return _CACHE[key]
  value = build()
  with _CACHE_LOCK:
    _CACHE[key] = value
    while len(_CACHE) > _CACHE_ENTRIES:
      _CACHE.popitem(last=False)
  return value


def _fingerprint(tokenizer) -> str:
  return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def _file_key(files: Sequence[str]):
  keys = []
  for path in files:
    st = os.stat(path) if os.path.isfile(path) else None
    keys.append((os.path.abspath(path), st and st.st_size, st and st.st_mtime_ns))
  return tuple(keys)


def engram_hashing(tokenizer, engram: Optional[EngramConfig]):
  """The `hashing.EngramHashing` of a tokenizer and Engram config (None without Engram), built once
  per process and tokenizer (compressing a vocabulary decodes every token)."""
  if engram is None:
    return None
  from engram_jax.hashing import CompressedTokenizer, EngramHashing

  compressed = _cached(("compressed", _fingerprint(tokenizer)), lambda: CompressedTokenizer(tokenizer))
  return EngramHashing(engram, compressed)


def tokenized_split(cfg: DataConfig, split: str = "train", tokenizer=None) -> TokenizedCorpus:
  """The documents of a split, tokenised with bos/eos (cached per files, tokenizer and flags)."""
  tokenizer = load_tokenizer(cfg.tokenizer_path) if tokenizer is None else tokenizer
  files = split_files(cfg, split)
  key = ("corpus", _file_key(files), cfg.format, cfg.text_field, cfg.text_split, _fingerprint(tokenizer),
         cfg.add_bos, cfg.add_eos, cfg.bos_token, cfg.eos_token)
  return _cached(key, lambda: tokenize_documents(
      read_documents(files, cfg.format, cfg.text_field, cfg.text_split), tokenizer, cfg))


def packed_rows(cfg: DataConfig, split: str = "train", *, engram: Optional[EngramConfig] = None,
                vocab_size: Optional[int] = None, process_index: Optional[int] = None,
                process_count: Optional[int] = None, tokenizer=None) -> PackedRows:
  """The random-access rows of a split for this process (train: cfg's shuffle/epochs/remainder;
  eval: in order, one pass, padded, with `document_ids`)."""
  pi, pc = _process(process_index, process_count)
  tokenizer = load_tokenizer(cfg.tokenizer_path) if tokenizer is None else tokenizer
  corpus = tokenized_split(cfg, split, tokenizer)
  pad = special_id(tokenizer, cfg.pad_token, "pad_token")
  if vocab_size is not None and tokenizer.get_vocab_size() > vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocabulary "
                     f"has {vocab_size}: token ids up to {tokenizer.get_vocab_size() - 1} would be out of range")
  train = split == "train"
  return PackedRows(
      corpus, cfg.seq_len, pad_id=pad, remainder=cfg.remainder if train else "pad",
      shuffle=cfg.shuffle and train, seed=cfg.seed, num_epochs=cfg.num_epochs if train else 1,
      global_batch=cfg.batch_size, process_index=pi, process_count=pc, vocab_size=vocab_size,
      with_document_ids=not train, hashing=engram_hashing(tokenizer, engram))


def _ensure_absl_flags_parsed():
  """grain 0.2.18's worker start reads an absl flag and fails in scripts that never parse flags
  (google/grain#1355, fixed upstream later); absl apps have parsed them already, so this only marks
  the defaults as parsed where nobody else will."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(cfg: DataConfig, split: str = "train", **kwargs) -> grain.IterDataset:
  """Batches of this process: dicts of [batch_size / process_count, T, ...] numpy arrays.

  Keyword arguments go to `packed_rows` (engram, vocab_size, process_index, process_count, tokenizer).
  """
  rows = packed_rows(cfg, split, **kwargs)
  ds = grain.MapDataset.source(rows).batch(rows.local_batch, drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                            prefetch_buffer_size=cfg.prefetch_batches))
  if cfg.num_workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers,
                                                     per_worker_buffer_size=cfg.worker_buffer_size))
  return ds


def make_train_iterator(cfg: DataConfig, **kwargs) -> grain.DatasetIterator:
  """The train stream's iterator; `get_state()` / `set_state()` checkpoint and restore it exactly
  (orbax's grain handler saves that state). Keyword arguments as for `make_dataset`."""
  return iter(make_dataset(cfg, "train", **kwargs))


def eval_batches(cfg: DataConfig, **kwargs) -> List[Dict[str, np.ndarray]]:
  """The eval split as a fixed list of this process's batches: in document order, one pass, the
  last row and batch padded (loss_mask 0), plus `document_ids [B, T]` (index into
  `document_byte_counts`, -1 on padding). Same count on every process."""
  rows = packed_rows(cfg, "eval", **kwargs)
  b = rows.local_batch
  batches = []
  for start in range(0, len(rows), b):
    examples = [rows[i] for i in range(start, start + b)]
    batches.append({k: np.stack([e[k] for e in examples]) for k in examples[0]})
  return batches


def document_byte_counts(cfg: DataConfig, split: str = "eval") -> np.ndarray:
  """int64 [D]: UTF-8 bytes of each document of a split, in the order `document_ids` index them."""
  docs = read_documents(split_files(cfg, split), cfg.format, cfg.text_field, cfg.text_split)
  return np.array([len(d.encode("utf-8")) for d in docs], np.int64)


# ----------------------------------------------------------------------------------------------
# Prefetch.


class Prefetcher:
  """Runs `prepare(item)` for upcoming items on a background thread, `depth` items ahead, and yields
  (item, prepared) in the input order.

  The thread releases the GIL in numpy's gathers and in `jax.device_put`, so the host gather and the
  transfer of batch i+1 overlap the device step of batch i (dispatched asynchronously by the main
  thread). An exception in `prepare` is re-raised by the iterator at the item that failed; closing
  the iterator early stops the thread.
  """

  _DONE = object()

  def __init__(self, items: Iterable, prepare: Callable, depth: int = 2):
    if not isinstance(depth, int) or depth < 1:
      raise ValueError(f"depth={depth!r}: expected a positive integer")
    self._items = iter(items)
    self._prepare = prepare
    self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="engram-prefetch", daemon=True)
    self._thread.start()

  def _put(self, value) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(value, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self):
    try:
      for item in self._items:
        if self._stop.is_set():
          return
        if not self._put((item, self._prepare(item), None)):
          return
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      self._put((None, None, e))
      return
    self._put(self._DONE)

  def __iter__(self) -> Iterator:
    try:
      while True:
        got = self._queue.get()
        if got is self._DONE:
          return
        item, prepared, error = got
        if error is not None:
          raise error
        yield item, prepared
    finally:
      self.close()

  def close(self):
    self._stop.set()
    self._thread.join(timeout=10)
