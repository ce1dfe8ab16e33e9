"""Consistency training (and plain AR training) on Ray Train: the thin Ray adapter around `cllm.losses`.

Driver: read the records with Ray Data, plan the steps, run a `TorchTrainer`, copy the final model
out of the last checkpoint into `output_dir`. Workers: load the model, wrap it in DDP (gloo on CPU) or
a DeepSpeed ZeRO engine, loop over padded batches of their data shard, checkpoint every N steps.
Rerunning with the same `storage_path` + `run_name` resumes from the latest checkpoint; a failed
worker is retried from it (`max_failures`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from transformers import AutoConfig, AutoModelForCausalLM, get_cosine_schedule_with_warmup

from cllm.config import StageConfig
from cllm.data import check_columns, collate_ar, collate_consistency, record_length
from cllm.feed import ordered_feed
from cllm.losses import LossParts, ar_objective, cllm_loss
from cllm.models import ModelLoadError, context_length, load_model, resolve_model_path

log = logging.getLogger(__name__)

# Test hook: rank 0 raises once when it reaches this step (the retry must resume from a checkpoint).
FAIL_ONCE_ENV = "CLLM_TRAIN_FAIL_ONCE_AT_STEP"
MODEL_DIR = "model"  # HF model folder inside a checkpoint
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"


class TrainConfig(StageConfig):
    """Everything a training run needs; the same config drives consistency and AR (teacher) training."""

    model: str = "builtin"  # HF dir or name to start from
    data: str  # Parquet file or directory of records
    output_dir: str  # the trained model, as a standard HF directory
    storage_path: str | None = None  # Ray Train checkpoints; default <output_dir>/../ray_train
    run_name: str = "cllm-train"  # same storage_path + run_name => resume
    ray_address: str | None = None  # CLI only: None joins RAY_ADDRESS / a running cluster, "local" starts one

    objective: Literal["consistency", "ar"] = "consistency"  # "ar": plain next-token training
    consistency: Literal["global", "local"] = "global"
    ar_weight: float = Field(10.0, ge=0)  # w in L = L_consistency + w * L_AR
    ar_source: Literal["teacher", "labels"] = "teacher"  # labels: ground truth where a record has it
    mask_prompt: bool = True  # no AR loss on prompt tokens
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    max_seq_len: int | None = Field(None, ge=1)  # default: the model's context length

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)  # < 1 leaves CPU for Ray Data on small machines
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = Field(2, ge=0, le=3)
    bf16: bool = False

    batch_size: int = Field(8, ge=1)  # per worker
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs
    shuffle_buffer: int = Field(256, ge=0)  # Ray Data local shuffle; 0 keeps file order
    length_window: int = Field(0, ge=0)  # batches of similar length cut from this many (less padding); 0: off
    ordered_feed: bool = True  # same records to the same worker in the same order every run (reproducible)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=-1)
    log_every: int = Field(10, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def default_storage_path(self) -> TrainConfig:
        if self.storage_path is None:
            self.storage_path = str(Path(self.output_dir).resolve().parent / "ray_train")
        elif "://" not in self.storage_path:
            self.storage_path = str(Path(self.storage_path).resolve())
        return self


@dataclass
class StepPlan:
    """How many optimizer steps the run takes; identical on every worker (equal data shards)."""

    records: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int


@dataclass
class TrainResult:
    model_dir: Path
    metrics: dict
    checkpoint_path: str | None


# ----- driver -----


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


def check_model(model_path: str) -> str:
    """Fail in the driver, not in every worker, when the model cannot be loaded."""
    try:
        AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load a model config from {model_path!r}: {err}") from err
    return model_path


def plan_steps(records: int, config: TrainConfig) -> StepPlan:
    """Ray Train splits the data equally, so every worker sees records // num_workers rows per epoch."""
    per_worker = records // config.num_workers
    if per_worker == 0:
        raise ValueError(f"{records} records cannot feed {config.num_workers} workers")
    steps_per_epoch = math.ceil(per_worker / config.batch_size)
    total = config.max_steps or config.epochs * steps_per_epoch
    return StepPlan(
        records=records,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=math.ceil(total / steps_per_epoch),
        warmup_steps=math.ceil(config.warmup_ratio * total),
    )


def run_training(config: TrainConfig) -> TrainResult:
    """Train, then save the final model to `config.output_dir` (loadable by `cllm.models.load_model`)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    dataset = read_records(config)  # bad data fails before any model is built
    model_path = check_model(resolve_model_path(config.model))  # builds the built-in teacher once, here
    records = dataset.count()
    plan = plan_steps(records, config)
    if config.ordered_feed:
        dataset = ordered_feed(dataset, records, config.seed)
    fail_marker = Path(tempfile.gettempdir()) / f"cllm-injected-failure-{uuid.uuid4().hex}"
    loop_config = {
        "config": config.model_dump(),
        "model_path": model_path,
        "plan": asdict(plan),
        "fail_once_at_step": int(os.environ[FAIL_ONCE_ENV]) if os.environ.get(FAIL_ONCE_ENV) else None,
        "fail_marker": str(fail_marker),
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
    finally:
        fail_marker.unlink(missing_ok=True)
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


# ----- worker: model engines -----


class DDPEngine:
    """torch DDP (gloo on CPU, NCCL on GPU) + AdamW + cosine schedule; bf16 through autocast."""

    def __init__(self, model, config: TrainConfig, plan: StepPlan, checkpoint_dir: Path | None):
        self.config = config
        self.model = ray.train.torch.prepare_model(model)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, plan.warmup_steps, plan.total_steps)
        self.step = 0
        if checkpoint_dir is not None:
            state = torch.load(checkpoint_dir / "trainer_state.pt", weights_only=False)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            apply_schedule(self.scheduler)
            self.step = state["step"]

    @property
    def module(self):
        return self.model.module if hasattr(self.model, "module") else self.model

    def autocast(self):
        device = next(self.module.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.config.bf16)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path, tokenizer, rank: int, export: bool) -> None:
        """Rank 0 writes the HF model (every checkpoint is loadable) and the optimizer state."""
        if rank != 0:
            return
        self.module.save_pretrained(directory / MODEL_DIR)
        tokenizer.save_pretrained(directory / MODEL_DIR)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
            },
            directory / "trainer_state.pt",
        )


class DeepSpeedEngine:
    """DeepSpeed ZeRO-0..3 with torch's AdamW (no compiled optimizer); runs on CPU under Ray's launcher."""

    def __init__(self, model, config: TrainConfig, plan: StepPlan, checkpoint_dir: Path | None):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "cllm" / "torch_extensions"))
        import deepspeed

        self.config, self.hf_config = config, model.config
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(config),
            lr_scheduler=lambda opt: get_cosine_schedule_with_warmup(opt, plan.warmup_steps, plan.total_steps),
        )
        self.step = 0
        if checkpoint_dir is not None:
            _, client_state = self.model.load_checkpoint(str(checkpoint_dir / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
            self.step = client_state["step"]
            apply_schedule(self.scheduler)

    def autocast(self):
        return nullcontext()  # DeepSpeed casts the model itself

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)
        self.model.step()  # clips, steps the optimizer and the scheduler, zeroes the grads

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path, tokenizer, rank: int, export: bool) -> None:
        """Every rank writes its ZeRO shards; on export rank 0 also writes the consolidated HF model."""
        self.model.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, client_state={"step": self.step})
        if not export:
            return
        weights_dir = directory / "consolidated"
        self.model.save_16bit_model(str(weights_dir))  # collective for ZeRO-3
        if rank == 0:
            model = AutoModelForCausalLM.from_config(self.hf_config)
            model.load_state_dict(torch.load(weights_dir / "pytorch_model.bin", weights_only=True))
            model.save_pretrained(directory / MODEL_DIR)
            tokenizer.save_pretrained(directory / MODEL_DIR)
        shutil.rmtree(weights_dir, ignore_errors=True)


def apply_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """After a restore, take the next lr from this run's schedule: the restored optimizer holds the lr
    of the previous run's schedule, which ends at 0 when that run finished (max_steps raised on rerun)."""
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def deepspeed_config(config: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": config.grad_clip,
        "bf16": {"enabled": config.bf16},
        "zero_optimization": {
            "stage": config.zero_stage,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": config.lr, "weight_decay": config.weight_decay, "torch_adam": True},
        },
        "steps_per_print": 10**9,
    }


# ----- worker: data and loop -----


def record_batches(shard, config: TrainConfig, plan: StepPlan, start_step: int):
    """Yield (epoch, list of record dicts), skipping the batches a resumed run has already trained on."""
    first_epoch = start_step // plan.steps_per_epoch
    window = config.batch_size * max(1, config.length_window)
    for epoch in range(first_epoch, plan.epochs):
        skip = start_step - epoch * plan.steps_per_epoch if epoch == first_epoch else 0
        tables = shard.iter_batches(
            batch_size=window,
            batch_format="pyarrow",
            local_shuffle_buffer_size=config.shuffle_buffer or None,
            local_shuffle_seed=config.seed + epoch if config.shuffle_buffer else None,
        )
        rng = random.Random(f"{config.seed}-{epoch}") if config.length_window else None
        batches = (batch for table in tables for batch in split_batches(table.to_pylist(), config.batch_size, rng))
        for index, records in enumerate(batches):
            if index >= skip:
                yield epoch, records


def split_batches(rows: list[dict], batch_size: int, rng: random.Random | None) -> list[list[dict]]:
    """Cut a window of rows into batches; with an rng, of rows of similar length, in random order.

    A batch pads to its longest row; grouping rows by length within a window of batches (as
    `group_by_length` does in transformers) cuts the padded tokens without a global sort by length.
    """
    if rng is not None:
        rows = sorted(rows, key=record_length)
    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def make_batch(records, config: TrainConfig, tokens: dict, rng: random.Random, device) -> dict:
    if config.objective == "ar":
        batch = collate_ar(
            records, pad_token_id=tokens["pad"], mask_prompt=config.mask_prompt, max_len=tokens["max_len"]
        )
    else:
        batch = collate_consistency(
            records,
            rng=rng,
            pad_token_id=tokens["pad"],
            eos_token_ids=tokens["eos"],
            consistency=config.consistency,
            ar_source=config.ar_source,
            mask_prompt=config.mask_prompt,
            max_len=tokens["max_len"],
        )
    return {key: value.to(device) for key, value in batch.items()}


def compute_loss(model, batch: dict, config: TrainConfig) -> LossParts:
    if config.objective == "ar":
        return ar_objective(model, batch, label_smoothing=config.label_smoothing)
    return cllm_loss(
        model,
        batch,
        consistency=config.consistency,
        ar_weight=config.ar_weight,
        label_smoothing=config.label_smoothing,
    )


def special_tokens(loaded, config: TrainConfig) -> dict:
    """Pad id, EOS ids (generation config first, tokenizer second) and the longest sequence to train on."""
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return {
        "pad": loaded.tokenizer.pad_token_id,
        "eos": eos,
        "max_len": config.max_seq_len or context_length(loaded.model),
    }


class LossMeter:
    """Running means of the loss terms since the last report, averaged over all workers.

    It also counts batch positions against real tokens: `padded_per_real` is the compute a step
    spends per token it learns from (1.0: no padding).
    """

    def __init__(self, device: torch.device):
        self.device = device  # NCCL reduces only GPU tensors
        self.sums = torch.zeros(6, dtype=torch.float64)  # total, consistency, ar, steps, positions, real tokens

    def add(self, parts: LossParts, batch: dict) -> None:
        masks = [mask for key, mask in batch.items() if key.endswith("attention_mask")]
        values = [
            parts.total.detach().float().item(),
            parts.consistency.float().item(),
            parts.ar.float().item(),
            1.0,
            float(sum(mask.numel() for mask in masks)),
            float(sum(mask.sum().item() for mask in masks)),
        ]
        self.sums += torch.tensor(values, dtype=torch.float64)

    def pop(self) -> dict:
        sums, self.sums = self.sums.to(self.device), torch.zeros_like(self.sums)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        sums = sums.cpu().tolist()
        steps, positions, real = sums[3], sums[4], sums[5]
        names = ("loss", "consistency_loss", "ar_loss")
        means = {name: sums[i] / steps if steps else float("nan") for i, name in enumerate(names)}
        return means | {"padded_per_real": positions / real if real else float("nan")}


def report(engine, tokenizer, rank: int, metrics: dict, export: bool) -> None:
    """Save a checkpoint on every rank into its own folder; Ray Train merges them into one."""
    with tempfile.TemporaryDirectory() as directory:
        engine.save(Path(directory), tokenizer, rank, export)
        has_files = any(Path(directory).iterdir())
        checkpoint = ray.train.Checkpoint.from_directory(directory) if has_files else None
        ray.train.report(metrics, checkpoint=checkpoint)


def maybe_fail(step: int, rank: int, loop_config: dict) -> None:
    """The FAIL_ONCE_ENV test hook: one real worker crash, on the first attempt only."""
    marker = Path(loop_config["fail_marker"])
    if rank == 0 and step == loop_config["fail_once_at_step"] and not marker.exists():
        marker.touch()
        raise RuntimeError(f"{FAIL_ONCE_ENV}: injected worker failure at step {step}")


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker: model, engine, batches, loss, step, checkpoint."""
    config = TrainConfig.model_validate(loop_config["config"])
    plan = StepPlan(**loop_config["plan"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(config.seed)
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext() as directory:
        checkpoint_dir = Path(directory) if directory else None
        resume_ddp = checkpoint_dir is not None and config.strategy == "ddp"
        source = str(checkpoint_dir / MODEL_DIR) if resume_ddp else loop_config["model_path"]
        loaded = load_model(source, device=str(device), dtype="float32")
        loaded.model.train()
        engine_cls = DeepSpeedEngine if config.strategy == "deepspeed" else DDPEngine
        engine = engine_cls(loaded.model, config, plan, checkpoint_dir)
    tokens = special_tokens(loaded, config)
    start_step = engine.step
    meter, started, epoch = LossMeter(device), time.perf_counter(), start_step // plan.steps_per_epoch
    last_log = started

    def metrics() -> dict:
        return meter.pop() | {
            "step": engine.step,
            "start_step": start_step,
            "epoch": epoch,
            "lr": engine.lr(),
            "seconds": time.perf_counter() - started,
        }

    shard = ray.train.get_dataset_shard("train")
    state_picks = {}  # epoch -> random.Random: reproducible, different across workers and epochs
    for epoch, records in record_batches(shard, config, plan, start_step):
        if engine.step >= plan.total_steps:
            break
        if epoch not in state_picks:
            state_picks[epoch] = random.Random(f"{config.seed}-{rank}-{epoch}")
        batch = make_batch(records, config, tokens, state_picks[epoch], device)
        with engine.autocast():
            parts = compute_loss(engine.model, batch, config)
        engine.backward_and_step(parts.total)
        engine.step += 1
        meter.add(parts, batch)
        maybe_fail(engine.step, rank, loop_config)
        if rank == 0 and engine.step % config.log_every == 0:
            now = time.perf_counter()
            log.info("step %d/%d loss %.4f consistency %.4f ar %.4f (%.2f s/step)", engine.step, plan.total_steps,
                     parts.total.item(), parts.consistency.item(), parts.ar.item(), (now - last_log) / config.log_every)
            last_log = now
        if engine.step % config.checkpoint_every == 0 and engine.step < plan.total_steps:
            report(engine, loaded.tokenizer, rank, metrics(), export=False)
    report(engine, loaded.tokenizer, rank, metrics(), export=True)
