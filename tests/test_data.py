"""Tests of the input pipeline (engram_jax/data.py), the embedded corpus and the knowledge corpus."""

import json
import os

import numpy as np
import pytest

from engram_jax import data, knowledge, probes
from engram_jax.config import DataConfig, EngramConfig
from engram_jax.hashing import CompressedTokenizer, EngramHashing, NgramHasher

ENGRAM = EngramConfig(vocab_size_per_ngram=(101, 211), max_ngram_size=3, n_embed_per_ngram=8,
                      n_head_per_ngram=2, layer_ids=(0, 2))


@pytest.fixture(scope="module")
def tokenizer():
  return data.load_tokenizer()


@pytest.fixture(scope="module")
def hashing(tokenizer):
  ct = CompressedTokenizer(tokenizer)
  return ct, NgramHasher.from_tokenizer(ENGRAM, ct)


@pytest.fixture(scope="module")
def kc_files(tmp_path_factory):
  kc = knowledge.generate_knowledge(24, seed=3, documents_per_entity=2)
  return knowledge.write_knowledge(kc, str(tmp_path_factory.mktemp("knowledge")))


def _cfg(kc_files, **kw):
  base = dict(train_files=kc_files["train"], eval_files=kc_files["eval"], seq_len=32, batch_size=4,
              read_threads=1, prefetch_batches=2)
  base.update(kw)
  return DataConfig(**base)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                  for x, y in zip(a, b))


def _random_docs(rng, num_docs, max_len, vocab=50):
  return [rng.integers(3, vocab, size=int(rng.integers(1, max_len + 1))) for _ in range(num_docs)]


# ----------------------------------------------------------------------------------------------
# Packing.


def test_hand_example():
  docs = [[1, 5, 6, 7, 2], [1, 8, 2], [1, 9, 9, 9, 9, 9, 2]]
  out = data.pack_documents(docs, seq_len=4, remainder="pad", pad_id=0)
  np.testing.assert_array_equal(out["tokens"], [[1, 5, 6, 7], [2, 1, 8, 2], [1, 9, 9, 9], [9, 9, 2, 0]])
  # Row ends inside a document keep their true next token (7 -> 2, 9 -> 9).
  np.testing.assert_array_equal(out["targets"], [[5, 6, 7, 2], [0, 8, 2, 0], [9, 9, 9, 9], [9, 2, 0, 0]])
  np.testing.assert_array_equal(out["loss_mask"], [[1, 1, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1], [1, 2, 2, 2], [1, 1, 1, 1], [1, 1, 1, 0]])
  np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 0]])
  dropped = data.pack_documents(docs, seq_len=4, remainder="drop")
  np.testing.assert_array_equal(dropped["tokens"], out["tokens"][:3])


@pytest.mark.parametrize("remainder", ["pad", "drop"])
@pytest.mark.parametrize("seq_len", [1, 5, 16])
def test_packing_keeps_every_token_once_in_order(remainder, seq_len):
  rng = np.random.default_rng(seq_len)
  docs = _random_docs(rng, 9, 12)
  out = data.pack_documents(docs, seq_len, remainder=remainder, pad_id=0)
  stream = np.concatenate(docs)
  doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
  real = out["segment_ids"] > 0
  kept = len(stream) if remainder == "pad" else len(stream) // seq_len * seq_len
  np.testing.assert_array_equal(out["tokens"][real], stream[:kept])
  assert real.sum() == kept and out["tokens"].shape[0] == -(-kept // seq_len)
  # Targets: the next token of the same document, masked at document ends and padding.
  same_doc_next = np.r_[doc_of[1:] == doc_of[:-1], False][:kept]
  np.testing.assert_array_equal(out["loss_mask"][real], same_doc_next)
  np.testing.assert_array_equal(out["targets"][real][same_doc_next], np.r_[stream[1:], 0][:kept][same_doc_next])
  assert not out["loss_mask"][~real].any() and not out["positions"][~real].any()
  # Positions count up inside each segment; segment ids count segments from 1 per row.
  for row in range(out["tokens"].shape[0]):
    seg, pos = out["segment_ids"][row], out["positions"][row]
    for s in np.unique(seg[seg > 0]):
      np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))
    assert seg[0] in (0, 1) and np.all(np.diff(seg[seg > 0]) >= 0)


def test_shuffled_epoch_covers_every_token_exactly_once():
  rng = np.random.default_rng(0)
  docs = _random_docs(rng, 15, 10)
  corpus = data.TokenizedCorpus.from_token_lists(docs)
  rows = data.PackedRows(corpus, 6, pad_id=0, shuffle=True, seed=5, num_epochs=2, global_batch=3,
                         with_document_ids=True)
  per_epoch = rows.rows_per_epoch
  assert len(rows) % 3 == 0 and len(rows) >= 2 * per_epoch
  seen = [{d: [] for d in range(len(docs))} for _ in range(2)]  # epoch -> doc -> pieces
  order = [[], []]  # epoch -> documents in order of appearance
  for i in range(2 * per_epoch):
    r = rows[i]
    for s in np.unique(r["segment_ids"][r["segment_ids"] > 0]):
      piece = r["tokens"][r["segment_ids"] == s]
      d = int(r["document_ids"][r["segment_ids"] == s][0])
      seen[i // per_epoch][d].append(piece.tolist())
      order[i // per_epoch].append(d)
  for epoch in range(2):
    # Rows are shuffled too, so a long document's pieces may come in any order; but each piece is
    # a contiguous run of the document, and together they hold each token exactly once.
    for d, doc in enumerate(docs):
      pieces = seen[epoch][d]
      assert sum(map(len, pieces)) == len(doc)
      assert sorted(sum(pieces, [])) == sorted(doc.tolist())
      text = "," + ",".join(map(str, doc)) + ","
      assert all("," + ",".join(map(str, p)) + "," in text for p in pieces)
  assert order[0] != order[1] and order[0] != sorted(order[0])  # shuffled, and again per epoch
  # Rows past the real stream are pure padding.
  for i in range(2 * per_epoch, len(rows)):
    assert not rows[i]["segment_ids"].any()


# ----------------------------------------------------------------------------------------------
# Hash ids.


ENGRAM_4 = EngramConfig(vocab_size_per_ngram=(101, 211, 307), max_ngram_size=4, n_embed_per_ngram=4,
                        n_head_per_ngram=1, layer_ids=(1,), pad_id=0)


@pytest.mark.parametrize("engram", [ENGRAM, ENGRAM_4], ids=["max_n3", "max_n4"])
def test_hash_ids_equal_hashing_each_document_alone(hashing, engram):
  ct, _ = hashing
  hasher = NgramHasher.from_tokenizer(engram, ct)
  rng = np.random.default_rng(1)
  docs = _random_docs(rng, 12, 9, vocab=ct.vocab_size)
  corpus = data.TokenizedCorpus.from_token_lists(docs)
  rows = data.PackedRows(corpus, 7, pad_id=0, hashing=EngramHashing(engram, ct), with_document_ids=True)
  expected = [hasher.hash_numpy(ct.compress(d)) for d in docs]  # [len, L, H] per document
  offsets = {}
  for i in range(len(rows)):
    r = rows[i]
    assert r["engram_ids"].shape == (7, len(engram.layer_ids), engram.num_heads)
    assert r["engram_ids"].dtype == np.int32
    for t in np.flatnonzero(r["segment_ids"]):
      d = int(r["document_ids"][t])
      o = offsets.get(d, 0)
      np.testing.assert_array_equal(r["engram_ids"][t], expected[d][o], err_msg=f"doc {d} offset {o}")
      offsets[d] = o + 1
  assert offsets == {d: len(doc) for d, doc in enumerate(docs)}
  # Packing matters: hashing a row as one sequence would differ at document starts.
  assert any(np.any(rows[i]["engram_ids"] != hasher.hash_numpy(ct.compress(rows[i]["tokens"])))
             for i in range(len(rows)))


def test_ids_out_of_range(hashing):
  ct, hasher = hashing
  corpus = data.TokenizedCorpus.from_token_lists([[1, 5, ct.vocab_size + 3]])
  with pytest.raises(ValueError, match="out of range"):
    data.PackedRows(corpus, 4, pad_id=0, hashing=EngramHashing(ENGRAM, ct))
  with pytest.raises(ValueError, match=r"token id 9 is out of range.*vocabulary has 8 tokens"):
    data.PackedRows(data.TokenizedCorpus.from_token_lists([[1, 9]]), 4, pad_id=0, vocab_size=8)
  with pytest.raises(ValueError, match="out of range"):
    data.TokenizedCorpus.from_token_lists([[1, -4]])


# ----------------------------------------------------------------------------------------------
# Pipeline: determinism, checkpointing, sharding, workers.


def test_pipeline_determinism_and_seed(kc_files):
  cfg = _cfg(kc_files)
  a = _take(data.make_train_iterator(cfg, engram=ENGRAM, process_index=0, process_count=1), 4)
  b = _take(data.make_train_iterator(cfg, engram=ENGRAM, process_index=0, process_count=1), 4)
  c = _take(data.make_train_iterator(_cfg(kc_files, seed=1), engram=ENGRAM, process_index=0,
                                     process_count=1), 4)
  assert _same(a, b) and not _same(a, c)
  assert a[0]["tokens"].shape == (4, 32) and a[0]["engram_ids"].shape == (4, 32, 2, 4)
  assert {k: v.dtype.name for k, v in a[0].items()} == dict(
      tokens="int32", targets="int32", segment_ids="int32", positions="int32", loss_mask="float32",
      engram_ids="int32")


def test_iterator_state_restores_exactly(kc_files):
  cfg = _cfg(kc_files)
  it = data.make_train_iterator(cfg, process_index=0, process_count=1)
  _take(it, 3)
  state = it.get_state()
  json.dumps(state)  # what orbax's grain handler writes
  expected = _take(it, 5)
  fresh = data.make_train_iterator(cfg, process_index=0, process_count=1)
  fresh.set_state(state)
  assert _same(_take(fresh, 5), expected)


def test_stream_crosses_epochs_with_reshuffle(kc_files):
  cfg = _cfg(kc_files, seq_len=64, batch_size=2)
  rows = data.packed_rows(cfg, process_index=0, process_count=1)
  it = data.make_train_iterator(cfg, process_index=0, process_count=1)
  batches = _take(it, rows.rows_per_epoch)  # two epochs' worth of rows at batch 2
  first = np.concatenate([b["tokens"] for b in batches])
  per_epoch = rows.rows_per_epoch
  assert not np.array_equal(first[:per_epoch], first[per_epoch:2 * per_epoch])
  np.testing.assert_array_equal(np.sort(first[:per_epoch].ravel()), np.sort(first[per_epoch:].ravel()))


def test_process_sharding_partitions_the_global_batch(kc_files):
  cfg = _cfg(kc_files, batch_size=4)
  whole = _take(data.make_train_iterator(cfg, engram=ENGRAM, process_index=0, process_count=1), 3)
  parts = [_take(data.make_train_iterator(cfg, engram=ENGRAM, process_index=p, process_count=2), 3)
           for p in range(2)]
  for step, batch in enumerate(whole):
    for k in batch:
      assert parts[0][step][k].shape[0] == 2
      np.testing.assert_array_equal(np.concatenate([parts[0][step][k], parts[1][step][k]]), batch[k])
  with pytest.raises(ValueError, match="does not split over 3 processes"):
    data.packed_rows(cfg, process_index=0, process_count=3)


def test_worker_processes_match_in_process(kc_files):
  """One worker process (spawned: seconds) gives the in-process batches and restores exactly."""
  cfg = _cfg(kc_files, num_workers=1, worker_buffer_size=1)
  reference = _take(data.make_train_iterator(_cfg(kc_files), engram=ENGRAM, process_index=0,
                                             process_count=1), 6)
  it = data.make_train_iterator(cfg, engram=ENGRAM, process_index=0, process_count=1)
  try:
    got = _take(it, 3)
    state = it.get_state()
    got += _take(it, 3)
    assert _same(got, reference)
    it.set_state(state)
    assert _same(_take(it, 3), reference[3:])
  finally:
    it.close()


# ----------------------------------------------------------------------------------------------
# Eval split and byte counts.


def test_eval_batches_cover_the_split(kc_files, tokenizer):
  cfg = _cfg(kc_files, batch_size=4)
  counts = data.document_byte_counts(cfg)
  docs = data.read_documents(kc_files["eval"])
  np.testing.assert_array_equal(counts, [len(d.encode("utf-8")) for d in docs])
  batches = data.eval_batches(cfg, engram=ENGRAM, process_index=0, process_count=1)
  tokens = np.concatenate([b["tokens"] for b in batches])
  segs = np.concatenate([b["segment_ids"] for b in batches])
  doc_ids = np.concatenate([b["document_ids"] for b in batches])
  expected = np.concatenate([[1] + tokenizer.encode(d, add_special_tokens=False).ids + [2] for d in docs])
  np.testing.assert_array_equal(tokens[segs > 0], expected)  # in order, nothing dropped, no shuffle
  assert np.all(doc_ids[segs == 0] == -1) and set(doc_ids[segs > 0]) == set(range(len(docs)))
  halves = [data.eval_batches(cfg, process_index=p, process_count=2) for p in range(2)]
  assert len(halves[0]) == len(halves[1]) == len(batches)
  np.testing.assert_array_equal(np.concatenate([halves[0][0]["tokens"], halves[1][0]["tokens"]]),
                                batches[0]["tokens"])


# ----------------------------------------------------------------------------------------------
# Sources and errors.


def _write_all_formats(tmp_path, docs):
  import pyarrow as pa
  import pyarrow.parquet as pq
  from array_record.python.array_record_module import ArrayRecordWriter

  paths = {}
  paths["text"] = str(tmp_path / "docs.txt")
  with open(paths["text"], "w", encoding="utf-8") as f:
    f.write("\n\f\n".join(docs) + "\n")
  paths["jsonl"] = str(tmp_path / "docs.jsonl")
  with open(paths["jsonl"], "w", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps({"text": d, "id": 0}) + "\n")
  paths["parquet"] = str(tmp_path / "docs.parquet")
  pq.write_table(pa.table({"text": docs}), paths["parquet"])
  paths["arrayrecord"] = str(tmp_path / "docs.arrayrecord")
  writer = ArrayRecordWriter(paths["arrayrecord"], "group_size:1")
  for d in docs:
    writer.write(d.encode("utf-8"))
  writer.close()
  return paths


def test_every_source_format_reads_the_same_documents(tmp_path):
  docs = ["First document.\nIt has two lines.", "Zweites Dokument: ünïcödé ✓", "third\n\nwith a blank line"]
  paths = _write_all_formats(tmp_path, docs)
  for fmt, path in paths.items():
    assert data.read_documents([path]) == docs, fmt
    assert data.read_documents([path], fmt=fmt) == docs, fmt
  lines = tmp_path / "lines.txt"
  lines.write_text("one doc\n\nanother doc\n", encoding="utf-8")
  assert data.read_documents([str(lines)], text_split="line") == ["one doc", "another doc"]
  # Every format feeds the same tokens into the pipeline.
  cfgs = [DataConfig(train_files=p, eval_files=p, seq_len=8, batch_size=2) for p in paths.values()]
  firsts = [data.eval_batches(c, process_index=0, process_count=1) for c in cfgs]
  assert all(_same(firsts[0], f) for f in firsts[1:])


def test_edited_file_is_read_again(tmp_path):
  path = tmp_path / "docs.txt"
  path.write_text("alpha beta", encoding="utf-8")
  cfg = DataConfig(train_files=str(path), eval_files=str(path), seq_len=8, batch_size=1)
  before = data.eval_batches(cfg, process_index=0, process_count=1)
  assert _same(before, data.eval_batches(cfg, process_index=0, process_count=1))
  path.write_text("gamma delta epsilon", encoding="utf-8")
  after = data.eval_batches(cfg, process_index=0, process_count=1)
  assert not _same(before, after)
  assert data.document_byte_counts(cfg).tolist() == [len("gamma delta epsilon")]


def test_clear_errors(tmp_path, kc_files):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\f\n   \n\f\n", encoding="utf-8")
  with pytest.raises(ValueError, match="empty corpus"):
    data.read_documents([str(empty)])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.read_documents([str(tmp_path / "missing.txt")])
  with pytest.raises(ValueError, match="cannot tell the format.*'.csv'"):
    data.read_documents([str(tmp_path / "docs.csv")])
  bad_field = tmp_path / "bad.jsonl"
  bad_field.write_text('{"body": "x"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"bad.jsonl:1.*'text' field"):
    data.read_documents([str(bad_field)])
  with pytest.raises(FileNotFoundError, match="tokenizer file"):
    data.make_train_iterator(_cfg(kc_files, tokenizer_path=str(tmp_path / "tok.json")),
                             process_index=0, process_count=1)
  with pytest.raises(ValueError, match="tokenizer has 8192 tokens but the model's vocabulary has 1000"):
    data.packed_rows(_cfg(kc_files), vocab_size=1000, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="bos_token='<s>' is not a token"):
    data.packed_rows(_cfg(kc_files, bos_token="<s>"), process_index=0, process_count=1)
  with pytest.raises(ValueError, match="no eval split"):
    data.document_byte_counts(DataConfig(train_files=kc_files["train"]))
  with pytest.raises(ValueError, match="DataConfig.format='csv'"):
    DataConfig(format="csv")
  with pytest.raises(ValueError, match="DataConfig.remainder='keep'"):
    DataConfig(remainder="keep")
  with pytest.raises(ValueError, match="DataConfig.seq_len=0"):
    DataConfig(seq_len=0)
  with pytest.raises(ValueError, match="remainder='drop' would drop them all"):
    data.pack_documents([[1, 2, 3]], seq_len=8, remainder="drop")


# ----------------------------------------------------------------------------------------------
# The embedded corpus.


def test_embedded_corpus_and_tokenizer(tokenizer):
  train, heldout = data.default_corpus_paths()
  assert os.path.isfile(train) and os.path.isfile(heldout)
  assert os.path.isfile(os.path.join(os.path.dirname(train), "LICENSE-PSF.txt"))
  assert [tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>")] == [0, 1, 2]
  assert tokenizer.get_vocab_size() == 8192 and EngramConfig().pad_id == 2
  train_docs, heldout_docs = data.read_documents([train]), data.read_documents([heldout])
  assert len(train_docs) > 100 and len(heldout_docs) > 5 and not set(train_docs) & set(heldout_docs)
  text = heldout_docs[0]
  assert tokenizer.decode(tokenizer.encode(text).ids) == text  # byte-level: lossless
  cfg = DataConfig()
  assert data.split_files(cfg, "train") == (train,) and data.split_files(cfg, "eval") == (heldout,)


# ----------------------------------------------------------------------------------------------
# The knowledge corpus.


def test_knowledge_generator_is_deterministic_and_consistent(tmp_path):
  a = knowledge.generate_knowledge(20, seed=7)
  b = knowledge.generate_knowledge(20, seed=7)
  c = knowledge.generate_knowledge(20, seed=8)
  assert a == b and a.train_documents != c.train_documents
  names = [e.name for e in a.entities]
  assert len(set(names)) == len(names) and all(" " in n for n in names)
  train_text = "\n".join(a.train_documents)
  by_name = {e.name: e for e in a.entities}
  assert len(a.probes) == 20 * len(knowledge.ATTRIBUTES)
  for p in a.probes:
    answer = p["choices"][p["answer"]]
    assert answer == by_name[p["entity"]].attributes[p["attribute"]]
    assert len(set(p["choices"])) == len(p["choices"]) == 4
    assert f"{p['question']} {answer}." in train_text  # the canonical statement is in training
    assert not any(f"{p['question']} {c}." in train_text for c in p["choices"] if c != answer)
  held_out = {t for ts in knowledge.TEMPLATES.values() for t in ts[-1:]}
  for doc in a.eval_documents:
    assert all(s in held_out for s in _templates_of(doc, by_name))
  paths = knowledge.write_knowledge(a, str(tmp_path))
  assert data.read_documents([paths["train"]]) == a.train_documents
  assert probes.read_mc_file(paths["probes"]) == a.probes
  # Split by entity (facts trained at different frequencies): disjoint parts that together are the
  # corpus, each document and probe in the part of the entity it names.
  parts = knowledge.split_entities(a, 3)
  assert sorted(d for p in parts for d in p.train_documents) == sorted(a.train_documents)
  assert sorted(len(p.entities) for p in parts) == [6, 7, 7]
  for part in parts:
    names = {e.name for e in part.entities}
    assert len(part.train_entities) == len(part.train_documents) == 3 * len(names)
    for doc, owner in zip(part.train_documents, part.train_entities):
      assert part.entities[owner].name in doc and not any(n in doc for n in by_name if n not in names)
    assert {p["entity"] for p in part.probes} == names and len(part.probes) == 4 * len(names)
    assert all(any(e.name in d for e in part.entities) for d in part.eval_documents)
  with pytest.raises(ValueError, match="parts=21: expected 1..20"):
    knowledge.split_entities(a, 21)


def _templates_of(doc, by_name):
  """The templates a document's sentences were made from (by substituting the values back)."""
  found = []
  for name, entity in by_name.items():
    if name in doc:
      for attr, value in entity.attributes.items():
        for t in knowledge.TEMPLATES[attr]:
          if t.format(name=name, value=value) in doc:
            found.append(t)
  return found
