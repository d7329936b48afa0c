#!/usr/bin/env bash
# Create ./.venv (once) and install franca with the extras the README's commands need.
# Reinstalls only when pyproject.toml changed. Torch comes from PyPI as usual (on machines whose pip is configured
# with a local wheel folder, pip takes it from there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "franca needs Python >= 3.10, found " + sys.version)'
if [ ! -x .venv/bin/python ]; then
  echo "[franca] creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
extras=${FRANCA_EXTRAS:-dev,eval,export,hf,log,slurm,timm}
stamp=".venv/.franca-installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  echo "[franca] installing franca[$extras] into .venv (torch is large: the first install takes a few minutes)"
  .venv/bin/python -m pip install --upgrade --quiet pip
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  rm -f .venv/.franca-installed-*
  touch "$stamp"
fi
