"""Knowledge patches: tables-only training, the patch format, apply / stack / revert, the CLI."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import data as data_lib
from engram_jax import knowledge, memory, patches
from engram_jax.config import (AttentionConfig, Config, DataConfig, EngramConfig, MeshConfig, MHCConfig,
                               ModelConfig, MoEConfig, TrainConfig)
from engram_jax.model import init_variables
from engram_jax.runner import ModelRunner
from engram_jax.sharding import LOGICAL_RULES, make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tiny_checkpoint", "checkpoints")

MODEL = ModelConfig(
    vocab_size=8192, d_model=32, num_layers=2, num_dense_layers=1, mlp_hidden=64,
    attention=AttentionConfig(kind="gqa", num_heads=2, num_kv_heads=1, head_dim=16, implementation="xla"),
    moe=MoEConfig(num_experts=4, top_k=2, num_shared_experts=1, expert_hidden=16, dispatch="capacity"),
    engram=EngramConfig(vocab_size_per_ngram=(1009, 1009), max_ngram_size=3, n_embed_per_ngram=16,
                        n_head_per_ngram=2, layer_ids=(0, 1), pad_id=2, conv_zero_init=False, table_init_std=0.5),
    mhc=MHCConfig(expansion=2), max_seq_len=32)


def _facts(tmp, seed, n=6):
  kc = knowledge.generate_knowledge(n, seed=seed, documents_per_entity=1)
  return kc, knowledge.write_knowledge(kc, str(tmp / f"facts{seed}"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("patches")
  cfg = Config(model=MODEL, data=DataConfig(seq_len=32, batch_size=4), train=TrainConfig(steps=10, warmup_steps=0),
               mesh=MeshConfig(data=1), name="test")
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    variables = jax.jit(lambda: nn.meta.unbox(init_variables(MODEL, jax.random.key(0))))()
  params = variables.pop("params")
  runner = ModelRunner(cfg, params, dict(variables), mesh)
  return cfg, runner, tmp


def _batches(cfg, runner, files):
  data_cfg = dataclasses.replace(cfg.data, train_files=tuple(files), num_epochs=1)
  return list(data_lib.make_dataset(data_cfg, "train", engram=cfg.model.engram, vocab_size=cfg.model.vocab_size,
                                    tokenizer=runner.tokenizer))


def _train(cfg, runner, files, steps=8, **kw):
  tables, stats = patches.train_rows(cfg, runner.params, runner.model_state, _batches(cfg, runner, files),
                                     patches.RowTraining(steps=steps, learning_rate=0.05, **kw), log=lambda s: None)
  return tables, stats


def _patch(cfg, runner, tables):
  return patches.make_patch(cfg.model, runner.hashing, tables, {"note": "test"})


def _tables_np(params):
  return {n: np.asarray(t) for n, t in memory.split(params)[1].items()}


def test_tables_only_training_changes_only_rows_the_facts_read(setup):
  cfg, runner, tmp = setup
  _, paths = _facts(tmp, 1)
  batches = _batches(cfg, runner, [paths["train"]])
  tables, stats = _train(cfg, runner, [paths["train"]])
  read = patches.rows_read(cfg.model, batches)
  assert stats["losses"][-1][1] < stats["losses"][0][1]  # it learns the facts
  for name, rows in tables.items():
    assert len(rows.ids) > 0 and np.all(np.isin(rows.ids, read[name]))
    assert len(rows.ids) < 0.5 * memory.table_layout(cfg.model.engram, int(name.split("_")[1]))[2]
  patched, _, _ = patches.apply_patches(runner.params, cfg.model, runner.hashing, [_patch(cfg, runner, tables)])
  # Everything but the changed rows is bit-identical: backbone, projections, gates, conv, norms.
  base_backbone, base_tables = memory.split(runner.params)
  new_backbone, new_tables = memory.split(patched)
  for a, b in zip(jax.tree.leaves(base_backbone), jax.tree.leaves(new_backbone)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for name in base_tables:
    changed = np.any(np.asarray(base_tables[name]) != np.asarray(new_tables[name]), axis=1)
    np.testing.assert_array_equal(np.flatnonzero(changed), tables[name].ids)


def test_create_apply_revert_round_trip_is_bit_exact_and_patched_eval_equals_hand_edit(setup):
  cfg, runner, tmp = setup
  _, paths = _facts(tmp, 2)
  tables, _ = _train(cfg, runner, [paths["train"]])
  out = str(tmp / "p2")
  patches.save_patch(_patch(cfg, runner, tables), out)
  loaded = patches.load_patch(out)
  for name, rows in tables.items():
    np.testing.assert_array_equal(loaded.tables[name].new, rows.new)
  base = _tables_np(runner.params)
  probe_rows = [[runner.bos_id] + runner.encode(t) for t in ("Zorvak was born in", "The os module")]
  before = runner.run_rows(probe_rows)
  runner.apply_patches([out], log=lambda s: None)
  patched = runner.run_rows(probe_rows)
  # The same rows written into the tables by hand give the same outputs.
  edited = dict(base)
  for name, rows in tables.items():
    edited[name] = edited[name].copy()
    edited[name][rows.ids] = rows.new
  hand = ModelRunner(runner.cfg, memory.merge(memory.split(runner.params)[0], {n: jnp.asarray(v) for n, v in
                                                                              edited.items()}),
                     runner.model_state, runner.mesh, runner.tokenizer)
  for a, b in zip(patched, hand.run_rows(probe_rows)):
    np.testing.assert_array_equal(a["nll"], b["nll"])
  assert any(not np.array_equal(a["nll"], b["nll"]) for a, b in zip(before, patched))
  runner.revert_patches()
  for name, table in _tables_np(runner.params).items():
    np.testing.assert_array_equal(table, base[name])
  for a, b in zip(before, runner.run_rows(probe_rows)):
    np.testing.assert_array_equal(a["nll"], b["nll"])


def test_disjoint_patches_commute_and_overlaps_follow_the_policy(setup):
  cfg, runner, tmp = setup
  ta, _ = _train(cfg, runner, [_facts(tmp, 3)[1]["train"]])
  tb, _ = _train(cfg, runner, [_facts(tmp, 4)[1]["train"]])
  # Make the two disjoint: drop from b every row a changes.
  tb_disjoint = {n: patches.TableRows(r.ids[~np.isin(r.ids, ta[n].ids)], r.new[~np.isin(r.ids, ta[n].ids)],
                                      r.base[~np.isin(r.ids, ta[n].ids)]) for n, r in tb.items()}
  pa, pb = _patch(cfg, runner, ta), _patch(cfg, runner, tb_disjoint)
  ab, _, rep = patches.apply_patches(runner.params, cfg.model, runner.hashing, [pa, pb])
  ba, _, _ = patches.apply_patches(runner.params, cfg.model, runner.hashing, [pb, pa])
  assert sum(rep.overlapping_rows.values()) == 0
  for n, t in _tables_np(ab).items():
    np.testing.assert_array_equal(t, _tables_np(ba)[n])
  # Overlapping patches: "sum" adds both deltas, "last" takes the last, "refuse" refuses.
  pb_full = _patch(cfg, runner, tb)
  overlap = {n: np.intersect1d(ta[n].ids, tb[n].ids) for n in ta}
  assert sum(len(v) for v in overlap.values()) > 0  # facts share template n-grams
  summed, _, rep = patches.apply_patches(runner.params, cfg.model, runner.hashing, [pa, pb_full], policy="sum")
  last, _, _ = patches.apply_patches(runner.params, cfg.model, runner.hashing, [pa, pb_full], policy="last")
  assert rep.overlapping_rows == {n: len(v) for n, v in overlap.items()}
  base = _tables_np(runner.params)
  for n, ids in overlap.items():
    da = ta[n].new[np.searchsorted(ta[n].ids, ids)] - base[n][ids]
    db = tb[n].new[np.searchsorted(tb[n].ids, ids)] - base[n][ids]
    np.testing.assert_allclose(_tables_np(summed)[n][ids], base[n][ids] + da + db, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(_tables_np(last)[n][ids], tb[n].new[np.searchsorted(tb[n].ids, ids)])
  with pytest.raises(patches.PatchError, match="changed by more than one patch"):
    patches.apply_patches(runner.params, cfg.model, runner.hashing, [pa, pb_full], policy="refuse")


def test_fingerprint_and_base_rows_mismatches_refuse(setup):
  cfg, runner, tmp = setup
  tables, _ = _train(cfg, runner, [_facts(tmp, 5)[1]["train"]], steps=2)
  patch = _patch(cfg, runner, tables)
  other = dataclasses.replace(cfg.model, engram=dataclasses.replace(cfg.model.engram, seed=7))
  other_hashing = data_lib.engram_hashing(runner.tokenizer, other.engram)
  with pytest.raises(patches.PatchError, match="made for another model"):
    patches.apply_patches(runner.params, other, other_hashing, [patch])
  once, _, _ = patches.apply_patches(runner.params, cfg.model, runner.hashing, [patch])
  with pytest.raises(patches.PatchError, match="differ from this model's"):
    patches.apply_patches(once, cfg.model, runner.hashing, [patch])
  twice, undo, _ = patches.apply_patches(once, cfg.model, runner.hashing, [patch], force=True)
  for n, t in _tables_np(patches.revert(twice, undo)).items():  # revert restores what the model had
    np.testing.assert_array_equal(t, _tables_np(once)[n])


def test_protect_freeze_keeps_common_rows(setup):
  cfg, runner, tmp = setup
  _, paths = _facts(tmp, 6)
  ref = _batches(cfg, runner, [paths["train"]])  # the facts themselves as the reference: every row is common
  tables, stats = patches.train_rows(cfg, runner.params, runner.model_state, ref,
                                     patches.RowTraining(steps=3, protect="freeze", protect_min_count=1),
                                     reference_batches=ref, log=lambda s: None)
  assert all(stats["rows_protected"][n] == stats["rows_read"][n] for n in tables)
  assert all(len(r.ids) == 0 for r in tables.values())


def _facts_and_traffic(cfg, runner, tmp, seed):
  """(facts batches, 2 batches of held-out text as the traffic, that text's row read counts)."""
  _, paths = _facts(tmp, seed)
  kwargs = dict(engram=cfg.model.engram, vocab_size=cfg.model.vocab_size, tokenizer=runner.tokenizer)
  text = data_lib.eval_batches(cfg.data, **kwargs)[:2]
  return _batches(cfg, runner, [paths["train"]]), text, patches.rows_read(cfg.model, text, with_counts=True)


def test_frozen_traffic_rows_stay_bit_identical_and_the_traffic_reads_the_same_model(setup):
  """protect="freeze" with a traffic count: the patch holds no row the traffic reads, every such row
  (and everything else the patch does not hold) is bit-identical after applying it, so the traffic
  text's next-token distributions do not move at all; the rows only the facts read still learn."""
  cfg, runner, tmp = setup
  facts, text, traffic = _facts_and_traffic(cfg, runner, tmp, 13)
  tables, stats = patches.train_rows(cfg, runner.params, runner.model_state, facts,
                                     patches.RowTraining(steps=8, learning_rate=0.05, protect="freeze",
                                                         protect_min_count=1), traffic=traffic, log=lambda s: None)
  assert stats["losses"][-1][1] < stats["losses"][0][1]
  read = patches.rows_read(cfg.model, facts)
  patched, _, _ = patches.apply_patches(runner.params, cfg.model, runner.hashing, [_patch(cfg, runner, tables)])
  base, new = _tables_np(runner.params), _tables_np(patched)
  for n, rows in tables.items():
    shared = np.isin(read[n], traffic[n][0])
    assert stats["rows_protected"][n] == shared.sum() > 0 and len(rows.ids) > 0
    assert not np.isin(rows.ids, traffic[n][0]).any()
    np.testing.assert_array_equal(new[n][traffic[n][0]], base[n][traffic[n][0]])
    np.testing.assert_array_equal(np.flatnonzero(np.any(new[n] != base[n], axis=1)), rows.ids)
  assert patches.collateral(cfg.model, runner.params, patched, runner.model_state, text)["kl_per_token"] == 0.0


def test_traffic_weighted_anchor_holds_back_the_rows_ordinary_text_reads(setup):
  """protect="traffic" pulls each row back in proportion to how often the traffic reads it: the
  traffic's read-weighted movement of the rows and its KL fall against unprotected training."""
  cfg, runner, tmp = setup
  facts, text, traffic = _facts_and_traffic(cfg, runner, tmp, 14)
  moved, kl = {}, {}
  for protect in ("none", "traffic"):
    tables, stats = patches.train_rows(cfg, runner.params, runner.model_state, facts,
                                       patches.RowTraining(steps=12, learning_rate=0.05, protect=protect,
                                                           protect_weight=1e5), traffic=traffic, log=lambda s: None)
    assert stats["losses"][-1][1] < stats["losses"][0][1]
    moved[protect] = 0.0
    for n, rows in tables.items():
      ids, counts = traffic[n]
      at = np.searchsorted(ids, rows.ids).clip(0, len(ids) - 1)
      reads = np.where(ids[at] == rows.ids, counts[at], 0)
      moved[protect] += float(np.sum(reads * np.sum(np.square(rows.new - rows.base), axis=1)))
    patched, _, _ = patches.apply_patches(runner.params, cfg.model, runner.hashing, [_patch(cfg, runner, tables)])
    kl[protect] = patches.collateral(cfg.model, runner.params, patched, runner.model_state, text)["kl_per_token"]
  assert moved["traffic"] < 0.5 * moved["none"] and kl["traffic"] < kl["none"], (moved, kl)
  with pytest.raises(ValueError, match="protect='weights'"):
    patches.RowTraining(protect="weights")
  with pytest.raises(ValueError, match="protect_weight=-1"):
    patches.RowTraining(protect_weight=-1)


def test_question_answer_batches_train_the_answers_only(setup):
  """answer_batches: each row is [bos] prompt " answer" with the loss mask on exactly the answer's
  tokens and the rows' hash ids; training on them lowers the answers' loss; bad files are errors."""
  cfg, runner, tmp = setup
  kc, paths = _facts(tmp, 15, n=3)
  pairs = patches.read_qa_file(paths["qa"])
  assert pairs == knowledge.qa_pairs(kc) and len(pairs) == 3 * 4 * 4
  batches = patches.answer_batches(pairs, runner.encode, runner.hashing, batch_size=5, max_len=cfg.model.max_seq_len,
                                   bos_id=runner.bos_id, pad_id=runner.pad_id)
  assert len(batches) == -(-len(pairs) // 5)
  for i, p in enumerate(pairs):
    b, r = batches[i // 5], i % 5
    mask = b["loss_mask"][r] > 0
    assert list(b["targets"][r][mask]) == runner.encode(" " + p["answer"])
    assert list(b["tokens"][r][:mask.argmax() + 1]) == [runner.bos_id] + runner.encode(p["prompt"])
  assert not batches[-1]["loss_mask"][len(pairs) % 5:].any()  # the filler rows carry no loss
  for b in batches:
    np.testing.assert_array_equal(b["engram_ids"], runner.hashing.hash_numpy(b["tokens"]))
  tables, stats = patches.train_rows(cfg, runner.params, runner.model_state, batches,
                                     patches.RowTraining(steps=10, learning_rate=0.05), log=lambda s: None)
  assert stats["losses"][-1][1] < stats["losses"][0][1]
  # max_answers: rows that pairs of more distinct answers read (the templates) are frozen.
  answers = patches.answers_per_row(cfg.model, batches)
  want = {}
  for n, (ids, _) in answers.items():  # by hand: the distinct answers of the pairs reading each row
    i = cfg.model.engram.layer_ids.index(int(n.split("_")[1]))
    offsets = memory.table_layout(cfg.model.engram, int(n.split("_")[1]))[1]
    seen = {}
    for b in batches:
      for r in range(len(b["answer_ids"])):
        real = b["segment_ids"][r] > 0
        for row in np.unique((b["engram_ids"][r, :, i, :].astype(np.int64) + offsets)[real]):
          seen.setdefault(int(row), set()).add(int(b["answer_ids"][r]))
    want[n] = {k: len(v) for k, v in seen.items()}
    assert dict(zip(answers[n][0].tolist(), answers[n][1].tolist())) == want[n]
  shared, stats = patches.train_rows(cfg, runner.params, runner.model_state, batches,
                                     patches.RowTraining(steps=10, learning_rate=0.05, max_answers=3),
                                     log=lambda s: None)
  for n, rows in shared.items():
    templates = [k for k, v in want[n].items() if v > 3]
    assert stats["rows_template"][n] == len(templates) > 0
    assert not np.isin(rows.ids, templates).any() and len(rows.ids) > 0
  _, stats = patches.train_rows(cfg, runner.params, runner.model_state, _batches(cfg, runner, [paths["train"]]),
                                patches.RowTraining(steps=1, max_answers=3), log=lambda s: None)
  assert sum(stats["rows_template"].values()) == 0  # text batches carry no answers: the rule does not apply
  with pytest.raises(patches.PatchError, match="needs question/answer batches"):
    patches.answers_per_row(cfg.model, _batches(cfg, runner, [paths["train"]]))
  bad = tmp / "bad_qa.jsonl"
  bad.write_text('{"prompt": "Who", "answer": "x"}\n{"prompt": "Who"}\n')
  with pytest.raises(patches.PatchError, match="bad_qa.jsonl:2"):
    patches.read_qa_file(str(bad))
  with pytest.raises(patches.PatchError, match="expected at most 4"):
    patches.answer_batches(pairs, runner.encode, runner.hashing, batch_size=5, max_len=4, bos_id=runner.bos_id)


def test_replayed_text_kl_term_lowers_the_collateral_kl(setup):
  """kl_weight > 0 replays the reference text under KL(base || patched): the trained patch moves
  that text's distributions less than the same training without it, and still learns the facts."""
  cfg, runner, tmp = setup
  _, paths = _facts(tmp, 12)
  facts = _batches(cfg, runner, [paths["train"]])
  kwargs = dict(engram=cfg.model.engram, vocab_size=cfg.model.vocab_size, tokenizer=runner.tokenizer)
  reference = data_lib.eval_batches(cfg.data, **kwargs)[:2]
  kl = {}
  for w in (0.0, 30.0):
    tables, stats = patches.train_rows(cfg, runner.params, runner.model_state, facts,
                                       patches.RowTraining(steps=8, learning_rate=0.05, kl_weight=w, protect="none"),
                                       reference_batches=reference, log=lambda s: None)
    assert stats["losses"][-1][1] < stats["losses"][0][1]
    patched, _, _ = patches.apply_patches(runner.params, cfg.model, runner.hashing, [_patch(cfg, runner, tables)])
    kl[w] = patches.collateral(cfg.model, runner.params, patched, runner.model_state, reference)["kl_per_token"]
  assert 0 < kl[30.0] < 0.8 * kl[0.0], kl  # (the KL gradient is 0 at the base: it acts as rows move)
  with pytest.raises(ValueError, match="kl_weight=-1"):
    patches.RowTraining(kl_weight=-1)


def test_damaged_patches_are_clear_errors_and_nothing_is_written_over(setup):
  cfg, runner, tmp = setup
  tables, _ = _train(cfg, runner, [_facts(tmp, 8)[1]["train"]], steps=2)
  out = str(tmp / "p8")
  patches.save_patch(_patch(cfg, runner, tables), out)
  with pytest.raises(FileExistsError, match="already exists"):
    patches.save_patch(_patch(cfg, runner, tables), out)
  bad = str(tmp / "p8_truncated")
  shutil.copytree(out, bad)
  name = sorted(tables)[0]
  with open(os.path.join(bad, f"{name}.new.npy"), "r+b") as f:
    f.truncate(100)
  with pytest.raises(patches.PatchError, match="checksum.*damaged"):
    patches.load_patch(bad)
  os.remove(os.path.join(bad, "manifest.json"))
  with pytest.raises(patches.PatchError, match="no manifest.json"):
    patches.load_patch(bad)
  with pytest.raises(patches.PatchError, match="does not exist"):
    patches.load_patch(str(tmp / "nope"))
  with open(os.path.join(out, "manifest.json")) as f:
    manifest = json.load(f)
  with pytest.raises(patches.PatchError, match="patch_policy='nope'"):
    patches.apply_patches(runner.params, cfg.model, runner.hashing, [out], policy="nope")
  assert manifest["format_version"] == patches.FORMAT_VERSION


def test_collateral_kl_and_loss_change_against_a_float64_reference(setup):
  """collateral(): zero for the base against itself; for a patch, the mean KL(base || patched) per
  real token and both losses equal a float64 numpy computation from the two models' logits."""
  from engram_jax.model import forward

  cfg, runner, tmp = setup
  _, paths = _facts(tmp, 11)
  tables, _ = _train(cfg, runner, [paths["train"]], steps=8)
  patched, _, _ = patches.apply_patches(runner.params, cfg.model, runner.hashing, [_patch(cfg, runner, tables)])
  kwargs = dict(engram=cfg.model.engram, vocab_size=cfg.model.vocab_size, tokenizer=runner.tokenizer)
  reference = data_lib.eval_batches(cfg.data, **kwargs)[:2]
  same = patches.collateral(cfg.model, runner.params, runner.params, runner.model_state, reference)
  assert same["kl_per_token"] == 0.0 and same["heldout_loss_change"] == 0.0 and same["tokens"] > 0
  got = patches.collateral(cfg.model, runner.params, patched, runner.model_state, reference)
  kl = nll_b = nll_p = n = 0.0
  for b in reference:
    batch = {k: jnp.asarray(v) for k, v in b.items() if k in ("tokens", "targets", "segment_ids", "positions",
                                                              "engram_ids")}
    lb, lp = (np.asarray(forward(cfg.model, p, runner.model_state, batch)[0], np.float64) for p in (runner.params, patched))
    log_b = lb - np.log(np.exp(lb - lb.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lb.max(-1, keepdims=True)
    log_p = lp - np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lp.max(-1, keepdims=True)
    mask = np.asarray(b["loss_mask"], np.float64)
    t = np.asarray(b["targets"])[..., None]
    kl += np.sum(mask * np.sum(np.exp(log_b) * (log_b - log_p), -1))
    nll_b -= np.sum(mask * np.take_along_axis(log_b, t, -1)[..., 0])
    nll_p -= np.sum(mask * np.take_along_axis(log_p, t, -1)[..., 0])
    n += mask.sum()
  assert got["tokens"] == n and got["kl_per_token"] > 0
  np.testing.assert_allclose(got["kl_per_token"], kl / n, rtol=1e-3, atol=1e-7)
  np.testing.assert_allclose([got["heldout_loss_base"], got["heldout_loss_patched"]], [nll_b / n, nll_p / n], rtol=1e-5)
  np.testing.assert_allclose(got["heldout_loss_change"], (nll_p - nll_b) / nll_b, rtol=1e-3, atol=1e-7)
  # Every row a patch changes is read by its own facts; the held-out text reads some share of them.
  assert patches.traffic_share(cfg.model, tables, _batches(cfg, runner, [paths["train"]]))["all"] == 1.0
  share = patches.traffic_share(cfg.model, tables, reference)
  assert 0.0 <= share["all"] <= 1.0 and set(share) == set(tables) | {"all"}
  assert patches.traffic_share(cfg.model, tables, read=patches.rows_read(cfg.model, reference, True)) == share
  with pytest.raises(patches.PatchError, match="no batch of reference text"):
    patches.collateral(cfg.model, runner.params, patched, runner.model_state, [])


def test_patch_py_create_info_and_eval_py_patches(tmp_path):
  """The CLI on the committed tiny checkpoint: create, info, eval.py --patches (checkpoint untouched)."""
  checkpoints = str(tmp_path / "checkpoints")
  shutil.copytree(FIXTURE, checkpoints)
  _, paths = _facts(tmp_path, 9, n=4)
  out = str(tmp_path / "facts_patch")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *args: subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env,  # noqa: E731
                                     timeout=600)
  proc = run("patch.py", "create", "--checkpoint", checkpoints, "--facts", paths["train"], "--out", out,
             "--steps", "20", "--seq_len", "32", "--batch_size", "4", "--probes", paths["probes"], "--mechanism", "rows")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "recall of new facts" in proc.stdout
  # The default protection costs the held-out text less than the same training unprotected.
  bare = str(tmp_path / "facts_patch_unprotected")
  proc2 = run("patch.py", "create", "--checkpoint", checkpoints, "--facts", paths["train"], "--out", bare,
              "--steps", "20", "--seq_len", "32", "--batch_size", "4", "--protect", "none", "--mechanism", "rows")
  assert proc2.returncode == 0, proc2.stderr[-3000:]
  with open(os.path.join(bare, "manifest.json")) as f:
    unprotected = json.load(f)["training"]["collateral"]
  qa_out = str(tmp_path / "qa_patch")  # question/answer pairs alone, the loss on the answers
  proc2 = run("patch.py", "create", "--checkpoint", checkpoints, "--qa", paths["qa"], "--out", qa_out, "--steps", "3")
  assert proc2.returncode == 0, proc2.stderr[-3000:]
  with open(os.path.join(qa_out, "manifest.json")) as f:
    assert json.load(f)["training"]["qa_pairs"] == 4 * 4 * 4
  assert "Patch written to" in proc.stdout and os.path.isfile(os.path.join(out, "manifest.json"))
  assert "collateral on held-out text" in proc.stdout and "KL(base || patched)" in proc.stdout
  with open(os.path.join(out, "manifest.json")) as f:
    training = json.load(f)["training"]
  assert training["collateral"]["tokens"] > 0 and training["collateral"]["kl_per_token"] >= 0
  assert training["protect"] == patches.RowTraining().protect and training["steps"] == 20
  assert abs(training["collateral"]["heldout_loss_change"]) < abs(unprotected["heldout_loss_change"]), (
      training["collateral"], unprotected)
  assert training["collateral"]["kl_per_token"] < unprotected["kl_per_token"]
  assert 0.0 <= training["rows_base_traffic_share"]["all"] <= 1.0
  assert set(training["recall"]["new_facts"]) == {"base", "patched", "questions"}
  proc = run("patch.py", "create", "--checkpoint", checkpoints, "--facts", paths["train"], "--out", out)
  assert proc.returncode != 0 and "already exists" in proc.stderr
  proc = run("patch.py", "info", out)
  assert proc.returncode == 0 and "rows changed" in proc.stdout, proc.stderr[-2000:]
  assert "rows the base traffic (the checkpoint's training text) reads" in proc.stdout
  assert "KL(base || patched)" in proc.stdout
  proc = run("eval.py", "--checkpoint", checkpoints, "--patches", out, "--max_eval_batches", "40",
             "--niah_lengths=", "--output_dir", str(tmp_path / "eval"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "eval" / "results.json") as f:
    results = json.load(f)
  assert results["checkpoint"]["patches"] == [os.path.abspath(out)]
  proc = run("eval.py", "--checkpoint", checkpoints, "--patches", str(tmp_path / "missing"), "--niah_lengths=")
  assert proc.returncode != 0 and "missing" in proc.stderr


def test_patches_on_host_and_disk_tables_equal_device_and_revert_exactly(setup):
  """The same patch on tables in host RAM and memory-mapped files (an overlay the host gather reads)
  gives the device-table outputs bitwise; reverting reads the base rows again; the files stay as written."""
  from engram_jax import offload

  cfg, runner, tmp = setup
  tables, _ = _train(cfg, runner, [_facts(tmp, 10)[1]["train"]], steps=4)
  out = str(tmp / "p10")
  patches.save_patch(_patch(cfg, runner, tables), out)
  rows = [[runner.bos_id] + runner.encode(t) for t in ("Zorvak was born in", "The os module")]
  base = runner.run_rows(rows)
  runner.apply_patches([out], log=lambda s: None)
  want = runner.run_rows(rows)
  runner.revert_patches()
  tables_np = _tables_np(runner.params)
  fp = patches.fingerprint(cfg.model, runner.hashing)
  table_dir = str(tmp / "tables10")
  offload.write_table_dir(table_dir, cfg.model, fp, lambda n, a, b: tables_np[n][a:b], chunk_rows=500,
                          log=lambda s: None)
  for placement in ("host", "disk"):
    host = offload.HostTables.open(table_dir, cfg.model, fp, placement)
    r = ModelRunner(cfg, runner.params, runner.model_state, runner.mesh, runner.tokenizer, tables=host)
    r.apply_patches([out], log=lambda s: None)
    for a, b in zip(r.run_rows(rows), want):
      np.testing.assert_array_equal(a["nll"], b["nll"], err_msg=placement)
    with pytest.raises(patches.PatchError, match="differ from this model's"):
      r.apply_patches([out], log=lambda s: None)  # its base rows are already replaced
    r.revert_patches()
    for a, b in zip(r.run_rows(rows), base):
      np.testing.assert_array_equal(a["nll"], b["nll"], err_msg=placement)
  for name, t in tables_np.items():  # the table files hold the base rows still
    np.testing.assert_array_equal(np.asarray(offload.HostTables.open(table_dir, cfg.model, fp, "disk").rows[name]), t)
