"""Evaluation: bits per byte, knock-out, needle and multiple-choice scoring, gate n-grams, the
results.json schema and clear errors. One tiny two-Engram-layer model, compiled once for the module
(every forward here shares its [4, 32] shape and takes the knock-out scale as an argument)."""

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import evaluation
from engram_jax import probes as probes_lib
from engram_jax import runner as runner_lib
from engram_jax.config import (AttentionConfig, Config, DataConfig, EngramConfig, MeshConfig, MHCConfig,
                               ModelConfig, TrainConfig, load_preset)
from engram_jax.evaluation import DocumentTotals, EvalOptions
from engram_jax.model import init_variables
from engram_jax.probes import NiahQuery
from engram_jax.sharding import LOGICAL_RULES, make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_KEYS = os.path.join(os.path.dirname(__file__), "golden", "eval_results_keys.json")

DOCS = [
    "The code module provides facilities to implement read-eval-print loops in Python. "
    "The code module is small.",
    "A list is a mutable sequence. A list can hold any object, and a list grows as needed.",
    "The code module and the list type are documented in the library reference.",
]


# ----------------------------------------------------------------------------------------------
# Pure functions: hand-computed expectations.


def test_bits_per_byte_hand_computed():
  # Two documents of 4 and 3 tokens (bos .. eos): 3 and 2 predictions. Row 1 holds the tail of
  # document 1 and a third document cut short (only 1 of its 2 predictions scored: excluded).
  nll = np.array([[1.0, 2.0, 3.0, 9.9], [0.5, 1.5, 4.0, 7.0]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 1]], np.float32)
  docs = np.array([[0, 0, 0, 0], [1, 1, 1, 2]])
  totals = DocumentTotals.zeros(3)
  totals.add(nll, mask, docs)
  np.testing.assert_allclose(totals.nats, [6.0, 2.0, 7.0])
  np.testing.assert_array_equal(totals.tokens, [3, 2, 1])
  out = evaluation.set_metrics(totals, doc_lengths=np.array([4, 3, 3]), byte_counts=np.array([10, 6, 5]))
  # Documents 0 and 1 are complete: 8 nats over 5 tokens and 16 bytes.
  assert out["documents"] == 2 and out["tokens"] == 5 and out["bytes"] == 16
  assert out["loss"] == pytest.approx(8.0 / 5)
  assert out["perplexity"] == pytest.approx(math.exp(8.0 / 5))
  assert out["bits_per_byte"] == pytest.approx(8.0 / math.log(2) / 16)
  assert evaluation.bits_per_byte(math.log(2) * 24, 12) == pytest.approx(2.0)
  with pytest.raises(ValueError, match="total_bytes=0"):
    evaluation.bits_per_byte(1.0, 0)


def test_knockout_metrics_definitions():
  out = evaluation.knockout_metrics({"loss": 2.0}, {"loss": 2.5, "perplexity": 12.2, "bits_per_byte": 1.0})
  assert out["loss_increase"] == pytest.approx(0.5)
  assert out["retained_fraction"] == pytest.approx(0.8)
  assert evaluation.retained(0.8, 0.2) == pytest.approx(0.25)


def test_top_ngrams_hand_built():
  # Two documents and one padding position.
  tokens = np.array([5, 6, 7, 5, 6, 8, 5, 6, 5, 6, 0])
  docs = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1])
  gates = np.array([.1, .9, .2, .1, .7, .3, .1, .8, .1, .6, .99])
  top = evaluation.top_ngrams(tokens, docs, gates, n=2, k=2, min_count=2)
  # (5, 6) ends at positions 1, 4, 7, 9: mean gate (.9 + .7 + .8 + .6) / 4; every other bigram occurs
  # once, below min_count. (8, 5) crosses a document boundary and (6, 0) reaches into padding.
  assert top == [{"token_ids": [5, 6], "count": 4, "mean_gate": pytest.approx(0.75)}]
  every = evaluation.top_ngrams(tokens, docs, gates, 2, 10, 1)
  assert len(every) == 5 and every[0]["token_ids"] == [5, 6] and every[1] == {
      "token_ids": [6, 8], "count": 1, "mean_gate": pytest.approx(0.3)}
  assert all(t["token_ids"] != [8, 5] for t in evaluation.top_ngrams(tokens, docs, gates, 2, 10, 1))
  assert all(t["token_ids"] != [6, 0] for t in evaluation.top_ngrams(tokens, docs, gates, 2, 10, 1))


def _lookup_scorer(table):
  """A fake model: log-likelihood and greedy flag looked up by (context tail, continuation)."""
  def score(contexts, continuations):
    out = [table[(ctx[-1], tuple(cont))] for ctx, cont in zip(contexts, continuations)]
    return np.array([o[0] for o in out]), np.array([o[1] for o in out])
  return score


def test_niah_scoring_hand_built():
  q = lambda length, tail, answer: NiahQuery(length, [1, tail], [[10], [11], [12]], answer)  # noqa: E731
  queries = [q(64, 100, 0), q(64, 101, 2), q(128, 102, 1), q(128, 103, 1)]
  table = {
      (100, (10,)): (-1.0, True), (100, (11,)): (-2.0, False), (100, (12,)): (-3.0, False),  # right, greedy
      (101, (10,)): (-1.0, False), (101, (11,)): (-2.0, False), (101, (12,)): (-1.5, False),  # wrong
      (102, (10,)): (-4.0, False), (102, (11,)): (-0.5, False), (102, (12,)): (-3.0, False),  # right
      (103, (10,)): (-4.0, False), (103, (11,)): (-0.5, True), (103, (12,)): (-3.0, False),  # right, greedy
  }
  out = probes_lib.score_niah(queries, _lookup_scorer(table))
  assert [r["length"] for r in out] == [64, 128]
  assert out[0]["accuracy"] == 0.5 and out[0]["greedy_accuracy"] == 0.5
  assert out[0]["mean_answer_logprob"] == pytest.approx((-1.0 - 1.5) / 2)
  assert out[1]["accuracy"] == 1.0 and out[1]["greedy_accuracy"] == 0.5 and out[1]["queries"] == 2


def _char_encode(text):
  return [ord(c) for c in text]


def test_niah_prompts_hold_their_needles():
  haystack = np.array(_char_encode("abcdefghij" * 100))
  queries = probes_lib.make_niah_queries(haystack, _char_encode, [160, 200], num_needles=3, num_candidates=5,
                                         num_examples=2, seed=1, bos_id=1)
  assert len(queries) == 2 * 2 * 3
  for query in queries:
    context = "".join(chr(t) for t in query.context[1:])
    assert query.context[0] == 1
    longest = max(len(c) for c in query.candidates)
    assert len(query.context) + longest <= query.length
    answer = "".join(chr(t) for t in query.candidates[query.answer]).strip()
    assert context.endswith(probes_lib.query_text(query.key))
    assert probes_lib.needle_text(query.key, answer) in context
    # Distractor values are absent from the context; exactly 3 of the 5 values are needles.
    present = [v for v in query.values if f" is {v}." in context]
    assert len(present) == 3 and len(set(query.values)) == 5
  # The longest query of each haystack fills its length exactly.
  assert max(len(q.context) + max(map(len, q.candidates)) for q in queries if q.length == 160) == 160

  def oracle(contexts, continuations):
    """Reads the needle of the queried key out of the context."""
    scores = []
    for ctx, cont in zip(contexts, continuations):
      text = "".join(chr(t) for t in ctx[1:])
      key = text.rsplit("The magic number for ", 1)[1][:-3]
      value = text.split(f"The magic number for {key} is ", 1)[1].split(".", 1)[0]
      scores.append(0.0 if "".join(chr(t) for t in cont).strip() == value else -5.0)
    return np.array(scores), np.array([s == 0.0 for s in scores])

  assert all(r["accuracy"] == 1.0 and r["greedy_accuracy"] == 1.0 for r in probes_lib.score_niah(queries, oracle))
  first = lambda c, x: (np.array([0.0 if i % 5 == 0 else -1.0 for i in range(len(c))]), np.zeros(len(c), bool))  # noqa: E731
  expected = np.mean([q.answer == 0 for q in queries])
  assert np.mean([r["accuracy"] for r in probes_lib.score_niah(queries, first)]) == pytest.approx(expected)
  with pytest.raises(ValueError, match="niah length 20"):
    probes_lib.make_niah_queries(haystack, _char_encode, [20], num_needles=3)


def test_multiple_choice_scoring_hand_built():
  probes = [
      {"question": "Q1", "choices": ["a", "bbbbbbbbb"], "answer": 1},
      {"question": "Q2", "choices": ["x", "y", "z"], "answer": 0},
  ]
  # Q1: " a" (2 bytes) -1.0, " bbbbbbbbb" (10 bytes) -0.9: b wins the sum and per byte (right).
  # Q2: y wins both (wrong).
  table = {
      (ord("1"), tuple(_char_encode(" a"))): (-1.0, False),
      (ord("1"), tuple(_char_encode(" bbbbbbbbb"))): (-0.9, True),
      (ord("2"), tuple(_char_encode(" x"))): (-2.0, False),
      (ord("2"), tuple(_char_encode(" y"))): (-1.0, True),
      (ord("2"), tuple(_char_encode(" z"))): (-3.0, False),
  }
  out = probes_lib.score_multiple_choice(probes, _char_encode, _lookup_scorer(table), bos_id=1)
  # Greedy decoding emits Q1's answer and a wrong choice (y) after Q2: one exact answer of two.
  assert out == {"questions": 2, "accuracy": 0.5, "accuracy_norm": 0.5, "greedy_exact": 0.5}
  # b at -1.5: a wins the sum (-1.0, wrong), b still wins per byte (-0.15 > -0.5, right).
  table[(ord("1"), tuple(_char_encode(" bbbbbbbbb")))] = (-1.5, False)
  out = probes_lib.score_multiple_choice(probes, _char_encode, _lookup_scorer(table), bos_id=1)
  assert out["accuracy"] == 0.0 and out["accuracy_norm"] == 0.5


def test_missing_files_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such.txt"):
    EvalOptions(eval_files=(str(tmp_path / "no_such.txt"),)).check_files()
  with pytest.raises(FileNotFoundError, match="probes.jsonl"):
    EvalOptions(mc_files=(str(tmp_path / "probes.jsonl"),)).check_files()
  with pytest.raises(FileNotFoundError, match="probes.jsonl"):
    probes_lib.read_mc_file(str(tmp_path / "probes.jsonl"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question": "q", "choices": ["a"], "answer": 0}\n')
  with pytest.raises(ValueError, match="bad.jsonl:1"):
    probes_lib.read_mc_file(str(bad))
  cfg = load_preset(os.path.join(ROOT, "configs", "tiny.py"))
  with pytest.raises(FileNotFoundError, match="missing_run"):
    evaluation.evaluate_checkpoint(cfg, str(tmp_path / "missing_run" / "checkpoints"), log=lambda s: None)
  with pytest.raises(FileNotFoundError, match="missing_run"):
    runner_lib.load_config_from_checkpoint(str(tmp_path / "missing_run" / "checkpoints"))


def test_eval_py_missing_checkpoint_exits_with_message(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "eval.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
       "--workdir", str(tmp_path / "nothing_here"), "--niah_lengths="],
      capture_output=True, text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert proc.returncode != 0
  assert "FileNotFoundError" in proc.stderr and "nothing_here" in proc.stderr
  assert not (tmp_path / "nothing_here").exists()  # nothing was created


# ----------------------------------------------------------------------------------------------
# A tiny model with two Engram layers.


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("eval")
  text_path = tmp / "docs.txt"
  text_path.write_text("\n\f\n".join(DOCS) + "\n", encoding="utf-8")
  mc_path = tmp / "probes.jsonl"
  with open(mc_path, "w") as f:
    f.write(json.dumps({"question": "The code module provides", "choices": ["facilities", "lists"], "answer": 0}) + "\n")
    f.write(json.dumps({"question": "A list is a mutable", "choices": ["code", "sequence", "module"], "answer": 1}) + "\n")
  model = ModelConfig(
      vocab_size=8192, d_model=32, num_layers=2, num_dense_layers=2, mlp_hidden=64,
      attention=AttentionConfig(kind="gqa", num_heads=2, num_kv_heads=1, head_dim=16, implementation="xla"),
      moe=None,
      engram=EngramConfig(vocab_size_per_ngram=(211, 211), max_ngram_size=3, n_embed_per_ngram=16,
                          n_head_per_ngram=2, layer_ids=(0, 1), pad_id=2, conv_zero_init=False,
                          table_init_std=0.5),
      mhc=MHCConfig(expansion=2), max_seq_len=32)
  cfg = Config(model=model, data=DataConfig(seq_len=32, batch_size=4, eval_files=(str(text_path),)),
               train=TrainConfig(steps=10, warmup_steps=0), mesh=MeshConfig(data=1), name="test")
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])

  def init():
    return nn.meta.unbox(init_variables(model, jax.random.key(0)))

  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    variables = jax.jit(init)()
  params = variables.pop("params")
  runner = runner_lib.ModelRunner(cfg, params, dict(variables), mesh)
  return runner, tmp, str(text_path), str(mc_path)


def _rows(runner):
  texts = ["The code module provides facilities", "A list is a mutable sequence.", "The list type", "x"]
  return [[runner.bos_id] + runner.encode(t) for t in texts]


def test_knockout_of_one_layer_equals_zeroing_its_value_projection(setup):
  runner = setup[0]
  batch = runner.make_batch(_rows(runner), 32)
  full = runner.forward(batch, runner.scale())
  off0 = runner.forward(batch, runner.scale((0,)))
  off1 = runner.forward(batch, runner.scale((1,)))
  params = runner.params
  engram0 = dict(params["layer_0"]["engram"])
  engram0["value_proj"] = jnp.zeros_like(engram0["value_proj"])
  engram0["value_bias"] = jnp.zeros_like(engram0["value_bias"])
  try:
    runner.params = {**params, "layer_0": {**params["layer_0"], "engram": engram0}}
    zeroed = runner.forward(batch, runner.scale())
  finally:
    runner.params = params
  real = batch["segment_ids"] > 0
  np.testing.assert_allclose(off0["nll"][real], zeroed["nll"][real], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(off0["gates"][real], zeroed["gates"][real], rtol=1e-5, atol=1e-5)
  # Each knock-out changes the output, and the two layers' knock-outs differ.
  assert np.abs(off0["nll"][real] - full["nll"][real]).max() > 1e-3
  assert np.abs(off0["nll"][real] - off1["nll"][real]).max() > 1e-3
  # Layer 0's gates read the hidden state before layer 0's own output: unchanged by its knock-out.
  np.testing.assert_allclose(off0["gates"][..., 0, :][real], full["gates"][..., 0, :][real], atol=1e-6)


def test_scores_are_right_padding_and_batching_invariant(setup):
  runner = setup[0]
  rows = _rows(runner)
  out = runner.run_rows(rows)
  ctx, cont = rows[0][:3], rows[0][3:]
  logprob, greedy = runner.score([ctx], [cont])
  assert logprob[0] == pytest.approx(-out[0]["nll"][2:len(rows[0]) - 1].sum(), rel=1e-5)
  # The same pair among other rows (another batch position) scores the same.
  lp2, _ = runner.score([rows[1][:2], ctx, rows[2][:2]], [rows[1][2:], cont, rows[2][2:]])
  assert lp2[1] == pytest.approx(logprob[0], rel=1e-5)
  # A continuation made of the model's own argmax predictions is a greedy match.
  argmax_cont = [int(out[0]["argmax"][2])]
  assert runner.score([ctx], [argmax_cont])[1][0]
  wrong = [(argmax_cont[0] + 1) % runner.cfg.model.vocab_size]
  assert not runner.score([ctx], [wrong])[1][0]


def test_results_schema_is_stable_and_complete(setup):
  runner, tmp, text_path, mc_path = setup
  options = EvalOptions(niah_lengths=(32,), niah_needles=1, niah_candidates=2, niah_examples=1,
                        mc_files=(mc_path,), top_ngrams=3, min_ngram_count=2)
  out_dir = str(tmp / "out")
  results = evaluation.run_evaluation(runner, options, step=0, gate_text="The code module", out_dir=out_dir)
  path = evaluation.write_results(results, out_dir)
  with open(path) as f:
    loaded = json.load(f)
  assert loaded == json.loads(json.dumps(results))
  keys = evaluation.results_schema(loaded)
  if os.environ.get("ENGRAM_UPDATE_GOLDEN"):
    with open(GOLDEN_KEYS, "w") as f:
      json.dump(keys, f, indent=1)
      f.write("\n")
  with open(GOLDEN_KEYS) as f:
    golden = json.load(f)
  assert keys == golden, ("results.json keys changed: update tests/golden/eval_results_keys.json (rerun with "
                          f"ENGRAM_UPDATE_GOLDEN=1) and the README's Evaluation section. Added: "
                          f"{sorted(set(keys) - set(golden))}, removed: {sorted(set(golden) - set(keys))}")
  # Numbers are consistent with their definitions.
  bench = loaded["benchmarks"][0]
  assert bench["documents"] == len(DOCS)
  assert bench["bytes"] == sum(len(d.encode()) for d in DOCS)
  assert bench["bits_per_byte"] == pytest.approx(bench["loss"] * bench["tokens"] / math.log(2) / bench["bytes"])
  assert [k["condition"] for k in bench["knockout"]] == ["all", "layer_0", "layer_1"]
  for k in bench["knockout"]:
    assert k["retained_fraction"] == pytest.approx(bench["loss"] / k["loss"])
  assert [g["layer"] for g in loaded["gates"]] == [0, 1]
  assert all(0 <= g["quantiles"]["p05"] <= g["quantiles"]["p95"] <= 1 for g in loaded["gates"])
  assert loaded["multiple_choice"][0]["questions"] == 2
  assert os.path.isfile(os.path.join(out_dir, "gates.png")) and os.path.isfile(os.path.join(out_dir, "gates.html"))
  page = open(os.path.join(out_dir, "gates.html"), encoding="utf-8").read()
  assert page.count("<span") == 2 * len(runner.gate_trace("The code module")[0])
  assert evaluation.format_table(loaded).count("off layer_") == 2
