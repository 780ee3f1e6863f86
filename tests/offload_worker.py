"""One process of a two-process host-table run, for tests/test_offload.py.

  python tests/offload_worker.py --coordinator 127.0.0.1:PORT --num_processes 2 --process_id I
      --local_devices 4 --text DOCS --table_dir TABLES

Every process builds tests/test_offload.py's tiny model on one 8-device mesh spanning both
processes, opens the table directory for "host" placement (so it holds only its own contiguous row
range of each table), and runs the held-out batches through a runner with the tables on the
devices (the reference: rows sharded over all 8 devices, read with the all-to-all lookup) and one
with the host tables (each process contributes the rows it owns). Prints one JSON line.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--coordinator", required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--local_devices", type=int, default=4)
  parser.add_argument("--text", required=True)
  parser.add_argument("--table_dir", required=True)
  args = parser.parse_args()
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
  import jax

  jax.config.update("jax_num_cpu_devices", args.local_devices)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                             process_id=args.process_id)
  sys.path.insert(0, HERE)
  sys.path.insert(0, os.path.dirname(HERE))
  import flax.linen as nn
  import numpy as np

  from engram_jax import data as data_lib
  from engram_jax import offload
  from engram_jax import runner as runner_lib
  from engram_jax.model import init_variables
  from engram_jax.patches import fingerprint
  from engram_jax.sharding import LOGICAL_RULES, make_mesh
  from test_offload import _config

  cfg = _config(args.text)
  mesh = make_mesh(cfg.mesh)

  def init():
    return nn.meta.unbox(init_variables(cfg.model, jax.random.key(0)))

  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    variables = jax.jit(init)()
  params = variables.pop("params")
  device = runner_lib.ModelRunner(cfg, params, dict(variables), mesh)
  tables = offload.HostTables.open(args.table_dir, cfg.model, fingerprint(cfg.model, device.hashing), "host")
  host = runner_lib.ModelRunner(cfg, params, dict(variables), mesh, tables=tables)
  batches = data_lib.eval_batches(cfg.data, engram=cfg.model.engram, vocab_size=cfg.model.vocab_size,
                                  tokenizer=device.tokenizer)
  equal, nll = True, 0.0
  for batch in batches:
    want, got = device.forward(batch), host.forward(batch)
    equal &= all(np.array_equal(want[k], got[k]) for k in want)
    nll += float(np.sum(got["nll"]))
  print(json.dumps({"process": jax.process_index(), "equal": bool(equal), "batches": len(batches), "nll_sum": nll,
                    "row_range": {k: list(v) for k, v in tables.row_range.items()},
                    "rows_held": {k: int(v.shape[0]) for k, v in tables.rows.items()}}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
