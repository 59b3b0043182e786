#!/usr/bin/env bash
# One-command GPU check for the performance targets: every row of docs/benchmarks.md's summary table, measured
# on CUDA (bf16 autocast, channels_last, batch 32, 256x256), plus the CUDA-marked tests (tests/test_cuda.py, the fused
# GroupNorm+SiLU kernel's real-GPU tests against its reference included). Everything lands in ONE file,
# $OUT_DIR/results.txt (default gpu_check/); the JSON of each suite is kept next to it in $OUT_DIR/raw/.
# At most 8 minutes: each step has its own time limit and the limits add up to 470 s.
#   bash scripts/gpu_check.sh                 # PYTHON=... to choose the interpreter; FULL=1 adds the
#                                             # memory, dwt and train-ldm suites (+3 min)
# Rows -> steps:
#   encoder throughput LiteVAE-B / SD-VAE, eager, fused kernel off and on   -> encoder
#   same, each compiled (torch.compile; Inductor fuses the norms itself)    -> encoder --compile
#   full AE training step, same decoder and loss, fused kernel off and on   -> train-ae
#   caching / bare encoder forward, decode-only (JPEG loader) throughput    -> cache
#   roofline: FLOPs and minimum bytes per image, H200 bound                 -> roofline (counted on CPU)
#   per-kernel profile, training forward+backward, fused kernel off and on  -> profile (full tables in raw/)
#   CPU encoder ratio vs FLOP ratio: not a GPU row (python scripts/benchmark.py --suite encoder on CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-gpu_check}
RAW="$OUT_DIR/raw"
RESULTS="$OUT_DIR/results.txt"
mkdir -p "$RAW"

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')" || exit 1
start=$(date +%s)
{
  echo "# scripts/gpu_check.sh, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
} > "$RESULTS"

status=0
run_suite() {  # name, time limit (s), extra benchmark.py arguments...
  local name=$1 limit=$2; shift 2
  echo -e "\n## $name (limit ${limit}s)" >> "$RESULTS"
  local t0=$(date +%s)
  timeout "$limit" "$PYTHON" scripts/benchmark.py "$@" --out "$RAW/$name.json" > "$RAW/$name.txt" 2>&1
  local rc=$?
  if (( rc )); then  # 124: ran past its limit
    status=1; echo "FAILED (exit $rc)" >> "$RESULTS"; tail -n 20 "$RAW/$name.txt" >> "$RESULTS"
  fi
  # The table and the ratios (everything after the machine line).
  sed -n '/^suite seconds/,$p' "$RAW/$name.txt" >> "$RESULTS"
  echo "($(( $(date +%s) - t0 )) s)" >> "$RESULTS"
}
# Each suite in its own process, under its own limit, so one slow suite cannot eat the others' time.
run_suite encoder 70 --suite encoder --device cuda --quick
run_suite encoder-compiled 100 --suite encoder --device cuda --quick --compile
run_suite train-ae 75 --suite train-ae --device cuda
run_suite cache 45 --suite cache --device cuda
run_suite roofline 20 --suite roofline --device cpu --threads 8
run_suite profile 40 --suite profile --device cuda
if [[ "${FULL:-0}" == 1 ]]; then
  for spec in memory:75 dwt:25 train-ldm:50; do run_suite "${spec%%:*}" "${spec##*:}" --suite "${spec%%:*}" --device cuda; done
fi

echo -e "\n## CUDA tests (pytest -m cuda, limit 120s)" >> "$RESULTS"
timeout 120 "$PYTHON" -m pytest -q -ra -p no:xdist -m cuda tests/test_cuda.py > "$RAW/pytest_cuda.txt" 2>&1 || status=1
tail -n 25 "$RAW/pytest_cuda.txt" >> "$RESULTS"

echo -e "\n# total $(( $(date +%s) - start )) s, exit $status" >> "$RESULTS"
grep -hE "^ratios|^  [a-z]|^#|passed|failed" "$RESULTS"
echo "results in $RESULTS (exit $status)"
exit $status
