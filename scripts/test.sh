#!/usr/bin/env bash
# The project's test command (what CI runs after setup).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export CLLM_HOME="${CLLM_HOME:-$PWD/.cache/cllm}" RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
# Without a -m of its own, two sets are left out to keep CI under its time budget: the multi-node scenarios
# that kill nodes mid-job (`-m multinode`, 20-30 minutes on 2 cores; scripts/multinode.py too), and the
# extended scenarios (`-m extended`, about 10 minutes), which repeat at greater length what a faster test
# in CI already covers (resume mid-epoch, worker retry, LoRA under ZeRO-3, a serve replica's node lost).
marker=(-m "not multinode and not extended")
for arg in "$@"; do [[ "$arg" == -m* ]] && marker=(); done
python -m pytest -q -p no:cacheprovider --durations=15 "${marker[@]}" "$@"
