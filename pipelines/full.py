"""The whole CLLM pipeline in one command: teacher -> collect -> train -> evaluate [-> serve].

    python pipelines/full.py                                   # embedded default, one machine
    python pipelines/full.py --config run.yaml --block-size 32 --train.lr 2e-5
    ray job submit --working-dir . -- python pipelines/full.py --model Qwen/Qwen2.5-0.5B-Instruct ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cllm.config import load_config  # noqa: E402
from cllm.pipeline import PipelineConfig, run_pipeline  # noqa: E402

if __name__ == "__main__":
    run_pipeline(load_config(PipelineConfig, sys.argv[1:]))
