"""Training with the Engram tables in host RAM or on disk (train.engram_tables): bitwise equal to device
row-sparse training, exact read-after-write when the next step's rows are gathered early, resumes
across placements, clear errors."""

import dataclasses
import os
import time

import jax
import numpy as np
import pytest

from engram_jax import checkpoint as ckpt_lib
from engram_jax import host_training, memory, offload, trainer
from engram_jax.config import CheckpointConfig, Config, MeshConfig, load_preset
from engram_jax.tables import batch as batch_rows
from engram_jax.tables import host as table_host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30


def tiny(placement="device", steps=STEPS, accum=1) -> Config:
  cfg = load_preset(os.path.join(ROOT, "configs", "tiny.py"))
  train = dataclasses.replace(cfg.train, steps=steps, warmup_steps=2, log_every=1, eval_every=15, eval_max_batches=2,
                              engram_tables=placement, grad_accum_steps=accum,
                              checkpoint=CheckpointConfig(every_n_steps=15, keep_last_n=5, async_save=True))
  return dataclasses.replace(cfg, train=train, data=dataclasses.replace(cfg.data, seq_len=32, batch_size=8),
                             mesh=MeshConfig(data=-1))


def train(cfg, workdir, devices=1, **kw):
  return trainer.train(cfg, str(workdir), progress=False, log=lambda *_: None, devices=jax.devices()[:devices], **kw)


def losses(workdir):
  import json

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = list(map(json.loads, f))
  return ({r["step"]: r["loss"] for r in rows if "loss" in r}, {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r})


def saved(workdir, step=STEPS):
  """Every saved parameter, model-state and lazy Adam array of a step, read from the checkpoint."""
  read = ckpt_lib.saved_array_reader(os.path.join(workdir, "checkpoints"), step)
  return {p: read(p) for p in read.paths if p[0] in ("params", "engram_opt", "model_state")}


def assert_same_run(a, b):
  (train_a, eval_a), (train_b, eval_b) = losses(a), losses(b)
  assert sorted(train_a) == list(range(1, STEPS + 1)) and sorted(eval_a) == [15, 30]
  assert train_a == train_b and eval_a == eval_b
  sa, sb = saved(a), saved(b)
  assert sorted(sa) == sorted(sb)
  assert any(p[0] == "engram_opt" for p in sa) and any(p[-1] == "table" for p in sa)
  for path in sa:
    np.testing.assert_array_equal(sa[path], sb[path], err_msg="/".join(path))


@pytest.fixture(scope="module")
def device_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("device")
  train(tiny(), workdir)
  return workdir


def test_host_tables_with_a_slow_gather_equal_device_training(device_run, tmp_path, monkeypatch):
  """The next step's rows are gathered while a step runs, slowly here, so the gather of step t+1
  reads rows before step t's update writes them: the rows re-read before the transfer keep it exact."""
  real = offload.prepare_rows

  def slow(*args, **kwargs):
    time.sleep(0.05)
    return real(*args, **kwargs)

  monkeypatch.setattr(batch_rows, "prepare_rows", slow)
  reread = []
  ready = host_training.RowFeed.ready

  def counting(self, prepared):
    reread.append(len([v for v, _ in self._written if v > prepared.version]))
    return ready(self, prepared)

  monkeypatch.setattr(host_training.RowFeed, "ready", counting)
  train(tiny("host"), tmp_path)
  assert sum(reread) > 0  # some steps' rows were gathered before the previous update
  assert_same_run(device_run, tmp_path)


def test_disk_tables_equal_device_training_and_switch_placement_on_resume(device_run, tmp_path):
  """Disk tables (memory-mapped files under the workdir), stopped at step 15 and resumed on the
  devices, then the reverse: every run equals uninterrupted device training."""
  disk_then_device = tmp_path / "a"
  out = train(tiny("disk"), disk_then_device, max_steps=15)
  assert out["stopped_by"] == "max_steps"
  files = sorted(os.listdir(disk_then_device / host_training.TABLES_DIR))
  assert "manifest.json" in files and "layer_1.rows" in files and "layer_1.count" in files
  train(tiny("device"), disk_then_device)
  assert_same_run(device_run, disk_then_device)

  device_then_disk = tmp_path / "b"
  train(tiny("device"), device_then_disk, max_steps=15)
  logs = []
  trainer.train(tiny("disk"), str(device_then_disk), progress=False, log=logs.append, devices=jax.devices()[:1])
  assert any("Resumed from step 15" in line for line in logs)
  assert_same_run(device_run, device_then_disk)


@pytest.mark.parametrize("devices,accum", [(8, 1), (4, 2)], ids=["mesh8", "mesh4_accum2"])
def test_host_tables_equal_device_training_on_a_mesh(tmp_path, devices, accum):
  """On a mesh the device update sums a row's gradients per device, then over devices: the host
  update adds in that order (host_training.sum_duplicates), so the tables stay bitwise equal,
  with gradient accumulation too."""
  train(tiny("device", accum=accum), tmp_path / "device", devices=devices)
  train(tiny("host", accum=accum), tmp_path / "host", devices=devices)
  assert_same_run(tmp_path / "device", tmp_path / "host")


def test_row_feed_rereads_rows_written_after_the_gather():
  cfg = tiny("host").model.engram
  store = host_training.HostTrainTables.allocate(cfg, "host", "unused")
  rng = np.random.default_rng(0)
  for name in store.names:
    store.tables.rows[name][:] = rng.standard_normal(store.tables.rows[name].shape).astype(np.float32)
  ids = rng.integers(0, 50, size=(4, 8, len(cfg.layer_ids), cfg.num_heads)).astype(np.int64)
  feed = host_training.RowFeed(store, shards=2)
  early = feed.prepare({"engram_ids": ids})
  grads = {n: rng.standard_normal(ids.shape[:2] + (cfg.num_heads, cfg.head_dim)).astype(np.float32)
           for n in store.names}
  written = store.update(ids[:2], {n: g[:2] for n, g in grads.items()}, 0.1, chunks=1, b1=0.9, b2=0.95, eps=1e-8)
  feed.record(written)
  got = feed.ready(early)
  want = host_training.RowFeed(store, shards=2).ready(host_training.RowFeed(store, shards=2).prepare(
      {"engram_ids": ids}))
  for name in store.names:
    assert len(written[name]) > 0
    np.testing.assert_array_equal(got[name]["index"], want[name]["index"])
    np.testing.assert_array_equal(got[name]["rows"], want[name]["rows"])


def test_host_update_is_the_device_lazy_adam_on_a_mesh():
  """HostTrainTables.update equals memory.sparse_update on the 8-device mesh, repeats included."""
  cfg = tiny("host").model.engram
  store = host_training.HostTrainTables.allocate(cfg, "host", "unused")
  rng = np.random.default_rng(1)
  tables = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in store.tables.rows.items()}
  for name in store.names:
    store.tables.rows[name][:] = tables[name]
  from engram_jax.sharding import make_mesh

  mesh = make_mesh(MeshConfig(data=-1), jax.devices()[:8])
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  device_tables = {n: jax.device_put(t, sharding) for n, t in tables.items()}
  device_state = memory.sparse_init(device_tables)
  update = jax.jit(lambda t, s, i, g: memory.sparse_update(t, s, cfg, i, g, lr=0.01, b1=0.9, b2=0.95, eps=1e-8))
  for _ in range(3):
    ids = rng.integers(0, 40, size=(8, 16, len(cfg.layer_ids), cfg.num_heads)).astype(np.int32)
    grads = {n: rng.standard_normal((8, 16, cfg.num_heads, cfg.head_dim)).astype(np.float32) for n in store.names}
    with jax.set_mesh(mesh):
      device_tables, device_state = update(device_tables, device_state, jax.device_put(ids, sharding),
                                           {n: jax.device_put(g, sharding) for n, g in grads.items()})
    store.update(ids, grads, np.float32(0.01), chunks=host_training.mesh_chunks(mesh), b1=0.9, b2=0.95, eps=1e-8)
  for name in store.names:
    np.testing.assert_array_equal(store.tables.rows[name], np.asarray(device_tables[name]))
    np.testing.assert_array_equal(store.m[name], np.asarray(device_state[name].m))
    np.testing.assert_array_equal(store.v[name], np.asarray(device_state[name].v))
    np.testing.assert_array_equal(store.count[name], np.asarray(device_state[name].count))


@pytest.mark.parametrize("placement", ["host", "disk"])
def test_each_process_holds_and_updates_its_own_rows(tmp_path, placement):
  """Several processes (tests/test_multihost.py trains with two): each store holds its row range of
  every table (`disk`: in its own subdirectory), is filled and updated with global row ids, and
  together they are the one-process store row for row; the row feeds' contributions add up to the
  one-process rows."""
  cfg = tiny(placement)
  e = cfg.model.engram
  whole = host_training.HostTrainTables.allocate(e, "host", "unused", process_index=0, process_count=1)
  parts = [host_training.HostTrainTables.allocate(e, placement, str(tmp_path), process_index=i, process_count=2)
           for i in range(2)]
  init = host_training.init_values(cfg)
  for store in [whole] + parts:
    store.fill(init)
  rng = np.random.default_rng(2)
  for _ in range(3):
    ids = rng.integers(0, 20000, size=(8, 16, len(e.layer_ids), e.num_heads)).astype(np.int64)
    grads = {n: rng.standard_normal((8, 16, e.num_heads, e.head_dim)).astype(np.float32) for n in whole.names}
    done = [s.update(ids, grads, np.float32(0.01), chunks=8, b1=0.9, b2=0.95, eps=1e-8) for s in [whole] + parts]
    for name in whole.names:  # each process writes the rows it owns, together every row written once
      np.testing.assert_array_equal(np.sort(np.concatenate([d[name] for d in done[1:]])), done[0][name])
      assert all(len(d[name]) for d in done[1:])
  for name in whole.names:
    rows = whole.tables.rows[name].shape[0]
    ranges = [p.row_range[name] for p in parts]
    assert ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] and ranges[1][1] == rows and 0 < ranges[0][1] < rows
    for part, (lo, hi) in zip(parts, ranges):
      for kind in ("rows", "m", "v", "count"):
        assert part._array(kind, name).shape[0] == hi - lo
        np.testing.assert_array_equal(part._array(kind, name), whole._array(kind, name)[lo:hi], err_msg=kind)
    feeds = [host_training.RowFeed(s, shards=4).prepare({"engram_ids": ids}) for s in [whole] + parts]
    got = [host_training.RowFeed(s, shards=4).ready(f)[name]["rows"] for s, f in zip([whole] + parts, feeds)]
    np.testing.assert_array_equal(got[1] + got[2], got[0])
    # A checkpoint's leaves: the global array, each process writing its rows in whole chunks.
    leaves = [p.snapshot()[0][name] for p in parts]
    assert [leaf.shape for leaf in leaves] == [whole.tables.rows[name].shape] * 2
    assert [leaf.rows for leaf in leaves] == ranges and leaves[0].chunk_rows == leaves[1].chunk_rows
    assert ranges[1][0] % leaves[1].chunk_rows == 0 and leaves[1].chunk_rows < whole.snapshot()[0][name].chunk_rows
    np.testing.assert_array_equal(leaves[1].read(*ranges[1]), whole.tables.rows[name][slice(*ranges[1])])
  if placement == "disk":
    assert sorted(os.listdir(tmp_path / host_training.TABLES_DIR)) == ["process0of2", "process1of2"]
  assert host_training.bytes_needed(e, 0, 2) + host_training.bytes_needed(e, 1, 2) == host_training.bytes_needed(e, 0, 1)


@pytest.mark.parametrize("placement", ["host", "disk"])
def test_checkpoint_is_the_tables_at_the_save_while_updates_go_on(tmp_path, monkeypatch, placement):
  """An asynchronous save of host or disk tables writes them chunk by chunk while training goes on:
  updates applied during the write (here from inside the writer, between two chunks) do not reach
  the checkpoint, which holds the tables and moments as they were at the save, in chunks of
  CHUNK_BYTES; the snapshot keeps only the rows updated during the write and releases itself."""
  monkeypatch.setattr(ckpt_lib, "CHUNK_BYTES", 1 << 16)  # 1024 rows of 16 floats: many chunks
  e = tiny(placement).model.engram
  store = host_training.HostTrainTables.allocate(e, placement, str(tmp_path / "work"))
  rng = np.random.default_rng(3)
  update = lambda hi: store.update(  # noqa: E731
      rng.integers(0, hi, size=(4, 16, len(e.layer_ids), e.num_heads)), {n: rng.standard_normal(
          (4, 16, e.num_heads, e.head_dim)).astype(np.float32) for n in store.names}, np.float32(0.01), chunks=1,
      b1=0.9, b2=0.95, eps=1e-8)
  update(50000)
  expected = {(k, n): np.array(store._array(k, n)) for k in ("rows", "m", "v", "count") for n in store.names}
  tables, opt = store.snapshot()
  leaf = tables[store.names[0]]
  assert isinstance(leaf, ckpt_lib.ChunkedArray) and leaf.chunk_rows == 1024 and leaf.shape[0] > 20 * 1024
  reads, kept = [], []
  real = leaf.read

  def read_and_update(start, stop):
    reads.append(start)
    if len(reads) in (2, 10):  # rows before and after the writer's position change
      update(leaf.shape[0])
      kept.append(len(store._snapshots[0].kept[store.names[0]][0]))
    return real(start, stop)

  leaf.read = read_and_update
  state = {"params": {n: {"engram": {"memory": {"table": t}}} for n, t in tables.items()}, "engram_opt": opt}
  with ckpt_lib.CheckpointManager(str(tmp_path / "ckpt"), CheckpointConfig(async_save=True)) as manager:
    assert manager.save(1, state, force=True)
  assert reads == list(range(0, leaf.shape[0], 1024)) and store._snapshots == []
  assert 0 < kept[0] <= kept[1] <= 2 * 4 * 16 * e.num_heads  # only rows updated during the save were kept
  read = host_training.checkpoint_values(str(tmp_path / "ckpt"), 1)
  changed = False
  for (kind, name), want in expected.items():
    np.testing.assert_array_equal(read(kind, name, 0, len(want)), want, err_msg=f"{kind} {name}")
    changed |= not np.array_equal(store._array(kind, name), want)
  assert changed  # the updates during the save did land in the store


def test_fill_from_a_checkpoint_and_its_errors(tmp_path):
  from engram_jax.runner import load_config_from_checkpoint

  fixture = os.path.join(ROOT, "tests", "fixtures", "tiny_checkpoint")
  cfg = load_config_from_checkpoint(os.path.join(fixture, "checkpoints"), 3)
  store = host_training.HostTrainTables.allocate(cfg.model.engram, "host", str(tmp_path))
  host_training.fill_from_checkpoint(store, os.path.join(fixture, "checkpoints"), 3)
  table = offload.checkpoint_table_reader(os.path.join(fixture, "checkpoints"), 3)("layer_1", 0, None)
  np.testing.assert_array_equal(store.tables.rows["layer_1"], table)
  assert store.count["layer_1"].max() >= 1

  # Several processes: each reads its row range of the saved global arrays.
  parts = [host_training.HostTrainTables.allocate(cfg.model.engram, "host", str(tmp_path), process_index=i,
                                                  process_count=2) for i in range(2)]
  for part in parts:
    host_training.fill_from_checkpoint(part, os.path.join(fixture, "checkpoints"), 3)
  for name in store.names:
    for kind in ("rows", "m", "v", "count"):
      np.testing.assert_array_equal(np.concatenate([p._array(kind, name) for p in parts]), store._array(kind, name))

  other = dataclasses.replace(cfg.model.engram, layer_ids=(1, 2))
  wrong = host_training.HostTrainTables.allocate(other, "host", str(tmp_path))
  with pytest.raises(ckpt_lib.CheckpointRestoreError, match="layer_2"):
    host_training.fill_from_checkpoint(wrong, os.path.join(fixture, "checkpoints"), 3)


def test_init_values_chunked_beyond_the_memory_budget():
  """Tables too big to draw whole are drawn chunk by chunk: the same values whatever rows are read
  at a time, distributed as N(0, table_init_std). (Within the budget they are the device init's
  values: the training tests above start host and device runs equal.)"""
  cfg = tiny("host")
  whole = host_training.init_values(cfg)("rows", "layer_1", 0, 70000)
  read = host_training.init_values(cfg, memory_budget=1000)
  a = read("rows", "layer_1", 0, 70000)
  b = np.concatenate([read("rows", "layer_1", s, min(s + 9999, 70000)) for s in range(0, 70000, 9999)])
  np.testing.assert_array_equal(a, b)
  assert abs(a.std() - cfg.model.engram.table_init_std) < 1e-3 and not np.array_equal(a, whole)
  assert read("m", "layer_1", 5, 9).shape == (4, cfg.model.engram.head_dim) and not read("count", "layer_1", 0, 3).any()


def test_placement_errors_write_nothing(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="engram_tables='ram'"):
    dataclasses.replace(tiny().train, engram_tables="ram")
  with pytest.raises(ValueError, match="engram_sparse_updates=False"):
    dataclasses.replace(tiny().train, engram_tables="host", engram_sparse_updates=False)

  monkeypatch.setattr(table_host, "available_memory", lambda: 1000)
  with pytest.raises(MemoryError, match="engram_tables='disk'"):
    train(tiny("host"), tmp_path / "ram")
  assert not (tmp_path / "ram").exists()
  monkeypatch.undo()

  workdir = tmp_path / "disk"
  (workdir / host_training.TABLES_DIR).mkdir(parents=True)
  (workdir / host_training.TABLES_DIR / "notes.txt").write_text("mine")
  with pytest.raises(host_training.TableStoreError, match="not an engram_jax training table directory"):
    train(tiny("disk"), workdir)
  assert os.listdir(workdir / host_training.TABLES_DIR) == ["notes.txt"]
  assert not (workdir / "checkpoints").exists()
