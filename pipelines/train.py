"""Train a CLLM (or, with `--objective ar`, a plain next-token model) on Ray Train.

    python pipelines/train.py --data outputs/run1/trajectories --output-dir outputs/run1/cllm
    python pipelines/train.py --config configs/train.yaml --model outputs/teacher --max-steps 200
    python pipelines/train.py --config configs/train.yaml --strategy deepspeed --zero-stage 3 --bf16 --use-gpu

Keys are TrainConfig's (cllm/train/config.py); `--model builtin` (the default) is the built-in teacher.
Rerunning with the same --storage-path and --run-name resumes from the last checkpoint; the final model
lands in --output-dir as an ordinary HF directory.
"""

from __future__ import annotations

import json

import checkout  # noqa: F401  (cllm importable here and in Ray workers, without installing)
import ray

from cllm.config import load_config
from cllm.errors import run_main
from cllm.teacher import resolve_model
from cllm.train.config import TrainConfig
from cllm.train.driver import TrainResult, check_inputs, run_training


def main(argv: list[str]) -> TrainResult:
    config = load_config(TrainConfig, argv)
    check_inputs(config)  # missing records or a missing model fail here, before Ray starts
    ray.init(address=config.ray_address, include_dashboard=False)
    try:
        result = run_training(config, resolve_model=resolve_model)
    finally:
        ray.shutdown()
    print(f"model saved to {result.model_dir}")
    print(json.dumps(result.metrics, indent=2, default=str))
    return result


if __name__ == "__main__":
    run_main(main)
