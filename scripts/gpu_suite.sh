#!/usr/bin/env bash
# Check and time every GPU code path of dsv3 in one run (benchmarks/gpu_suite.py; issue #17).
#
#   bash scripts/gpu_suite.sh OUT_DIR [more gpu_suite.py flags]
#
# Meant for a machine with a Hopper GPU and its own Python with torch, triton, transformers,
# safetensors, tokenizers, numpy and fsspec installed (nothing is downloaded): dsv3 runs from src/
# without being installed. Writes OUT_DIR/gpu_suite.{json,md} and OUT_DIR/gpu_suite.log; exit code 1
# if a check failed, 2 on bad arguments or a missing package.
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
missing=$("$PY" - <<'PY'
import importlib.util
need = ["torch", "triton", "numpy", "safetensors", "tokenizers", "fsspec", "tqdm", "transformers"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
    echo "gpu_suite.sh: missing Python packages: $missing" >&2
    exit 2
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
"$PY" benchmarks/gpu_suite.py --out "$out" "$@" 2>&1 | tee "$out/gpu_suite.log"
exit "${PIPESTATUS[0]}"
