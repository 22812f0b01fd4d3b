#!/usr/bin/env bash
# GPU check of the paper configs (configs/*/paper.yaml), under 8 minutes on one GPU: for each model, train a
# bounded number of steps on MVTec AD bottle, predict its test split and print images/s (training, inference)
# and peak GPU memory, one row per model, also written to benchmarks/results/gpu_check.csv.
# What is timed, the data fallback and DPNR's VAE: see benchmarks/gpu_check.py (its options follow this script's).
#   bash benchmarks/gpu_check.sh                            # 30 steps, float32, ../shared/data/mvtec_ad bottle
#   bash benchmarks/gpu_check.sh --precision bf16-mixed     # any gpu_check.py option; later ones win
#   ANOMALIB_DPNR_DATA=/data bash benchmarks/gpu_check.sh   # /data/mvtec_ad/bottle (or --data /data/mvtec_ad)
# Stopped after GPU_CHECK_TIMEOUT seconds (default 470); rows finished by then stay in the CSV.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PYTHON=${PYTHON:-python}
echo "[gpu_check.sh] $(date -Is) in $(pwd)"
if ! "$PYTHON" -c "import anomalib_dpnr" 2>/dev/null; then
    echo "[gpu_check.sh] anomalib_dpnr is not importable by $PYTHON: run pip install -e . first" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "[gpu_check.sh] nvidia-smi not found"
status=0
timeout --signal=INT --kill-after=30 "${GPU_CHECK_TIMEOUT:-470}" \
    "$PYTHON" benchmarks/gpu_check.py --accelerator gpu "$@" || status=$?
if [ "$status" -eq 124 ]; then
    echo "[gpu_check.sh] stopped after ${GPU_CHECK_TIMEOUT:-470} s; rows finished by then are in the CSV" >&2
fi
exit "$status"
