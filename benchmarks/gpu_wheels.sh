#!/usr/bin/env bash
# Fill .whl/ with what the GPU scripts need beyond torch and transformers (pydantic, pydantic-settings, pillow and
# their dependencies), as binary wheels for each Python a GPU machine may run (blip-tools needs 3.11 or newer).
# The GPU machines have no internet: run this here, then carry the folder (`run(..., carry=[".whl"])`), where
# benchmarks/gpu_session.sh installs from it when the machine lacks them. About 25 MB.
set -eu
cd "$(dirname "$0")/.."
for version in 3.11 3.12 3.13; do
    pip download -q -d .whl --only-binary=:all: --python-version "$version" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        pydantic pydantic-settings pillow
done
du -sh .whl
