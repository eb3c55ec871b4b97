#!/usr/bin/env bash
# GPU checks of MEC pretraining, one GPU, at most 5 minutes; results are appended to
# benchmarks/RESULTS.md with the GPU's name (see benchmarks/gpu_check.py for what is measured).
#
#   bash benchmarks/gpu_check.sh            # on a machine with a GPU
#   bash benchmarks/gpu_check.sh --tiny     # CPU, toy sizes, prints only: a crash test
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if [ "${1:-}" = "--tiny" ]; then
    exec timeout 300 "$PYTHON" benchmarks/gpu_check.py "$@"
fi
exec timeout 300 "$PYTHON" benchmarks/gpu_check.py --results benchmarks/RESULTS.md "$@"
