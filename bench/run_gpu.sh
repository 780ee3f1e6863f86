#!/usr/bin/env bash
# The GPU benchmarks, run from the repository root on a GPU machine; every result lands in $OUT.
#
#   bash bench/fetch_wheels.sh                       # once, where pip can reach an index: -> .wheels/
#   OUT=/some/dir bash bench/run_gpu.sh [PART ...]   # on the GPU machine, with .wheels/ beside it
#
# PARTs. The default is the ~10-minute set that fits one lease, most important figures first:
#   engram_layer_quick  (<= 200 s) the Engram layer vs the PyTorch module: float32 gate on 1 x 256
#                       tokens, 10 repeats, no torch.compile
#   model_quick         (<= 200 s) train-step tokens/s and MFU of `small` alone, 10 repeats
#   hashing             (<= 45 s)  jnp hashing on the GPU
#   generate            (<= 75 s)  bench/bench_generate.py (if present) on `small`
#   offload             (<= 75 s)  bench/bench_offload.py --gpu: decoding at batch 1 and 32 under every
#                       decode path (host tables vs device tables), then scoring per placement
# Longer parts, each its own call when more device time is lent:
#   model         bench/bench_model.py: MoE layer vs dense MLP, then small, small:no_engram and
#                 small:no_engram,dense: train-step and forward+backward tokens/s and MFU, Engram
#                 cost                                                                  (<= 540 s)
#   e2e           bench/bench_e2e.py: small trained for 150 steps through trainer.train (grain
#                 pipeline, embedded corpus) vs its pure step, same process             (<= 330 s)
#   hashing       bench/bench_hashing.py: numpy vs jnp-on-GPU hashing, 2 M tokens       (<= 80 s)
#   plan          bench/plan_memory.py: XLA's memory plan of the small train step (and its dense
#                 twin) compiled for this GPU, without and with full remat            (<= 170 s)
#   engram_layer  bench/bench_engram_layer.py (if present): one Engram layer vs PyTorch,
#                 correctness gates at full shape, eager and torch.compile            (<= 540 s)
#   host_training bench/bench_host_training.py --gpu: `small` trained 40 steps with its Engram tables
#                 and Adam moments in host RAM vs on the GPU, per-stage host times     (<= 240 s)
#   qwen4exp      bench/bench_qwen4exp.py --gpu --config large: Qwen4Exp (Qwen3.8-Flash-Next layout,
#                 ~0.6 B params + a 1.6 M-row PLE table, random weights written by transformers)
#                 in engram_jax vs transformers on the same GPU: prefill tokens/s and greedy decode
#                 at batch 1, 8 and 32; needs transformers with Qwen4Exp (5.23.0: `bash
#                 bench/fetch_wheels.sh transformers==5.23.0`), else engram_jax alone   (<= 420 s)
# A failed or timed-out part does not stop the next one, and the JSON files are rewritten after
# each measured piece, so a part cut short keeps what it finished. Files in $OUT (at most 8):
# run_gpu.txt (environment, exit codes, durations), bench_<part>.log (stdout + stderr),
# bench_model.json, bench_e2e.json, bench_engram_layer.json, bench_host_training.json, bench_qwen4exp.json.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench_gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(engram_layer_quick model_quick hashing generate offload)
STATUS="$OUT/run_gpu.txt"
# Extra arguments per part (word-split), e.g. a CPU smoke run:
#   BENCH_MODEL_ARGS="--preset configs/tiny.py --repeats 2 --set data.batch_size=4"
MODEL_ARGS=${BENCH_MODEL_ARGS:-}
HASHING_ARGS=${BENCH_HASHING_ARGS:---tokens 2097152 --repeats 3}
E2E_ARGS=${BENCH_E2E_ARGS:-}
ENGRAM_LAYER_ARGS=${BENCH_ENGRAM_LAYER_ARGS:-}
# The Qwen4Exp part's arguments, and the interpreter that runs the transformers side (torch and
# transformers>=5.23 with Qwen4Exp; by default the same python, which sees .wheels/ too). A CPU
# check of the part: BENCH_QWEN4EXP_ARGS="--hf_dir tests/fixtures/qwen4exp/causal_l3i1/hf --repeats 2"
QWEN4EXP_ARGS=${BENCH_QWEN4EXP_ARGS:---gpu --config large --repeats 5}
QWEN4EXP_REFERENCE=${QWEN4EXP_REFERENCE_PYTHON:-$PY}

export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The small preset without rematerialisation holds tens of GB of activations: bench_model and
# bench_e2e let XLA's pool have 90% of the GPU rather than the default 75% (not bench_engram_layer,
# which shares the GPU with PyTorch and sets its own allocator options).
MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
# One compilation cache per run: bench_e2e compiles the same train step as trainer.train, which
# then loads it instead of compiling it again (compile times reported by the first compile only).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/engram_jax_compilation_cache}

SITE=/tmp/engram_site
echo "# run_gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) parts: ${PARTS[*]}" >>"$STATUS"
if ls .wheels/*.whl >/dev/null 2>&1; then
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .wheels/*.whl >>"$STATUS" 2>&1; then
    echo "installed wheels: $(cd .wheels && ls *.whl | tr '\n' ' ')" >>"$STATUS"
    export PYTHONPATH="$SITE:$PYTHONPATH"
  else
    echo "wheel install FAILED: relying on the installed packages" >>"$STATUS"
  fi
else
  echo "no .wheels/: relying on the installed packages" >>"$STATUS"
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  $PY - <<'PYEOF' 2>&1
import importlib, sys
print("python", sys.version.split()[0])
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "tensorstore", "grain", "ml_collections",
             "tensorboardX", "tokenizers", "numpy", "etils", "google.protobuf", "torch"):
  try:
    mod = importlib.import_module(name)
    print(f"{name} {getattr(mod, '__version__', '?')}")
  except Exception as e:  # noqa: BLE001
    print(f"{name} MISSING: {type(e).__name__}: {e}")
try:
  import jax
  print("devices", jax.devices())
except Exception as e:  # noqa: BLE001
  print("jax devices FAILED:", e)
PYEOF
} >>"$STATUS"

run_part() {  # name, time limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name: $*" >>"$STATUS"
  timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local note=""
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && note=" (TIMED OUT at ${limit}s)"
  echo "== $name: exit $rc after $((SECONDS - start)) s$note" >>"$STATUS"
}

for part in "${PARTS[@]}"; do
  case "$part" in
    engram_layer_quick)
      run_part bench_engram_layer 200 $PY bench/bench_engram_layer.py --out "$OUT/bench_engram_layer.json" \
        --check_small --repeats 10 --torch_compile off $ENGRAM_LAYER_ARGS ;;
    model_quick)
      run_part bench_model 200 env XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION $PY bench/bench_model.py \
        --json "$OUT/bench_model.json" --variants base --repeats 10 --no_moe_layer $MODEL_ARGS ;;
    generate|offload)
      if [ -f "bench/bench_$part.py" ]; then
        run_part "bench_$part" 75 $PY "bench/bench_$part.py" --gpu --json "$OUT/bench_$part.json"
      else
        echo "== $part: bench/bench_$part.py not found, skipped" >>"$STATUS"
      fi ;;
    model)
      run_part bench_model 540 env XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION $PY bench/bench_model.py --json "$OUT/bench_model.json" $MODEL_ARGS ;;
    hashing)
      run_part bench_hashing 80 $PY bench/bench_hashing.py $HASHING_ARGS ;;
    plan)
      run_part plan_memory 170 bash -c "for v in configs/small.py configs/small.py:no_engram,dense; do \
        for r in none full; do $PY bench/plan_memory.py \$v --remat \$r; done; done" ;;
    e2e)
      run_part bench_e2e 330 env XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION $PY bench/bench_e2e.py --json "$OUT/bench_e2e.json" $E2E_ARGS ;;
    engram_layer)
      if [ -f bench/bench_engram_layer.py ]; then
        run_part bench_engram_layer 540 $PY bench/bench_engram_layer.py --out "$OUT/bench_engram_layer.json" \
          $ENGRAM_LAYER_ARGS
      else
        echo "== engram_layer: bench/bench_engram_layer.py not found, skipped" >>"$STATUS"
      fi ;;
    host_training)
      run_part bench_host_training 240 env XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION $PY \
        bench/bench_host_training.py --gpu --rounds 1 --steps 40 --json "$OUT/bench_host_training.json" ;;
    qwen4exp)
      # Without transformers' Qwen4Exp the part still times engram_jax (random weights, same config).
      if "$QWEN4EXP_REFERENCE" -c "import torch, transformers; transformers.Qwen4ExpForCausalLM" >/dev/null 2>&1; then
        REF_ARGS=(--reference_python "$QWEN4EXP_REFERENCE")
      else
        REF_ARGS=()
        echo "== qwen4exp: $QWEN4EXP_REFERENCE has no torch + transformers.Qwen4ExpForCausalLM: engram_jax alone" >>"$STATUS"
      fi
      # JAX shares the GPU with the torch subprocess: half of it each, not XLA's default 75%.
      run_part bench_qwen4exp 420 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 $PY bench/bench_qwen4exp.py \
        "${REF_ARGS[@]}" --json "$OUT/bench_qwen4exp.json" $QWEN4EXP_ARGS ;;
    *)
      echo "== unknown part $part (expected engram_layer_quick, model_quick, hashing, generate, offload, model, plan, e2e, engram_layer, host_training, qwen4exp)" >>"$STATUS" ;;
  esac
done
cat "$STATUS"
