#!/usr/bin/env bash
# The project's test command (what CI runs after setup).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export CLLM_HOME="${CLLM_HOME:-$PWD/.cache/cllm}" RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
# Without a -m of its own, the multi-node scenarios that kill nodes mid-job (20-30 minutes on 2 cores) are left
# out; the serve one still runs. `bash scripts/test.sh -m multinode` runs them (scripts/multinode.py too).
marker=(-m "not multinode")
for arg in "$@"; do [[ "$arg" == -m* ]] && marker=(); done
python -m pytest -q -p no:cacheprovider --durations=15 "${marker[@]}" "$@"
