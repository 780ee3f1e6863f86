"""Engram tables off the accelerator (engram_jax/tables/, named by engram_jax.offload): host and disk
placement give the device placement's losses, every row source reads the same rows, the prefetcher
keeps order under a slow gather, cache hits + misses reassemble the plain gather, quantized rows stay
within their documented bounds, and bad table files are clear errors that write nothing. One tiny two-Engram-layer model on the 8-device test mesh."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from engram_jax import checkpoint as ckpt_lib
from engram_jax import evaluation, memory, offload
from engram_jax import runner as runner_lib
from engram_jax.config import (AttentionConfig, Config, DataConfig, EngramConfig, MeshConfig, MHCConfig,
                               ModelConfig, TrainConfig)
from engram_jax.evaluation import EvalOptions
from engram_jax.model import init_variables
from engram_jax.patches import fingerprint
from engram_jax.sharding import LOGICAL_RULES, make_mesh, place_batch
from engram_jax.tables import batch as batch_rows
from engram_jax.tables import host as table_host
from engram_jax.tables.source import build_row_source

DOCS = [
    "The code module provides facilities to implement read-eval-print loops in Python. "
    "The code module is small.",
    "A list is a mutable sequence. A list can hold any object, and a list grows as needed.",
    "The code module and the list type are documented in the library reference.",
    "Dictionaries map keys to values. A dictionary is a mutable mapping; keys must be hashable.",
]


def _config(text_path):
  model = ModelConfig(
      vocab_size=8192, d_model=32, num_layers=2, num_dense_layers=2, mlp_hidden=64,
      attention=AttentionConfig(kind="gqa", num_heads=2, num_kv_heads=1, head_dim=16, implementation="xla"),
      moe=None,
      engram=EngramConfig(vocab_size_per_ngram=(211, 211), max_ngram_size=3, n_embed_per_ngram=16,
                          n_head_per_ngram=2, layer_ids=(0, 1), pad_id=2, conv_zero_init=False,
                          table_init_std=0.5),
      mhc=MHCConfig(expansion=2), max_seq_len=32)
  return Config(model=model, data=DataConfig(seq_len=32, batch_size=8, eval_files=(str(text_path),)),
                train=TrainConfig(steps=10, warmup_steps=0), mesh=MeshConfig(data=-1), name="test")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("offload")
  text_path = tmp / "docs.txt"
  text_path.write_text("\n\f\n".join(DOCS * 3) + "\n", encoding="utf-8")
  cfg = _config(text_path)
  mesh = make_mesh(cfg.mesh)  # every one of the 8 test devices on `data`

  def init():
    return nn.meta.unbox(init_variables(cfg.model, jax.random.key(0)))

  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    variables = jax.jit(init)()
  params = variables.pop("params")
  device = runner_lib.ModelRunner(cfg, params, dict(variables), mesh)
  tables_np = {k: np.asarray(v) for k, v in memory.split(params)[1].items()}
  fp = fingerprint(cfg.model, device.hashing)
  table_dir = str(tmp / "tables")
  offload.write_table_dir(table_dir, cfg.model, fp, lambda n, a, b: tables_np[n][a:b], chunk_rows=1000,
                          log=lambda s: None)
  return dict(cfg=cfg, mesh=mesh, params=params, model_state=dict(variables), device=device, tables=tables_np,
              fp=fp, table_dir=table_dir, tmp=tmp)


def _runner(s, tables, cache=None, prefetch=True):
  return runner_lib.ModelRunner(s["cfg"], s["params"], s["model_state"], s["mesh"], tables=tables, cache=cache,
                                prefetch=prefetch)


def _batches(runner):
  return evaluation.data_lib.eval_batches(runner.cfg.data, engram=runner.cfg.model.engram,
                                          vocab_size=runner.cfg.model.vocab_size, tokenizer=runner.tokenizer)


# ----------------------------------------------------------------------------------------------
# Placement: host and disk give the device's outputs.


def test_host_and_disk_forward_equal_device_bitwise(setup):
  s = setup
  batches = _batches(s["device"])
  assert len(batches) >= 2
  host = offload.HostTables.open(s["table_dir"], s["cfg"].model, s["fp"], "host")
  disk = offload.HostTables.open(s["table_dir"], s["cfg"].model, s["fp"], "disk")
  assert isinstance(disk.rows["layer_0"], np.memmap) and not isinstance(host.rows["layer_0"], np.memmap)
  for tables in (host, disk, offload.HostTables.from_arrays(s["cfg"].model.engram, s["tables"])):
    runner = _runner(s, tables)
    assert memory.split(runner.params)[1] == {}  # the backbone only: no table on the device
    for batch, prepared in runner.prepared(batches):
      want = s["device"].forward(batch)
      got = runner.forward(prepared)
      for k in want:  # same rows, same math: bitwise on this backend
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{tables.placement} {k}")


def test_every_row_source_reads_the_same_rows(setup):
  """The row source (tables/source.py) is how every program reads rows: the device source (an
  in-graph gather of the params' tables) and host sources over RAM and memory-mapped tables, with
  and without a hot-row cache, give the same rows for the same hash ids, bitwise, through the same
  calls (rows_for on the host, rows in the program, with params() and operand())."""
  s = setup
  cfg, mesh, e = s["cfg"], s["mesh"], s["cfg"].model.engram
  rng = np.random.default_rng(2)
  sizes = [memory.table_layout(e, l)[0] for l in e.layer_ids]
  ids = np.stack([rng.integers(0, sizes[i][None, :], size=(8, 32, e.num_heads)) for i in range(2)], axis=2)
  ids = ids.astype(np.int32)  # [B, T, L, H]
  disk = offload.HostTables.open(s["table_dir"], cfg.model, s["fp"], "disk")
  cache = offload.HotRowCache.build(disk, ids[:4], 40)
  sources = [build_row_source(cfg.model, mesh), build_row_source(cfg.model, mesh, offload.HostTables.from_arrays(
      e, s["tables"])), build_row_source(cfg.model, mesh, disk), build_row_source(cfg.model, mesh, disk, cache)]
  assert [src.placement for src in sources] == ["device", "host", "disk", "disk"]
  placed_ids = place_batch({"engram_ids": ids}, mesh)["engram_ids"]
  got = []
  for src in sources:
    feed = src.rows_for(ids)
    assert (feed is None) == src.ids_in_graph
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
      rows = jax.jit(src.rows)(src.params(s["params"]), feed, src.operand(), placed_ids)
    got.append({n: np.asarray(r.astype(cfg.model.dtype).astype(np.float32)) for n, r in rows.items()})
  for src, rows in zip(sources[1:], got[1:]):
    assert memory.split(src.params(s["params"]))[1] == {}  # host sources' programs take the backbone alone
    for name in got[0]:
      np.testing.assert_array_equal(rows[name], got[0][name], err_msg=f"{src.placement} {name}")
  assert sum(int(h.sum()) for h in sources[-1].hit_counter.hits.values()) > 0
  with pytest.raises(ValueError, match="a hot-row cache caches host tables"):
    build_row_source(cfg.model, mesh, None, cache)


def test_eval_losses_and_scores_with_host_tables_equal_device(setup):
  s = setup
  options = EvalOptions(niah_lengths=(), top_ngrams=2, min_ngram_count=2)
  want = evaluation.run_evaluation(s["device"], options, step=0, log=lambda m: None)
  tables = offload.HostTables.open(s["table_dir"], s["cfg"].model, s["fp"], "disk")
  got = evaluation.run_evaluation(_runner(s, tables), options, step=0, log=lambda m: None)
  assert got["benchmarks"] == want["benchmarks"] and got["gates"] == want["gates"]
  assert want["engram_tables"] == {"placement": "device", "quantize": None, "bytes_per_row": None, "cache": None}
  assert got["engram_tables"]["placement"] == "disk" and got["engram_tables"]["bytes_per_row"] == 8 * 4
  rows = [[1, 5, 9, 200, 7], [1, 300], [1, 44, 45, 46, 47, 48, 49]]
  lp_d, gr_d = s["device"].score([r[:2] for r in rows], [r[2:] or [3] for r in rows])
  lp_h, gr_h = _runner(s, tables).score([r[:2] for r in rows], [r[2:] or [3] for r in rows])
  np.testing.assert_array_equal(lp_h, lp_d)
  np.testing.assert_array_equal(gr_h, gr_d)


# ----------------------------------------------------------------------------------------------
# Prefetch.


def test_prefetcher_with_slow_gather_keeps_order_and_outputs(setup, monkeypatch):
  s = setup
  tables = offload.HostTables.open(s["table_dir"], s["cfg"].model, s["fp"], "host")
  batches = _batches(s["device"])
  plain = [_runner(s, tables, prefetch=False).forward(b) for b in batches]
  take = offload.HostTables.take
  delays = iter(np.random.default_rng(0).uniform(0, 0.05, 10_000))

  def slow_take(self, name, ids):  # an irregular slow gather: later batches may be ready sooner
    time.sleep(next(delays))
    return take(self, name, ids)

  monkeypatch.setattr(offload.HostTables, "take", slow_take)
  runner = _runner(s, tables)
  seen = []
  for i, (batch, prepared) in enumerate(runner.prepared(batches)):
    assert batch is batches[i]
    out = runner.forward(prepared)
    seen.append(i)
    for k in out:
      np.testing.assert_array_equal(out[k], plain[i][k])
  assert seen == list(range(len(batches)))


def test_prefetcher_order_and_errors():
  def prepare(x):
    time.sleep(0.02 * ((7 * x) % 3))
    if x == 5:
      raise RuntimeError("boom at 5")
    return x * x

  got = []
  with pytest.raises(RuntimeError, match="boom at 5"):
    for item, out in offload.Prefetcher(range(10), prepare, depth=3):
      got.append((item, out))
  assert got == [(i, i * i) for i in range(5)]
  with pytest.raises(ValueError, match="depth=0"):
    offload.Prefetcher([], prepare, depth=0)


# ----------------------------------------------------------------------------------------------
# Hot-row cache.


def test_cache_hits_and_misses_reassemble_the_plain_gather(setup):
  s = setup
  e = s["cfg"].model.engram
  tables = offload.HostTables.from_arrays(e, s["tables"])
  rng = np.random.default_rng(1)
  sizes = [memory.table_layout(e, l)[0] for l in e.layer_ids]
  ids = np.stack([rng.integers(0, sizes[i][None, :], size=(8, 32, e.num_heads)) for i in range(2)], axis=2)
  ids = ids.astype(np.int32)  # [B, T, L, H]
  plain = tables.gather(ids)
  cache = offload.HotRowCache.build(tables, ids[:4], 40)
  placed = cache.place(s["mesh"])
  counter = offload.HitCounter()
  host = offload.prepare_rows(tables, cache, ids, shards=8, counter=counter)
  rows = offload.assemble_rows({n: {k: jax.numpy.asarray(v) for k, v in d.items()} for n, d in host.items()},
                               {n: (placed.rows[n], placed.scales[n]) for n in placed.ids}, np.float32)
  for name in tables.names:
    np.testing.assert_array_equal(np.asarray(rows[name]), plain[name][0])
    dev = np.asarray(memory.read_rows(jax.numpy.asarray(s["tables"][name]), e, int(name.split("_")[1]),
                                      ids[:, :, tables.names.index(name)]))
    np.testing.assert_array_equal(np.asarray(rows[name]), dev)
    # Hit counts are exactly the lookups of cached rows.
    flat = np.asarray(memory.row_ids(e, ids)[name]).reshape(-1, e.num_heads)
    want_hits = np.isin(flat, cache.ids[name]).sum(axis=0)
    np.testing.assert_array_equal(counter.hits[name], want_hits)
    assert 0 < want_hits.sum() < flat.size  # both kinds present
    assert len(cache.ids[name]) == 40
  report = counter.report(e, 40)
  assert [l["layer"] for l in report["layers"]] == [0, 1]
  assert [o["n"] for o in report["layers"][0]["orders"]] == [2, 3]


def test_cache_is_the_most_frequent_rows(setup):
  e = setup["cfg"].model.engram
  tables = offload.HostTables.from_arrays(e, setup["tables"])
  ids = np.zeros((1, 6, 2, e.num_heads), np.int32)
  ids[0, :, :, 1:] = np.arange(6)[:, None, None]  # other heads: six distinct rows, once each
  ids[0, :, 0, 0] = [5, 5, 5, 7, 7, 9]  # layer 0 head 0: row 5 three times, 7 twice, 9 once
  cache = offload.HotRowCache.build(tables, ids, 2)
  assert list(cache.ids["layer_0"]) == [5, 7]
  cache = offload.HotRowCache.build(tables, ids, 3)
  assert list(cache.ids["layer_0"]) == [5, 7, 9]  # ties (count 1) go to the smallest row id
  offsets = memory.table_layout(e, 1)[1]
  # Layer 1: head 0 reads its row 0 six times, every other head six rows once each.
  assert list(cache.ids["layer_1"]) == [0, offsets[1], offsets[1] + 1]
  assert cache.slots("layer_0", np.array([7, 6, 9, 5])).tolist() == [1, -1, 2, 0]


def test_runner_cache_reports_hit_rates_and_equal_losses(setup):
  s = setup
  tables = offload.HostTables.open(s["table_dir"], s["cfg"].model, s["fp"], "host")
  batches = _batches(s["device"])
  reference = np.concatenate([b["engram_ids"] for b in batches[:1]])
  runner = _runner(s, tables, cache=offload.HotRowCache.build(tables, reference, 64))
  options = EvalOptions(niah_lengths=(), knockout=False, top_ngrams=2, min_ngram_count=2)
  got = evaluation.run_evaluation(runner, options, step=0, log=lambda m: None)
  want = evaluation.run_evaluation(s["device"], options, step=0, log=lambda m: None)
  assert got["benchmarks"] == want["benchmarks"]
  cache = got["engram_tables"]["cache"]
  assert cache["rows_per_table"] == 64
  for layer in cache["layers"]:
    assert 0 < layer["hit_rate"] < 1 and layer["lookups"] > 0
    assert all(0 <= o["hit_rate"] <= 1 for o in layer["orders"])
  assert "hit rates" in evaluation.format_table(got)


# ----------------------------------------------------------------------------------------------
# Quantization.


@pytest.mark.parametrize("kind", offload.QUANTIZATIONS)
def test_quantized_round_trip_within_documented_bound(kind):
  rng = np.random.default_rng(0)
  rows = rng.standard_normal((512, 24)).astype(np.float32) * rng.uniform(1e-3, 30, (512, 1)).astype(np.float32)
  rows[3] = 0.0  # an all-zero row (scale 0)
  rows[4, :] = 1e-30  # tiny values
  stored, scale = offload.quantize_rows(rows, kind)
  back = offload.dequantize(stored, scale, np.float32)
  err = np.abs(back - rows)
  amax = np.abs(rows).max(axis=1, keepdims=True)
  ulps = 4 * np.finfo(np.float32).eps * np.abs(rows) + 1e-37
  if kind == "float32":
    bound = np.zeros_like(rows)
  elif kind == "bfloat16":
    bound = 2.0 ** -8 * np.abs(rows)
  elif kind == "int8":
    bound = amax / 254
  else:
    bound = 2.0 ** -4 * np.abs(rows) + 2.0 ** -10 * amax / 448
  assert np.all(err <= bound + ulps), f"{kind}: worst excess {(err - bound - ulps).max()}"
  assert np.all(back[3] == 0)
  if kind != "float32":
    assert err.max() > 0  # the bound is not vacuous: rounding happened
  assert offload.bytes_per_row(kind, 24) == {"float32": 96, "bfloat16": 48, "int8": 28, "float8_e4m3": 28}[kind]
  # The device-side dequantize gives the same values as the host's.
  dev = offload.dequantize(jax.numpy.asarray(stored), None if scale is None else jax.numpy.asarray(scale),
                           np.float32)
  np.testing.assert_array_equal(np.asarray(dev), back)


@pytest.mark.parametrize("kind", ["int8", "float8_e4m3"])
def test_quantized_tables_through_runner_equal_dequantized_device_tables(setup, kind):
  s = setup
  tables = offload.HostTables.from_arrays(s["cfg"].model.engram, s["tables"], kind)
  assert tables.rows["layer_0"].dtype == offload.STORAGE[kind]
  deq = {n: offload.dequantize(tables.rows[n], tables.scales[n], np.float32) for n in tables.names}
  with jax.set_mesh(s["mesh"]):
    params = memory.merge(memory.split(s["params"])[0], {n: jax.numpy.asarray(v) for n, v in deq.items()})
  device = runner_lib.ModelRunner(s["cfg"], params, s["model_state"], s["mesh"])
  batch = _batches(device)[0]
  runner = _runner(s, tables, cache=offload.HotRowCache.build(tables, batch["engram_ids"], 32))
  want, got = device.forward(batch), runner.forward(batch)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ----------------------------------------------------------------------------------------------
# Table files: export, errors.


def test_table_dir_round_trip_and_quantized_files(setup, tmp_path):
  s = setup
  for kind in offload.QUANTIZATIONS:
    path = str(tmp_path / kind)
    offload.write_table_dir(path, s["cfg"].model, s["fp"], lambda n, a, b: s["tables"][n][a:b], quantize=kind,
                            chunk_rows=777, log=lambda m: None)
    opened = offload.HostTables.open(path, s["cfg"].model, s["fp"], "disk", verify=True)
    want = offload.HostTables.from_arrays(s["cfg"].model.engram, s["tables"], kind)
    assert opened.quantize == kind
    for n in opened.names:
      np.testing.assert_array_equal(np.asarray(opened.rows[n]).view(np.uint8), want.rows[n].view(np.uint8))
      if kind in ("int8", "float8_e4m3"):
        np.testing.assert_array_equal(opened.scales[n], want.scales[n])
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f != "manifest.json")
    rows = sum(memory.table_layout(s["cfg"].model.engram, l)[2] for l in (0, 1))
    assert size == rows * offload.bytes_per_row(kind, 8)


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def test_bad_table_dirs_are_clear_errors_and_nothing_is_written(setup, tmp_path, monkeypatch):
  s = setup
  cfg, fp, src = s["cfg"], s["fp"], s["table_dir"]
  open_ = lambda path, placement="disk", **kw: offload.HostTables.open(path, cfg.model, fp, placement, **kw)  # noqa
  with pytest.raises(offload.TableFileError, match="does not exist"):
    open_(str(tmp_path / "nope"))
  # Truncated file.
  bad = _copy(src, tmp_path / "truncated")
  with open(os.path.join(bad, "layer_1.rows"), "r+b") as f:
    f.truncate(100)
  with pytest.raises(offload.TableFileError, match=r"layer_1.rows has 100 bytes; expected"):
    open_(bad)
  # Missing file.
  bad = _copy(src, tmp_path / "missing")
  os.remove(os.path.join(bad, "layer_0.rows"))
  with pytest.raises(offload.TableFileError, match="lacks layer_0.rows"):
    open_(bad)
  # Modified bytes: found by verify only.
  bad = _copy(src, tmp_path / "modified")
  with open(os.path.join(bad, "layer_0.rows"), "r+b") as f:
    f.write(b"\x01\x02\x03\x04")
  open_(bad)
  with pytest.raises(offload.TableFileError, match="sha256"):
    open_(bad, verify=True)
  # Another model's layout: rows and width, then hashing config (same shapes, other fingerprint).
  other = dataclasses.replace(cfg.model, engram=dataclasses.replace(cfg.model.engram, vocab_size_per_ngram=(5000, 211)))
  with pytest.raises(offload.TableFileError, match=r"layer_0 has \d+ rows x 8; the model expects \d+ rows x 8"):
    offload.HostTables.open(src, other, fp, "disk")
  wider = dataclasses.replace(cfg.model, engram=dataclasses.replace(cfg.model.engram, n_embed_per_ngram=32))
  with pytest.raises(offload.TableFileError, match=r"x 8; the model expects \d+ rows x 16"):
    offload.HostTables.open(src, wider, fp, "disk")
  with pytest.raises(offload.TableFileError, match="another hashing config or tokenizer"):
    offload.HostTables.open(src, cfg.model, "0" * 64, "disk")
  with pytest.raises(offload.TableFileError, match="holds float32 rows but quantize='int8'"):
    open_(src, quantize="int8")
  # Not enough RAM for host placement.
  monkeypatch.setattr(table_host, "available_memory", lambda: 1000)
  with pytest.raises(MemoryError, match=r"placement 'host' needs .* only 0.00 GiB is available: use placement 'disk'"):
    open_(src, "host")
  open_(src, "disk")  # disk placement does not need the RAM
  # Never written over.
  before = sorted(os.listdir(src)), open(os.path.join(src, "manifest.json")).read()
  with pytest.raises(FileExistsError, match="already exists"):
    offload.write_table_dir(src, cfg.model, fp, lambda n, a, b: np.zeros((b - a, 8), np.float32), log=lambda m: None)
  assert (sorted(os.listdir(src)), open(os.path.join(src, "manifest.json")).read()) == before
  # A failing writer leaves nothing behind.
  def broken(n, a, b):
    raise OSError("disk full")
  with pytest.raises(OSError, match="disk full"):
    offload.write_table_dir(str(tmp_path / "half"), cfg.model, fp, broken, log=lambda m: None)
  assert not os.path.exists(tmp_path / "half") and not [p for p in os.listdir(tmp_path) if p.startswith(".tables-")]
  with pytest.raises(ValueError, match="quantize='int4'"):
    offload.quantize_rows(np.zeros((1, 2)), "int4")


# ----------------------------------------------------------------------------------------------
# A real checkpoint: export, then evaluate from disk and from host memory.

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_checkpoint", "checkpoints")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_checkpoint_export_and_eval_from_disk_and_host_equal_device(tmp_path):
  checkpoints = str(tmp_path / "checkpoints")
  shutil.copytree(FIXTURE, checkpoints)
  cfg = runner_lib.load_config_from_checkpoint(checkpoints)
  table_dir = str(tmp_path / "tables")
  offload.export_tables(cfg, checkpoints, table_dir, chunk_rows=1000, log=lambda m: None)
  manifest = json.load(open(os.path.join(table_dir, "manifest.json")))
  assert manifest["source"] == {"checkpoint_step": 3, "checkpoint_dir": os.path.abspath(checkpoints),
                                "state_fingerprint": ckpt_lib.state_fingerprint(checkpoints, 3)}
  assert manifest["quantize"] == "float32"
  options = EvalOptions(max_batches=8, knockout=False, niah_lengths=(), top_ngrams=2, min_ngram_count=2)
  quiet = dict(log=lambda m: None)
  want = evaluation.evaluate_checkpoint(cfg, checkpoints, options, **quiet)
  # The exported rows are the checkpoint's rows, read by orbax onto the devices.
  device = runner_lib.ModelRunner.from_checkpoint(cfg, checkpoints, **quiet)
  disk = offload.HostTables.open(table_dir, cfg.model, fingerprint(cfg.model, device.hashing), "disk", verify=True)
  for name, table in memory.split(device.params)[1].items():
    np.testing.assert_array_equal(np.asarray(disk.rows[name]), np.asarray(table))
  for kw in (dict(engram_tables="disk", table_dir=table_dir), dict(engram_tables="host"),
             dict(engram_tables="host", table_dir=table_dir, prefetch=False)):
    got = evaluation.evaluate_checkpoint(cfg, checkpoints, options, **kw, **quiet)
    assert got["benchmarks"] == want["benchmarks"], kw
    assert got["engram_tables"]["placement"] == kw["engram_tables"]
  # A cache chosen from the training split; int8 rows read from the checkpoint into host memory.
  got = evaluation.evaluate_checkpoint(cfg, checkpoints, options, engram_tables="host", quantize="int8",
                                       cache_rows=256, **quiet)
  assert abs(got["benchmarks"][0]["loss"] - want["benchmarks"][0]["loss"]) < 1e-3
  assert got["engram_tables"]["bytes_per_row"] == 4 + cfg.model.engram.head_dim
  assert all(0 < l["hit_rate"] < 1 for l in got["engram_tables"]["cache"]["layers"])
  with pytest.raises(ValueError, match="engram_tables='disk' memory-maps exported table files: pass table_dir"):
    runner_lib.ModelRunner.from_checkpoint(cfg, checkpoints, engram_tables="disk", **quiet)
  with pytest.raises(ValueError, match="engram_tables='gpu'"):
    runner_lib.ModelRunner.from_checkpoint(cfg, checkpoints, engram_tables="gpu", **quiet)
  with pytest.raises(ValueError, match="need 'host' or 'disk'"):
    runner_lib.ModelRunner.from_checkpoint(cfg, checkpoints, cache_rows=10, **quiet)


def test_generation_with_host_and_disk_tables_equals_device(tmp_path, monkeypatch):
  """Greedy and sampled generation from host tables (the split step; the in-graph pinned-host gather,
  the default on one device) and disk tables (the in-graph host callback with a hot-row cache, the
  default): the same tokens and bitwise the same log-probabilities and gates as device tables, also
  when the host gather is slow (the step waits for its rows: nothing is read early or out of order)."""
  from engram_jax import generation

  checkpoints = str(tmp_path / "checkpoints")
  shutil.copytree(FIXTURE, checkpoints)
  cfg = runner_lib.load_config_from_checkpoint(checkpoints)
  table_dir = str(tmp_path / "tables")
  offload.export_tables(cfg, checkpoints, table_dir, chunk_rows=1000, log=lambda m: None)
  quiet = dict(log=lambda m: None)
  device = generation.Generator.from_checkpoint(cfg, checkpoints, **quiet)
  prompts = [device.encode_prompt(t) for t in ("The os module", "import sys\n", "A list is")]
  kwargs = dict(temperature=[0.0, 0.8, 0.0], top_k=[0, 20, 0], seed=5, batch_size=4)
  want = device.generate(prompts, 10, **kwargs)

  def same(got, label):
    for w, g in zip(want, got):
      assert g.token_ids == w.token_ids, label
      np.testing.assert_array_equal(g.logprobs, w.logprobs, err_msg=label)
      np.testing.assert_array_equal(g.gate_means, w.gate_means, err_msg=label)

  host = generation.Generator.from_checkpoint(cfg, checkpoints, engram_tables="host", decode="split", **quiet)
  assert host.split_layer == 1 and host.placement == "host" and host.block == 1
  assert memory.split(host.runner.params)[1] == {}
  same(host.generate(prompts, 10, **kwargs), "host, split step")
  prepare_rows = offload.prepare_rows

  def slow(*a, **k):
    time.sleep(0.02)
    return prepare_rows(*a, **k)

  monkeypatch.setattr(batch_rows, "prepare_rows", slow)
  same(host.generate(prompts, 10, **kwargs), "host, slow gather")
  monkeypatch.setattr(batch_rows, "prepare_rows", prepare_rows)

  def interleaved(gen):
    # Two states stepped in turn with different sampling arrays: each step must draw from its own
    # state and arrays, never from a sample drawn ahead for another.
    rows = prompts * 3
    rows = rows[:gen.batch_bucket(len(rows))] + [[1]] * (gen.batch_bucket(len(rows)) - len(rows))
    hot, greedy = (generation.sampling_arrays(len(rows), temperature=t, seed=3) for t in (0.9, 0.0))
    cache_length = gen.length_bucket(max(map(len, rows)) + 4)
    a, b = gen.prefill(rows, cache_length), gen.prefill(rows, cache_length)
    a, a1 = gen.step(a, hot)
    b, b1 = gen.step(b, greedy)
    a, a2 = gen.step(a, greedy)
    a, a3 = gen.step(a, greedy)
    return [np.asarray(o.tokens) for o in (a1, b1, a2, a3)]

  for got, want_tokens in zip(interleaved(host), interleaved(device)):
    np.testing.assert_array_equal(got, want_tokens)
  pinned = generation.Generator.from_checkpoint(cfg, checkpoints, engram_tables="host", decode="pinned_host",
                                                block=4, **quiet)
  assert pinned.path == "pinned_host" and pinned.split_layer is None
  same(pinned.generate(prompts, 10, **kwargs), "host, in-graph pinned-host gather, 4 tokens per dispatch")
  disk = generation.Generator.from_checkpoint(cfg, checkpoints, engram_tables="disk", table_dir=table_dir,
                                              cache_rows=128, block=4, **quiet)
  assert disk.path == "callback" and disk.runner.cache is not None
  monkeypatch.setattr(batch_rows, "prepare_rows", slow)
  same(disk.generate(prompts, 10, **kwargs), "disk, in-graph callback, cache, slow gather")
  monkeypatch.setattr(batch_rows, "prepare_rows", prepare_rows)
  hits = disk.runner.table_report()["cache"]["layers"][0]["hit_rate"]
  assert 0 < hits < 1
  with pytest.raises(ValueError, match="device and pinned_host paths"):
    disk.programs(4, 16, 32)


def test_eval_py_exports_tables_and_refuses_an_existing_directory(tmp_path):
  checkpoints = str(tmp_path / "checkpoints")
  shutil.copytree(FIXTURE, checkpoints)
  out = tmp_path / "tables"
  cmd = [sys.executable, os.path.join(ROOT, "eval.py"), "--checkpoint", checkpoints, "--export_tables", str(out),
         "--quantize", "float8_e4m3"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  manifest = json.load(open(out / "manifest.json"))
  assert manifest["quantize"] == "float8_e4m3" and sorted(manifest["tables"]) == ["layer_1"]
  before = {p: os.path.getmtime(out / p) for p in os.listdir(out)}
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert proc.returncode != 0 and "already exists" in proc.stderr
  assert {p: os.path.getmtime(out / p) for p in os.listdir(out)} == before


# ----------------------------------------------------------------------------------------------
# Two processes: each holds its row range; rows are reassembled exactly on the devices.


def test_two_processes_hold_their_rows_and_reassemble_exactly(setup, tmp_path):
  import importlib.util

  spec = importlib.util.spec_from_file_location("test_multihost", os.path.join(os.path.dirname(__file__),
                                                                               "test_multihost.py"))
  mh = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mh)
  worker = os.path.join(os.path.dirname(__file__), "offload_worker.py")
  port = mh._free_loopback_port()
  text = setup["cfg"].data.eval_files[0]
  with mh._Processes() as procs:
    procs.procs = []
    for i in range(2):
      log = tmp_path / f"worker_{i}.log"
      env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "XLA_FLAGS"))}
      f = open(log, "w")
      p = subprocess.Popen([sys.executable, worker, "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
                            "--process_id", str(i), "--local_devices", "4", "--text", text, "--table_dir",
                            setup["table_dir"]], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                           start_new_session=True)
      procs.procs.append((p, f, str(log)))
    procs.wait(600)
    results = [mh._summary(tmp_path / f"worker_{i}.log") for i in range(2)]
  rows = {n: int(t.shape[0]) for n, t in setup["tables"].items()}
  for name, total in rows.items():
    (a0, b0), (a1, b1) = results[0]["row_range"][name], results[1]["row_range"][name]
    assert a0 == 0 and b0 == a1 and b1 == total  # contiguous halves, together every row once
    assert results[0]["rows_held"][name] == b0 and results[1]["rows_held"][name] == total - a1
  assert all(r["equal"] for r in results)  # bitwise equal to the device placement, on every process
  assert results[0]["nll_sum"] == results[1]["nll_sum"] and results[0]["batches"] >= 2
