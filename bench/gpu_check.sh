#!/usr/bin/env bash
# The ONE script for a lent GPU (bench/README.md "On a lent GPU"): versions, the CUDA
# extension build, the GPU tests (tests/test_triton.py, tests/test_cuda.py: every test, on CUDA), the
# headline benchmark rows, Newton-Schulz CUDA vs Triton, the ResNet-50 training step, a profile, and
# compute-sanitizer memcheck if time is left. Steps run in that order (most important first), each
# under its own limit; a failing step is logged and the script goes on.
#
#   OUT=/some/dir bash bench/gpu_check.sh             # on the device machine (python3, a GPU); run
#                                                     # `make device-wheels` here first and carry bench/device_wheels
#   GPU_CHECK_BUDGET=300 bash bench/gpu_check.sh      # a shorter run (default 420 s)
#   PYTHON=.venv/bin/python bash bench/gpu_check.sh --dry-run   # the same steps on CPU (make gpu-dry-run)
#
# Results: exactly two files in $OUT, rewritten after every step (a killed run keeps what it had):
#   $OUT/gpu_check.tar.gz   gpu_check/{summary.md, gpu_check.log, logs/*.log, junit/*.xml, results/...}
#   $OUT/summary.md         every step with rc, time, limit and its key lines
# The working files live in a temporary folder outside $OUT; every name is [A-Za-z0-9._-].
# Env: PYTHON (default python3; one command, no arguments), OUT (default bench/out/<date>),
# GPU_CHECK_BUDGET (seconds, default 420; 180 for --dry-run), GPU_CHECK_ONLY (comma list of steps, e.g.
# for a rerun: 05_ns_compare,07_profile; 00_env and 01_build always run), GPU_CHECK_KEEP_WORK=1 (keep
# the work folder), INTL_OPS_CUDA_BUILD_DIR (the extension's JIT cache, default build/).
# Exit: 0 when the script ran to its end (step failures are in the summary), 2 when torch cannot be
# imported, 3 when no GPU is visible (not in --dry-run), 130 when interrupted.
set -u

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -u$/{/^#/p}' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$arg' (the only option is --dry-run)" >&2; exit 64 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
if (( DRY )); then BUDGET="${GPU_CHECK_BUDGET:-180}"; else BUDGET="${GPU_CHECK_BUDGET:-420}"; fi
OUT="${OUT:-$REPO/bench/out/$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || { echo "gpu_check: cannot create OUT=$OUT" >&2; exit 2; }
TOP="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
case "$TOP/" in "$OUT"/*) rmdir "$TOP"; TOP="$(mktemp -d /tmp/gpu_check.XXXXXX)" ;; esac  # never under $OUT
WORK="$TOP/gpu_check"
mkdir -p "$WORK/logs" "$WORK/junit" "$WORK/results"
ARCHIVE="$OUT/gpu_check.tar.gz"
SUMMARY="$OUT/summary.md"
MAINLOG="$WORK/gpu_check.log"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset INTL_OPS_JIT  # set to 1 below only once the extension has built (else every process would compile)
if (( DRY )); then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi
MODE_NAME=$([ "$DRY" = 1 ] && echo "DRY RUN (CPU twins of the GPU steps)" || echo "GPU")
STARTED="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
STATUS="starting"
SECONDS=0

say() { echo "$*" | tee -a "$MAINLOG"; }

# ------------------------------------------------------------------ the plan and its budget
# name:nominal limit in seconds, in order of importance. A step's actual limit is what is left of the
# budget minus the nominal limits of the steps after it, so time saved early flows to later steps and
# a step that overruns never eats what the next ones were promised. sanitize gets what is left.
if (( DRY )); then
  PLAN=(00_env:15 01_build:30 02_test_triton:35 03_test_cuda:25 04_bench_headline:25 05_ns_compare:15
        06_train_step:15 07_profile:10 08_sanitize:0)
  MIN_STEP=5 RESERVE=5
else
  PLAN=(00_env:15 01_build:150 02_test_triton:70 03_test_cuda:45 04_bench_headline:50 05_ns_compare:25
        06_train_step:35 07_profile:20 08_sanitize:0)
  MIN_STEP=10 RESERVE=10
fi
# GPU_CHECK_ONLY="05_ns_compare,07_profile" (e.g. a rerun): only those steps (00_env and 01_build always
# run: later steps need the extension); the others are SKIPPED and their time goes to the selected.
ONLY="${GPU_CHECK_ONLY:-}"
selected() { [ -z "$ONLY" ] || [ "$1" = 00_env ] || [ "$1" = 01_build ] || [[ ",$ONLY," == *",$1,"* ]]; }
declare -A NOMINAL DESC
for i in "${!PLAN[@]}"; do p=${PLAN[$i]}; selected "${p%%:*}" || PLAN[$i]="${p%%:*}:0"; done
for p in "${PLAN[@]}"; do NOMINAL[${p%%:*}]=${p##*:}; done
PLAN_SUM=0; for p in "${PLAN[@]}"; do PLAN_SUM=$(( PLAN_SUM + ${p##*:} )); done
# RESERVE: the seconds between steps (archiving) and after a limit (a step's exit after its SIGINT)
if (( PLAN_SUM + RESERVE > BUDGET )); then  # a shorter budget: every limit but 00_env's shrinks in proportion
  env_s=${NOMINAL[00_env]}
  for p in "${PLAN[@]}"; do
    [ "${p%%:*}" = 00_env ] || NOMINAL[${p%%:*}]=$(( ${p##*:} * (BUDGET - RESERVE - env_s) / (PLAN_SUM - env_s) ))
  done
fi
if (( DRY )); then
  DESC=([00_env]="versions, python, torch, triton, nvcc (no GPU)"
        [01_build]="CUDA extension: nvcc compile or load the cache (build/)"
        [02_test_triton]="tests/test_triton.py, test_ns_kernels.py, test_loss_head.py: one case per test, TRITON_INTERPRET=1"
        [03_test_cuda]="tests/test_cuda.py, one case per test (CPU tier)"
        [04_bench_headline]="python -m bench --grid tiny (CPU), then the model (python -m bench --model)"
        [05_ns_compare]="Newton-Schulz C=32 under the interpreter (cuda: n/a)"
        [06_train_step]="train/bench_step.py, tiny CNN on CPU"
        [07_profile]="python -m bench --grid tiny --profile (CPU)"
        [08_sanitize]="compute-sanitizer memcheck (GPU only)")
else
  DESC=([00_env]="nvidia-smi, versions, GPU properties"
        [01_build]="CUDA extension: intl_ops.backend_cuda.build()"
        [02_test_triton]="tests/test_triton.py, test_ns_kernels.py, test_loss_head.py: every test, on CUDA"
        [03_test_cuda]="tests/test_cuda.py, every test, on CUDA"
        [04_bench_headline]="python -m bench --grid headline (eager and every registered backend), then the model next to its full rows (--model --compare)"
        [05_ns_compare]="Newton-Schulz C=64/128/256: CUDA vs Triton vs torch, fwd+bwd"
        [06_train_step]="train/bench_step.py: ResNet-50 step, losses triton/cuda/literal"
        [07_profile]="python -m bench --grid headline --profile, bf16, Chrome traces"
        [08_sanitize]="compute-sanitizer memcheck on tools/sanitize_run.py")
fi

# ------------------------------------------------------------------ bookkeeping, summary, archive
ORDER=()                                   # steps reported so far, in order
declare -A RC SECS LIMIT RESULT            # per step
ARCHIVE_NOTE=""

plan_table() {
  echo "| step | nominal limit s |"
  echo "|---|---|"
  local p; for p in "${PLAN[@]}"; do
    local n=${p%%:*}
    echo "| $n | $([ "$n" = 08_sanitize ] && echo "what is left (needs >= 40)" || echo "${NOMINAL[$n]}") |"
  done
  local s=0; for p in "${PLAN[@]}"; do s=$(( s + ${NOMINAL[${p%%:*}]} )); done
  echo "| reserve (archiving, exits after SIGINT) | $RESERVE |"
  echo "| sum | $(( s + RESERVE )) <= budget $BUDGET |"
}

later_sum() {  # nominal seconds of the steps after $1
  local after=0 s=0 p
  for p in "${PLAN[@]}"; do
    if (( after )); then s=$(( s + ${NOMINAL[${p%%:*}]} )); fi
    [ "${p%%:*}" = "$1" ] && after=1
  done
  echo "$s"
}

limit_for() {  # the limit step $1 gets now: what is left minus what later steps were promised
  echo $(( BUDGET - RESERVE - SECONDS - $(later_sum "$1") ))
}

sanitize_names() {  # rename anything in $WORK whose name is not [A-Za-z0-9._-] (e.g. bench traces "K=2")
  local path dir base new
  while IFS= read -r -d '' path; do
    dir="${path%/*}"; base="${path##*/}"; new="${base//[^A-Za-z0-9._-]/_}"
    while [ -e "$dir/$new" ]; do new="_$new"; done
    mv -- "$path" "$dir/$new"
  done < <(find "$WORK" -depth -mindepth 1 -name '*[!A-Za-z0-9._-]*' -print0)
}

key_lines() {  # the lines of step $1's log worth reading without the archive
  local name="$1" log="$WORK/logs/$1.log"
  [ -f "$log" ] || return 0
  case "$name" in
    00_env) grep -E '^(gpu|gpu-mem|python|torch|torchvision|triton|nvcc|git|backend|registered|build_dir|cpu)' "$log" ;;
    01_build)
      grep -E '^built:' "$log" || grep -v '^removed build lock' "$log" | tail -n 6
      local k bad
      k=$(grep -c 'bytes spill stores' "$log"); bad=$(grep 'bytes spill stores' "$log" | grep -vc '0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads')
      (( k > 0 )) && echo "ptxas: $k kernel reports, $bad with a stack frame or spills"
      grep -E '^removed build lock' "$log" ;;
    02_test_*|03_test_*)
      grep -E '^removed build lock' "$log"
      grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$log" | grep -E ' in [0-9.]+s' | tail -n 1
      grep -E '^(FAILED|ERROR) ' "$log" | head -n 25
      local n; n=$(grep -c 'test time budget' "$WORK/junit/$name.xml" 2>/dev/null)
      [ -f "$WORK/junit/$name.xml" ] && echo "junit: junit/$name.xml$([ "${n:-0}" != 0 ] && echo " (tests after the time budget were skipped)")" \
        || echo "junit: none written" ;;
    04_bench_headline)
      if grep -qE '^\| case' "$log"; then  # the measured table (up to the model's output), then the model's
        sed '/^# bench model/,$d' "$log" | grep -E '^\| (case|---)' | head -n 2
        sed '/^# bench model/,$d' "$log" | grep -E '^\| .* \| full \| '
        sed '/^# bench model/,$d' "$log" | grep -E '^- '
        sed -n '/^## model vs measured/,$p' "$log" | grep -E '^(##|\|)'
      else  # stopped before its table: the rows measured so far, from the progress lines
        grep -E '^  .* (ms|error.*)$' "$log"
        echo "(no table: stopped early; the rows measured are in results/bench_headline/*.jsonl)"
      fi ;;
    05_ns_compare) sed -n '/^Newton-Schulz, CUDA vs Triton/,$p' "$log" | grep -E '^(\||Newton)' ;;
    06_train_step) grep -E '^\{' "$log" | tail -n 1 | "$PY" "$TOP/fmt_train.py" 2>&1 ;;
    07_profile)  # trace paths as they are in the archive (work folder stripped, names sanitised)
      grep -E '^\|' "$log" | sed -E "s#$WORK/##g; :a; s#(results/traces/[^ |=]*)=#\1_#; ta" ;;
    08_sanitize) grep -E 'ERROR SUMMARY|sanitize_run' "$log" ;;
  esac
}

cat > "$TOP/fmt_train.py" <<'EOF'
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(f"{r['arch']}, batch {r['batch_size']} x {r['crops']} crops of {r['image_size']} px, "
          f"one of {r['world']} ranks ({r['per_rank_batch']} images each), loss on {r['embedding']}, {r['device']}, "
          f"autocast {r['amps']}")
    for k, v in r["results"].items():
        print(f"  {k}: " + (v["error"] if "error" in v else
              f"{v['images_per_s']:.1f} images/s, step {v['step_ms']:.1f} ms, loss head {v['loss_head_ms']:.2f} ms "
              f"({100 * v['loss_head_share']:.1f}% of the step)"))
EOF

write_summary() {
  local tmp="$OUT/.summary.md.part" n keys
  {
    echo "# gpu_check summary"
    echo
    echo "- mode: $MODE_NAME"
    echo "- status: $STATUS"
    echo "- started $STARTED on $(hostname 2>/dev/null || echo '?'), python: $PY, elapsed ${SECONDS} s of a ${BUDGET} s budget"
    echo "- archive: gpu_check.tar.gz (folder gpu_check/: this summary, gpu_check.log, logs/<step>.log, junit/<step>.xml, results/)"
    [ -n "$ARCHIVE_NOTE" ] && echo "- $ARCHIVE_NOTE"
    echo
    echo "| step | what | rc | result | time s | limit s |"
    echo "|---|---|---|---|---|---|"
    for n in "${ORDER[@]}"; do
      echo "| $n | ${DESC[$n]} | ${RC[$n]} | ${RESULT[$n]} | ${SECS[$n]} | ${LIMIT[$n]} |"
    done
    echo
    echo "## Budget"
    plan_table
    for n in "${ORDER[@]}"; do
      keys="$(key_lines "$n")"
      if [ -z "$keys" ] && [ "${RESULT[$n]}" != ok ] && [[ "${RESULT[$n]}" != SKIPPED* ]]; then
        keys="$(tail -n 8 "$WORK/logs/$n.log" 2>/dev/null)"  # no key lines: the end of its log
      fi
      [ -n "$keys" ] || continue
      echo
      echo "## $n: ${RESULT[$n]}"
      echo '```'
      echo "$keys"
      echo '```'
    done
  } > "$tmp" 2>&1
  cp "$tmp" "$WORK/summary.md"
  mv -f "$tmp" "$SUMMARY"
}

archive() {  # one archive of everything so far, replaced atomically; traces go first if it is too big
  local tmp="$OUT/.gpu_check.tar.gz.part" size
  sanitize_names
  tar -czf "$tmp" -C "$TOP" gpu_check 2>/dev/null
  size=$(stat -c %s "$tmp" 2>/dev/null || echo 0)
  if (( size > 15 * 1024 * 1024 )); then
    tar -czf "$tmp" -C "$TOP" --exclude='gpu_check/results/traces' gpu_check 2>/dev/null
    ARCHIVE_NOTE="the Chrome traces were left out of the archive ($(( size >> 20 )) MiB > 15 MiB, the device tool's limit is 16)"
  fi
  mv -f "$tmp" "$ARCHIVE"
}

checkpoint() { write_summary; archive; }

finish() {
  local code="$1"
  STATUS="$2"
  say ""
  say "=== [${SECONDS} s] $STATUS"
  checkpoint
  checkpoint  # a second time so the archive's summary.md holds the final status too
  [ "${GPU_CHECK_KEEP_WORK:-0}" = 1 ] && echo "work folder kept: $WORK"
  echo; cat "$SUMMARY"
  echo; echo "results: $ARCHIVE and $SUMMARY"
  exit "$code"
}

record() {  # record NAME RC SECS LIMIT RESULT, then rewrite the summary and the archive
  ORDER+=("$1"); RC[$1]="$2"; SECS[$1]="$3"; LIMIT[$1]="$4"; RESULT[$1]="$5"
  checkpoint
}

skip_step() {  # skip_step NAME REASON
  say ""
  say "=== [${SECONDS} s] $1 SKIPPED: $2"
  record "$1" "-" 0 "${NOMINAL[$1]}" "SKIPPED: $2"
}

# A build killed mid-way (the build step, or test_cuda's fixture building again after a failed build
# step) leaves <build dir>/<tag>/lock behind, and torch 2.11's FileBaton then makes every later build()
# wait forever (torch 2.14 uses an OS lock: the file is harmless there). After every step, on the device
# machine (one user, steps one after another: no build is running) every lock is removed; in the dry run
# (a shared machine), after a step that failed, a lock created during it or older than 10 minutes (no
# build takes that long; a younger one may be another user's build in progress). The JIT cache is build_dir() of
# intl_ops/cuda_build.py: $INTL_OPS_CUDA_BUILD_DIR, else build/ of the checkout (if writable), else the user cache.
BUILD_BASE="${INTL_OPS_CUDA_BUILD_DIR:-$REPO/build}"
[ -w "$REPO" ] || BUILD_BASE="${INTL_OPS_CUDA_BUILD_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/intl_ops}"
clear_locks() {  # clear_locks all|new LOG: remove BUILD_BASE/*/lock (new: made during the step, or old)
  local f
  for f in "$BUILD_BASE"/*/lock; do
    [ -e "$f" ] || continue
    if [ "$1" = all ] || [ "$f" -nt "$TOP/step_start" ] || [ -n "$(find "$f" -mmin +10 2>/dev/null)" ]; then
      rm -f "$f" && echo "removed build lock $f" | tee -a "$MAINLOG" "$2" > /dev/null
    fi
  done
}

# run_step NAME LIMIT CMD...: CMD under `timeout` (SIGINT first, so pytest prints its failures and writes
# its junit XML; SIGKILL 15 s later), its output in logs/NAME.log, then rc / time into the summary.
STEP_PID=""
INTERRUPTED=""
on_signal() { INTERRUPTED="$1"; [ -n "$STEP_PID" ] && kill -INT "$STEP_PID" 2>/dev/null; }
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP
cleanup() {
  rm -f "$OUT/.summary.md.part" "$OUT/.gpu_check.tar.gz.part"
  [ "${GPU_CHECK_KEEP_WORK:-0}" = 1 ] || rm -rf "$TOP"
}
trap cleanup EXIT

run_step() {
  local name="$1" limit="$2"; shift 2
  local log="$WORK/logs/$name.log" t0=$SECONDS rc result
  if ! selected "$name"; then
    skip_step "$name" "not selected (GPU_CHECK_ONLY=$ONLY)"
    return 0
  fi
  if (( limit < MIN_STEP )); then
    skip_step "$name" "no time left (${limit} s for it, less than ${MIN_STEP} s; $(( BUDGET - SECONDS )) s of the budget left)"
    return 0
  fi
  say ""
  say "=== [${SECONDS} s] $name (limit ${limit} s): $*"
  echo "\$ $*" > "$log"
  touch "$TOP/step_start"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$log" 2>&1 < /dev/null &
  STEP_PID=$!
  wait "$STEP_PID"; rc=$?
  while [ -n "$INTERRUPTED" ] && kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID"; rc=$?; done
  STEP_PID=""
  if (( DRY )); then (( rc == 0 )) || clear_locks new "$log"; else clear_locks all "$log"; fi
  case "$rc" in
    0) result="ok" ;;
    124) result="TIMEOUT: stopped at its ${limit} s limit (SIGINT)" ;;
    137) result="KILLED: still running 15 s after SIGINT at ${limit} s" ;;
    *) result="FAILED (rc $rc)" ;;
  esac
  [ -n "$INTERRUPTED" ] && result="INTERRUPTED by SIG$INTERRUPTED"
  tail -n 12 "$log" | sed 's/^/    /'
  say "--- $name: $result in $(( SECONDS - t0 )) s"
  record "$name" "$rc" "$(( SECONDS - t0 ))" "$limit" "$result"
  [ -n "$INTERRUPTED" ] && finish 130 "interrupted by SIG$INTERRUPTED during $name"
  return 0
}

# ------------------------------------------------------------------ 0. can this run at all? (seconds)
say "gpu_check: mode $MODE_NAME, python '$PY', budget ${BUDGET} s, OUT=$OUT, work folder $WORK"
PROBE="$(timeout 60 "$PY" -c '
import sys
try:
    import torch
except BaseException as e:
    print(f"{type(e).__name__}: {e}"); sys.exit(2)
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {n} GPU(s) visible")
sys.exit(0 if n else 3)
' 2>&1)"
PROBE_RC=$?
[ -z "$PROBE" ] && PROBE="no output (rc $PROBE_RC)"
say "probe: $(echo "$PROBE" | tail -n 1)"
if (( PROBE_RC != 0 && PROBE_RC != 3 )); then
  say "ABORT: '$PY' cannot import torch: $(echo "$PROBE" | tail -n 1). Set PYTHON to an interpreter with torch."
  finish 2 "ABORTED in ${SECONDS} s: '$PY' cannot import torch"
fi
if (( PROBE_RC == 3 && ! DRY )); then
  say "ABORT: no GPU visible to torch (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}). On a CPU machine use --dry-run."
  finish 3 "ABORTED in ${SECONDS} s: no GPU visible to torch"
fi

# torchvision (the training step's ResNet-50) is not on the device machine, and nothing installs there:
# `make device-wheels` downloads its wheel (and pillow's, which it imports) into bench/device_wheels/
# (git-ignored), the device call carries that folder (carry=["bench/device_wheels"]), and what is missing is
# unpacked onto PYTHONPATH here (a wheel is a zip).
PYTAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")' 2>/dev/null)"
unpack_if_missing() {  # unpack_if_missing MODULE WHEEL_NAME
  "$PY" -c "import $1" > /dev/null 2>&1 && return 0
  local whl; whl="$(ls "$REPO"/bench/device_wheels/"$2"-*-"$PYTAG"-*.whl 2>/dev/null | head -n 1)"
  [ -n "$whl" ] && "$PY" -m zipfile -e "$whl" "$TOP/pylib" && say "unpacked ${whl##*/} onto PYTHONPATH (no $1 installed)"
}
if ! "$PY" -c "import torchvision" > /dev/null 2>&1; then
  export PYTHONPATH="$PYTHONPATH:$TOP/pylib"
  unpack_if_missing PIL pillow
  unpack_if_missing torchvision torchvision
  "$PY" -c "import torchvision" > /dev/null 2>&1 || say "torchvision: not importable, and bench/device_wheels has no usable $PYTAG wheel (make device-wheels, then carry bench/device_wheels): the ResNet-50 step will fail"
fi

say ""
say "budget: each step's nominal limit (unused time flows to the later steps), in order of importance:"
plan_table | tee -a "$MAINLOG"
write_summary

# ------------------------------------------------------------------ 1. environment
cat > "$TOP/env.py" <<'EOF'
import os, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
print("cpu", os.cpu_count(), "cores,", platform.processor() or platform.machine())
try:
    import torchvision; print("torchvision", torchvision.__version__)
except Exception as e:
    print("torchvision: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count)
    print("gpu-mem", round(p.total_memory / 2**30, 1), "GiB, L2", getattr(p, "L2_cache_size", 0) >> 20, "MiB")
else:
    print("gpu none")
import intl_ops
from intl_ops import backend_cuda
print("build_dir", backend_cuda.build_dir())
dev = "cuda" if torch.cuda.is_available() else "cpu"
for k, v in intl_ops.available_backends(dev).items():
    print(f"backend {k} on {dev}: {v}")
print("registered", ",".join(intl_ops.backends.registered()))  # read back by the bench steps
EOF
cat > "$TOP/env.sh" <<'EOF'
(nvidia-smi 2>&1 || echo "nvidia-smi: not available")
"$1" "$2"; rc=$?
echo "nvcc $( (nvcc --version 2>/dev/null || /usr/local/cuda/bin/nvcc --version 2>/dev/null || echo 'not found') | tail -n 1)"
echo "git $(git rev-parse HEAD 2>/dev/null || echo 'no git metadata (a copy of the tree)')$(git status --porcelain 2>/dev/null | grep -q . && echo ' (dirty)')"
exit $rc
EOF
run_step 00_env "$(limit_for 00_env)" bash "$TOP/env.sh" "$PY" "$TOP/env.py"

# ------------------------------------------------------------------ 2. CUDA extension build
# EDIT THIS STEP if the CUDA backend's build entry point changes. intl_ops.backend_cuda.build() compiles
# csrc/ into build_dir() (cached); later steps load that cache with INTL_OPS_JIT=1, exported only when
# the build worked. Stale build locks: see clear_locks above.
if [ -d csrc ] && [ -f intl_ops/backend_cuda.py ]; then
  (( DRY )) || clear_locks all "$MAINLOG"  # e.g. from an earlier run killed on this (warm) machine
  run_step 01_build "$(limit_for 01_build)" "$PY" -c \
    "import intl_ops.backend_cuda as b; r = b.toolkit_reason(); print('no toolkit:', r) if r else print('built:', b.build(verbose=True))"
  if grep -q '^built:' "$WORK/logs/01_build.log" 2>/dev/null; then
    export INTL_OPS_JIT=1
    say "CUDA extension built: later steps load it (INTL_OPS_JIT=1)"
  else
    say "CUDA extension NOT built: the cuda provider / loss / tests report it unavailable (see logs/01_build.log)"
  fi
  checkpoint
else
  skip_step 01_build "no csrc/ or intl_ops/backend_cuda.py"
fi

# ------------------------------------------------------------------ 3. GPU tests, one step per backend
# Every test of the files on CUDA (the dry run: the first case of each test under the interpreter).
# bench/pytest_gpu_check.py skips the tests that would start after the step's limit minus a margin,
# so pytest ends by itself with its junit XML; the SIGINT of the limit is the fallback.
PYTEST_ENV=()
(( DRY )) && PYTEST_ENV=(GPU_CHECK_ONE_PER_TEST=1)
for t in 02_test_triton:tests/test_triton.py,tests/test_ns_kernels.py,tests/test_loss_head.py \
         03_test_cuda:tests/test_cuda.py; do
  name=${t%%:*}; files=${t#*:}
  lim=$(limit_for "$name")
  tb=$(( lim - 15 ))  # pytest's own budget: the limit minus a margin for its start and the last test
  (( DRY && tb > NOMINAL[$name] - 15 )) && tb=$(( NOMINAL[$name] - 15 ))  # the dry run stays short
  (( tb < 1 )) && tb=1
  run_step "$name" "$lim" env "${PYTEST_ENV[@]}" GPU_CHECK_TEST_BUDGET=$tb \
    "$PY" -m pytest -q -rfE -p no:cacheprovider -p bench.pytest_gpu_check --junitxml="$WORK/junit/$name.xml" ${files//,/ }
done

# ------------------------------------------------------------------ 4. headline benchmark rows
# Providers: eager and every backend of the registry (intl_ops.backends.registered()), so a backend
# registered there is benchmarked here too. Rows stop starting at --time-budget (most important first),
# so the table and plot get written.
BACKENDS="$(sed -n 's/^registered //p' "$WORK/logs/00_env.log" 2>/dev/null | tail -n 1)"
[ -n "$BACKENDS" ] || BACKENDS="$("$PY" -c 'from intl_ops.backends import registered; print(",".join(registered()))' 2>/dev/null)"
BENCH_PROVIDERS="eager${BACKENDS:+,$BACKENDS}"
say "bench providers: $BENCH_PROVIDERS (eager and intl_ops.backends.registered())"
lim=$(limit_for 04_bench_headline)
# Then the performance model (bench/model.py, CPU only, ~10 s) next to the measured full rows: the first
# check of its predictions (bench/bench_then_model.sh). The dry run's CPU rows: the model alone.
if (( DRY )); then
  run_step 04_bench_headline "$lim" bash bench/bench_then_model.sh "$PY" "$WORK/results/bench_headline" alone \
    --grid tiny --providers "$BENCH_PROVIDERS" --time-budget $(( lim - 20 ))
else
  run_step 04_bench_headline "$lim" bash bench/bench_then_model.sh "$PY" "$WORK/results/bench_headline" compare \
    --grid headline --providers "$BENCH_PROVIDERS" --time-budget $(( lim - 35 )) --rep-ms 50 --warmup-ms 10
fi

# ------------------------------------------------------------------ 5. Newton-Schulz, CUDA vs Triton
lim=$(limit_for 05_ns_compare)
if (( DRY )); then
  run_step 05_ns_compare "$lim" "$PY" bench/ns_compare.py --sizes 32 --reps 1 --out "$WORK/results/ns_compare"
else
  run_step 05_ns_compare "$lim" "$PY" bench/ns_compare.py --sizes 64,128,256 --rep-ms 50 --out "$WORK/results/ns_compare"
fi

# ------------------------------------------------------------------ 6. ResNet-50 training step
lim=$(limit_for 06_train_step)
if (( DRY )); then
  run_step 06_train_step "$lim" "$PY" train/bench_step.py --device cpu --arch cnn --image-size 16 --batch-size 32 \
    --projector 64-64 --steps 2 --warmup 1 --losses triton cuda literal --out "$WORK/results/train_step_cpu.json"
else
  run_step 06_train_step "$lim" "$PY" train/bench_step.py --losses triton cuda literal --steps 10 --warmup 3 \
    --out "$WORK/results/train_step_resnet50.json"
fi

# ------------------------------------------------------------------ 7. profile
lim=$(limit_for 07_profile)
if (( DRY )); then
  run_step 07_profile "$lim" "$PY" -m bench --grid tiny --ops intl_loss,iternorm --modes full \
    --providers "$BENCH_PROVIDERS" --profile --trace-dir "$WORK/results/traces"
else
  run_step 07_profile "$lim" "$PY" -m bench --grid headline --ops intl_loss,iternorm --dtypes bf16 --modes full \
    --providers "$BENCH_PROVIDERS" --profile --trace-dir "$WORK/results/traces"
fi

# ------------------------------------------------------------------ 8. compute-sanitizer (lowest priority)
lim=$(( BUDGET - RESERVE - SECONDS ))
if ! selected 08_sanitize; then
  skip_step 08_sanitize "not selected (GPU_CHECK_ONLY=$ONLY)"
elif (( DRY )); then
  skip_step 08_sanitize "dry run: compute-sanitizer needs a GPU"
elif ! command -v compute-sanitizer > /dev/null; then
  skip_step 08_sanitize "compute-sanitizer not found"
elif [ "${INTL_OPS_JIT:-0}" != 1 ]; then
  skip_step 08_sanitize "the CUDA extension did not build"
elif (( lim < 40 )); then
  skip_step 08_sanitize "no time left (${lim} s, needs >= 40)"
else
  run_step 08_sanitize "$lim" compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" tools/sanitize_run.py
fi

fails=0
for n in "${ORDER[@]}"; do [ "${RESULT[$n]}" = ok ] || [[ "${RESULT[$n]}" == SKIPPED* ]] || fails=$(( fails + 1 )); done
finish 0 "finished in ${SECONDS} s: ${#ORDER[@]} steps, $fails not ok"
