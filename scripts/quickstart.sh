#!/usr/bin/env bash
# Set up (if needed), train the tiny DeepSeek-V3 model on the built-in corpus (the Python standard
# library's sources) and generate from it. Re-running starts the demo run over (--overwrite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/dsv3 train --preset tiny --out runs/tiny --overwrite "$@"
echo
echo "--- dsv3 generate --model runs/tiny/final --prompt 'import os' ---"
.venv/bin/dsv3 generate --model runs/tiny/final --prompt "import os" --max-new-tokens 60 --seed 1
