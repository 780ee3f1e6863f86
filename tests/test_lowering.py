"""The train step and the evaluation forward lower for TPU and CUDA, checked on a CPU-only machine.

CI has no accelerator, so a change that runs on CPU but would not lower for a TPU VM or a CUDA GPU
(a primitive without a TPU/GPU lowering, a collective or shard_map that does not partition there, a
code path chosen by the host's backend at trace time) would otherwise pass. `jax.export` lowers a
jitted function for platforms that need not be present:
`jax.export.export(jitted, platforms=("tpu",))(*abstract_args)`.

Exported here, from abstract arguments (nothing is allocated), on the 8 fake CPU devices of
conftest.py:
- the tiny preset's train step, jitted exactly as `trainer.train` jits it (in/out shardings, the
  state donated, under the mesh and the logical axis rules), with row-sparse and with dense
  Engram table updates, on two meshes: the preset's own (data=8: the Engram lookups and the lazy
  Adam update exchange table rows with all_to_all; each device holds every expert) and
  fsdp=2 x expert=2 x tensor=2 (the MoE exchanges tokens between expert shards, hidden dims and
  heads are split, parameters are fsdp-sharded);
- the evaluation forward as the model runner jits it (`jitted_eval_forward`);
- generation's decode step (sample | hash + gather | blocks, the state donated), its K-step decode
  loop and its prefill, as `generation.Generator` jits them, both platforms in one module; and the
  step and loop that gather rows in-graph from tables in pinned host memory (host tables).

Each export must name the requested platforms, span the 8 devices and carry a non-empty StableHLO
module with its in-graph collectives: the Engram tables' all_to_all exchanges and, on the
expert-parallel mesh, the MoE's `ragged_all_to_all` (for TPU/GPU; on CPU the MoE uses a
fixed-capacity all_to_all: `test_moe_dispatch_follows_the_lowering_platform`).

Limits of exporting from a CPU host, and how this file handles them:
- `jax.lax.ragged_all_to_all` lowers to a `custom_call @ragged_all_to_all` (StableHLO has no
  ragged all-to-all op), a target that jax.export does not list among the custom calls with a
  serialization-compatibility guarantee, so export refuses it by default. That is a policy on
  storing the module for years, not a lowering failure: the exports allow exactly that target
  (`DisabledSafetyCheck.custom_call`). Any other custom call without that guarantee (a kernel,
  a host callback) still fails the export.
- cuDNN attention cannot be traced without cuDNN and a GPU: `jax.nn.dot_product_attention(
  implementation="cudnn")` asks the CUDA plugin for the cuDNN version and the device for its
  compute capability at trace time ("cuDNN is not detected" here). With attention "auto" the
  model picks cuDNN only when it runs on a GPU, so the CUDA exports here carry XLA's attention;
  the cuDNN kernel (bf16 models on a GPU) is not covered.
- Lowering only: the TPU and GPU compilers are not on a CPU host, so what only their compilation
  would reject (memory, kernel limits) is out of reach.
- The serialized module checked is `Exported.mlir_module_serialized` (the StableHLO bytecode that
  `Exported.serialize()` wraps); `serialize()` itself needs the optional flatbuffers package.

Run with `python -m pytest tests/test_lowering.py` from the repository root (the checkout's
engram_jax must be the one imported).
"""

import dataclasses
import functools
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax import export

from engram_jax import generation, runner, trainer
from engram_jax.tables import source as row_source
from engram_jax.config import Config, MeshConfig, load_preset
from engram_jax.sharding import LOGICAL_RULES, batch_sharding, make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLATFORMS = [("tpu",), ("cuda",)]
MESHES = {
    "preset": None,  # the tiny preset's own mesh: data=8
    "fsdp2_expert2_tensor2": MeshConfig(data=1, fsdp=2, expert=2, tensor=2),
}
# The only custom call target allowed into the exports (see the module docstring).
RAGGED_ALL_TO_ALL = "ragged_all_to_all"


def tiny(mesh: str = "preset", sparse: bool = True) -> Config:
  cfg = load_preset(os.path.join(ROOT, "configs", "tiny.py"))
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=16, batch_size=8),
                            train=dataclasses.replace(cfg.train, engram_sparse_updates=sparse))
  if MESHES[mesh] is not None:
    cfg = dataclasses.replace(cfg, mesh=MESHES[mesh])
  return cfg


def jitted_eval_forward(cfg: Config, mesh):
  """The evaluation forward, jitted as the model runner jits it."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    return jax.jit(runner.make_forward(cfg, row_source.DeviceRows(cfg.model, mesh)))


def _export(jitted, mesh, platforms, *args) -> export.Exported:
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    return export.export(jitted, platforms=platforms,
                         disabled_checks=[export.DisabledSafetyCheck.custom_call(RAGGED_ALL_TO_ALL)])(*args)


def _batch(cfg: Config, mesh, keys=None):
  shapes = trainer.batch_shapes(cfg, cfg.data.batch_size)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, len(v.shape)))
          for k, v in shapes.items() if keys is None or k in keys}


@functools.lru_cache(maxsize=None)
def export_train_step(mesh_name: str, sparse: bool, platforms) -> export.Exported:
  """trainer.train's step, jitted as train() jits it, exported from the abstract state and batch."""
  cfg = tiny(mesh_name, sparse)
  mesh = make_mesh(cfg.mesh)
  trainer.check_batch_divides_mesh(cfg, mesh)
  tx, shardings, abstract_state = trainer.state_shardings(cfg, mesh)
  data_shardings = {k: batch_sharding(mesh, len(v.shape)) for k, v in trainer.batch_shapes(cfg, 1).items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    step = jax.jit(trainer.make_train_step(cfg, tx), in_shardings=(shardings, data_shardings),
                   out_shardings=(shardings, None), donate_argnums=(0,))
  return _export(step, mesh, platforms, abstract_state, _batch(cfg, mesh))


@functools.lru_cache(maxsize=None)
def export_eval_forward(mesh_name: str, platforms) -> export.Exported:
  """The evaluation forward on params and model state sharded as a restored checkpoint's."""
  cfg = tiny(mesh_name)
  mesh = make_mesh(cfg.mesh)
  _, _, abstract_state = trainer.state_shardings(cfg, mesh)
  batch = _batch(cfg, mesh, keys=("tokens", "targets", "segment_ids", "positions", "engram_ids"))
  engram_scale = jax.ShapeDtypeStruct((len(cfg.model.engram.layer_ids),), jnp.float32)
  return _export(jitted_eval_forward(cfg, mesh), mesh, platforms, abstract_state.params,
                 abstract_state.model_state, batch, engram_scale)


def _count(exported: export.Exported, op: str) -> int:
  return exported.mlir_module().count(op)


def _float_all_to_alls(exported: export.Exported) -> int:
  """all_to_all ops that move floating-point data (not just integer ids or offsets)."""
  return sum(1 for line in exported.mlir_module().splitlines()
             if "stablehlo.all_to_all" in line and re.search(r"-> tensor<[0-9x]*(f32|bf16|f16)>", line))


def _check_module(exported: export.Exported, platforms):
  assert exported.platforms == platforms
  assert exported.nr_devices == jax.device_count() == 8
  assert len(exported.mlir_module_serialized) > 0
  assert "func.func public @main" in exported.mlir_module()


def _engram_layers() -> int:
  return len(tiny().model.engram.layer_ids)


def _expert_parallel(mesh_name: str) -> bool:
  return make_mesh(tiny(mesh_name).mesh).shape["expert"] > 1


# ----------------------------------------------------------------------------------------------
# The sharded train step.


@pytest.mark.parametrize("platforms", PLATFORMS, ids=lambda p: "+".join(p))
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse_tables", "dense_tables"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_train_step_exports(mesh_name, sparse, platforms):
  exported = export_train_step(mesh_name, sparse, platforms)
  _check_module(exported, platforms)
  # Engram rows travel with all_to_all, per Engram layer: ids out and rows back in the lookup
  # (memory.sharded_lookup), then row gradients to the rows' owners in the lookup's backward
  # (dense tables) or in the lazy Adam update (memory.sparse_adam_update). A lookup left to XLA's
  # gather partitioning (all-gathered ids, all-reduced rows) would have none.
  assert _count(exported, "stablehlo.all_to_all") >= 4 * _engram_layers()
  ragged = _count(exported, f"custom_call @{RAGGED_ALL_TO_ALL}")
  if _expert_parallel(mesh_name):
    # Dispatch and combine, forward and backward, in every MoE layer body.
    assert ragged >= 4 and ragged % 4 == 0, ragged
  else:
    assert ragged == 0  # every expert on every device: nothing to exchange


# ----------------------------------------------------------------------------------------------
# The evaluation forward.


@pytest.mark.parametrize("platforms", PLATFORMS, ids=lambda p: "+".join(p))
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_eval_forward_exports(mesh_name, platforms):
  exported = export_eval_forward(mesh_name, platforms)
  _check_module(exported, platforms)
  assert _count(exported, "stablehlo.all_to_all") >= 2 * _engram_layers()  # rows out and back
  ragged = _count(exported, f"custom_call @{RAGGED_ALL_TO_ALL}")
  if _expert_parallel(mesh_name):
    assert ragged >= 2, ragged  # dispatch and combine in every MoE layer body
  else:
    assert ragged == 0, ragged


# ----------------------------------------------------------------------------------------------
# Both platforms in one module, and the MoE dispatch per platform.


def test_one_module_for_tpu_and_cuda():
  platforms = ("tpu", "cuda")
  exported = export_train_step("fsdp2_expert2_tensor2", True, platforms)
  _check_module(exported, platforms)
  # A multi-platform module takes the platform index as its first argument.
  main = exported.mlir_module().split("func.func public @main(", 1)[1].split("\n", 1)[0]
  assert main.startswith("%arg0: tensor<i32>"), main[:200]
  assert _count(exported, f"custom_call @{RAGGED_ALL_TO_ALL}") >= 4


def test_moe_dispatch_follows_the_lowering_platform():
  """MoEConfig.dispatch="auto" is the fixed-capacity all_to_all on CPU (XLA:CPU has no ragged
  all-to-all) and ragged_all_to_all on TPU/GPU. Traced on a CPU host, as here, the choice must
  follow the platform lowered for: chosen by `jax.default_backend()` alone, an export (or any AOT
  lowering) for TPU/GPU from a CPU host would carry the CPU fallback (see moe.resolve_dispatch)."""
  mesh_name = "fsdp2_expert2_tensor2"
  cpu = export_train_step(mesh_name, True, ("cpu",))
  assert cpu.platforms == ("cpu",)
  assert _count(cpu, f"custom_call @{RAGGED_ALL_TO_ALL}") == 0
  for platforms in PLATFORMS:
    accelerator = export_train_step(mesh_name, True, platforms)
    assert _count(accelerator, f"custom_call @{RAGGED_ALL_TO_ALL}") >= 4, platforms
    # The CPU module moves the MoE's tokens with all_to_all instead (the ragged exchange's backward
    # uses all_to_all too, but only on its integer offsets).
    assert _float_all_to_alls(cpu) > _float_all_to_alls(accelerator), platforms


# ----------------------------------------------------------------------------------------------
# Generation: the decode step and the prefill.


@functools.lru_cache(maxsize=None)
def export_generation(mesh_name: str, part: str) -> export.Exported:
  """Generation's jitted prefill or decode step (generation.Generator.programs: 8 rows, 16 prompt
  positions, a 64-position cache) on params sharded as a restored checkpoint's, for TPU and CUDA."""
  cfg = tiny(mesh_name)
  mesh = make_mesh(cfg.mesh)
  _, _, abstract_state = trainer.state_shardings(cfg, mesh)
  model_runner = runner.ModelRunner(cfg, abstract_state.params, abstract_state.model_state, mesh)
  generator = generation.Generator(model_runner, log=lambda s: None)
  jitted, args = generator.programs(8, 16, 64)[part]
  return _export(jitted, mesh, ("tpu", "cuda"), *args)


@pytest.mark.parametrize("part", ["step", "loop", "prefill"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_generation_exports(mesh_name, part):
  exported = export_generation(mesh_name, part)
  _check_module(exported, ("tpu", "cuda"))
  # The step hashes its new tokens in-graph and reads their rows with the sharded lookup (ids out,
  # rows back); prefill reads the prompt's rows the same way.
  assert _count(exported, "stablehlo.all_to_all") >= 2 * _engram_layers()
  ragged = _count(exported, f"custom_call @{RAGGED_ALL_TO_ALL}")
  if _expert_parallel(mesh_name):
    assert ragged >= 2, ragged  # the MoE's dispatch and combine, dropless
  else:
    assert ragged == 0, ragged
  if part == "loop":
    assert _count(exported, "stablehlo.while") >= 1  # up to K steps in one program
  if part in ("step", "loop"):
    # The sampler's sort over the vocabulary and its per-row keys are in the module.
    assert _count(exported, "stablehlo.sort") >= 1 and "threefry" in exported.mlir_module()



@pytest.mark.parametrize("part", ["step", "loop"])
def test_generation_pinned_host_gather_exports(part):
  """The decode step and loop of host tables read in-graph from pinned host memory: the tables enter
  in the pinned_host memory space, the row gather runs as host compute, and its rows come back to the
  device, for TPU and CUDA."""
  import numpy as np

  from engram_jax import memory, offload

  cfg = tiny("preset")
  mesh = make_mesh(cfg.mesh)
  _, _, abstract_state = trainer.state_shardings(cfg, mesh)
  backbone, tables = memory.split(abstract_state.params)
  host = offload.HostTables.from_arrays(cfg.model.engram, {n: np.zeros(t.shape, np.float32) for n, t in tables.items()})
  model_runner = runner.ModelRunner(cfg, backbone, abstract_state.model_state, mesh, tables=host)
  generator = generation.Generator(model_runner, log=lambda s: None, decode="pinned_host", block=4)
  jitted, args = generator.programs(8, 16, 64)[part]
  exported = _export(jitted, mesh, ("tpu", "cuda"), *args)
  _check_module(exported, ("tpu", "cuda"))
  text = exported.mlir_module()
  assert "pinned_host" in text
  assert "_xla_compute_type" in text and "host" in text
  assert _count(exported, "stablehlo.all_to_all") == 0  # replicated tables: no row exchange between devices
