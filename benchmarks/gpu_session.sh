#!/usr/bin/env bash
# What a session with a lent GPU runs, as one command (~7-9 minutes on an H200):
#
#   bash benchmarks/gpu_session.sh 2>&1 | tee "$OUT/log.txt"     # through the device tool
#   TINY=1 PY=.venv/bin/python bash benchmarks/gpu_session.sh     # a dry run on this CPU
#
# 1. the CUDA-graph decoding test (when pytest is there), 2. `gpu_train.py` as committed
# (vocabulary padded to 64, then 3 steps profiled by kind of kernel; decoding eager and
# CUDA-graphed, their tokens compared),
# 3. the same training with the unpadded vocabulary and 4. with inductor's
# coordinate-descent tuning, each in a process of its own: the A/B figures for
# benchmarks/RESULTS.md. JSON results go to $OUT (default /tmp/gpu_session).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
ARGS=()
if [ -n "${TINY:-}" ]; then ARGS=(--tiny --device cpu --steps 2 --warmup 1 --decode-tokens 4); fi
status=0
run() { echo "=== $* ($(date -u +%H:%M:%S))"; "$@" || { status=1; echo "=== FAILED: $*"; }; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"
if "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
    run "$PY" -m pytest -q -p no:cacheprovider tests/test_generate.py -k "graph_decoder or picks"
fi
run "$PY" benchmarks/gpu_train.py "${ARGS[@]}" --profile-steps 3 --json "$OUT/train_pad64.json"
run "$PY" benchmarks/gpu_train.py "${ARGS[@]}" --vocab-multiple 1 --decode-batches "" \
    --json "$OUT/train_pad1.json"
run "$PY" benchmarks/gpu_train.py "${ARGS[@]}" --coordinate-descent --decode-batches "" \
    --json "$OUT/train_pad64_cdt.json"
echo "=== done ($(date -u +%H:%M:%S)), status $status"
exit $status
