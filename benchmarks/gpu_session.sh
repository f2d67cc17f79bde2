#!/usr/bin/env bash
# What a session with a lent GPU runs (~10-12 minutes on an H200 in all), in two parts so
# that each stays under the device tool's 10 minutes a command; issue the second within
# the machine's idle window (~30 s) so that it runs on the same warm machine:
#
#   PART=1 bash benchmarks/gpu_session.sh 2>&1 | tee "$OUT/log1.txt"   # carry .devdeps
#   PART=2 bash benchmarks/gpu_session.sh 2>&1 | tee "$OUT/log2.txt"
#   TINY=1 PY=.venv/bin/python bash benchmarks/gpu_session.sh          # a dry run on this CPU
#
# In order of what matters most, so that a run cut short still reports the first ones.
# Part 1: the CUDA tests of CUDA-graph decoding and of the Triton cross-entropy (when
# pytest is there), `cross_entropy.py` (the loss alone, inductor's against gpu_kernels',
# seconds), `gpu_train.py` as committed (vocabulary padded to 64, 3 steps profiled by kind
# of kernel; decoding eager and CUDA-graphed, their tokens compared), and the same training
# with `--loss-kernel triton`. Part 2: the Triton loss with inductor's coordinate-descent
# tuning (of its other kernels: layer norms, activations), and the unpadded vocabulary. Each training in a process of its own: the A/B figures for
# benchmarks/RESULTS.md. No PART: both. JSON results go to $OUT (default /tmp/gpu_session).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# The lent machine has no pytest and no network: carry a folder made here with
# `pip install --target .devdeps pytest hypothesis` (pure Python, ~20 MB).
if [ -d .devdeps ]; then export PYTHONPATH="$PYTHONPATH:$PWD/.devdeps"; fi
ARGS=()
if [ -n "${TINY:-}" ]; then ARGS=(--tiny --device cpu --steps 2 --warmup 1 --decode-tokens 4); fi
status=0
run() { echo "=== $* ($(date -u +%H:%M:%S))"; "$@" || { status=1; echo "=== FAILED: $*"; }; }

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"
PART=${PART:-12}
if [[ $PART == *1* ]]; then
    if "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
        run "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_kernels.py \
            tests/test_generate.py tests/test_train.py tests/test_data.py \
            -k "gpu_kernels or graph_decoder or picks or tf32 or reach_cuda"
    fi
    run "$PY" benchmarks/cross_entropy.py ${TINY:+--tiny} --json "$OUT/cross_entropy.json"
    run "$PY" benchmarks/gpu_train.py "${ARGS[@]}" --profile-steps 3 \
        --json "$OUT/train_pad64.json"
    if [ -z "${TINY:-}" ]; then  # the Triton loss runs on a GPU only
        run "$PY" benchmarks/gpu_train.py --loss-kernel triton --profile-steps 3 \
            --decode-batches "" --json "$OUT/train_pad64_triton.json"
    fi
fi
if [[ $PART == *2* ]]; then
    # The file name says which loss ran: the TINY dry run keeps inductor's (no GPU, no Triton).
    LOSS=(--loss-kernel triton) LOSS_NAME=_triton
    if [ -n "${TINY:-}" ]; then LOSS=() LOSS_NAME=; fi
    run "$PY" benchmarks/gpu_train.py "${ARGS[@]}" "${LOSS[@]}" --coordinate-descent \
        --decode-batches "" --json "$OUT/train_pad64${LOSS_NAME}_cdt.json"
    run "$PY" benchmarks/gpu_train.py "${ARGS[@]}" --vocab-multiple 1 --decode-batches "" \
        --json "$OUT/train_pad1.json"
fi
echo "=== done ($(date -u +%H:%M:%S)), status $status"
exit $status
