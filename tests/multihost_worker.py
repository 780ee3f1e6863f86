"""One process of a local multi-process training run, for tests/test_multihost.py.

  python tests/multihost_worker.py [--mode train|io|lock] --workdir W --dump D
      [--coordinator 127.0.0.1:PORT --num_processes 2 --process_id I] [--local_devices 4]

`--mode io` (see `run_io`) checks the data pipeline and checkpoints across processes in seconds;
`--mode lock` (see `run_lock`) the workdir's run lock.
In `--mode train` every process trains `config()` (the tiny preset) for 5 steps through
`trainer.train`, exactly as train.py does after `jax.distributed.initialize`, stopping at step 5
with a checkpoint. Without --coordinator it is the single-process reference run. When it hands the step-5 state to orbax,
the process also writes the Engram table shards it owns (with their global row ranges) to
`D/tables_<process>.npz`: the test compares a restore against these bytes, which it could not
get from the checkpoint itself without trusting the code under test.

Device count, platform and collectives are set here, before jax starts, because a subprocess
does not run the test suite's conftest.
"""

import argparse
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5


def config(engram_tables: str = "device"):
  """The run every side trains: tests/test_train.py's tiny() (seq_len 32, batch 8, a 6-step
  schedule), of which the worker runs 5 steps.

  The same config compiles to the same train step as tests/test_train.py's 8-device runs, so the
  single-process reference hits the persistent compilation cache when those ran first (compiling
  the step costs about a minute of CPU). The mesh puts all 8 devices on `data`: with two processes
  of 4 devices, the gradient all-reduce crosses processes, and so do the all-to-alls of the
  Engram lookup, whose table rows shard over every mesh axis (1/8 of each table per device). The
  embedded held-out split serves as the training text: a tenth of the train split, so tokenising
  it costs each process well under a second (the text does not change the compiled step).
  """
  from engram_jax import data as data_lib
  from engram_jax.config import CheckpointConfig, MeshConfig, load_preset

  cfg = load_preset(os.path.join(ROOT, "configs", "tiny.py"))
  train = dataclasses.replace(
      cfg.train, steps=6, warmup_steps=2, log_every=1, eval_every=0,
      checkpoint=CheckpointConfig(every_n_steps=3, keep_last_n=5, async_save=True))
  data = dataclasses.replace(cfg.data, seq_len=32, batch_size=8, train_files=(data_lib.default_corpus_paths()[1],),
                             eval_files=(data_lib.default_corpus_paths()[1],))
  train = dataclasses.replace(train, engram_tables=engram_tables)
  return dataclasses.replace(cfg, train=train, data=data, mesh=MeshConfig(data=-1))


def table_paths(params):
  """{path string: leaf} of every Engram table in a params tree."""
  import jax

  from engram_jax import memory

  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)
          if memory.is_table_path(p)}


def _dump_tables(state, path):
  """This process's shards of every table (host tables: its rows): `<key>|<start>` -> rows
  [start, start + n). Called once the last step is saved: no update follows that could race the
  writer for host tables' rows."""
  import numpy as np

  from engram_jax.checkpoint import ChunkedArray

  out = {}
  for key, table in table_paths(state.params).items():
    if isinstance(table, ChunkedArray):  # host tables: the rows this process writes
      lo, hi = table.rows
      out[f"{key}|{lo}"] = np.asarray(table.read(lo, hi))
      continue
    for shard in table.addressable_shards:
      rows = shard.index[0]
      assert shard.index[1] == slice(None), shard.index  # rows only: each shard holds whole rows
      out[f"{key}|{rows.start or 0}"] = np.asarray(shard.data)
  np.savez(path, **out)


def _write_small_arrays_whole():
  """Let one replica write each small replicated array instead of slicing it among its replicas.

  orbax's replica-parallel save cuts a replicated array into one slice per replica with an eager
  `slice` whose program is compiled per shape: about 200 programs for the tiny preset, tens of
  seconds on two CPU cores at the first save, in every process. Arrays under 1 MiB per slice gain
  nothing from parallel writes, and the checkpoint holds the same arrays either way (only which
  process writes which bytes changes), so what the test checks is unchanged.
  """
  import jax
  import orbax.checkpoint as ocp
  from orbax.checkpoint._src.metadata import array_metadata_store

  handler = ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                           min_slice_bytes_for_replica_parallel=1 << 20)
  ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


IO_TABLE_SHAPE = (16 * 1024, 16)  # 1 MiB of float32; rows divide any mesh of up to 1024 devices


def io_table_values(seed: int):
  """A table of random float32s: every entry distinct (a misplaced row cannot go unnoticed) and
  incompressible, so the bytes on disk measure how much of the table a process wrote or read."""
  import numpy as np

  return np.random.default_rng(seed).standard_normal(IO_TABLE_SHAPE, np.float32)


def _file_bytes_read() -> int:
  import tensorstore as ts

  for metric in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read"):
    return int(sum(v.get("value", 0) for v in metric["values"]))
  return 0


def run_io(args):
  """The data pipeline and checkpoints across processes, without the model's minute of compiling.

  1. Reads two global batches (each process its half), assembles the second into global arrays
     and gathers a reduction of them onto every process.
  2. Restores the table that a single 8-device process saved in `--restore_dir` onto this mesh of
     2 processes, counting the bytes this process's tensorstore read from files.
  3. Saves a row-sharded table (seed 1) with the data iterator's position.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from engram_jax import checkpoint as ckpt_lib
  from engram_jax import data as data_lib
  from engram_jax.config import CheckpointConfig
  from engram_jax.sharding import batch_sharding, logical_to_spec, make_mesh

  cfg = config()
  mesh = make_mesh(cfg.mesh)
  data_iter = data_lib.make_train_iterator(cfg.data, engram=cfg.model.engram, vocab_size=cfg.model.vocab_size)
  next(data_iter)
  local = next(data_iter)
  tokens = jax.make_array_from_process_local_data(batch_sharding(mesh, 2), local["tokens"])
  row_sums = jax.jit(lambda t: jnp.sum(t, axis=1), out_shardings=NamedSharding(mesh, PartitionSpec()))(tokens)
  out = dict(local, row_sums=np.asarray(row_sums))

  rows = NamedSharding(mesh, logical_to_spec(("table_rows", "table_dim")))
  reader = ckpt_lib.CheckpointManager(args.restore_dir, CheckpointConfig(async_save=False))
  with reader:
    before = _file_bytes_read()
    restored = reader.restore(reader.latest_step(), {"table": jax.ShapeDtypeStruct(IO_TABLE_SHAPE, np.float32,
                                                                                   sharding=rows)})["table"]
    out["restore_bytes_read"] = np.int64(_file_bytes_read() - before)
  for shard in restored.addressable_shards:
    out[f"restored|{shard.index[0].start or 0}"] = np.asarray(shard.data)
  np.savez(os.path.join(args.dump, f"io_{jax.process_index()}.npz"), **out)

  values = io_table_values(1)
  table = jax.make_array_from_callback(IO_TABLE_SHAPE, rows, lambda index: values[index])
  writer = ckpt_lib.CheckpointManager(os.path.join(args.workdir, "checkpoints"),
                                      CheckpointConfig(every_n_steps=1, async_save=True))
  with writer:
    assert writer.save(2, {"table": table}, data_iter, force=True)
  return {"step": 2, "local_rows": int(local["tokens"].shape[0])}


def run_lock(args):
  """Take the workdir's run lock as `trainer.train` does (process 0 alone; the others learn whether it
  got it), report who holds it while every process can look, then let it go."""
  from jax.experimental import multihost_utils

  from engram_jax import runlock, trainer

  os.makedirs(args.workdir, exist_ok=True)
  lock = runlock.WorkdirLock(args.workdir)
  try:
    trainer._lock_workdir(lock)
  except runlock.WorkdirBusyError as e:
    return {"busy": True, "message": str(e)}
  try:
    holder = lock.holder()
    multihost_utils.sync_global_devices("lock_read")  # every process read the file while it was held
    return {"busy": False, "held_here": lock.held, "holder_pid": holder.get("pid"), "pid": os.getpid()}
  finally:
    lock.release()


def run_train(args):
  import jax

  from engram_jax import checkpoint as ckpt_lib
  from engram_jax import trainer

  save = ckpt_lib.CheckpointManager.save

  def save_and_dump(self, step, state, *a, **k):
    started = save(self, step, state, *a, **k)
    if started and int(step) == STEPS:  # the arrays orbax was just handed
      _dump_tables(state, os.path.join(args.dump, f"tables_{jax.process_index()}.npz"))
    return started

  ckpt_lib.CheckpointManager.save = save_and_dump
  summary = trainer.train(config(args.engram_tables), args.workdir, progress=False, log=lambda *_: None,
                          max_steps=args.max_steps)
  return {"step": summary["step"], "stopped_by": summary["stopped_by"]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--mode", choices=("train", "io", "lock"), default="train")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--dump", required=True)
  parser.add_argument("--restore_dir", default=None, help="--mode io: a checkpoint of io_table_values(0)")
  parser.add_argument("--coordinator", default=None)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--local_devices", type=int, default=8)
  parser.add_argument("--engram_tables", default="device", help="--mode train: train.engram_tables")
  parser.add_argument("--max_steps", type=int, default=STEPS, help="--mode train: train (or resume) up to this step")
  parser.add_argument("--cache_dir", default=None, help="persistent compilation cache (the test suite's)")
  args = parser.parse_args()

  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
  import jax

  jax.config.update("jax_num_cpu_devices", args.local_devices)
  # Cross-process collectives on CPU go through gloo over TCP (the default in recent jax; named
  # here so the test fails loudly if that ever changes rather than hanging on a missing backend).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  _write_small_arrays_whole()
  if args.coordinator:
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id, initialization_timeout=120)
  sys.path.insert(0, ROOT)
  result = {"io": run_io, "lock": run_lock, "train": run_train}[args.mode](args)
  print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                    "devices": jax.device_count(), "local_devices": jax.local_device_count(), **result}))
  if args.coordinator:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
