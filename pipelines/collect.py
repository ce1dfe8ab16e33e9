"""Collect Jacobi trajectories from a teacher with Ray Data (stage 1 of the CLLM pipeline).

    python pipelines/collect.py --dataset builtin:arith --output outputs/run1/trajectories --limit 1000
    python pipelines/collect.py --model outputs/teacher --dataset data/{split}.jsonl --output DIR \
        --block-size 16 --max-new-tokens 256 --actors 4 --batch-size 16 --num-gpus-per-actor 1
    python pipelines/collect.py --config configs/collect.yaml --actors 2

Keys are CollectConfig's (cllm/data/collect_config.py); `--model builtin` (the default) is the built-in teacher.
Rerunning the same command after an interruption decodes only the prompts not yet written.
The collection's imports (Ray, torch, transformers) wait until the command line is read, the dataset is
loaded and a local model path is found: `--help` and a mistake answer at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import checkout  # noqa: F401  (cllm importable here and in Ray workers, without installing)

from cllm.config import load_config
from cllm.data.collect_config import CollectConfig
from cllm.errors import run_main
from cllm.models.loading import check_model_path

if TYPE_CHECKING:
    from cllm.data.collect import CollectResult


def main(argv: list[str]) -> CollectResult:
    config = load_config(CollectConfig, argv)
    task = config.load_split(config.split, config.limit, config.seed)  # a bad dataset fails first,
    check_model_path(config.model)  # then a missing model path, both before the collection's imports
    import ray

    from cllm.data.collect import plan_collection, run_collection
    from cllm.models.teacher import resolve_model

    plan = plan_collection(config, resolve_model, task)  # a model that cannot be used fails here, before Ray starts
    config = config.model_copy(update={"model": plan.model_path})
    ray.init(address=config.ray_address, include_dashboard=False)
    try:
        result = run_collection(config, plan)
    finally:
        ray.shutdown()
    print(result.summary())
    return result


if __name__ == "__main__":
    run_main(main)
