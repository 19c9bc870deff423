#!/usr/bin/env bash
# Fetch, on a machine with network, the wheels that scripts/gpu_suite.sh unpacks on a GPU machine
# without network when its own Python lacks them: transformers (the peer of the training and decoding
# rows) with its dependencies, and numpy (before 2.4, which Triton 3.6's interpreter predates), for
# CPython 3.12 on x86_64 Linux (about 45 MB).
#
#   bash scripts/gpu_wheels.sh [DIR]        # default benchmarks/work/gpu_wheels (git-ignored)
#
# Then hand DIR to the GPU machine with the working tree (e.g. the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-benchmarks/work/gpu_wheels}"
transformers=$(sed -n 's/.*"transformers==\([^"]*\)".*/\1/p' pyproject.toml)
[ -n "$transformers" ] || { echo "gpu_wheels.sh: no transformers==X pin in pyproject.toml" >&2; exit 2; }
mkdir -p "$dir"
python3 -m pip download "transformers==$transformers" "numpy<2.4" --only-binary=:all: --implementation cp \
    --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" -q
echo "$(ls "$dir"/*.whl | wc -l) wheels in $dir ($(du -sh "$dir" | cut -f1))"
