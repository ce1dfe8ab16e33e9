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
from typing import TypeVar

import ray
import ray.train

from cllm.errors import DataError
from cllm.models.loading import absolute_if_local, causal_lm_config
from cllm.train.batches import check_columns
from cllm.train.config import TrainConfig, check_inputs, plan_steps
from cllm.train.engines import MODEL_DIR
from cllm.train.feed import ordered_feed
from cllm.train.loop import StepCallback, train_loop


@dataclass
class TrainResult:
    model_dir: Path
    metrics: dict
    checkpoint_path: str | None


def read_records(config: TrainConfig) -> ray.data.Dataset:
    check_inputs(config)

    def read() -> tuple[ray.data.Dataset, list[str]]:
        dataset = ray.data.read_parquet(config.data, file_extensions=["parquet"])
        return dataset, dataset.schema().names  # runs the listing and footer reads now

    try:
        dataset, columns = with_read_retries(read, f"reading {config.data}")
    except Exception as err:  # Ray wraps pyarrow's errors in several types
        if lost_to_the_cluster(err):
            raise
        raise DataError(f"cannot read Parquet records from {config.data}: {err}") from err
    check_columns(columns, config.objective)
    return dataset


# What a lost node raises in whoever was using its tasks, actors or objects; not a fault of the data.
CLUSTER_LOSSES = (
    ray.exceptions.ActorDiedError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,  # OwnerDiedError and ObjectReconstructionFailedError too
    ray.exceptions.WorkerCrashedError,
)
READ_ATTEMPTS = 3
T = TypeVar("T")


def lost_to_the_cluster(err: BaseException | None) -> bool:
    """Whether `err`, or an error it wraps, is a worker, actor, object or node lost by the cluster."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, CLUSTER_LOSSES):
            return True
        seen.add(id(err))
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return False


def with_read_retries(read: Callable[[], T], what: str, attempts: int = READ_ATTEMPTS) -> T:
    """Run a Ray Data read again when the cluster lost a node under it; bad data still fails at once.

    A read started just after a node died can still send a file-listing or footer-reading task or actor
    to it (`ActorDiedError`), which fails the whole dataset although every file is intact; the next
    attempt is planned on the nodes alive then.
    """
    for attempt in range(1, attempts + 1):
        try:
            return read()
        except Exception as err:
            if attempt == attempts or not lost_to_the_cluster(err):
                raise
            print(f"{what}: the cluster lost a node, worker or object under the read ({type(err).__name__}); "
                  f"retrying the read ({attempt} of {attempts - 1})", flush=True)
            time.sleep(2.0 * attempt)
    raise AssertionError("unreachable")


def run_training(
    config: TrainConfig,
    *,
    resolve_model: Callable[[str], str] = str,
    step_callback: StepCallback | None = None,
) -> TrainResult:
    """Train, then save the final model to `config.output_dir` (loadable by `cllm.models.loading.load_model`).

    `resolve_model` turns the model reference into a directory once the records have been read (an entry
    point passes the one that builds the built-in teacher). `step_callback(step, rank)` runs in every worker
    after each optimizer step (tests use it to crash one).
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    dataset = read_records(config)  # bad data fails before any model is built
    config = config.model_copy(update={"model": absolute_if_local(resolve_model(config.model))})
    causal_lm_config(config.model)  # a bad model fails here, not in every worker
    records = with_read_retries(dataset.count, f"counting the records of {config.data}")
    plan = plan_steps(records, config)
    if config.ordered_feed:
        dataset = with_read_retries(
            lambda: ordered_feed(dataset, records, config.seed, by_prompt=config.consistency == "progressive"),
            "ordering the records",
        )
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
        # One worker has no split to race for, and reads its blocks in file order.
        dataset_config=DataConfig(
            execution_options=ExecutionOptions(preserve_order=config.ordered_feed or config.num_workers == 1)
        ),
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
    """A ValueError in a worker (a malformed record) becomes a DataError here, not a worker trace."""
    for rank, failure in getattr(err, "worker_failures", {}).items():
        if isinstance(failure, ValueError):
            raise DataError(f"training worker {rank} rejected its input: {failure}") from None


def export_model(checkpoint: ray.train.Checkpoint, output_dir: Path) -> Path:
    with checkpoint.as_directory() as directory:
        source = Path(directory) / MODEL_DIR
        if not source.is_dir():
            raise RuntimeError(f"checkpoint {checkpoint.path} holds no {MODEL_DIR}/ folder")
        output_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, output_dir, dirs_exist_ok=True)
    return output_dir


