#!/usr/bin/env bash
# One device call: versions, ceilings, the parity suite natively, the benchmarks.
# Results land in $OUT (the device tool's folder) or benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT="${OUT:-benchmarks/results}"
export OUT
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
python3 benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
