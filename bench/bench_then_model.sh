#!/usr/bin/env bash
# bench/gpu_check.sh's step 04: a benchmark grid, then the performance model (bench/model.py) for it.
#   bash bench/bench_then_model.sh PYTHON OUT_DIR compare|alone [python -m bench arguments...]
# compare: the model next to the measured full rows of the grid (--model --compare <the run's .jsonl>);
# alone: the model's iternorm rows alone (the dry run's CPU rows are no GPU measurement to compare).
# The model records compiled Triton launches, so it runs without TRITON_INTERPRET. Exit status: the
# grid's, else the model's.
set -u
py=$1 out=$2 how=$3
shift 3
model() { env -u TRITON_INTERPRET "$py" -m bench --model --no-files --modes full "$@"; }

"$py" -m bench --out "$out" "$@"
rc=$?
if [ "$how" = compare ]; then
  f=$(ls "$out"/*.jsonl 2>/dev/null | head -n 1)
  if [ -n "$f" ]; then model --compare "$f"; else true; fi
else
  model --ops iternorm
fi
model_rc=$?
(( rc == 0 )) && rc=$model_rc
exit "$rc"
