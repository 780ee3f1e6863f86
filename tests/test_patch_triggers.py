"""Trigger-row patches: exact matching, bitwise-base outputs where no trigger fires (device, host and
disk tables; prefill and decode), a trigger completed mid-generation, stacking, the format."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import data as data_lib
from engram_jax import generation, knowledge, memory, offload, patches
from engram_jax.config import Config, DataConfig, MeshConfig, TrainConfig
from engram_jax.model import forward, init_variables
from engram_jax.runner import ModelRunner
from engram_jax.sharding import LOGICAL_RULES, make_mesh, place_batch
from engram_jax.tables import triggers as tr

from test_patches import MODEL

OTHER_TEXT = ("The os module provides a portable way of using operating system dependent functionality.",
              "The list sort method is stable, and a dict keeps its insertion order.")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("triggers")
  cfg = Config(model=MODEL, data=DataConfig(seq_len=32, batch_size=4), train=TrainConfig(steps=10, warmup_steps=0),
               mesh=MeshConfig(data=1), name="test")
  mesh = make_mesh(cfg.mesh, jax.devices()[:1])
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    variables = jax.jit(lambda: nn.meta.unbox(init_variables(MODEL, jax.random.key(0))))()
  params = variables.pop("params")
  runner = ModelRunner(cfg, params, dict(variables), mesh)
  kw = dict(engram=MODEL.engram, vocab_size=MODEL.vocab_size, tokenizer=runner.tokenizer)
  traffic = list(data_lib.make_dataset(dataclasses.replace(cfg.data, num_epochs=1, num_workers=0), "train", **kw))[:64]
  # The base's traffic holds facts of other people, as a base trained on facts does: their templates
  # ("was born in") are then ordinary text, and a patch's triggers single out its own people.
  traffic += _facts_batches(cfg, runner, tmp, 99, n=16)[1]
  return cfg, runner, tmp, traffic


def _facts_batches(cfg, runner, tmp, seed, n=4):
  kc = knowledge.generate_knowledge(n, seed=seed, documents_per_entity=1)
  paths = knowledge.write_knowledge(kc, str(tmp / f"facts{seed}"))
  data_cfg = dataclasses.replace(cfg.data, train_files=(paths["train"],), num_epochs=1)
  return kc, list(data_lib.make_dataset(data_cfg, "train", engram=cfg.model.engram, vocab_size=cfg.model.vocab_size,
                                        tokenizer=runner.tokenizer))


def _trigger_patch(cfg, runner, setup_tmp, traffic, seed, steps=6):
  kc, batches = _facts_batches(cfg, runner, setup_tmp, seed)
  tokens, _ = patches.choose_triggers(cfg.model, batches, traffic, max_length=12)
  rows, _ = patches.train_triggers(cfg, runner.params, runner.model_state, batches, tokens,
                                   patches.TriggerTraining(steps=steps, learning_rate=0.05), log=lambda s: None)
  return kc, batches, patches.make_patch(cfg.model, runner.hashing, {}, {"seed": seed}, rows)


@pytest.fixture(scope="module")
def patch_a(setup):
  cfg, runner, tmp, traffic = setup
  return _trigger_patch(cfg, runner, tmp, traffic, 11)


def _rows_of(runner, texts, length=30):
  return [([runner.bos_id] + runner.encode(t))[:length] for t in texts]


def _nll(runner, rows):
  return [o["nll"] for o in runner.run_rows(rows)]


def test_host_matching_equals_brute_force_and_the_decode_window_match():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 4, (3, 48)).astype(np.int32)
  seg = np.ones_like(tokens)
  seg[1, 20:] = 2  # a document boundary
  seg[2, 40:] = 0  # padding
  table = tr.pack([tuple(tokens[0, 5:9]), tuple(tokens[0, 7:9]), tuple(tokens[1, 17:22]), tuple(tokens[2, 10:13]),
                   tuple(tokens[1, 30:36])])
  got = tr.match(tokens, seg, table)
  for b in range(3):
    for t in range(48):
      want, best = -1, 0
      for n, s in enumerate(tr.unpack(table)):
        lo = t - len(s) + 1
        if lo >= 0 and seg[b, t] > 0 and np.all(seg[b, lo:t + 1] == seg[b, t]) and tuple(tokens[b, lo:t + 1]) == s \
            and len(s) > best:
          want, best = n, len(s)
      assert got[b, t] == want, (b, t)
      if b == 0:  # the in-graph match of the decode loop on the row's window gives the same trigger
        window = tr.window_numpy(tokens[b:b + 1], np.array([t + 1]), table.shape[1])
        assert int(tr.match_last(jnp.asarray(window), jnp.asarray(table))[0]) == want
  assert got[1, 21] == -1  # trigger 2 spans the document boundary: it never fires
  # A fingerprint shared by two triggers still needs token equality (the walk over candidates).
  assert tr.match(tokens[:1], None, tr.pack([(9, 9, 9), tuple(tokens[0, 6:9])]))[0, 8] == 1


def test_chosen_triggers_are_the_shortest_suffixes_the_traffic_never_contains(setup, patch_a):
  cfg, runner, tmp, traffic = setup
  _, batches, patch = patch_a
  t = patch.triggers
  assert len(t) > 0 and t.tokens.shape[1] <= 12
  lengths = t.lengths if hasattr(t, "lengths") else (t.tokens != tr.PAD).sum(1)
  assert lengths.min() >= cfg.model.engram.max_ngram_size
  # Ordinary text never fires one, and the suffix one token shorter occurs in it (when long enough).
  assert all(np.all(tr.match(b["tokens"], b["segment_ids"], t.tokens) < 0) for b in traffic)
  longer = [s for s in tr.unpack(t.tokens) if len(s) > cfg.model.engram.max_ngram_size]
  seen = tr.Traffic(traffic, 12)
  for s in longer:
    assert seen.contains(len(s) - 1, tr.fingerprints(np.asarray([s[1:]])))[0], s
  # Every trained position of the facts reads a trigger or has none up to max_length tokens.
  assert all(np.any(tr.match(b["tokens"], b["segment_ids"], t.tokens) >= 0) for b in batches)


def test_untrained_trigger_patch_is_the_base_model_bit_for_bit(setup):
  cfg, runner, tmp, traffic = setup
  kc, batches = _facts_batches(cfg, runner, tmp, 12)
  tokens, _ = patches.choose_triggers(cfg.model, batches, traffic, max_length=12)
  rows, _ = patches.train_triggers(cfg, runner.params, runner.model_state, batches, tokens,
                                   patches.TriggerTraining(steps=0), log=lambda s: None)
  for name in rows.new:
    np.testing.assert_array_equal(rows.new[name], rows.base[name])
  fact_rows = _rows_of(runner, kc.train_documents[:3])
  base = _nll(runner, fact_rows)
  report = runner.apply_patches([patches.make_patch(cfg.model, runner.hashing, {}, {}, rows)], log=lambda s: None)
  assert report.triggers == len(tokens)
  assert np.any(runner.source.trigger_ids(*[runner.make_batch(fact_rows, 32)[k] for k in ("tokens", "segment_ids")])
                >= 0)  # the triggers fire on the facts
  for a, b in zip(_nll(runner, fact_rows), base):
    np.testing.assert_array_equal(a, b)
  runner.revert_patches()


def _tables_dir(cfg, runner, tmp):
  path = str(tmp / "tables")
  if not os.path.exists(path):
    tables_np = {n: np.asarray(t) for n, t in memory.split(runner.params)[1].items()}
    offload.write_table_dir(path, cfg.model, patches.fingerprint(cfg.model, runner.hashing),
                            lambda n, a, b: tables_np[n][a:b], chunk_rows=500, log=lambda s: None)
  return path


def _near_misses(runner, patch):
  """(a trigger, texts that come close to it): its prefix, its last token changed, and a copy that
  reads the very hashed rows the trigger does where it ends, with other tokens (a token outside the
  last n-gram changed, or one changed to another with the same compressed id). The longest trigger
  whose near-misses hold no other trigger (a prefix may end with a shorter one, which rightly fires)."""
  for seq in sorted(tr.unpack(patch.triggers.tokens), key=len, reverse=True):
    seq, near = _near_misses_of(runner, list(seq))
    b = data_lib.document_rows([[runner.bos_id] + x for x in near], 32, runner.pad_id)
    if near[2] and np.all(tr.match(b["tokens"], b["segment_ids"], patch.triggers.tokens) < 0):
      return seq, near
  raise AssertionError("every trigger's near-misses hold another trigger")


def _near_misses_of(runner, seq):
  e = runner.cfg.model.engram
  collide = None
  if len(seq) > e.max_ngram_size:
    collide = [(seq[0] + 1) % e_vocab(runner)] + seq[1:]
  else:
    lookup = runner.hashing.compressed.lookup
    for i in range(len(seq)):
      twins = [t for t in np.flatnonzero(lookup == lookup[seq[i]]) if t != seq[i]]
      if twins:
        collide = seq[:i] + [int(twins[0])] + seq[i + 1:]
        break
  return seq, [seq[:-1], seq[:-1] + [(seq[-1] + 1) % e_vocab(runner)], collide or []]


def e_vocab(runner):
  return runner.cfg.model.vocab_size


def test_text_without_a_trigger_is_bitwise_the_base_on_device_host_and_disk_tables(setup, patch_a):
  cfg, runner, tmp, traffic = setup
  _, _, patch = patch_a
  seq, near = _near_misses(runner, patch)
  rows = _rows_of(runner, OTHER_TEXT) + [[runner.bos_id] + s for s in near]
  batch = runner.make_batch(rows, 32)
  # The colliding text reads the very hashed rows the whole trigger does, yet no trigger fires.
  full = runner.make_batch([[runner.bos_id] + seq], 32)
  np.testing.assert_array_equal(batch["engram_ids"][4, len(seq)], full["engram_ids"][0, len(seq)])
  fires = tr.match(batch["tokens"], batch["segment_ids"], patch.triggers.tokens)
  assert np.all(fires < 0), [(r, runner.tokenizer.decode(rows[r])) for r in np.flatnonzero(np.any(fires >= 0, 1))]
  base = _nll(runner, rows)
  base_fired = _nll(runner, [[runner.bos_id] + seq])[0]
  table_dir = _tables_dir(cfg, runner, tmp)
  for placement in ("device", "host", "disk"):
    r = runner if placement == "device" else ModelRunner(
        cfg, runner.params, runner.model_state, runner.mesh, runner.tokenizer,
        tables=offload.HostTables.open(table_dir, cfg.model, patches.fingerprint(cfg.model, runner.hashing), placement))
    r.apply_patches([patch], log=lambda s: None)
    for a, b in zip(_nll(r, rows), base):
      np.testing.assert_array_equal(a, b, err_msg=placement)
    # ... while the trigger itself changes the output from where it ends.
    fired = _nll(r, [[runner.bos_id] + seq])[0]
    np.testing.assert_array_equal(fired[:len(seq)], base_fired[:len(seq)])
    assert not np.array_equal(fired, base_fired)
    r.revert_patches()
    for a, b in zip(_nll(r, rows), base):
      np.testing.assert_array_equal(a, b, err_msg=placement)


def _rollout(gen, prompts, steps):
  rows = gen.batch_bucket(len(prompts))
  padded = [list(p) for p in prompts] + [[gen.runner.pad_id]] * (rows - len(prompts))
  state = gen.prefill(padded, 32)
  sampling = generation.sampling_arrays(rows)
  logits, tokens = [np.asarray(state.logits)], []
  for _ in range(steps):
    state, out = gen.step(state, sampling)
    tokens.append(np.asarray(out.tokens))
    logits.append(np.asarray(state.logits))
  return np.stack(tokens, 1)[:len(prompts)], np.stack(logits, 1)[:len(prompts)]


@pytest.mark.parametrize("placement", ["device", "host"])
def test_a_trigger_completed_mid_generation_fires_at_that_step_as_in_a_full_forward(setup, placement):
  """Decode with a trigger made of a prompt's end and its first two greedy tokens: the steps before
  it read the base rows (logits bitwise the base decode's), the step that completes it reads the
  trigger's rows, as a full forward over the whole sequence with host matching does; prompts with
  no trigger decode bitwise as the base."""
  cfg, runner, tmp, traffic = setup
  r = runner if placement == "device" else ModelRunner(
      cfg, runner.params, runner.model_state, runner.mesh, runner.tokenizer,
      tables=offload.HostTables.open(_tables_dir(cfg, runner, tmp), cfg.model,
                                     patches.fingerprint(cfg.model, runner.hashing), "host"))
  gen = generation.Generator(r, log=lambda s: None)
  prompts = _rows_of(runner, ("Zorvak was born in", "The list sort method"))
  steps = 5
  base_tokens, base_logits = _rollout(gen, prompts, steps)
  trig = list(prompts[0][-3:]) + base_tokens[0, :2].tolist()
  doc = list(prompts[0]) + base_tokens[0, :2].tolist()
  batch = data_lib.document_rows([doc], 32, runner.pad_id, runner.hashing)
  batch["loss_mask"] = (batch["segment_ids"] > 0).astype(np.float32)
  rows, _ = patches.train_triggers(cfg, runner.params, runner.model_state, [batch], tr.pack([trig]),
                                   patches.TriggerTraining(steps=0), log=lambda s: None)
  rng = np.random.default_rng(0)
  rows.new = {n: (v + rng.normal(0, 1.0, v.shape)).astype(v.dtype) for n, v in rows.new.items()}
  r.apply_patches([patches.make_patch(cfg.model, runner.hashing, {}, {}, rows)], log=lambda s: None)
  tokens, logits = _rollout(gen, prompts, steps)
  r.revert_patches()
  # The trigger completes when the second generated token is fed (decode step 2: logits index 2).
  np.testing.assert_array_equal(logits[:, :2], base_logits[:, :2])
  np.testing.assert_array_equal(tokens[:, :2], base_tokens[:, :2])
  np.testing.assert_array_equal(logits[1], base_logits[1])  # the other prompt never completes it
  assert np.abs(logits[0, 2] - base_logits[0, 2]).max() > 1e-3
  # The full forward over the decoded sequence with host-matched triggers gives the same logits.
  seq = list(prompts[0]) + tokens[0].tolist()
  full = data_lib.document_rows([seq], 32, runner.pad_id, runner.hashing)
  tid = tr.match(full["tokens"], full["segment_ids"], tr.pack([trig]))
  assert np.flatnonzero(tid[0] >= 0).tolist() == [len(prompts[0]) + 1]
  with jax.set_mesh(runner.mesh), nn.logical_axis_rules(LOGICAL_RULES):
    def fwd(p, s, b, tid, trig_rows):
      base_rows = memory.gather(memory.split(p)[1], cfg.model.engram, b["engram_ids"])
      return forward(cfg.model, p, s, b, rows=tr.select(base_rows, tid, trig_rows))[0]
    want = np.asarray(jax.jit(fwd)(runner.params, runner.model_state, place_batch(full, runner.mesh), jnp.asarray(tid),
                                   {n: jnp.asarray(v) for n, v in rows.new.items()}))[0]
  n = len(prompts[0])
  np.testing.assert_allclose(logits[0], want[n - 1:n + steps], atol=2e-4, rtol=1e-4)


def test_disjoint_patches_stack_exactly_and_identical_triggers_follow_the_policy(setup, patch_a):
  cfg, runner, tmp, traffic = setup
  kc_a, batches_a, pa = patch_a
  kc_b, batches_b, pb = _trigger_patch(cfg, runner, tmp, traffic, 13)
  # Two facts sets may share a phrase the traffic sample never held (then one trigger both supply,
  # resolved by the policy, below): keep B's own triggers for the disjoint case.
  mine = [i for i, s in enumerate(tr.unpack(pb.triggers.tokens)) if s not in set(tr.unpack(pa.triggers.tokens))]
  t = pb.triggers
  pb = patches.make_patch(cfg.model, runner.hashing, {}, {}, patches.TriggerRows(
      tr.pack(tr.unpack(t.tokens[mine])), {n: v[mine] for n, v in t.new.items()}, {n: v[mine] for n, v in t.base.items()}))
  text_a, text_b = _rows_of(runner, kc_a.train_documents[:2]), _rows_of(runner, kc_b.train_documents[:2])
  for text, other in ((text_a, pb), (text_b, pa)):  # disjoint: neither fires on the other's facts
    b = runner.make_batch(text, 32)
    assert np.all(tr.match(b["tokens"], b["segment_ids"], other.triggers.tokens) < 0)
  alone = {}
  for name, p, text in (("a", pa, text_a), ("b", pb, text_b)):
    runner.apply_patches([p], log=lambda s: None)
    alone[name] = _nll(runner, text)
    runner.revert_patches()
  report = runner.apply_patches([pa, pb], policy="refuse", log=lambda s: None)
  assert report.identical_triggers == 0 and report.triggers == len(pa.triggers) + len(pb.triggers)
  for name, text in (("a", text_a), ("b", text_b)):
    for x, y in zip(_nll(runner, text), alone[name]):
      np.testing.assert_array_equal(x, y)
  runner.revert_patches()
  # The same triggers twice: counted, refused under "refuse", the last one's rows under "last".
  with pytest.raises(patches.PatchError, match=f"{len(pa.triggers)} triggers are supplied by more than one patch"):
    runner.apply_patches([pa, pa], policy="refuse", log=lambda s: None)
  assert runner.source.triggers is None
  report = runner.apply_patches([pa, pa], policy="last", log=lambda s: None)
  assert report.identical_triggers == len(pa.triggers)
  for x, y in zip(_nll(runner, text_a), alone["a"]):
    np.testing.assert_array_equal(x, y)
  runner.revert_patches()
  summed, _ = patches.resolve_triggers(cfg.model, runner.hashing, [pa, pa], ["a", "a2"], policy="sum")
  name = sorted(pa.triggers.new)[0]
  order = [tr.unpack(pa.triggers.tokens).index(s) for s in tr.unpack(summed.tokens)]
  want = pa.triggers.base[name][order] + 2 * (pa.triggers.new[name][order] - pa.triggers.base[name][order])
  np.testing.assert_allclose(summed.rows[name], want, rtol=1e-6, atol=1e-6)


def test_trigger_patch_format_round_trip_info_and_version_1_still_loads(setup, patch_a):
  cfg, runner, tmp, traffic = setup
  _, _, pa = patch_a
  out = str(tmp / "pa")
  patches.save_patch(pa, out)
  loaded = patches.load_patch(out)
  assert loaded.manifest["format_version"] == 2 and loaded.manifest["mechanism"] == "triggers"
  np.testing.assert_array_equal(loaded.triggers.tokens, pa.triggers.tokens)
  for name in pa.triggers.new:
    np.testing.assert_array_equal(loaded.triggers.new[name], pa.triggers.new[name])
  text = patches.describe(loaded, decode=lambda ids: runner.tokenizer.decode(list(ids)))
  assert "mechanism triggers" in text and f"triggers {len(pa.triggers)}" in text and "trigger 0:" in text
  # A damaged trigger file is refused by its checksum.
  damaged = str(tmp / "pa_damaged")
  import shutil
  shutil.copytree(out, damaged)
  with open(os.path.join(damaged, "triggers.tokens.npy"), "r+b") as f:
    f.seek(-1, 2)
    f.write(b"\x01")
  with pytest.raises(patches.PatchError, match="triggers.tokens.npy does not match its checksum"):
    patches.load_patch(damaged)
  # A format-1 patch (hashed rows, no triggers) still loads and applies.
  tables, _ = patches.train_rows(cfg, runner.params, runner.model_state, _facts_batches(cfg, runner, tmp, 14)[1],
                                 patches.RowTraining(steps=2, learning_rate=0.05), log=lambda s: None)
  old = str(tmp / "v1")
  patches.save_patch(patches.make_patch(cfg.model, runner.hashing, tables, {}), old)
  with open(os.path.join(old, "manifest.json")) as f:
    manifest = json.load(f)
  manifest["format_version"] = 1
  manifest.pop("mechanism")
  with open(os.path.join(old, "manifest.json"), "w") as f:
    json.dump(manifest, f)
  assert patches.load_patch(old).triggers is None
  runner.apply_patches([old, out], log=lambda s: None)  # a rows patch and a trigger patch together
  runner.revert_patches()


def test_patch_py_create_defaults_to_triggers_info_lists_them_and_eval_applies_them(tmp_path):
  """The CLI on the committed tiny checkpoint: `create` (triggers by default) reports the triggers and
  a collateral KL of exactly 0 where none fires in the held-out text; `info` lists them; eval.py applies it."""
  import shutil
  import subprocess
  import sys

  from test_patches import FIXTURE, ROOT, _facts

  checkpoints = str(tmp_path / "checkpoints")
  shutil.copytree(FIXTURE, checkpoints)
  _, paths = _facts(tmp_path, 21, n=3)
  out = str(tmp_path / "trigger_patch")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = lambda *args: subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env,  # noqa: E731
                                     timeout=600)
  proc = run("patch.py", "create", "--checkpoint", checkpoints, "--facts", paths["train"], "--out", out,
             "--steps", "10", "--seq_len", "32", "--batch_size", "4", "--probes", paths["probes"],
             "--traffic_batches", "32", "--collateral_batches", "4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "triggers:" in proc.stdout and "mechanism triggers" in proc.stdout
  with open(os.path.join(out, "manifest.json")) as f:
    manifest = json.load(f)
  c = manifest["training"]["collateral"]
  assert manifest["mechanism"] == "triggers" and manifest["triggers"]["count"] > 0
  if c["triggered_tokens"] == 0:
    assert c["kl_per_token"] == 0.0 and c["heldout_loss_change"] == 0.0
  proc = run("patch.py", "create", "--checkpoint", checkpoints, "--facts", paths["train"], "--out", out + "x",
             "--protect", "none")
  assert proc.returncode != 0 and "--mechanism rows" in proc.stderr
  proc = run("patch.py", "info", out)
  assert proc.returncode == 0 and "trigger 0:" in proc.stdout, proc.stderr[-2000:]
  proc = run("eval.py", "--checkpoint", checkpoints, "--patches", out, "--max_eval_batches", "40",
             "--niah_lengths=", "--output_dir", str(tmp_path / "eval"))
  assert proc.returncode == 0, proc.stderr[-3000:]
