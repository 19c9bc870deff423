#!/usr/bin/env bash
# Check and time every GPU code path of dsv3 in one run (benchmarks/gpu_suite.py; issue #17).
#
#   bash scripts/gpu_suite.sh OUT_DIR [more gpu_suite.py flags]
#
# Meant for a machine with a Hopper GPU and its own Python with torch, triton and numpy (nothing is
# downloaded): dsv3 runs from src/ without being installed. Packages that Python lacks are taken from
# the wheels of benchmarks/work/gpu_wheels (or $DSV3_GPU_WHEELS; fetched by scripts/gpu_wheels.sh),
# unpacked into a directory searched after Python's own; without transformers the peer rows are
# skipped. Writes OUT_DIR/gpu_suite.{json,md} and OUT_DIR/gpu_suite.log; exit code 1 if a check
# failed, 2 on bad arguments or a missing torch, triton or numpy.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash scripts/gpu_suite.sh OUT_DIR [gpu_suite.py flags]" >&2
    exit 2
fi
out="$1"; shift
PY="${PYTHON:-python3}"
mkdir -p "$out" || { echo "gpu_suite.sh: cannot create $out" >&2; exit 2; }
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/dsv3_triton_cache}" TOKENIZERS_PARALLELISM=false
wheels="${DSV3_GPU_WHEELS:-benchmarks/work/gpu_wheels}"
if compgen -G "$wheels/*.whl" > /dev/null; then      # wheels are zip files: unpacking one installs it
    export DSV3_EXTRA_SITE="${TMPDIR:-/tmp}/dsv3_gpu_site"
    mkdir -p "$DSV3_EXTRA_SITE"
    for w in "$wheels"/*.whl; do
        "$PY" -m zipfile -e "$w" "$DSV3_EXTRA_SITE" || { echo "gpu_suite.sh: cannot unpack $w" >&2; exit 2; }
    done
fi
missing=$("$PY" - <<'PY'
import importlib.util, os, sys
if os.environ.get("DSV3_EXTRA_SITE"):
    sys.path.append(os.environ["DSV3_EXTRA_SITE"])      # after Python's own packages, as gpu_suite.py does
need = ["torch", "triton", "numpy"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
if importlib.util.find_spec("transformers") is None:
    print("gpu_suite.sh: transformers missing (no wheels in $DSV3_GPU_WHEELS or benchmarks/work/gpu_wheels): "
          "the peer rows will be skipped", file=sys.stderr)
PY
)
if [ -n "$missing" ]; then
    echo "gpu_suite.sh: missing Python packages: $missing" >&2
    exit 2
fi
"$PY" -c "import os, sys; sys.path += [os.environ['DSV3_EXTRA_SITE']] if os.environ.get('DSV3_EXTRA_SITE') else []
import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
"$PY" benchmarks/gpu_suite.py --out "$out" "$@" 2>&1 | tee "$out/gpu_suite.log"
exit "${PIPESTATUS[0]}"
