"""Engram table checkpoints: save / restore GB/s through the project's CheckpointManager.

A model's Engram tables: `--tables` float32 tables [rows, dim] (default 2, one per Engram layer as
in Engram-27B, 2 GiB each: 4.3 GB in all) of random values (a trained table is as
incompressible), their rows sharded over 8 fake CPU devices as the trainer shards them, saved
together as one state tree and restored with
`engram_jax.checkpoint.CheckpointManager` (orbax, OCDBT + zarr3, zstd) on local disk, by this one
process (figures are per process, i.e. per host):

1. synchronous save: GB/s, and the time `save` blocks the caller;
2. asynchronous save: the time `save` blocks the caller (the device-to-host copy) and the time
   until the bytes are on disk; the blocked-time ratio async / sync is what training gains;
3. restore onto the same 8 devices and onto 4 (another device count; the chunks are resharded on
   read), each checked equal to the saved table;
4. what a host restoring part of the table reads: the zarr3 chunk shape written (one chunk per
   saved shard) and the file bytes tensorstore reads for a quarter of the rows and for 1/16 (finer
   than a chunk), from its own metrics;
5. a projection to a `--project_tb` table on `--project_hosts` hosts from the measured per-host
   rates (assumptions printed with it).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/bench_checkpoint.py \\
      [--tables 2] [--gib 2] [--dim 128] [--repeats 2] [--dir DIR] [--project_tb 2] [--project_hosts 64]

Needs about 2.5x the tables' bytes in free RAM and on disk (checked first); everything written is
deleted at the end. Prints one JSON object.
"""

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorstore as ts  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from engram_jax.checkpoint import CheckpointManager  # noqa: E402
from engram_jax.config import CheckpointConfig, MeshConfig  # noqa: E402
from engram_jax.sharding import logical_to_spec, make_mesh  # noqa: E402

GB = 1e9


def _bytes_read() -> int:
  for metric in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read"):
    return int(sum(v.get("value", 0) for v in metric["values"]))
  return 0


def _dir_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _available_ram() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def _rows_sharding(devices):
  return NamedSharding(make_mesh(MeshConfig(data=-1), devices), logical_to_spec(("table_rows", "table_dim")))


def _random_table(shape, sharding, index):
  """Table `index`, generated in place on `sharding`: threefry's bits do not depend on the
  sharding, so the same values can be rebuilt on any mesh to check a restore without keeping a
  host copy (which would cap the tables at a third of RAM instead of half)."""
  return jax.jit(lambda key: jax.random.normal(key, shape, np.float32), out_shardings=sharding)(jax.random.key(index))


def _tables(shape, sharding, count):
  """The state tree saved: {"engram": {"layer_<i>": table}} (tables built one at a time)."""
  return {"engram": {f"layer_{i}": _random_table(shape, sharding, i) for i in range(count)}}


def _check_equal(restored):
  for name, table in restored["engram"].items():
    expected = _random_table(table.shape, table.sharding, int(name.split("_")[1]))
    if not bool(jax.jit(lambda a, b: (a == b).all())(table, expected)):
      raise AssertionError(f"the restored table {name} differs from the saved one")
    del expected


def _save(directory, state, async_save):
  manager = CheckpointManager(directory, CheckpointConfig(every_n_steps=1, keep_last_n=1, async_save=async_save))
  t0 = time.perf_counter()
  manager.save(1, state, force=True)
  blocked = time.perf_counter() - t0
  manager.wait()
  total = time.perf_counter() - t0
  manager.close()
  return blocked, total


def _restore(directory, shape, sharding, count):
  manager = CheckpointManager(directory, CheckpointConfig(async_save=False))
  target = {"engram": {f"layer_{i}": jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding) for i in range(count)}}
  before = _bytes_read()
  t0 = time.perf_counter()
  state = manager.restore(1, target)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - t0
  manager.close()
  return state, seconds, _bytes_read() - before


def _partial_reads(state_dir, rows):
  """Chunk shape on disk and file bytes read for rows [0, rows/4) and [0, rows/16) of the first
  table, read the way orbax reads a shard: a tensorstore read of that index range of the zarr3
  array in OCDBT."""
  spec = {"driver": "zarr3", "kvstore": {"driver": "ocdbt", "base": f"file://{os.path.abspath(state_dir)}/",
                                         "path": "engram.layer_0/"}}
  array = ts.open(spec).result()
  metadata = array.spec().to_json()["metadata"]
  codecs = metadata.get("codecs", [])
  inner = next((c["configuration"]["chunk_shape"] for c in codecs if c.get("name") == "sharding_indexed"), None)
  out = {"chunk_grid": metadata["chunk_grid"]["configuration"]["chunk_shape"], "inner_chunk": inner}
  for name, part in (("quarter", 4), ("sixteenth", 16)):
    array = ts.open(spec).result()  # a fresh handle: nothing cached from the previous read
    before = _bytes_read()
    array[: rows // part].read().result()
    out[f"bytes_read_{name}"] = _bytes_read() - before
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tables", type=int, default=2, help="Engram tables (layers) in the saved model state")
  parser.add_argument("--gib", type=float, default=2.0, help="size of each table in GiB")
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--dir", default=None, help="scratch directory (default: a new temporary one)")
  parser.add_argument("--repeats", type=int, default=2, help="each save and restore; the fastest is reported")
  parser.add_argument("--project_tb", type=float, default=2.0)
  parser.add_argument("--project_hosts", type=int, default=64)
  parser.add_argument("--project_d2h_gb_per_s", type=float, default=50.0,
                      help="device-to-host copy bandwidth of one accelerator host (all its devices together)")
  args = parser.parse_args()

  devices = jax.devices()
  if len(devices) < 8:
    raise SystemExit(f"needs 8 devices, found {len(devices)}: set XLA_FLAGS=--xla_force_host_platform_device_count=8")
  rows = int(args.gib * 2**30 / (args.dim * 4)) // (8 * 1024) * (8 * 1024)
  shape = (rows, args.dim)
  nbytes = args.tables * rows * args.dim * 4
  scratch = args.dir or tempfile.mkdtemp(prefix="bench_checkpoint_")
  os.makedirs(scratch, exist_ok=True)
  free_disk = shutil.disk_usage(scratch).free
  if free_disk < 2.5 * nbytes:
    raise SystemExit(f"{scratch}: {free_disk / GB:.1f} GB free on disk, need {2.5 * nbytes / GB:.1f} GB")
  if _available_ram() < 2.5 * nbytes:
    raise SystemExit(f"{_available_ram() / GB:.1f} GB of RAM available, need {2.5 * nbytes / GB:.1f} GB")

  result = {"tables": args.tables, "table_shape": list(shape), "tables_gb": nbytes / GB, "devices_saved": 8,
            "devices_restored": 4,
            "cpu_count": os.cpu_count(), "jax": jax.__version__}
  try:
    state = _tables(shape, _rows_sharding(devices[:8]), args.tables)
    result["peak_rss_gb_after_init"] = _peak_rss_gb()

    saves = {"sync": [], "async": []}
    for r in range(args.repeats):
      for mode in ("sync", "async"):
        directory = os.path.join(scratch, f"{mode}_{r}")
        saves[mode].append(_save(directory, state, async_save=mode == "async"))
        if (mode, r) != ("sync", 0):  # keep one checkpoint to restore from; the disk holds two at most
          shutil.rmtree(directory)
    for mode, runs in saves.items():
      blocked, total = min(runs, key=lambda run: run[1])
      result[f"{mode}_save"] = {"blocked_s": blocked, "total_s": total, "gb_per_s": nbytes / GB / total,
                                "all_total_s": [run[1] for run in runs], "all_blocked_s": [run[0] for run in runs]}
    result["async_over_sync_blocked"] = result["async_save"]["blocked_s"] / result["sync_save"]["blocked_s"]
    result["peak_rss_gb_after_saves"] = _peak_rss_gb()
    del state
    saved = os.path.join(scratch, "sync_0")
    state_dir = os.path.join(saved, "1", "state")
    result["on_disk_bytes"] = _dir_bytes(state_dir)
    result["on_disk_over_raw"] = result["on_disk_bytes"] / nbytes

    for label, n in (("restore_same_8", 8), ("restore_onto_4", 4)):
      runs = []
      for _ in range(args.repeats):
        restored, seconds, read = _restore(saved, shape, _rows_sharding(devices[:n]), args.tables)
        assert all(len(t.sharding.device_set) == n for t in restored["engram"].values())
        _check_equal(restored)
        del restored
        runs.append((seconds, read))
      seconds, read = min(runs)
      result[label] = {"seconds": seconds, "gb_per_s": nbytes / GB / seconds, "all_seconds": [r[0] for r in runs],
                       "file_bytes_read": read, "read_over_on_disk": read / result["on_disk_bytes"],
                       "peak_rss_gb_after": _peak_rss_gb()}

    partial = _partial_reads(state_dir, rows)
    table_on_disk = result["on_disk_bytes"] / args.tables
    partial["quarter_over_table_on_disk"] = partial["bytes_read_quarter"] / table_on_disk
    partial["sixteenth_over_table_on_disk"] = partial["bytes_read_sixteenth"] / table_on_disk
    result["partial_reads"] = partial

    share = args.project_tb * 1e12 / args.project_hosts
    save_rate = result["sync_save"]["gb_per_s"] * GB
    restore_rate = result["restore_onto_4"]["gb_per_s"] * GB
    cpu_blocked_rate = nbytes / result["async_save"]["blocked_s"]
    result["projection"] = {
        "table_tb": args.project_tb, "hosts": args.project_hosts, "gb_per_host": share / GB,
        "save_s": share / save_rate, "restore_s": share / restore_rate,
        # On CPU the "device" arrays already live in host memory, so `save` blocks only for orbax's
        # bookkeeping; an accelerator host first copies its share to host memory.
        "async_blocked_s_cpu_hosts": share / cpu_blocked_rate,
        "async_blocked_s_accelerator_hosts": share / (args.project_d2h_gb_per_s * GB),
        "assumptions": [
            "every host writes and reads only its own 1/hosts of the rows, in parallel (verified: per-process "
            "OCDBT stores, chunks = saved shards, partial reads above)",
            "storage bandwidth scales with hosts (host-local disks, or a parallel file system / object store "
            "whose aggregate bandwidth is at least hosts x the per-host rate)",
            "per-host rate as measured here: one process, 2 shared CPU cores, local disk, zstd on "
            "incompressible float32; hosts with more cores compress and write more chunks in parallel",
            "the table alone: Adam's two moments triple the bytes (and the times) of a full train state",
            "an async save holds a host copy of its share until written: host RAM >= the share (and tensorstore's "
            "encode / decode buffers on top: see peak_rss_gb_*)",
            f"accelerator hosts copy device to host at {args.project_d2h_gb_per_s:g} GB/s per host in all",
        ],
    }
  finally:
    if args.dir is None:
      shutil.rmtree(scratch, ignore_errors=True)
    else:
      for sub in os.listdir(scratch):
        if sub.startswith(("sync_", "async_")):
          shutil.rmtree(os.path.join(scratch, sub), ignore_errors=True)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
