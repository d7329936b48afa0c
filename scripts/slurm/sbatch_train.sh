#!/bin/bash
# Franca pretraining with plain sbatch + srun (no submitit): one task per GPU, the trainer reads the SLURM_* variables.
# Edit the #SBATCH lines for your cluster, then:   sbatch scripts/slurm/sbatch_train.sh CONFIG OUTPUT_DIR [key=value ...]
# Example (the documented ViT-B/14 run, 64 GPUs = global batch 2048):
#   sbatch --nodes=16 scripts/slurm/sbatch_train.sh configs/train/IN21K/vitb14.yaml /scratch/franca_vitb14 \
#     train.dataset_path=ImageNet22k:root=/data/in21k:extra=/data/in21k-extra
# Requeue: SLURM sends SIGUSR1 120 s before the time limit; the trainer then checkpoints and exits, and this script
# requeues the job, which resumes from that checkpoint (resume is automatic).
#SBATCH --job-name=franca
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --time=20:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: sbatch $0 CONFIG OUTPUT_DIR [key=value ...]" >&2
  exit 2
fi
CONFIG="$1"
OUTPUT_DIR="$2"
shift 2
cd "${SLURM_SUBMIT_DIR:-.}"
PYTHON="${PYTHON:-python}"

# The batch shell receives SIGUSR1 (B:): pass it on to every training task, then requeue once they have saved.
forward_and_requeue() {
  echo "time limit near: asking the trainer to checkpoint, then requeueing job ${SLURM_JOB_ID}"
  scancel --signal=USR1 "${SLURM_JOB_ID}.0" || true
  wait "${TRAIN_PID}" || true
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
}
trap forward_and_requeue USR1

srun --kill-on-bad-exit=1 "${PYTHON}" -m franca.train --config-file "${CONFIG}" --output-dir "${OUTPUT_DIR}" "$@" &
TRAIN_PID=$!
wait "${TRAIN_PID}"
