"""Train a CLLM (or, with `--objective ar`, a plain next-token model) on Ray Train.

    python pipelines/train.py --data outputs/run1/trajectories --output-dir outputs/run1/cllm
    python pipelines/train.py --config configs/train.yaml --model outputs/teacher --max-steps 200
    python pipelines/train.py --config configs/train.yaml --strategy deepspeed --zero-stage 3 --bf16 --use-gpu

Keys are TrainConfig's (cllm/train/config.py); `--model builtin` (the default) is the built-in teacher.
Rerunning with the same --storage-path and --run-name resumes from the last checkpoint; the final model
lands in --output-dir as an ordinary HF directory. The driver's imports (Ray, torch, transformers) wait
until the command line is read and the inputs are found: `--help` and a mistake answer at once.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import checkout  # noqa: F401  (cllm importable here and in Ray workers, without installing)

from cllm.config import load_config
from cllm.errors import run_main
from cllm.train.config import TrainConfig, check_inputs

if TYPE_CHECKING:
    from cllm.train.driver import TrainResult


def main(argv: list[str]) -> TrainResult:
    config = load_config(TrainConfig, argv)
    check_inputs(config)  # missing records or a missing model fail here, before Ray starts
    import ray

    from cllm.models.teacher import resolve_model
    from cllm.train.driver import run_training

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
