"""One Engram layer, forward + backward tokens/s: engram_jax vs the official PyTorch module.

Shape (defaults: one Engram-27B layer, as configs/engram_27b.py builds it): D=2560, M=4
hyper-connection branches, orders 2..3 x 8 heads = 16 heads of width 80 (n_embed_per_ngram 640 per
order, d_mem 1280), 2,262,400 rows per head (the next unused primes above it, layer 2's table:
~36.2 M rows), batch 4 x 4096 tokens = 16,384 tokens per step. The hash ids are drawn uniformly
in each head's range and given to both sides as they are (hashing is not timed); in the timed
steps the hidden states and a fixed output cotangent are standard normal.

Both sides build their weights from one init: the JAX params are initialised jitted, converted
with `engram_jax.convert.params_to_official` and loaded into `torch_engram.TorchEngram` (our own
transcription of the official demo's module, in its parameter layout).

Correctness gate (before any timing; the run stops with an error if it fails):
  * float32 with the benchmark's weights and shape (`--check_small`: batch 1 x 256 tokens), no
    TF32 on either side: outputs, the gradient w.r.t. the hidden states, every dense param's
    gradient and the table gradient at the rows read. The figure is the relative error
    ||ours - torch|| / ||torch|| (gate: `--tol`, 1e-4); the max-abs error over max |torch| is
    printed too. The hidden states are built so that no gate score is near 0 (see
    `well_conditioned_hidden`: near 0 the gate's signed square root amplifies float32 rounding in
    the gradients of both implementations, and more so the more tokens there are).
  * float64 (`jax.enable_x64` inside this script only, torch double) at the benchmark's widths
    with small tables (1,009+ rows per head), standard normal hidden states and 1 x min(256, seq)
    tokens: gate 1e-10.
  * the torch transcription against the official demo's own output (the parity fixtures, run as
    float64 against `output` and float32 against `output_fp32`): max |diff| / max |official|
    <= 1e-10 / 1e-5.

Timed lines (median of `--repeats` steps after `--warmup`; tokens/s = batch * seq / median):
  jax_dense        `jax.jit` of the module's VJP with a fixed cotangent: grads w.r.t. every param
                   (float32 master weights, including the dense [rows, 80] float32 table gradient,
                   what `jax.grad` gives for the table param) and w.r.t. the hidden states;
                   compute in bf16 (the module's `dtype`), norms and gate reduction in float32.
  jax_row_sparse   the trainer's row-sparse path (`train.engram_sparse_updates`): the rows are
                   gathered from the table inside the step but outside the differentiated
                   function and passed in the `engram_rows` collection; grads w.r.t. every other
                   param, the gathered rows ([B, T, 16, 80] float32) and the hidden states. No
                   [rows, 80] gradient exists; the lazy Adam that consumes the row gradients
                   (memory.sparse_adam_update) is NOT included, and neither is any optimizer on
                   the other lines.
  torch_eager      the official module run under bf16 as `model.to(torch.bfloat16)` (bf16
                   weights, bf16 dense table gradient, nn.Embedding's default), bf16 hidden states,
                   `out.backward(cotangent)` with the grads of the previous step set to None,
                   then `torch.cuda.synchronize()`.
  torch_compile    the same under `torch.compile(model)` (default mode); a failure is reported, not
                   raised. Skipped with --small unless `--torch_compile on`.
The ratios are ours/official tokens/s (= torch time / JAX time) against each torch line.

Memory (printed first, before anything is allocated; the JAX figures are XLA's own buffer
assignment of the programs compiled for this backend): the table is the bulk (36.2 M x 80: 11.6 GB
float32). JAX holds its float32 table and writes a float32 dense gradient every jax_dense step;
torch holds a bf16 table and bf16 gradient. The phases are ordered so that the two float32 dense
table gradients of the gate never coexist: torch's float32 gate runs first (beside the JAX
params), torch's model then becomes bf16 and its cache is emptied, then JAX's gate and timings,
then torch's timings beside the memory JAX's pool keeps (~56 GB at the peak for the default
shape by this estimate, with XLA's CPU figures; `--estimate_only` on the GPU gives its own). If the estimate exceeds 90% of the GPU, the float32 gate falls back to
`--check_small` by itself (the same weights, fewer tokens) and says so. JAX is started with
XLA_PYTHON_CLIENT_PREALLOCATE=false (unless set) so that torch can have the rest of the GPU.

  python bench/bench_engram_layer.py [--batch 4] [--seq 4096] [--repeats 20] [--warmup 3] \\
      [--check_small] [--torch_compile auto|on|off] [--out results.json]
  python bench/bench_engram_layer.py --small          # CPU smoke run at tiny shapes (~1 minute)
  python bench/bench_engram_layer.py --estimate_only  # memory plan only (compiles, allocates nothing)

Needs torch (not a dependency of engram_jax): `pip install torch` with the build for the machine.
Prints one JSON line per gate / measurement and writes everything to `--out` as one JSON file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from engram_jax.config import EngramConfig  # noqa: E402
from engram_jax.convert import params_to_official  # noqa: E402
from engram_jax.engram import Engram, rms_norm  # noqa: E402
from engram_jax import memory  # noqa: E402
from engram_jax.memory import read_rows, table_layout  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FIXTURES = os.environ.get("ENGRAM_PARITY_FIXTURES",
                                  os.path.join(HERE, os.pardir, "tests", "fixtures", "official_demo"))
GB = 1e9


def _import_torch():
  try:
    import torch  # noqa: F401
  except ImportError as e:
    raise SystemExit("bench_engram_layer.py needs PyTorch for the official baseline, and it is not installed "
                     f"({e}). Install the build for this machine (`pip install torch`); engram_jax itself "
                     "does not depend on it.") from e
  if HERE not in sys.path:
    sys.path.insert(0, HERE)
  import torch_engram  # noqa: F401
  return torch, torch_engram


def emit(record):
  """One JSON line per gate / measurement (each is also stored in its place in the results)."""
  print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------------------------
# Shapes.


def make_config(args) -> EngramConfig:
  return EngramConfig(vocab_size_per_ngram=(args.rows_per_head,) * (args.max_ngram_size - 1),
                      max_ngram_size=args.max_ngram_size, n_embed_per_ngram=args.n_embed_per_ngram,
                      n_head_per_ngram=args.n_head_per_ngram, layer_ids=tuple(args.layer_ids), pad_id=2, seed=0,
                      conv_zero_init=False)  # a random conv, so the gate checks the conv path too


def random_inputs(cfg, layer, B, T, M, D, seed, dtype):
  """Hidden states [B,T,M,D], per-head hash ids [B,T,H] (uniform below each head's size), cotangent."""
  sizes, offsets, _ = table_layout(cfg, layer)
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal((B, T, M, D), dtype=np.float32).astype(dtype)
  ct = rng.standard_normal((B, T, M, D), dtype=np.float32).astype(dtype)
  ids = (rng.random((B, T, len(sizes))) * sizes).astype(np.int32)
  return hidden, ids, ct, offsets


def well_conditioned_hidden(params, cfg, layer, hidden, ids, seed):
  """Hidden states whose gate scores s = <RMSNorm(k_m), RMSNorm(h_m)> / sqrt(D) lie away from 0.

  The gate's signed square root has slope 1 / (2 sqrt|s|), so a token whose score lands near 0
  amplifies float32 rounding in every gradient it feeds (both implementations alike: at D=2560 the
  relative L2 difference of the gradients grows from ~5e-5 at 128 tokens to ~2e-3 at 2,048, each
  side about as far from float64). The float32 gate therefore uses
  h_m = c * sign * RMSNorm(k_m) + noise with c = 6 / sqrt(D) and a random sign per (token, branch):
  s = +-(6 + N(0, 1)) / sqrt(1 + c^2), never near 0. Scores near 0 are covered by the float64 gate,
  whose random hidden states have no such offset. Returns (hidden, min |s|).
  """
  eps = cfg.gate_norm_eps if cfg.gate_norm_eps is not None else float(jnp.finfo(hidden.dtype).eps)
  D = hidden.shape[-1]
  sign = np.random.default_rng(seed + 7).choice(np.array([-1.0, 1.0], hidden.dtype), size=hidden.shape[:3] + (1,))

  @jax.jit
  def build(p, noise, i, sgn):
    B, T, _ = i.shape
    e = read_rows(p["memory"]["table"], cfg, layer, i).reshape(B, T, -1)  # [B,T,d_mem]
    key = jnp.einsum("btk,mkd->btmd", e, p["key_proj"], precision="highest") + p["key_bias"]
    nk = rms_norm(key, p["key_norm"], eps)
    h = (6.0 / np.sqrt(D)) * sgn * nk + noise
    score = jnp.sum(nk * rms_norm(h, p["query_norm"], eps), axis=-1) / np.sqrt(D)
    return h.astype(noise.dtype), jnp.min(jnp.abs(score))

  h, min_score = build(params, hidden, ids, sign)
  return np.asarray(h), float(min_score)


# One layer's parameters as a checkpoint holds them: the module's params plus {"memory": {"table"}}.


def _layer_init(module, cfg, layer, M, D):
  def init(key):
    rows = jnp.zeros((1, 8, cfg.num_heads, cfg.head_dim), jnp.float32)
    params = nn.meta.unbox(module.init(key, jnp.zeros((1, 8, M, D), jnp.float32), rows)["params"])
    table = nn.meta.unbox(memory.init_tables(cfg, jax.random.fold_in(key, 1)))[memory.table_name(layer)]
    return {**params, "memory": {"table": table}}
  return init


def init_params(module, cfg, layer, M, D, seed):
  """Jitted init (eager init of a billion-row table would be slow), params unboxed."""
  return jax.jit(_layer_init(module, cfg, layer, M, D))(jax.random.key(seed))


def abstract_params(module, cfg, layer, M, D):
  return jax.eval_shape(_layer_init(module, cfg, layer, M, D), jax.random.key(0))


def split_table(params):
  """(the module's params, the table)."""
  rest = {k: v for k, v in params.items() if k != "memory"}
  return rest, params["memory"]["table"]


def apply_layer(module, cfg, layer, params, hidden, ids):
  """The layer on per-head hash ids: rows read from its table (memory.read_rows), then the module."""
  rest, table = split_table(params)
  return module.apply({"params": rest}, hidden, read_rows(table, cfg, layer, ids))


def to_torch_model(torch, torch_engram, params, cfg, layer, D, M, device, dtype):
  """The official-layout torch module holding `params` (converted by params_to_official)."""
  rest, table = split_table(jax.tree.map(np.array, params))  # writable host copies: torch takes them
  sd = params_to_official(rest, table, cfg, layer)
  with torch.device("meta"):
    model = torch_engram.TorchEngram.from_config(cfg, layer, D, M)
  torch_engram.load_official(model, sd)
  del sd
  return model.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# The timed steps.


def jax_dense_step(module, cfg, layer):
  def step(params, hidden, ids, ct):
    _, vjp = jax.vjp(lambda p, h: apply_layer(module, cfg, layer, p, h, ids), params, hidden)
    return vjp(ct)  # (param grads incl. the dense table gradient, hidden grad)
  return step


def jax_row_sparse_step(module, cfg, layer):
  def step(rest, table, hidden, ids, ct):
    rows = read_rows(table, cfg, layer, ids)  # [B,T,H,d]: the forward's gather, outside the VJP
    _, vjp = jax.vjp(lambda p, r, h: module.apply({"params": p}, h, r), rest, rows, hidden)
    return vjp(ct)  # (grads of the other params, row grads [B,T,H,d], hidden grad)
  return step


def jax_gate_step(module, cfg, layer):
  """The float32/float64 gate's JAX side: output, hidden grad, dense-param grads, table grad at rows `u`."""
  def step(params, hidden, ids, ct, u):
    out, vjp = jax.vjp(lambda p, h: apply_layer(module, cfg, layer, p, h, ids), params, hidden)
    g_params, g_hidden = vjp(ct)
    g_rest, g_table = split_table(g_params)
    return out, g_hidden, g_rest, g_table[u]
  return step


def median_time(call, sync, warmup, repeats):
  for _ in range(warmup):
    out = call()
    sync(out)
    del out
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = call()
    sync(out)
    times.append(time.perf_counter() - t0)
    del out
  return float(np.median(times)), float(np.min(times))


def memory_analysis(compiled):
  try:
    m = compiled.memory_analysis()
  except Exception as e:  # some backends do not implement it
    return {"error": repr(e)[:200]}
  if m is None:
    return None
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
          "generated_code_size_in_bytes")
  return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def jax_peak_bytes():
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


# ----------------------------------------------------------------------------------------------
# Memory plan.


def compile_steps(cfg, layer, D, M, B, T, module_bf16, module_f32, gate_BT):
  """The JAX steps compiled ahead of time at abstract shapes (nothing is allocated): the two timed
  steps and the float32 gate at `gate_BT`, all reused later. Returns ({name: compiled},
  {name: compile seconds})."""
  params = abstract_params(module_bf16, cfg, layer, M, D)
  rest, table = split_table(params)
  H = cfg.num_heads
  h = jax.ShapeDtypeStruct((B, T, M, D), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((B, T, H), jnp.int32)
  todo = {"jax_dense": (jax_dense_step(module_bf16, cfg, layer), (params, h, ids, h)),
          "jax_row_sparse": (jax_row_sparse_step(module_bf16, cfg, layer), (rest, table, h, ids, h))}
  gB, gT = gate_BT
  h32 = jax.ShapeDtypeStruct((gB, gT, M, D), jnp.float32)
  gids = jax.ShapeDtypeStruct((gB, gT, H), jnp.int32)
  u = jax.ShapeDtypeStruct((min(gB * gT * H, table.shape[0]),), jnp.int32)  # rows read, padded (see `gate`)
  todo["float32_gate"] = (jax_gate_step(module_f32, cfg, layer), (params, h32, gids, h32, u))
  compiled, seconds = {}, {}
  for name, (fn, args) in todo.items():
    t0 = time.perf_counter()
    with jax.default_matmul_precision("highest" if name == "float32_gate" else None):
      compiled[name] = jax.jit(fn).lower(*args).compile()
    seconds[name] = time.perf_counter() - t0
  return compiled, seconds


def memory_estimate(cfg, layer, D, M, B, T, compiled, gate_BT):
  """Bytes each phase needs, in GB: analytic counts plus XLA's buffer assignment of the compiled
  JAX programs. JAX keeps the memory it has used in its own pool while torch runs, and torch's
  cache is emptied after its gate, so the run's peak is the largest of the phases' sums below."""
  sizes, _, padded = table_layout(cfg, layer)
  d_mem, K = cfg.d_mem, cfg.kernel_size
  table_jax = int(padded) * cfg.head_dim  # the JAX table is padded to a multiple of 1024 rows
  table = int(sizes.sum()) * cfg.head_dim
  dense = M * d_mem * D + M * D + d_mem * D + D + 3 * M * D + K * M * D
  act = B * T * M * D  # one [B,T,M,D] tensor
  gB, gT = gate_BT
  gate_act = gB * gT * M * D
  est = {
      "rows_per_head": [int(s) for s in sizes], "table_rows": int(sizes.sum()), "table_rows_jax_padded": int(padded),
      "head_dim": cfg.head_dim, "d_mem": d_mem, "table_params": table, "dense_params": dense,
      "table_GB_float32": 4 * table_jax / GB, "table_GB_bf16": 2 * table / GB,
      "one_BTMD_tensor_GB_bf16": 2 * act / GB,
      # JAX step: float32 params + float32 grads (dense table grad) + bf16 hidden/cotangent/hidden grad
      # (temporaries: XLA's figures below).
      "jax_dense_step_GB_without_temps": (8 * (table_jax + dense) + 3 * 2 * act) / GB,
      # torch bf16 step: bf16 params + bf16 grads + bf16 hidden/cotangent/hidden grad + ~12 saved
      # [B,T,M,D] activations (a rough count of what the eager module keeps for backward).
      "torch_bf16_step_GB_rough": (4 * (table + dense) + (3 + 12) * 2 * act) / GB,
      # torch float32 gate: float32 params + float32 grads (dense table grad) + ~15 float32 activations.
      "torch_float32_gate_GB_rough": (8 * (table + dense) + 15 * 4 * gate_act) / GB,
      "gate_batch_seq": [gB, gT],
  }
  for name, c in compiled.items():
    m = memory_analysis(c)
    est[f"xla_{name}"] = m
    if m and "temp_size_in_bytes" in m:
      est[f"xla_{name}_total_GB"] = (m["argument_size_in_bytes"] + m["output_size_in_bytes"]
                                     + m["temp_size_in_bytes"] - m.get("alias_size_in_bytes", 0)) / GB
  totals = {k: v for k, v in est.items() if k.startswith("xla_") and k.endswith("_total_GB")}
  if totals:
    # The phases in the order main() runs them: torch's float32 gate beside the JAX params; JAX's
    # gate beside the torch model, by then bf16; the timing, torch's bf16 step beside JAX's pool.
    jax_params, torch_bf16_params = 4 * (table_jax + dense) / GB, 2 * (table + dense) / GB
    est["run_peak_GB_estimate"] = max(jax_params + est["torch_float32_gate_GB_rough"],
                                      torch_bf16_params + totals.get("xla_float32_gate_total_GB", 0.0),
                                      max(totals.values()) + est["torch_bf16_step_GB_rough"])
  return est


# ----------------------------------------------------------------------------------------------
# Correctness gate.


def rel_errors(ours, ref):
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise AssertionError(f"shape mismatch: ours {ours.shape}, torch {ref.shape}")
  diff = ours - ref
  norm = float(np.linalg.norm(ref))
  peak = float(np.abs(ref).max()) if ref.size else 0.0
  return {"rel_l2": float(np.linalg.norm(diff)) / max(norm, 1e-300),
          "max_abs_over_max_ref": float(np.abs(diff).max()) / max(peak, 1e-300) if diff.size else 0.0}


def gate(torch, module, params, model, cfg, layer, B, T, M, D, dtype_name, device, seed, tol, label,
         jax_step=None, after_torch=None, condition=False):
  """Outputs and every gradient of both implementations on the same inputs (the verdict is the
  record's "passed"). Torch runs first and empties its cache, then `after_torch()` (which may
  shrink the torch model), then JAX: the two float32 tables' dense gradients never coexist.
  `jax_step` is `jax_gate_step(module)` compiled for these shapes (jitted here if None).
  `condition`: hidden states from `well_conditioned_hidden` instead of plain noise."""
  np_dtype = np.dtype(dtype_name)
  tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
  hidden, ids, ct, offsets = random_inputs(cfg, layer, B, T, M, D, seed, np_dtype)
  min_score = None
  if condition:
    hidden, min_score = well_conditioned_hidden(params, cfg, layer, hidden, ids, seed)
  uniq = np.unique((ids.astype(np.int64) + offsets).reshape(-1))
  n_uniq = uniq.size
  # Padded (with its first row) to a length fixed by the shapes, so a program compiled ahead fits.
  uniq = np.pad(uniq, (0, min(B * T * cfg.num_heads, int(table_layout(cfg, layer)[2])) - n_uniq),
                mode="edge").astype(np.int32)

  flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  try:
    h_t = torch.tensor(hidden, device=device, dtype=tdtype, requires_grad=True)
    out_t = model(h_t, torch.from_numpy(ids.astype(np.int64)).to(device))
    out_t.backward(torch.tensor(ct, device=device, dtype=tdtype))
    emb = model.multi_head_embedding.embedding.weight
    t_grads = {name: p.grad.detach().cpu().numpy() for name, p in model.named_parameters() if p is not emb}
    t_rows = emb.grad[torch.from_numpy(uniq[:n_uniq].astype(np.int64)).to(device)].cpu().numpy()
    t_out, t_gh = out_t.detach().cpu().numpy(), h_t.grad.cpu().numpy()
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    model.zero_grad(set_to_none=True)
    h_t = out_t = None
    if device.startswith("cuda"):
      torch.cuda.empty_cache()
  if after_torch is not None:
    after_torch()

  with jax.default_matmul_precision("highest"):
    step = jax_step if jax_step is not None else jax.jit(jax_gate_step(module, cfg, layer))
    out, gh, g_rest, g_rows = step(params, hidden, ids, ct, uniq)
  out, gh, g_rows = np.asarray(out), np.asarray(gh), np.asarray(g_rows)[:n_uniq]
  g_rest = jax.tree.map(np.asarray, g_rest)

  # Our dense-param grads under the official names (the table is compared at the rows read).
  ours_named = params_to_official(g_rest, np.zeros((1, cfg.head_dim), np_dtype), cfg, layer)
  errors = {"output": rel_errors(out, t_out), "grad_hidden": rel_errors(gh, t_gh),
            "grad_table_rows_read": rel_errors(g_rows, t_rows)}
  for name, g in t_grads.items():
    errors[f"grad_{name}"] = rel_errors(ours_named[name], g)
  worst = max(errors, key=lambda k: errors[k]["rel_l2"])
  return {"gate": label, "dtype": dtype_name, "batch": B, "seq": T, "rows_read": int(n_uniq),
          "hidden": "well-conditioned (min |gate score| %.3g)" % min_score if condition else "standard normal",
          "tol_rel_l2": tol, "worst": worst, "worst_rel_l2": errors[worst]["rel_l2"],
          "output_rel_l2": errors["output"]["rel_l2"], "output_max_abs_rel": errors["output"]["max_abs_over_max_ref"],
          "grad_hidden_rel_l2": errors["grad_hidden"]["rel_l2"],
          "grad_table_rows_rel_l2": errors["grad_table_rows_read"]["rel_l2"], "errors": errors,
          "passed": bool(errors[worst]["rel_l2"] <= tol)}


def fixture_check(torch, torch_engram, fixtures):
  """The torch transcription against the official demo's own outputs (float64 and float32)."""
  with open(os.path.join(fixtures, "meta.json")) as f:
    meta = json.load(f)
  data = dict(np.load(os.path.join(fixtures, "small.npz")))
  layer = meta["engram_module_layer_id"]
  sizes = [p for order in meta["head_vocab_sizes"][str(layer)] for p in order]
  sd = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
  with torch.device("meta"):
    model = torch_engram.TorchEngram(sizes, meta["n_embed_per_ngram"] // meta["n_head_per_ngram"],
                                     meta["hidden_size"], meta["hc_mult"], meta.get("kernel_size", 4),
                                     meta["max_ngram_size"])
  torch_engram.load_official(model, sd)
  ids = torch.from_numpy(data[f"hash_layer{layer}"])
  hidden = torch.from_numpy(data["hidden_states"])
  with torch.no_grad():
    out64 = model.double()(hidden.double(), ids).numpy()
    out32 = model.float()(hidden.float(), ids).numpy()
  e64 = rel_errors(out64, data["output"])
  e32 = rel_errors(out32, data["output_fp32"])
  return {"gate": "torch_transcription_vs_official_fixture", "fixture_shape": list(hidden.shape),
          "float64_vs_output": e64, "float32_vs_output_fp32": e32,
          "passed": bool(e64["max_abs_over_max_ref"] <= 1e-10 and e32["max_abs_over_max_ref"] <= 1e-5)}


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--d_model", type=int, default=2560)
  p.add_argument("--branches", type=int, default=4, help="M, hyper-connection branches")
  p.add_argument("--n_head_per_ngram", type=int, default=8)
  p.add_argument("--n_embed_per_ngram", type=int, default=640, help="width of one order (d_mem = orders x this)")
  p.add_argument("--rows_per_head", type=int, default=2262400)
  p.add_argument("--max_ngram_size", type=int, default=3)
  p.add_argument("--layer_ids", type=int, nargs="+", default=[2, 15], help="Engram layers (fix the primes)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tol", type=float, default=1e-4, help="float32 gate: max relative L2 error")
  p.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
  p.add_argument("--check_small", action="store_true", help="float32 gate on 1 x 256 tokens instead of the full batch")
  p.add_argument("--no_f64_check", action="store_true")
  p.add_argument("--fixtures", default=DEFAULT_FIXTURES, help="official demo parity fixtures ('' to skip)")
  p.add_argument("--torch_compile", choices=("auto", "on", "off"), default="auto",
                 help="time torch.compile too (auto: yes, except with --small: compiling takes minutes on a CPU)")
  p.add_argument("--torch_device", default=None, help="default: cuda if available, else cpu")
  p.add_argument("--estimate_only", action="store_true", help="print the memory plan and exit")
  p.add_argument("--out", default=None, help="write all results to this JSON file")
  args = p.parse_args(argv)
  if args.small:
    args.d_model, args.n_head_per_ngram, args.n_embed_per_ngram, args.rows_per_head = 64, 4, 64, 1000
    args.batch, args.seq = 2, 64
  return args


def main(argv=None):
  args = parse_args(argv)
  results = {"command": "python " + shlex.join(sys.argv if argv is None else ["bench/bench_engram_layer.py"] + argv)}
  cfg = make_config(args)
  layer = cfg.layer_ids[0]
  D, M, B, T = args.d_model, args.branches, args.batch, args.seq
  tokens = B * T
  module_bf16 = Engram(cfg, D, M, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  module_f32 = Engram(cfg, D, M, dtype=jnp.float32, param_dtype=jnp.float32)

  results["shapes"] = {"d_model": D, "branches": M, "heads": cfg.num_heads, "n_head_per_ngram": cfg.n_head_per_ngram,
                       "n_embed_per_ngram": cfg.n_embed_per_ngram, "head_dim": cfg.head_dim, "d_mem": cfg.d_mem,
                       "rows_per_head_target": args.rows_per_head, "layer_id": layer, "batch": B, "seq": T,
                       "tokens_per_step": tokens, "kernel_size": cfg.kernel_size, "dilation": cfg.max_ngram_size}
  results["versions"] = {"jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", None),
                         "python": platform.python_version(), "numpy": np.__version__}
  results["jax_backend"] = jax.default_backend()
  results["jax_device_kind"] = jax.devices()[0].device_kind
  results["host"] = {"machine": platform.machine(), "cpus": os.cpu_count()}
  print(json.dumps({"config": {k: results[k] for k in ("command", "shapes", "jax_backend", "jax_device_kind")}}),
        flush=True)

  full_gate = (B, T)
  small_gate = (1, min(256, T))
  compiled_gate_BT = small_gate if args.check_small else full_gate
  compiled, compile_s = compile_steps(cfg, layer, D, M, B, T, module_bf16, module_f32, compiled_gate_BT)
  est = memory_estimate(cfg, layer, D, M, B, T, compiled, compiled_gate_BT)
  results["memory_estimate"] = est
  emit({"memory_estimate": est})
  if args.estimate_only:
    return _finish(results, args)

  torch, torch_engram = _import_torch()
  device = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
  if device.startswith("cuda"):
    total_gb = torch.cuda.get_device_properties(0).total_memory / GB
    results["gpu_memory_GB"] = total_gb
    if not args.check_small and est["run_peak_GB_estimate"] > 0.9 * total_gb:
      args.check_small = True
      results["check_small_reason"] = (f"estimated peak {est['run_peak_GB_estimate']:.1f} GB with the float32 gate at "
                                        f"the full shape exceeds 90% of the GPU's {total_gb:.1f} GB")
      emit({"note": results["check_small_reason"]})
  results["versions"]["torch"] = torch.__version__
  results["torch_device"] = device
  results["torch_device_kind"] = (torch.cuda.get_device_name() if device.startswith("cuda")
                                  else platform.processor() or "cpu")
  sync_torch = (lambda _: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda _: None)

  # -- Correctness gates. ------------------------------------------------------------------------
  gates = results["gates"] = []
  if args.fixtures:
    if os.path.exists(os.path.join(args.fixtures, "small.npz")):
      rec = fixture_check(torch, torch_engram, args.fixtures)
    else:
      rec = {"gate": "torch_transcription_vs_official_fixture", "skipped": f"no fixtures at {args.fixtures}",
             "passed": True}
    gates.append(rec)
    emit(rec)
    _require(rec, results, args)

  if not args.no_f64_check:
    # Float64: the benchmark's widths, small tables, standard normal hidden states, 1 x min(256, seq) tokens.
    cfg64 = dataclasses.replace(cfg, vocab_size_per_ngram=(1009,) * cfg.num_orders)
    with jax.enable_x64(True):
      module64 = Engram(cfg64, D, M, dtype=jnp.float64, param_dtype=jnp.float64)
      params64 = init_params(module64, cfg64, layer, M, D, args.seed + 1)
      model64 = to_torch_model(torch, torch_engram, params64, cfg64, layer, D, M, device, torch.float64)
      rec = gate(torch, module64, params64, model64, cfg64, layer, *small_gate, M, D, "float64", device,
                 args.seed + 1, 1e-10, "float64_small_tables")
    del params64, model64
    gates.append(rec)
    emit(rec)
    _require(rec, results, args)

  t0 = time.perf_counter()
  params = init_params(module_f32, cfg, layer, M, D, args.seed)
  jax.block_until_ready(params)
  results["jax_init_s"] = time.perf_counter() - t0
  model = to_torch_model(torch, torch_engram, params, cfg, layer, D, M, device, torch.float32)
  gB, gT = small_gate if args.check_small else full_gate
  gate_step = compiled.pop("float32_gate")
  rec = gate(torch, module_f32, params, model, cfg, layer, gB, gT, M, D, "float32", device, args.seed,
             args.tol, "float32_bench_weights", jax_step=gate_step if (gB, gT) == compiled_gate_BT else None,
             after_torch=lambda: _to_bf16(torch, model, device), condition=True)
  del gate_step
  gates.append(rec)
  emit(rec)
  _require(rec, results, args)

  # -- Timing (bf16 compute). ----------------------------------------------------------------------
  hidden, ids, ct, offsets = random_inputs(cfg, layer, B, T, M, D, args.seed + 2, np.float32)
  measurements = results["measurements"] = {}

  def record(name, median, best, **extra):
    rec = {"measure": name, "median_s": median, "min_s": best, "tokens_per_s": tokens / median, **extra}
    measurements[name] = rec
    emit(rec)

  h_j = jnp.asarray(hidden, jnp.bfloat16)
  ct_j = jnp.asarray(ct, jnp.bfloat16)
  ids_j = jnp.asarray(ids)
  dense = compiled.pop("jax_dense")
  med, best = median_time(lambda: dense(params, h_j, ids_j, ct_j), jax.block_until_ready, args.warmup, args.repeats)
  record("jax_dense", med, best, compile_s=compile_s["jax_dense"], xla_memory=memory_analysis(dense),
         includes="VJP: grads of all params (float32, dense [rows, d] table grad) and of the hidden states; "
                  "bf16 compute")
  del dense

  rest, table = split_table(params)
  sparse = compiled.pop("jax_row_sparse")
  med, best = median_time(lambda: sparse(rest, table, h_j, ids_j, ct_j), jax.block_until_ready, args.warmup,
                          args.repeats)
  record("jax_row_sparse", med, best, compile_s=compile_s["jax_row_sparse"], xla_memory=memory_analysis(sparse),
         includes="gather + VJP: grads of the other params, of the gathered rows [B,T,H,d] (no [rows, d] gradient; "
                  "lazy Adam not included) and of the hidden states; bf16 compute")
  del sparse, rest, table
  results["jax_peak_bytes_in_use"] = jax_peak_bytes()
  del params

  assert next(model.parameters()).dtype == torch.bfloat16  # since the float32 gate's `after_torch`
  h_t = torch.tensor(hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
  ct_t = torch.tensor(ct, device=device, dtype=torch.bfloat16)
  ids_t = torch.from_numpy(ids.astype(np.int64)).to(device)

  def torch_step(fn):
    def call():
      model.zero_grad(set_to_none=True)
      h_t.grad = None
      fn(h_t, ids_t).backward(ct_t)
    return call

  def torch_peak():
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None

  if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
  med, best = median_time(torch_step(model), sync_torch, args.warmup, args.repeats)
  record("torch_eager", med, best, peak_bytes=torch_peak(),
         includes="model.to(bfloat16); forward + out.backward(cotangent): bf16 grads of all params (dense table grad) "
                  "and of the hidden states")

  if args.torch_compile == "on" or (args.torch_compile == "auto" and not args.small):
    try:
      compiled_model = torch.compile(model)
      if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
      t0 = time.perf_counter()
      torch_step(compiled_model)()
      sync_torch(None)
      compile_s = time.perf_counter() - t0
      med, best = median_time(torch_step(compiled_model), sync_torch, args.warmup, args.repeats)
      record("torch_compile", med, best, compile_s=compile_s, peak_bytes=torch_peak(),
             includes="torch.compile(model) (default mode), otherwise as torch_eager")
    except Exception as e:  # report, do not crash: the eager baseline stands on its own
      rec = {"measure": "torch_compile", "error": f"{type(e).__name__}: {str(e)[:2000]}"}
      measurements["torch_compile"] = rec
      emit(rec)

  ratios = {}
  for ours in ("jax_dense", "jax_row_sparse"):
    for theirs in ("torch_eager", "torch_compile"):
      if "median_s" in measurements.get(theirs, {}):
        ratios[f"{ours}_vs_{theirs}"] = measurements[theirs]["median_s"] / measurements[ours]["median_s"]
  results["ratios_ours_over_official_tokens_per_s"] = ratios
  emit({"summary": {k: round(v, 3) for k, v in ratios.items()},
        "tokens_per_s": {k: round(v["tokens_per_s"], 1) for k, v in measurements.items() if "tokens_per_s" in v},
        "target": ">= 2x vs the official module"})
  return _finish(results, args)


def _to_bf16(torch, model, device):
  """The official module as run under bf16: weights (and so gradients) in bf16, in place."""
  model.to(torch.bfloat16)
  if device.startswith("cuda"):
    torch.cuda.empty_cache()


def _require(rec, results, args):
  if not rec["passed"]:
    _finish(results, args)
    raise SystemExit(f"correctness gate failed: {json.dumps(rec)}")


def _finish(results, args):
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
