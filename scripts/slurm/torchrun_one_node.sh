#!/bin/bash
# Franca pretraining on the GPUs of one machine (or inside a one-node allocation) with torchrun.
# Usage: bash scripts/slurm/torchrun_one_node.sh NGPUS CONFIG OUTPUT_DIR [key=value ...]
# Example: bash scripts/slurm/torchrun_one_node.sh 8 configs/train/IN21K/vitb14.yaml runs/vitb14 \
#            train.dataset_path=ImageFolder:root=/data/my_photos
# Stop with Ctrl-C or SIGTERM: the trainer checkpoints first; run the same command again to resume.
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: bash $0 NGPUS CONFIG OUTPUT_DIR [key=value ...]" >&2
  exit 2
fi
NGPUS="$1"
CONFIG="$2"
OUTPUT_DIR="$3"
shift 3
PYTHON="${PYTHON:-python}"
exec "${PYTHON}" -m torch.distributed.run --standalone --nproc-per-node="${NGPUS}" \
  -m franca.train --config-file "${CONFIG}" --output-dir "${OUTPUT_DIR}" "$@"
