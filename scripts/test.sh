#!/usr/bin/env bash
# The README's second command: set up .venv if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_venv.sh
exec .venv/bin/python -m pytest -n 2 --dist loadfile -q "$@"
