"""The Ray Train driver: read the records, plan the steps, run a `TorchTrainer`, export the final model.

Rerunning with the same `storage_path` + `run_name` resumes from the latest checkpoint; a failed
worker is retried from it (`max_failures`).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import ray.train

from cllm.data import check_columns
from cllm.models import causal_lm_config
from cllm.train.config import TrainConfig, plan_steps
from cllm.train.engines import MODEL_DIR
from cllm.train.feed import ordered_feed
from cllm.train.loop import StepCallback, train_loop


@dataclass
class TrainResult:
    model_dir: Path
    metrics: dict
    checkpoint_path: str | None


def read_records(config: TrainConfig) -> ray.data.Dataset:
    if "://" not in config.data and not Path(config.data).exists():
        raise ValueError(f"training data not found: {config.data}")
    try:
        dataset = ray.data.read_parquet(config.data, file_extensions=["parquet"])
        columns = dataset.schema().names
    except Exception as err:  # Ray wraps pyarrow's errors in several types
        raise ValueError(f"cannot read Parquet records from {config.data}: {err}") from err
    check_columns(columns, config.objective)
    return dataset


def run_training(
    config: TrainConfig,
    *,
    resolve_model: Callable[[str], str] = str,
    step_callback: StepCallback | None = None,
) -> TrainResult:
    """Train, then save the final model to `config.output_dir` (loadable by `cllm.models.load_model`).

    `resolve_model` turns the model reference into a directory once the records have been read (an entry
    point passes the one that builds the built-in teacher). `step_callback(step, rank)` runs in every worker
    after each optimizer step (tests use it to crash one).
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    dataset = read_records(config)  # bad data fails before any model is built
    config = config.model_copy(update={"model": resolve_model(config.model)})
    causal_lm_config(config.model)  # a bad model fails here, not in every worker
    records = dataset.count()
    plan = plan_steps(records, config)
    if config.ordered_feed:
        dataset = ordered_feed(dataset, records, config.seed)
    loop_config = {
        "config": config.model_dump(),
        "plan": asdict(plan),
        "step_callback": step_callback,
    }
    resources = {"CPU": config.cpus_per_worker} | ({"GPU": 1} if config.use_gpu else {})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=config.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
        datasets={"train": dataset},
        # Ray Data otherwise hands each block to whichever worker asks first: a different split every run.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=config.ordered_feed)),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as err:
        raise_bad_input(err)
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"training run {config.run_name} ended without a checkpoint")
    model_dir = export_model(result.checkpoint, Path(config.output_dir))
    metrics = dict(result.metrics) | {"wall_seconds": time.perf_counter() - started}
    return TrainResult(model_dir=model_dir, metrics=metrics, checkpoint_path=result.checkpoint.path)


def raise_bad_input(err: Exception) -> None:
    """A ValueError in a worker (a malformed record) becomes a ValueError here, not a worker trace."""
    for rank, failure in getattr(err, "worker_failures", {}).items():
        if isinstance(failure, ValueError):
            raise ValueError(f"training worker {rank} rejected its input: {failure}") from None


def export_model(checkpoint: ray.train.Checkpoint, output_dir: Path) -> Path:
    with checkpoint.as_directory() as directory:
        source = Path(directory) / MODEL_DIR
        if not source.is_dir():
            raise RuntimeError(f"checkpoint {checkpoint.path} holds no {MODEL_DIR}/ folder")
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, output_dir, dirs_exist_ok=True)
    return output_dir


