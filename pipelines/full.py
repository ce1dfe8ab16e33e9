"""The whole CLLM pipeline in one command: teacher -> collect -> train -> evaluate [-> serve].

    python pipelines/full.py                                   # embedded default, one machine
    python pipelines/full.py --config run.yaml --block-size 32 --train.lr 2e-5
    ray job submit --working-dir . -- python pipelines/full.py --model Qwen/Qwen2.5-0.5B-Instruct ...
"""

from __future__ import annotations

import checkout  # noqa: F401  (cllm importable here and in Ray workers, without installing)

from cllm.config import load_config
from cllm.errors import run_main
from cllm.pipeline import PipelineConfig, run_pipeline


def main(argv: list[str]) -> dict:
    return run_pipeline(load_config(PipelineConfig, argv))


if __name__ == "__main__":
    run_main(main)
