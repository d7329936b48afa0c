#!/usr/bin/env bash
# The README's first command: set up .venv if needed, then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_venv.sh
exec .venv/bin/python -m franca.quickstart "$@"
