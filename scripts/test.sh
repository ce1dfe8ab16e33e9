#!/usr/bin/env bash
# The project's test command (what CI runs after setup).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export CLLM_HOME="${CLLM_HOME:-$PWD/.cache/cllm}" RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
