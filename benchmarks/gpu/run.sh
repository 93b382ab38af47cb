#!/usr/bin/env bash
# One prepared command for a GPU machine (torch + CUDA, onnx, onnxruntime, pytest; no network,
# no torch-pruning): install sepfx from this checkout, run the CUDA tests, then the CUDA latency
# benchmark, all inside 9 minutes. Usage (from anywhere): bash benchmarks/gpu/run.sh OUTDIR
# Writes OUTDIR/cuda_tests.txt, OUTDIR/latency_cuda.{json,md,png} and OUTDIR/latency_cuda.log.
# Extra arguments after OUTDIR go to latency_cuda.py (e.g. --models conv_tasnet --configs paper).
set -u
OUTDIR=${1:?usage: run.sh OUTDIR [latency_cuda.py arguments]}
shift
TOTAL=${SEPFX_GPU_SECONDS:-540}  # everything below ends within this many seconds
START=$SECONDS
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$ROOT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}

# Carried wheels (benchmarks/gpu/wheels/*.whl, e.g. torch-pruning), into a folder of their own.
if compgen -G "benchmarks/gpu/wheels/*.whl" >/dev/null; then
    timeout 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/sepfx-wheels benchmarks/gpu/wheels/*.whl \
        && export PYTHONPATH=/tmp/sepfx-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
# sepfx itself, editable, without its dependencies (the machine has them, or the tests skip);
# no build isolation: there is no network to fetch a build backend. The checkout first on the
# path either way.
# SEPFX_GPU_NO_INSTALL=1 skips it (a machine whose install must not change).
if [ -z "${SEPFX_GPU_NO_INSTALL:-}" ]; then
    timeout 90 "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . \
        || echo "pip install -e . failed: using PYTHONPATH=$ROOT"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUTDIR/cuda_tests.txt"

# The CUDA tests: at most 3 minutes.
timeout 180 "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider -rs tests 2>&1 \
    | tee -a "$OUTDIR/cuda_tests.txt"
echo "pytest -m cuda exit status: ${PIPESTATUS[0]}" | tee -a "$OUTDIR/cuda_tests.txt"

# The latency benchmark: what is left, less a margin for the cell in flight and the last save.
LEFT=$((TOTAL - (SECONDS - START)))
LIMIT=$((LEFT - 100))
if [ "$LIMIT" -lt 30 ]; then
    echo "only ${LEFT}s left: latency_cuda.py not run" | tee "$OUTDIR/latency_cuda.log"
    exit 1
fi
timeout $((LEFT - 10)) "$PYTHON" benchmarks/latency_cuda.py "$OUTDIR" --time-limit "$LIMIT" "$@" \
    2>&1 | tee "$OUTDIR/latency_cuda.log"
status=${PIPESTATUS[0]}
echo "latency_cuda.py exit status: $status after $((SECONDS - START))s in all" \
    | tee -a "$OUTDIR/latency_cuda.log"
exit "$status"
