#!/usr/bin/env bash
# One GPU session in one command: check that BLIP_CUDA_GRAPHS decodes as generate() does on the device, then
# time the real size (bf16) against the H100 roofline. Writes everything to $OUT (default bench-results).
#
#   bash benchmarks/gpu_session.sh            # with the wheels of benchmarks/gpu_wheels.sh in .whl/
#   BUDGET=300 OUT=/tmp/out bash benchmarks/gpu_session.sh
#
# The GPU machines here have torch and transformers but no internet: pydantic, pydantic-settings, pillow and their
# dependencies are installed from .whl/ when the machine lacks them (fill it with `bash benchmarks/gpu_wheels.sh`
# beforehand, for Python 3.11-3.13, and carry the folder). pip picks the wheels that match the machine's Python.
set -u
OUT=${OUT:-bench-results}
BUDGET=${BUDGET:-420}
mkdir -p "$OUT"
if ! python3 -c "import pydantic_settings, PIL" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --find-links .whl --target /tmp/blip-site pydantic pydantic-settings pillow
    export PYTHONPATH="/tmp/blip-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
start=$(date +%s)
timeout 150 python3 benchmarks/gpu_check.py --out "$OUT" 2>&1 | tail -30
echo "gpu_check exit: ${PIPESTATUS[0]}"
left=$((BUDGET - ($(date +%s) - start)))
python3 benchmarks/gpu_real.py --budget-s "$((left > 60 ? left : 60))" --out "$OUT"
