#!/usr/bin/env bash
# The GPU run, ready to fire (issue 14): on a fresh machine with the repository, install what
# is missing, run the CUDA path of every bench that has one (AMP/bf16, pinned memory,
# channels_last: the benches' own CUDA settings), the classify job end to end through a
# worker on cuda, and print ONE table. Every step has its own timeout; the total stays under
# 8 minutes. Without CUDA each CUDA row says "skipped: no CUDA" and the script exits 0.
#
#   bash bench/gpu_check.sh [--smoke] [--out DIR]
#
# --smoke: the benches' smoke sizes (seconds), for CI; --out: where the JSON files and logs
# go (default: a temporary folder). PYTHON overrides the interpreter (default .venv's).
# Exit status: 0 when every row is ok or skipped for want of CUDA/services, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE="--smoke"; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: bash bench/gpu_check.sh [--smoke] [--out DIR]" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-$(mktemp -d -t mriq-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
START=$(date +%s)

if [ -z "${PYTHON:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    echo "installing (.venv is missing): bash scripts/install.sh" >&2
    timeout 150 bash scripts/install.sh >"$OUT/install.log" 2>&1 || {
      echo "install failed, see $OUT/install.log" >&2; exit 1; }
  fi
  PYTHON=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

ROWS="$OUT/rows.tsv"
: >"$ROWS"
FAILED=0
row() {  # name, status, seconds, result
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$ROWS"
}

if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
  CUDA=1
  GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))")
else
  CUDA=0
  GPU="none"
fi

# Services for the e2e row (Redis + PostgreSQL); bench.inference skips the row when down.
if [ "$CUDA" = 1 ] && [ -z "$SMOKE" ]; then
  timeout 45 bash scripts/services.sh >"$OUT/services.log" 2>&1 || true
fi

# name, timeout seconds, module, args...: runs one bench on cuda, one table row.
bench() {
  local name="$1" limit="$2" module="$3"
  shift 3
  if [ "$CUDA" = 0 ]; then
    row "$name" "skipped: no CUDA" "-" "-"
    return
  fi
  local json="$OUT/${module#bench.}.json" t0=$SECONDS rc
  timeout "$limit" "$PYTHON" -m "$module" --device cuda $SMOKE --json-out "$json" "$@" \
    >"$OUT/${module#bench.}.log" 2>&1
  rc=$?
  local secs=$((SECONDS - t0))
  if [ "$rc" = 0 ]; then
    row "$name" "ok" "$secs" "$("$PYTHON" -m bench.gpu_summary "$json")"
  elif [ "$rc" = 124 ]; then
    row "$name" "FAILED: timed out after ${limit}s" "$secs" "see $OUT/${module#bench.}.log"
    FAILED=1
  else
    row "$name" "FAILED: exit $rc" "$secs" "$(tail -c 200 "$OUT/${module#bench.}.log" | tr '\n\t' '  ')"
    FAILED=1
  fi
}

# Budget (s): install 150 + services 45 + inference/e2e 150 + training 90 + explanation 60.
bench "inference: model-only, Predictor, e2e (bf16 AMP, pinned)" 150 bench.inference \
  --e2e --skip allocator,notebook,core.predict --n 512 --chunk-size 256
bench "training: one epoch (AMP, channels_last, pinned)" 90 bench.training
bench "explanation: Grad-CAM vs classification" 60 bench.explanation
if [ "$CUDA" = 0 ]; then
  row "preprocess: torchvision.io.decode_jpeg(device=cuda), batched" "skipped: no CUDA" "-" "-"
else
  # Not built: mriq decodes with PIL/OpenCV on CPU threads (core.decoding); a GPU decode
  # path needs its own design (where the brain crop runs) before it can be measured.
  row "preprocess: torchvision.io.decode_jpeg(device=cuda), batched" "not built" "-" "-"
fi

echo "== mriq GPU check ($([ -n "$SMOKE" ] && echo smoke || echo full)) =="
echo "gpu: $GPU; total $(( $(date +%s) - START ))s; logs and JSON in $OUT"
awk -F'\t' 'BEGIN { printf "%-62s %-28s %7s  %s\n", "row", "status", "seconds", "result" }
  { printf "%-62s %-28s %7s  %s\n", $1, $2, $3, $4 }' "$ROWS"
exit "$FAILED"
