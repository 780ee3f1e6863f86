"""Model throughput: train-step and forward+backward time, tokens/s and MFU per preset variant; the
cost of Engram (step time with / without it); one MoE layer against a dense MLP of equal activated
FLOPs.

For each variant of `--preset` (default `configs/small.py` as itself, `:no_engram` and
`:no_engram,dense`), on a mesh over all local devices (one GPU: a 1-device mesh):

- "train_step": the trainer's own step (`trainer.make_train_step`: forward, backward, optimizer
  update, MoE bias update, metrics), jitted as `trainer.train` jits it (explicit in/out shardings,
  donated state), on one synthetic batch of the pipeline's structure.
- "fwd_bwd": forward + backward only: `jax.value_and_grad` of the trainer's loss with respect to
  the optimizer's params (and, with row-sparse tables, the gathered Engram rows, as the train step
  takes them), no optimizer update. The requirement's MFU targets refer to this one.

Both are compiled once (ahead of time, timed), run `--warmup` times, then timed as the median of
`--repeats` steps each synchronised with `block_until_ready` ("step_s"); "pipelined_step_s" is the
mean over `--repeats` steps dispatched back to back with one synchronisation at the end, as the
training loop runs them. tokens/s = batch_size * seq_len / step_s (padding counts, as in the
trainer's tokens/s); MFU = tokens/s * trainer.flops_per_token / (peak bf16 FLOP/s * devices),
null where the device's peak is unknown (CPU).

The synthetic batch: uniformly random token ids over the model's vocabulary, rows packed with
documents of random length (segment ids from 1, positions restarting at 0 in each document, as the
pipeline packs them), loss mask 1, and Engram hash ids from `NgramHasher.hash_numpy` of the tokens
(taken as compressed ids), so their layout and range are exactly the pipeline's.

Memory: per program, XLA's planned argument/output/temporary bytes ("compiled_memory"); per
variant, the allocator's counters after it ran ("memory_after"; `peak_bytes_in_use` is the
process's high-water mark so far, which no API resets: the first variant's is its own).

MoE layer vs dense MLP: one `moe.MoE` with the preset's MoE config (router, shared and routed
experts; forward + backward with respect to params and input) against one `layers.MLP` whose hidden
width is (num_shared_experts + top_k) * expert_hidden, i.e. the same activated matmul FLOPs, on the
same [batch, seq, d_model] input in the model's compute dtype. The compiled HLO's custom-call
targets are listed too: they show whether `ragged_dot` became a grouped GEMM or a dense dot. On a
GPU whose JAX has it, the MoE layer is also timed with JAX's Pallas/Triton ragged_dot kernel
("moe_pallas_triton"); `--ragged_dot_pallas_triton` uses that kernel for the whole run. On CPU,
ragged_dot becomes a dense dot over every expert: XLA:CPU plans 346 GB of temporaries for the
`small` train step (214 GB with full remat), 187 GB for its dense twin (24 GB with full remat), so
`small` cannot be compiled usefully on CPU; see BENCHMARKS.md.

  python bench/bench_model.py                                  # small on one GPU
  python bench/bench_model.py --preset configs/tiny.py --repeats 3 --set data.batch_size=4
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import gc
import json
import os
import platform
import re
import time
import traceback
from typing import Any, Dict, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import trainer
from engram_jax.config import Config, load_preset
from engram_jax.hashing import NgramHasher
from engram_jax.layers import MLP
from engram_jax.model import param_counts
from engram_jax.moe import MoE
from engram_jax.sharding import LOGICAL_RULES, batch_sharding, make_mesh, place_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VARIANTS = ("base", "no_engram", "no_engram,dense")
TARGETS = {"mfu_engram_moe": 0.30, "mfu_dense": 0.40, "engram_cost": 1.05, "moe_over_mlp": 1.5}
# JAX's switch from XLA's ragged_dot lowering to its Pallas/Triton kernel on GPU (where it exists).
TRITON_RAGGED_DOT = "jax_ragged_dot_use_gpu_pallas_triton_lowering"


# ----------------------------------------------------------------------------------------------
# Configs.


def _replace_path(obj, keys: List[str], value):
  names = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
  if keys[0] not in names:
    raise ValueError(f"--set: {type(obj).__name__} has no field {keys[0]!r}; fields are {sorted(names)}")
  if len(keys) == 1:
    return dataclasses.replace(obj, **{keys[0]: value})
  return dataclasses.replace(obj, **{keys[0]: _replace_path(getattr(obj, keys[0]), keys[1:], value)})


def apply_overrides(cfg: Config, overrides: List[str]) -> Config:
  """`data.batch_size=16`-style overrides (values parsed as Python literals, else kept as strings)."""
  for item in overrides or []:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"--set {item!r}: expected dotted.key=value")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    cfg = _replace_path(cfg, key.split("."), value)
  return cfg


def load_variant(preset: str, variant: str, overrides: List[str]) -> Config:
  path = preset if variant in ("", "base") else f"{preset}:{variant}"
  return apply_overrides(load_preset(path), overrides)


def variant_label(cfg_name: str, variant: str) -> str:
  return cfg_name if variant in ("", "base") else f"{cfg_name}:{variant}"


# ----------------------------------------------------------------------------------------------
# Inputs.


def synthetic_batch(cfg: Config, seed: int = 0) -> Dict[str, np.ndarray]:
  """One global batch with the pipeline's keys, shapes and dtypes (see the module docstring)."""
  B, T, vocab = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
  rng = np.random.default_rng(seed)
  stream = rng.integers(0, vocab, size=(B, T + 1), dtype=np.int64)
  segment_ids = np.zeros((B, T), np.int32)
  positions = np.zeros((B, T), np.int32)
  for b in range(B):
    t, seg = 0, 1
    while t < T:
      n = min(int(rng.integers(max(T // 8, 1), max(T // 2, 2) + 1)), T - t)
      segment_ids[b, t:t + n] = seg
      positions[b, t:t + n] = np.arange(n)
      t, seg = t + n, seg + 1
  batch = {"tokens": stream[:, :T].astype(np.int32), "targets": stream[:, 1:].astype(np.int32),
           "segment_ids": segment_ids, "positions": positions, "loss_mask": np.ones((B, T), np.float32)}
  engram = cfg.model.engram
  if engram is not None:
    hasher = NgramHasher(engram, vocab, pad_id=engram.pad_id)
    batch["engram_ids"] = hasher.hash_numpy(stream[:, :T])  # int32 [B, T, layers, heads]
  return batch


def data_shardings(cfg: Config, mesh):
  return {k: batch_sharding(mesh, len(v.shape)) for k, v in trainer.batch_shapes(cfg, 1).items()}


# ----------------------------------------------------------------------------------------------
# Measurement helpers.


def device_info() -> Dict[str, Any]:
  dev = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": dev.device_kind, "device_count": jax.device_count(),
          "local_device_count": jax.local_device_count(), "jax": jax.__version__,
          "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
          "peak_flops_per_device": trainer.peak_flops_per_device(),
          "compilation_cache": jax.config.jax_compilation_cache_dir}


def memory_stats() -> Optional[Dict[str, int]]:
  """The first local device's allocator counters (None where the backend has none, e.g. CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - backends without allocator statistics
    return None
  if not stats:
    return None
  keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit", "largest_alloc_size")
  return {k: int(stats[k]) for k in keys if k in stats}


def compiled_memory(compiled) -> Optional[Dict[str, int]]:
  """Bytes XLA planned for one program (per device): arguments, outputs, temporaries."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return None
  if m is None:
    return None
  out = {}
  for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
               "generated_code_size_in_bytes"):
    if hasattr(m, name):
      out[name.replace("_size_in_bytes", "_bytes")] = int(getattr(m, name))
  return out


def xla_flops(compiled) -> Optional[float]:
  """XLA's own FLOP count of a compiled program (loops counted once: use on loop-free programs)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def hlo_summary(compiled) -> Dict[str, Any]:
  """Custom-call targets (cuBLAS/cuDNN kernels, grouped GEMMs) and op counts in the optimized HLO."""
  try:
    text = compiled.as_text()
  except Exception:  # noqa: BLE001
    return {}
  targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
  return {"custom_call_targets": dict(targets), "ragged_dot_ops": len(re.findall(r"\bragged-dot\(", text)),
          "dot_ops": len(re.findall(r"\bdot\(", text)), "fusions": len(re.findall(r"\bfusion\(", text))}


def time_calls(call, warmup: int, repeats: int) -> Dict[str, float]:
  """`call()` returns the arrays to wait for. Median of synchronised calls; mean of pipelined ones."""
  for _ in range(warmup):
    jax.block_until_ready(call())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - t0)
  t0 = time.perf_counter()
  out = None
  for _ in range(repeats):
    out = call()
  jax.block_until_ready(out)
  pipelined = (time.perf_counter() - t0) / repeats
  return {"step_s": float(np.median(times)), "step_s_min": float(np.min(times)),
          "step_s_max": float(np.max(times)), "pipelined_step_s": pipelined}


def throughput(cfg: Config, seconds: float) -> Dict[str, Optional[float]]:
  tokens = cfg.data.batch_size * cfg.data.seq_len
  tok_s = tokens / seconds
  peak = trainer.peak_flops_per_device()
  mfu = tok_s * trainer.flops_per_token(cfg) / (peak * jax.device_count()) if peak else None
  return {"tokens_per_s": tok_s, "mfu": mfu}


# ----------------------------------------------------------------------------------------------
# The model: train step and forward+backward.


def make_fwd_bwd(cfg: Config):
  """(params, model_state, batch) -> (loss, grads): the train step's gradient computation without the
  update (`trainer.make_grads`: with row-sparse tables, gradients of the backbone and of the rows read)."""
  grads_of = trainer.make_grads(cfg)

  def fwd_bwd(params, model_state, batch):
    loss, _, grads, row_grads = grads_of(params, model_state, batch)
    return loss, (grads, row_grads)

  return fwd_bwd


def measure_model(cfg: Config, mesh, *, warmup: int, repeats: int, fwd_bwd: bool = True,
                  log=print) -> Dict[str, Any]:
  """Train step (and optionally forward+backward) timings of one config on `mesh`."""
  counts = param_counts(cfg.model)
  result: Dict[str, Any] = {
      "config": cfg.name, "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
      "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len, "dtype": cfg.model.dtype,
      "params_total": counts["total"], "params_activated": counts["activated"], "params_engram": counts["engram"],
      "flops_per_token": trainer.flops_per_token(cfg),
  }
  t0 = time.perf_counter()
  tx, shardings, _ = trainer.state_shardings(cfg, mesh)
  state = trainer.init_state(cfg, mesh, tx, shardings)
  jax.block_until_ready(state)
  result["init_s"] = time.perf_counter() - t0
  batch = place_batch(synthetic_batch(cfg), mesh)
  batch_shard = data_shardings(cfg, mesh)

  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    step = jax.jit(trainer.make_train_step(cfg, tx), in_shardings=(shardings, batch_shard),
                   out_shardings=(shardings, None), donate_argnums=(0,))
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    holder = {"state": state}
    del state

    def call():
      holder["state"], metrics = compiled(holder["state"], batch)
      return holder["state"], metrics

    timing = time_calls(call, warmup, repeats)
    loss = float(jax.device_get(call()[1]["loss"]))
    result["train_step"] = {"lower_s": t1 - t0, "compile_s": t2 - t1, **timing,
                            **throughput(cfg, timing["step_s"]),
                            "pipelined_mfu": throughput(cfg, timing["pipelined_step_s"])["mfu"],
                            "loss": loss, "compiled_memory": compiled_memory(compiled)}
    log(json.dumps({"config": cfg.name, "train_step": result["train_step"]}), flush=True)
    del compiled, lowered, step

    if fwd_bwd:
      state = holder.pop("state")
      params, model_state = state.params, state.model_state
      fb = jax.jit(make_fwd_bwd(cfg), in_shardings=(shardings.params, shardings.model_state, batch_shard))
      t0 = time.perf_counter()
      lowered = fb.lower(params, model_state, batch)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()
      timing = time_calls(lambda: compiled(params, model_state, batch), warmup, repeats)
      result["fwd_bwd"] = {"lower_s": t1 - t0, "compile_s": t2 - t1, **timing, **throughput(cfg, timing["step_s"]),
                           "pipelined_mfu": throughput(cfg, timing["pipelined_step_s"])["mfu"],
                           "compiled_memory": compiled_memory(compiled)}
      log(json.dumps({"config": cfg.name, "fwd_bwd": result["fwd_bwd"]}), flush=True)
      result["optimizer_share_of_train_step"] = 1.0 - result["fwd_bwd"]["step_s"] / result["train_step"]["step_s"]
      del compiled, lowered, fb, params, model_state, state
  holder.clear()
  gc.collect()
  result["memory_after"] = memory_stats()
  return result


# ----------------------------------------------------------------------------------------------
# One MoE layer vs a dense MLP of equal activated FLOPs.


def measure_moe_vs_mlp(cfg: Config, mesh, *, warmup: int, repeats: int, log=print) -> Dict[str, Any]:
  m, moe = cfg.model, cfg.model.moe
  B, T, D = cfg.data.batch_size, cfg.data.seq_len, m.d_model
  hidden = (moe.num_shared_experts + moe.top_k) * moe.expert_hidden
  dtype = jnp.dtype(m.dtype)
  x = jax.random.normal(jax.random.key(1), (B, T, D), jnp.float32).astype(dtype)
  tokens = B * T
  matmul_flops = 2 * 3 * tokens * D * hidden  # forward: gate, up, down
  result: Dict[str, Any] = {
      "tokens": tokens, "d_model": D, "dtype": m.dtype, "num_experts": moe.num_experts, "top_k": moe.top_k,
      "num_shared_experts": moe.num_shared_experts, "expert_hidden": moe.expert_hidden,
      "shared_hidden": moe.num_shared_experts * moe.expert_hidden, "routed_hidden_per_token": moe.top_k * moe.expert_hidden,
      "mlp_hidden": hidden, "activated_matmul_flops_fwd": matmul_flops,
      "router_flops_fwd": 2 * tokens * D * moe.num_experts, "dispatch": moe.dispatch,
  }
  log(f"MoE layer: {moe.num_shared_experts} shared + top-{moe.top_k} of {moe.num_experts} routed experts of width "
      f"{moe.expert_hidden} vs dense SwiGLU MLP of width {hidden} "
      f"(= ({moe.num_shared_experts} + {moe.top_k}) x {moe.expert_hidden}), {tokens} tokens x d_model {D}, {m.dtype}",
      flush=True)

  candidates = [("moe", MoE(m), False), ("mlp", MLP(hidden, m), False)]
  if jax.default_backend() == "gpu" and hasattr(jax.config, TRITON_RAGGED_DOT):
    # JAX's own Pallas/Triton grouped-matmul kernel for ragged_dot, instead of XLA's lowering
    # (cuDNN grouped GEMM where it applies, else a dense dot over every expert).
    candidates.append(("moe_pallas_triton", MoE(m), True))
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    for name, module, triton in candidates:
      previous = getattr(jax.config, TRITON_RAGGED_DOT, None)
      if triton:
        jax.config.update(TRITON_RAGGED_DOT, True)  # part of the jit key: set while lowering
      try:
        result[name] = _measure_layer(module, x, matmul_flops, warmup, repeats)
      except Exception as e:  # noqa: BLE001 - a missing kernel on this GPU is a result, not a crash
        if not triton:
          raise
        result[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
      finally:
        if triton:
          jax.config.update(TRITON_RAGGED_DOT, previous)
      log(json.dumps({name: result[name]}), flush=True)
  result["moe_over_mlp_fwd_bwd"] = result["moe"]["fwd_bwd_s"] / result["mlp"]["fwd_bwd_s"]
  result["moe_over_mlp_fwd"] = result["moe"]["fwd_s"] / result["mlp"]["fwd_s"]
  if "fwd_bwd_s" in result.get("moe_pallas_triton", {}):
    result["moe_pallas_triton_over_mlp_fwd_bwd"] = result["moe_pallas_triton"]["fwd_bwd_s"] / result["mlp"]["fwd_bwd_s"]
  gc.collect()
  return result


def _measure_layer(module, x, matmul_flops, warmup, repeats) -> Dict[str, Any]:
  """Forward and forward+backward time of one layer on x (sum of its output as the loss)."""
  variables = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), x))
  params = variables.pop("params")
  others = dict(variables)

  def loss(p, xx):
    y = module.apply({"params": p, **others}, xx)
    y = y[0] if isinstance(y, tuple) else y
    return jnp.sum(y.astype(jnp.float32))

  fwd = jax.jit(loss).lower(params, x).compile()
  t0 = time.perf_counter()
  fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
  compile_s = time.perf_counter() - t0
  t_f = time_calls(lambda: fwd(params, x), warmup, repeats)
  t_fb = time_calls(lambda: fb(params, x), warmup, repeats)
  xf = xla_flops(fb)
  return {
      "fwd_s": t_f["step_s"], "fwd_bwd_s": t_fb["step_s"], "compile_s": compile_s,
      "fwd_bwd_activated_tflop_s": 3 * matmul_flops / t_fb["step_s"] / 1e12,
      "xla_flops_fwd_bwd": xf, "xla_flops_over_activated": xf / (3 * matmul_flops) if xf else None,
      "hlo": hlo_summary(fb),
  }


# ----------------------------------------------------------------------------------------------


def summarize(results: Dict[str, Any], base: str) -> Dict[str, Any]:
  """Ratios and target checks from the per-variant results (whatever of them exist)."""
  models = results.get("models", {})
  out: Dict[str, Any] = {}
  eng, no_eng, dense = models.get(base), models.get(f"{base}:no_engram"), models.get(f"{base}:no_engram,dense")

  def ratio(a, b, key):
    if a and b and key in a and key in b:
      return a[key]["step_s"] / b[key]["step_s"]
    return None

  def check(value, target, larger_is_better):
    if value is None:
      return {"value": None, "target": target, "met": None}
    return {"value": value, "target": target, "met": value >= target if larger_is_better else value <= target}

  out["engram_cost_train_step"] = ratio(eng, no_eng, "train_step")
  out["engram_cost_fwd_bwd"] = ratio(eng, no_eng, "fwd_bwd")
  targets = {}
  if eng and "fwd_bwd" in eng:
    targets["fwd_bwd_mfu_" + base] = check(eng["fwd_bwd"]["mfu"], TARGETS["mfu_engram_moe"], True)
  if dense and "fwd_bwd" in dense:
    targets[f"fwd_bwd_mfu_{base}:no_engram,dense"] = check(dense["fwd_bwd"]["mfu"], TARGETS["mfu_dense"], True)
  targets["engram_cost_train_step"] = check(out["engram_cost_train_step"], TARGETS["engram_cost"], False)
  targets["engram_cost_fwd_bwd"] = check(out["engram_cost_fwd_bwd"], TARGETS["engram_cost"], False)
  if "moe_layer" in results:
    targets["moe_over_mlp_fwd_bwd"] = check(results["moe_layer"]["moe_over_mlp_fwd_bwd"], TARGETS["moe_over_mlp"], False)
  out["targets"] = targets
  out["step_s"] = {k: {"train_step": v["train_step"]["step_s"], "fwd_bwd": v.get("fwd_bwd", {}).get("step_s")}
                   for k, v in models.items()}
  out["mfu"] = {k: {"train_step": v["train_step"]["mfu"], "fwd_bwd": v.get("fwd_bwd", {}).get("mfu")}
                for k, v in models.items()}
  out["tokens_per_s"] = {k: {"train_step": v["train_step"]["tokens_per_s"],
                             "fwd_bwd": v.get("fwd_bwd", {}).get("tokens_per_s")} for k, v in models.items()}
  return out


def write_json(path: Optional[str], obj):
  if path:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default=os.path.join(ROOT, "configs", "small.py"))
  parser.add_argument("--variants", nargs="*", default=list(DEFAULT_VARIANTS),
                      help="'base' (the preset as it is) or a variant list like 'no_engram,dense'")
  parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. data.batch_size=16 (repeatable)")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--no_fwd_bwd", action="store_true", help="time only the train step")
  parser.add_argument("--no_moe_layer", action="store_true", help="skip the MoE-vs-dense-MLP layer timing")
  parser.add_argument("--json", default=None, help="also write the results here (rewritten after each part)")
  parser.add_argument("--ragged_dot_pallas_triton", action="store_true",
                      help=f"set {TRITON_RAGGED_DOT} for the whole run (the MoE experts' grouped matmuls)")
  args = parser.parse_args()
  if args.ragged_dot_pallas_triton:
    jax.config.update(TRITON_RAGGED_DOT, True)

  results: Dict[str, Any] = {"device": device_info(), "preset": args.preset, "overrides": args.overrides,
                             "ragged_dot_pallas_triton": args.ragged_dot_pallas_triton,
                             "repeats": args.repeats, "warmup": args.warmup, "models": {}, "errors": {}}
  print(json.dumps({"device": results["device"]}), flush=True)
  base_cfg = load_variant(args.preset, "base", args.overrides)
  base = base_cfg.name
  mesh = make_mesh(base_cfg.mesh)
  results["mesh"] = dict(mesh.shape)

  # Each part runs on its own: a failure (out of memory, say) is recorded and the next part still runs.
  if not args.no_moe_layer:
    if base_cfg.model.moe is None:
      print("MoE layer timing skipped: the preset has no MoE", flush=True)
    else:
      try:
        results["moe_layer"] = measure_moe_vs_mlp(base_cfg, mesh, warmup=args.warmup, repeats=args.repeats)
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        results["errors"]["moe_layer"] = f"{type(e).__name__}: {e}"[:2000]
      write_json(args.json, results)

  for variant in args.variants:
    label = variant_label(base, variant)
    try:
      cfg = dataclasses.replace(load_variant(args.preset, variant, args.overrides), name=label)
      results["models"][label] = measure_model(cfg, make_mesh(cfg.mesh), warmup=args.warmup, repeats=args.repeats,
                                               fwd_bwd=not args.no_fwd_bwd)
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      results["errors"][label] = f"{type(e).__name__}: {e}"[:2000]
    gc.collect()
    results["summary"] = summarize(results, base)
    results["memory"] = memory_stats()
    write_json(args.json, results)

  results["summary"] = summarize(results, base)
  results["memory"] = memory_stats()
  write_json(args.json, results)
  print(json.dumps({"summary": results["summary"], "memory": results["memory"], "errors": results["errors"]}, indent=1),
        flush=True)


if __name__ == "__main__":
  main()
