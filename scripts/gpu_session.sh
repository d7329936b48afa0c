#!/usr/bin/env bash
# The GPU measurements still pending (issues #7 and #8), in stages that each fit one 10-minute device call:
#   bash scripts/gpu_session.sh check      # cuda tests: chunked vs plain step, no host sync, bf16/compile parity
#   bash scripts/gpu_session.sh step-b     # ViT-B/14 full Franca step, batch 32/64, compiled, plain vs chunked losses
#   bash scripts/gpu_session.sh step-l     # ViT-L/14 at batch 64 (the 60 GiB goal), also with activation checkpointing
#   bash scripts/gpu_session.sh fidelity   # the Fashion-MNIST fidelity headline (configs/fidelity/gpu.yaml)
# Runs work in runs/gpu_session/<stage>/ (kept while the device machine stays warm, so a fidelity stage cut by the time
# limit resumes when called again); logs and results (at most 8 small files, as the device tool returns) go to
# ${OUT:-runs/gpu_session}/<stage>/. Copy the tables into benchmarks/RESULTS.md with the device, versions and date.
# Packages the device image lacks (omegaconf) are installed from ./.whl (carry .whl, and .fmnist for the fidelity
# stage: the four Fashion-MNIST idx files).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: bash scripts/gpu_session.sh check|step-b|step-l|fidelity}
work=runs/gpu_session/$stage
out=${OUT:-runs/gpu_session}/$stage
mkdir -p "$work" "$out"
publish() { [ "$work" -ef "$out" ] || cp "$@" "$out/"; }  # results from the work folder to the returned one
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ! $py -c "import omegaconf" 2>/dev/null; then
    compgen -G '.whl/*.whl' >/dev/null || {
        echo "omegaconf is missing and ./.whl holds no wheels (omegaconf, antlr4-python3-runtime 4.9.x)" >&2; exit 1; }
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
$py -c "import omegaconf, yaml, pytest, torch; assert torch.cuda.is_available(), 'no CUDA device'"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
step() {  # step CONFIG "BATCH_SIZES" [OVERRIDES...]: compiled, both loss paths, with the phase breakdown
    local config=$1 batch_sizes=$2
    shift 2
    # shellcheck disable=SC2086  # the batch sizes are separate words
    $py benchmarks/train_step.py --batch-sizes $batch_sizes --compile --breakdown --chunked-losses false true \
        --steps 10 --warmup 3 --out "$work" --config "$config" "$@" 2>&1 | tee -a "$out/train_step.log"
    publish "$work/train_step.json"
}
case $stage in
    check) $py -m pytest -m cuda -q -p no:cacheprovider tests 2>&1 | tee "$out/pytest_cuda.log" ;;
    step-b) step configs/train/IN21K/vitb14.yaml "32 64" ;;
    step-l)  # batch 64 (the 60 GiB goal), then the same with activation checkpointing
        step configs/train/IN21K/vitl14.yaml 64
        step configs/train/IN21K/vitl14.yaml 64 compute_precision.activation_checkpointing=true ;;
    fidelity)
        [ -d .fmnist ] || { echo "carry .fmnist (the four Fashion-MNIST idx .gz files) for the fidelity stage" >&2; exit 1; }
        $py benchmarks/fidelity.py --budget gpu --data-root "$PWD/.fmnist" --out "$work" 2>&1 | tee -a "$out/fidelity.log"
        publish "$work"/fidelity.json "$work"/fidelity.md "$work"/*.png
        cat "$out/fidelity.md" ;;
    *) echo "unknown stage '$stage': use check, step-b, step-l or fidelity" >&2; exit 2 ;;
esac
