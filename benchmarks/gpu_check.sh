#!/usr/bin/env bash
# On a machine with one CUDA GPU and PyTorch installed: the CUDA exactness tests, then
# plain Inductor vs CQIL local vs CQIL concurrent (streams) latency.  A few minutes.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
tests=${PIPESTATUS[0]}
python3 benchmarks/gpu_latency.py --out "$out" 2>&1 | tee "$out/gpu_latency.log"
exit $(( tests || PIPESTATUS[0] ))
