#!/usr/bin/env bash
# The GPU paths in one short run (scripts/gpu_check.py): bf16 Jacobi vs generate, DeepSpeed ZeRO-2/3 on NCCL,
# a collection actor and a Serve replica with one GPU each; prints one table. Needs no internet.
# Exits 2 without a GPU, 1 when a check failed. Arguments go to gpu_check.py (--help).
#   bash scripts/gpu_check.sh smollm2-bench [cllm bench options]
# instead benches SmolLM2-135M-Instruct and its shipped CLLM on GSM8K test questions on the GPU (every method side
# by side; $CLLM_GSM8K names the GSM8K files, default ../shared/data/gsm8k/{split}.jsonl; 20 questions unless
# --limit says otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi is missing or lists none): nothing checked" >&2
    exit 2
fi
nvidia-smi -L
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export CLLM_HOME="${CLLM_HOME:-$PWD/.cache/cllm}"
if [ "${1:-}" = "smollm2-bench" ]; then
    shift
    dataset="${CLLM_GSM8K:-../shared/data/gsm8k/{split}.jsonl}"
    models=(--models smollm2)
    [ -f cllm/assets/smollm2-cllm/cllm_adapter.json ] && models+=(--models smollm2-cllm)
    exec timeout 570 cllm bench "${models[@]}" --dataset "$dataset" --prompt-field question --chat --device cuda \
        --limit 20 --methods hf_greedy --methods ar --methods jacobi --methods multiblock "$@"
fi
exec timeout 570 python scripts/gpu_check.py "$@"
