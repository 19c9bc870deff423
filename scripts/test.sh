#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# two workers, one test file each at a time (a file's module fixtures start once): most tests wait on
# subprocesses or a single thread, so two keep both cores busy; "-n 0" as an argument runs serially
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
