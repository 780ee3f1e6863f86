"""Training end to end on the tiny preset: it learns, resumes exactly, reshards, survives SIGTERM."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from engram_jax import memory, trainer
from engram_jax.config import CheckpointConfig, Config, MeshConfig, load_preset
from engram_jax.sharding import make_mesh, place_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(steps=6, every=3, **train_changes) -> Config:
  cfg = load_preset(os.path.join(ROOT, "configs", "tiny.py"))
  train = dataclasses.replace(cfg.train, steps=steps, warmup_steps=2, log_every=1, eval_every=0,
                              checkpoint=CheckpointConfig(every_n_steps=every, keep_last_n=5, async_save=True),
                              **train_changes)
  data = dataclasses.replace(cfg.data, seq_len=32, batch_size=8)
  return dataclasses.replace(cfg, train=train, data=data, mesh=MeshConfig(data=-1))


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_few_steps_train_and_resume_exactly(tmp_path):
  cfg = tiny(steps=6, every=3)
  full = trainer.train(cfg, str(tmp_path / "full"), progress=False, log=lambda *_: None)
  assert full["stopped_by"] == "completed" and full["step"] == 6
  losses_full = _losses(tmp_path / "full")
  assert sorted(losses_full) == list(range(1, 7)) and all(np.isfinite(list(losses_full.values())))
  assert os.path.isdir(os.path.join(full["checkpoint_dir"], "6"))

  part = trainer.train(cfg, str(tmp_path / "resumed"), progress=False, log=lambda *_: None, max_steps=4)
  assert part["stopped_by"] == "max_steps" and part["step"] == 4
  logs = []
  rest = trainer.train(cfg, str(tmp_path / "resumed"), progress=False, log=logs.append)
  assert any("Resumed from step 4" in line for line in logs)
  assert rest["step"] == 6
  losses_resumed = _losses(tmp_path / "resumed")
  for step in (5, 6):
    assert losses_resumed[step] == losses_full[step], (step, losses_resumed[step], losses_full[step])


def test_restore_on_a_smaller_mesh_and_continue(tmp_path):
  cfg8 = dataclasses.replace(tiny(steps=3, every=3), mesh=MeshConfig(data=2, fsdp=4))
  trainer.train(cfg8, str(tmp_path), progress=False, log=lambda *_: None, devices=jax.devices()[:8])
  cfg4 = dataclasses.replace(tiny(steps=5, every=5), mesh=MeshConfig(data=1, fsdp=4))
  logs = []
  out = trainer.train(cfg4, str(tmp_path), progress=False, log=logs.append, devices=jax.devices()[:4])
  assert any("Resumed from step 3" in line for line in logs)
  assert out["step"] == 5
  losses = _losses(tmp_path)
  assert set(losses) >= {4, 5} and np.isfinite(losses[5])
  mesh4 = make_mesh(cfg4.mesh, jax.devices()[:4])
  params, _, step = trainer.restore_for_eval(cfg4, os.path.join(str(tmp_path), "checkpoints"), mesh=mesh4)
  assert params["embedding"].sharding.mesh.size == 4
  assert step == 5


def test_sigterm_leaves_a_complete_checkpoint(tmp_path):
  cfg = tiny(steps=100000, every=100000)
  workdir = str(tmp_path)

  def preempt_once_training():
    deadline = time.time() + 600
    while time.time() < deadline:
      path = os.path.join(workdir, "metrics.jsonl")
      if os.path.exists(path) and os.path.getsize(path) > 0:
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.2)

  threading.Thread(target=preempt_once_training, daemon=True).start()
  out = trainer.train(cfg, workdir, progress=False, log=lambda *_: None)
  assert out["stopped_by"] == "preempted"
  assert 1 <= out["step"] < 100000
  _, _, step = trainer.restore_for_eval(cfg, os.path.join(workdir, "checkpoints"))
  assert step == out["step"]


def test_batch_that_does_not_divide_the_mesh_is_an_error(tmp_path):
  cfg = dataclasses.replace(tiny(), data=dataclasses.replace(tiny().data, batch_size=6), mesh=MeshConfig(data=4))
  with pytest.raises(ValueError, match="data.batch_size=6"):
    trainer.train(cfg, str(tmp_path), progress=False, devices=jax.devices()[:4])


def test_empty_corpus_is_a_clear_error(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  cfg = tiny()
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_files=(str(empty),)))
  with pytest.raises(ValueError, match="empty"):
    trainer.train(cfg, str(tmp_path / "w"), progress=False)


def test_restore_from_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    trainer.restore_for_eval(tiny(), str(tmp_path / "nope"))


@pytest.mark.parametrize("override, message", [
    ("--config.train.steps=0", "TrainConfig.steps=0"),
    ("--config.model.engram.max_ngram_size=1", "max_ngram_size=1"),
    ("--config.data.seq_len=4096", "data.seq_len=4096"),
    ("--config.train.schedule=linear", "schedule"),
])
def test_train_py_reports_bad_config_values(tmp_path, override, message):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/tiny.py"),
                         "--workdir", str(tmp_path), override], capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]


def test_dry_run_prints_counts_without_training(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/tiny.py"),
                         "--dry_run"], capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["total_params"] > report["activated_params"] > 0
  assert report["engram_params"] > 0 and report["param_bytes_per_device"] > 0


def test_row_sparse_tables_equal_dense_adam_on_the_first_step():
  """Lazy Adam's first update of a row equals dense Adam's (bias-corrected m/sqrt(v) = g/|g|), and
  dense Adam leaves unread rows unchanged on step 1 (zero gradient, zero moments), so after one
  step both paths give the same params; unread rows stay bit-identical."""
  from engram_jax import data as data_lib

  cfg = tiny(grad_clip_norm=None)
  mesh = make_mesh(cfg.mesh)
  local = next(data_lib.make_train_iterator(cfg.data, engram=cfg.model.engram, vocab_size=cfg.model.vocab_size))
  results = {}
  for sparse in (True, False):
    c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, engram_sparse_updates=sparse))
    tx, shardings, _ = trainer.state_shardings(c, mesh)
    state = trainer.init_state(c, mesh, tx, shardings)
    init_table = np.asarray(memory.split(state.params)[1]["layer_1"])
    with jax.set_mesh(mesh):
      new, metrics = jax.jit(trainer.make_train_step(c, tx))(state, place_batch(local, mesh))
    results[sparse] = jax.device_get(new.params)
    assert bool(metrics["finite"])
  flat_sparse = jax.tree_util.tree_leaves_with_path(results[True])
  flat_dense = jax.tree.leaves(results[False])
  for (path, a), b in zip(flat_sparse, flat_dense):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  table = memory.split(results[True])[1]["layer_1"]
  changed = np.any(table != init_table, axis=1)
  _, offsets, _ = memory.table_layout(cfg.model.engram, 1)
  read = np.zeros(table.shape[0], bool)
  read[(local["engram_ids"][:, :, 0] + offsets).reshape(-1)] = True
  assert changed.sum() > 0 and not np.any(changed & ~read)


@pytest.mark.parametrize("sparse", [True, False])
def test_gradient_accumulation_equals_one_big_batch(sparse):
  """Two micro-batches of 4 give the update of one batch of 8: the loss is a mean over tokens of
  equal-length rows, so the mean of the micro-batch gradients is the full-batch gradient."""
  from engram_jax import data as data_lib

  # A large Adam eps keeps the first update lr * g / (|g| + eps) smooth in g: with the default 1e-8
  # a gradient entry near zero turns float32 summation-order noise into a sign flip of a full step.
  base = tiny(grad_clip_norm=None, engram_sparse_updates=sparse, adam_eps=1e-3)
  mesh = make_mesh(MeshConfig(data=2), jax.devices()[:2])
  local = next(data_lib.make_train_iterator(base.data, engram=base.model.engram, vocab_size=base.model.vocab_size))
  local["loss_mask"] = np.ones_like(local["loss_mask"])  # equal token counts per micro-batch
  out = {}
  for accum in (1, 2):
    cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, grad_accum_steps=accum))
    tx, shardings, _ = trainer.state_shardings(cfg, mesh)
    state = trainer.init_state(cfg, mesh, tx, shardings)
    with jax.set_mesh(mesh):
      new, metrics = jax.jit(trainer.make_train_step(cfg, tx))(state, place_batch(local, mesh))
    out[accum] = (jax.device_get(new.params), float(metrics["loss"]))
  np.testing.assert_allclose(out[2][1], out[1][1], rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out[2][0]), jax.tree.leaves(out[1][0])):
    # 1e-5 absolute is under 1/100 of one step (the tables' step is 5 x 1.5e-3).
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
