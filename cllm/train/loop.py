"""One Ray Train worker: model, engine, batches, loss, optimizer step, checkpoint reports."""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cllm.decoding.core import special_tokens
from cllm.models.loading import context_length, load_model
from cllm.train.batches import collate_ar, collate_consistency, collate_progressive, record_length
from cllm.train.config import StepPlan, TrainConfig
from cllm.train.engines import make_engine
from cllm.train.lora import MODEL_DIR, prepare_model
from cllm.train.losses import LossParts, ar_objective, cllm_loss

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (step just taken, worker rank); tests inject failures with it


def record_batches(shard, config: TrainConfig, plan: StepPlan, start_step: int):
    """Yield (epoch, list of record dicts, trained) from the epoch a run resumes in; `trained`: a batch it
    trained on before its checkpoint (the caller only draws its trajectory states again, so the batches
    after it draw the states they would have drawn in a run never stopped)."""
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
            yield epoch, records, index < skip


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
    elif config.consistency == "progressive":  # the state is scheduled, not drawn: no rng
        batch = collate_progressive(
            records,
            pad_token_id=tokens["pad"],
            eos_token_ids=tokens["eos"],
            ar_source=config.ar_source,
            noise_levels=(config.noise_low, config.noise_high),
            noise_period=config.noise_period,
            mask_prompt=config.mask_prompt,
            max_len=tokens["max_len"],
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


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker: model, engine, batches, loss, step, checkpoint."""
    config = TrainConfig.model_validate(loop_config["config"])
    plan = StepPlan(**loop_config["plan"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(config.seed)
    if config.threads_per_worker:
        torch.set_num_threads(config.threads_per_worker)
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext() as directory:
        checkpoint_dir = Path(directory) if directory else None
        resume_ddp = checkpoint_dir is not None and config.strategy == "ddp"
        # a LoRA run's checkpoint holds only the adapter: it goes back onto the base model
        resume_full = resume_ddp and config.lora_rank == 0
        source = str(checkpoint_dir / MODEL_DIR) if resume_full else config.model
        loaded = load_model(source, device=str(device), dtype=config.weights_dtype, quantize=config.quantize)
        loaded.model.train()
        model = prepare_model(loaded.model, config, checkpoint_dir if resume_ddp else None)
        engine = make_engine(model, config, plan, checkpoint_dir)
    special = special_tokens(loaded.tokenizer, loaded.model.generation_config)
    tokens = {"pad": special.pad_id, "eos": list(special.eos_ids),
              "max_len": config.max_seq_len or context_length(loaded.model)}
    step_callback: StepCallback | None = loop_config["step_callback"]
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
    for epoch, records, trained in record_batches(shard, config, plan, start_step):
        if engine.step >= plan.total_steps:
            break
        if epoch not in state_picks:
            state_picks[epoch] = random.Random(f"{config.seed}-{rank}-{epoch}")
        if trained:  # before the checkpoint: its draws only, so the next batch's are those of a run never stopped
            make_batch(records, config, tokens, state_picks[epoch], "cpu")
            continue
        batch = make_batch(records, config, tokens, state_picks[epoch], device)
        with engine.autocast():
            parts = compute_loss(engine.model, batch, config)
        engine.backward_and_step(parts.total)
        engine.step += 1
        meter.add(parts, batch)
        if step_callback is not None:
            step_callback(engine.step, rank)
        if rank == 0 and engine.step % config.log_every == 0:
            now = time.perf_counter()
            log.info("step %d/%d loss %.4f consistency %.4f ar %.4f (%.2f s/step)", engine.step, plan.total_steps,
                     parts.total.item(), parts.consistency.item(), parts.ar.item(), (now - last_log) / config.log_every)
            last_log = now
        if engine.step % config.checkpoint_every == 0 and engine.step < plan.total_steps:
            report(engine, loaded.tokenizer, rank, metrics(), export=False)
    report(engine, loaded.tokenizer, rank, metrics(), export=True)
