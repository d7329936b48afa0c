#!/usr/bin/env bash
# The README's second command: set up .venv if needed, then run the whole test suite (arguments go to pytest:
# `bash scripts/test.sh -m "not slow"` is the one-minute subset). The 25 slowest tests are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_venv.sh
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q --durations=25 "$@"
