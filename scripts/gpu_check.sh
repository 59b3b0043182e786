#!/usr/bin/env bash
# One-command GPU check: the CUDA benchmark suites (bf16 autocast, channels_last, batch 32) and the
# CUDA-marked tests (tests/test_cuda.py), results written to $OUT_DIR (default gpu_check/). At most 10
# minutes (each step has its own time limit); about 4 on an H200 (docs/benchmarks.md).
#   bash scripts/gpu_check.sh                 # PYTHON=... to choose the interpreter, COMPILE=1 for torch.compile
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-gpu_check}
mkdir -p "$OUT_DIR"
EXTRA=()
[[ "${COMPILE:-0}" == 1 ]] && EXTRA+=(--compile)

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT_DIR/nvidia_smi.txt" 2>&1

status=0
# Each suite in its own process, under its own time limit, so one slow suite cannot eat the others' time.
for spec in encoder:75 memory:75 dwt:25 cache:50 train-ae:75 train-ldm:50; do  # 6 min in all, at most
  suite=${spec%%:*}
  timeout "${spec##*:}" "$PYTHON" scripts/benchmark.py --suite "$suite" --device cuda "${EXTRA[@]}" \
      --out "$OUT_DIR/bench_${suite}.json" > "$OUT_DIR/bench_${suite}.txt" 2>&1 || { status=1; echo "suite $suite failed"; }
done
timeout 180 "$PYTHON" -m pytest -q -ra -m cuda tests > "$OUT_DIR/pytest_cuda.txt" 2>&1 || status=1
{ cat "$OUT_DIR/nvidia_smi.txt"; tail -n 15 "$OUT_DIR/pytest_cuda.txt"; grep -h -A30 "^ratios" "$OUT_DIR"/bench_*.txt; } \
    | tee "$OUT_DIR/summary.txt"
echo "results in $OUT_DIR/ (exit $status)"
exit $status
