#!/usr/bin/env bash
# The ONE script for a lent GPU (../shared/GPU.md): environment, CUDA extension build, GPU test tier,
# the benchmark grid, a profile of the reference defaults. Everything lands under $OUT (or
# ./bench/out/<date> when $OUT is unset). Each step has its own `timeout`; a failing step is logged
# and the script goes on. The whole run fits GPU_CHECK_BUDGET seconds (default 470, ~8 minutes).
#
#   bash bench/gpu_check.sh                      # on the device machine, from a copy of the repo
#   GPU_CHECK_BUDGET=300 bash bench/gpu_check.sh # a shorter run: the benchmark grid shrinks first
#
# No pip install here: the machine has python 3.12, torch, triton, pytest, numpy, matplotlib.
# Afterwards copy $OUT's <date>_<gpu>_<grid>.{md,jsonl,png} into bench/results/ and commit them.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/bench/out/$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
BUDGET="${GPU_CHECK_BUDGET:-470}"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
SECONDS=0

step() { echo; echo "=== [$SECONDS s] $*"; }
left() { echo $(( BUDGET - SECONDS )); }
# run NAME LIMIT_S CMD...: one step with a hard time limit; its output also goes to $OUT/NAME.log
run() {
  local name="$1" limit="$2"; shift 2
  if (( limit < 5 )); then echo "SKIPPED $name: no time left"; echo "$name skipped" >> "$OUT/steps.txt"; return 0; fi
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc (limit ${limit}s, at ${SECONDS}s)" | tee -a "$OUT/steps.txt"
  return 0
}

step "1. environment"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" || echo "nvidia-smi failed"
$PY - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1), "L2 MiB", getattr(p, "L2_cache_size", 0) >> 20)
EOF
(nvcc --version 2>&1 || echo "nvcc: not found") | tail -2 | tee -a "$OUT/versions.txt"
git -C "$REPO" rev-parse HEAD 2>/dev/null | tee -a "$OUT/versions.txt" || echo "no git metadata (a copy of the tree)"

# ---------------------------------------------------------------------------------------------
# 2. CUDA extension build. EDIT THIS STEP if the CUDA backend's build entry point changes.
#    intl_ops.backend_cuda.build() compiles csrc/ (cached in build/); later steps load that cache
#    with INTL_OPS_JIT=1, which is exported only when the build worked (else every process
#    would try to compile again).
# ---------------------------------------------------------------------------------------------
step "2. build the CUDA extension (csrc/)"
BUILD_LIMIT=$(( $(left) - 300 )); (( BUILD_LIMIT > 240 )) && BUILD_LIMIT=240
if [ -d "$REPO/csrc" ] && [ -f "$REPO/intl_ops/backend_cuda.py" ]; then
  run build_cuda "$BUILD_LIMIT" env INTL_OPS_JIT=1 $PY -c "import intl_ops.backend_cuda as b; print('built:', b.build(verbose=False))"
  if grep -q "^built:" "$OUT/build_cuda.log"; then export INTL_OPS_JIT=1; else echo "CUDA extension NOT built: the cuda provider will be skipped (see build_cuda.log)"; fi
else
  echo "no csrc/ or intl_ops/backend_cuda.py: nothing to build"
fi
$PY -c "import intl_ops; [print(f'  {k}: {v}') for k, v in intl_ops.available_backends('cuda').items()]" 2>&1 | tee "$OUT/backends.txt"

step "3. GPU test tier"
TEST_LIMIT=$(( $(left) - 200 )); (( TEST_LIMIT > 150 )) && TEST_LIMIT=150
run gpu_tests "$TEST_LIMIT" $PY -m pytest -m gpu -q -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" tests/

step "3b. compute-sanitizer on the CUDA backend's small-C path (memcheck, racecheck)"
if command -v compute-sanitizer >/dev/null && [ "${INTL_OPS_JIT:-0}" = 1 ] && (( $(left) > 300 )); then
  run sanitize_memcheck 45 compute-sanitizer --tool memcheck --error-exitcode 1 $PY csrc/sanitize_run.py
  run sanitize_racecheck 45 compute-sanitizer --tool racecheck --error-exitcode 1 $PY csrc/sanitize_run.py
else
  echo "skipped: compute-sanitizer absent, the CUDA extension not built, or no time left"
fi

step "4. benchmark grid (most important rows first; the time budget cuts from the end)"
# Pass A: every provider but `compiled` over the full grid. Pass B: `compiled` (one inductor
# compile per shape, tens of seconds each) with eager and reference on the headline cases only.
GRID_BUDGET=$(( $(left) - 210 ))  # leaves the compiled pass, the train step and the profile
run bench_full $(( GRID_BUDGET + 40 )) $PY -m bench --grid full --providers eager,eager-amp,reference,triton,cuda,iternorm,zca,cholesky \
    --results-dir "$OUT" --time-budget "$GRID_BUDGET" --rep-ms 60 --warmup-ms 15
run bench_compiled $(( $(left) - 30 )) $PY -m bench --grid headline --providers eager,compiled,reference --modes full \
    --results-dir "$OUT" --time-budget $(( $(left) - 75 )) --rep-ms 60 --warmup-ms 15

step "4b. training step: ResNet-50 images/s per loss implementation, and the loss head's share"
run train_step 100 $PY train/bench_step.py --losses triton cuda literal --out "$OUT/train_step_resnet50.json"

step "5. profile: launches and device time per provider at the reference default"
run profile $(( $(left) - 8 )) $PY -m bench --grid headline --ops intl_loss,iternorm --dtypes bf16 --modes full \
    --providers eager,reference,triton,cuda --profile --trace-dir "$OUT/traces"

step "6. one table and one plot of everything measured"
$PY -m bench --table "$OUT/rows.jsonl" > "$OUT/all_rows.md" 2>&1 || echo "table rendering failed"
echo "files in $OUT:"; ls -la "$OUT"
echo "done in $SECONDS s (budget $BUDGET s)"
