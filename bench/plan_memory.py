"""XLA's memory plan for one train step, compiled from abstract state (nothing is allocated).

Prints one JSON line: the train state's bytes and the compiled step's argument / output / alias /
temporary bytes as the backend compiling it plans them. On CPU it shows what the step would need
there; GPU plans differ (fused attention, grouped matmuls), so treat CPU figures as an upper bound.

  JAX_PLATFORMS=cpu python bench/plan_memory.py configs/small.py [--remat full] [--batch_size 16]
"""

import argparse
import dataclasses
import json
import time

import flax.linen as nn
import jax

from engram_jax import trainer
from engram_jax.config import load_preset
from engram_jax.sharding import LOGICAL_RULES, batch_sharding, make_mesh


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("preset", help="configs/<name>.py[:variant,...]")
  parser.add_argument("--remat", default=None, help="model.remat_policy: none, full, dots, dots_no_batch")
  parser.add_argument("--batch_size", type=int, default=None)
  args = parser.parse_args()
  cfg = load_preset(args.preset)
  if args.remat:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat_policy=args.remat))
  if args.batch_size:
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=args.batch_size))
  mesh = make_mesh(cfg.mesh)
  trainer.check_batch_divides_mesh(cfg, mesh)
  tx, shardings, abstract_state = trainer.state_shardings(cfg, mesh)
  B, T = cfg.data.batch_size, cfg.data.seq_len
  shapes = trainer.batch_shapes(cfg, B)
  batch_shardings = {k: batch_sharding(mesh, len(v.shape)) for k, v in shapes.items()}
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k]) for k, v in shapes.items()}
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    step = jax.jit(trainer.make_train_step(cfg, tx), in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    compiled = step.lower(abstract_state, batch).compile()
  plan = compiled.memory_analysis()
  state_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract_state))
  print(json.dumps({
      "preset": args.preset, "backend": jax.default_backend(), "devices": mesh.size,
      "remat_policy": cfg.model.remat_policy, "batch": [B, T], "compile_s": round(time.perf_counter() - t0, 1),
      "state_GB": state_bytes / 1e9, "argument_GB": plan.argument_size_in_bytes / 1e9,
      "output_GB": plan.output_size_in_bytes / 1e9, "alias_GB": plan.alias_size_in_bytes / 1e9,
      "temp_GB": plan.temp_size_in_bytes / 1e9}))


if __name__ == "__main__":
  main()
