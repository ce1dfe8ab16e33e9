"""What a training run needs, declared once: the pipeline's `train` section is `TrainOptions` itself.

Nothing here imports Ray or torch: `pipelines/train.py` reads its command line and checks its inputs with this
module alone, before the driver's imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from cllm.config import StageConfig, fill_unset
from cllm.errors import DataError
from cllm.models.loading import BUILTIN_MODEL, check_model_path, recipe_kind

# Consistency-training defaults per kind of model. The built-in 1.8M-parameter teacher needs a large lr
# and a heavier AR loss than the paper's w = 10, which cost it accuracy, and a third epoch on sampled
# trajectories (`cllm.data.collect_config.COLLECT_RECIPES`) adds tokens per pass (docs/results.md, "Consistency-
# training recipe"). Real models get the paper's.
RECIPES = {"builtin": {"lr": 1.5e-3, "ar_weight": 20.0, "epochs": 3},
           "model": {"lr": 2e-5, "ar_weight": 10.0, "epochs": 2}}
Recipe = Literal["builtin", "model"]


class TrainOptions(BaseModel):
    """The knobs of a run (not what it reads or writes); lr, ar_weight and epochs left unset take the model's
    recipe."""

    consistency: Literal["global", "local", "progressive"] = Field(
        "global", description="the consistency loss: global, local, or progressive (a prompt's consecutive blocks "
                              "packed in one sequence, one forward)")
    noise_low: float = Field(
        0.0, ge=0, le=1, description="progressive: the share of wrong tokens in the state the first block of a period "
                                     "trains on (easy)")
    noise_high: float = Field(
        1.0, ge=0, le=1, description="progressive: the share of wrong tokens for the last block of a period (hard)")
    noise_period: int = Field(
        4, ge=1, description="progressive: consecutive blocks over which that share goes linearly from noise_low to "
                             "noise_high, then again")
    ar_weight: float | None = Field(
        None, ge=0, description="w in loss = consistency + w * AR; None: the recipe's")
    ar_source: Literal["teacher", "labels"] = Field(
        "labels", description="AR targets: labels (the record's answer where it has one, else the teacher's output) "
                              "or teacher")
    mask_prompt: bool = Field(True, description="no AR loss on prompt tokens")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the AR loss")
    max_seq_len: int | None = Field(None, ge=1, description="longest training sequence; None: the model's context")

    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel model replicas)")
    cpus_per_worker: float = Field(
        0.5, gt=0, description="CPUs each worker reserves; below 1 leaves CPU for Ray Data on small machines")
    threads_per_worker: int | None = Field(
        None, ge=1, description="torch intra-op threads per worker; None: Ray's (the worker's CPUs)")
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="data parallelism: ddp or deepspeed")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage")
    bf16: bool = Field(False, description="train in bfloat16 (mixed precision); left unset: on with --use-gpu")

    batch_size: int = Field(16, ge=1, description="records per optimizer step, per worker")
    lr: float | None = Field(None, gt=0, description="peak learning rate; None: the recipe's")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of the steps spent warming the learning rate up")
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this; 0: no clipping")
    epochs: int | None = Field(None, ge=1, description="passes over the records; None: the recipe's")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps, instead of epochs; None: from epochs")
    shuffle_buffer: int = Field(
        256, ge=0, description="rows in Ray Data's local shuffle buffer; 0: file order (progressive: 0 unless set)")
    length_window: int = Field(
        0, ge=0, description="cut batches of similar length from this many records (less padding); 0: off")
    ordered_feed: bool = Field(
        True, description="the same records to the same worker in the same order every run (reproducible)")
    checkpoint_every: int = Field(100, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on disk")
    max_failures: int = Field(1, ge=-1, description="restarts from the last checkpoint after a failure; -1: no limit")
    log_every: int = Field(10, ge=1, description="optimizer steps between logged losses")

    lora_rank: int = Field(
        0, ge=0, description="train a LoRA adapter of this rank (PEFT), the base weights frozen; 0: full finetuning")
    lora_alpha: int = Field(16, ge=1, description="the adapter's output is scaled by lora_alpha / lora_rank")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    lora_target_modules: list[str] | None = Field(
        None, min_length=1, description="the modules that get an adapter; None: every linear layer but the output head")
    merge_lora: bool = Field(
        True, description="export the merged model (a plain HF directory); off: the adapter and its base's name")
    quantize: Literal["none", "4bit", "8bit"] = Field(
        "none", description="QLoRA: load the frozen base quantized by bitsandbytes (4bit: NF4, 8bit: int8; LoRA with "
                            "ddp only); the export merges the adapter into the base loaded unquantized")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, about a third more compute")


class TrainConfig(StageConfig, TrainOptions):
    """One run: the options plus what it starts from, reads and writes; the same config drives AR training."""

    model: str = Field(
        BUILTIN_MODEL,
        description="the model to start from: a Hugging Face directory or hub name, a GGUF file, or builtin (the "
                    "project's own teacher)")
    data: str = Field(description="the records: a Parquet file or a directory of them (collect's output)")
    output_dir: str = Field(description="where the trained model goes, as a standard Hugging Face directory")
    storage_path: str | None = Field(
        None, description="where Ray Train keeps checkpoints; None: ray_train beside output_dir")
    run_name: str = Field(
        "cllm-train", description="names the run in storage_path; the same storage_path and run_name resume it")
    ray_address: str | None = Field(
        None, description="the Ray cluster to use; None: RAY_ADDRESS or a running cluster; local: a new one")
    objective: Literal["consistency", "ar"] = Field(
        "consistency", description="consistency (a CLLM) or ar (plain next-token training)")
    recipe: Recipe | None = Field(
        None, description="whose defaults fill lr, ar_weight and epochs: builtin or model; None: from the model")
    use_gpu: bool = Field(False, description="one GPU per worker")
    seed: int = Field(0, description="seeds the order of the records, the states trained on, and torch")

    @model_validator(mode="after")
    def fill_defaults(self) -> TrainConfig:
        if self.storage_path is None:
            self.storage_path = str(Path(self.output_dir).resolve().parent / "ray_train")
        elif "://" not in self.storage_path:
            self.storage_path = str(Path(self.storage_path).resolve())
        if self.recipe is None:
            self.recipe = recipe_kind(self.model)
        fill_unset(self, RECIPES[self.recipe])
        if "bf16" not in self.model_fields_set:
            self.bf16 = self.use_gpu
        if self.quantize != "none" and (self.lora_rank == 0 or self.strategy != "ddp"):
            raise ValueError("quantize trains a LoRA adapter on a quantized base: it needs lora_rank > 0 and "
                             "strategy ddp (DeepSpeed cannot shard bitsandbytes weights)")
        if self.consistency == "progressive" and "shuffle_buffer" not in self.model_fields_set:
            self.shuffle_buffer = 0  # the feed shuffles whole prompts; a row shuffle would split their blocks
        return self

    @property
    def weights_dtype(self) -> str:
        """The dtype the model is loaded (and exported) in: bf16 where nothing steps the weights in fp32.

        DeepSpeed with bf16 keeps its own fp32 master copy of what trains (and would cast an fp32 model
        down anyway); LoRA never steps the base weights, and PEFT keeps the adapter in fp32. DDP full
        finetuning steps the weights themselves, so under bf16 autocast they stay fp32. Halving the
        loaded weights is what lets a 7B base fit on a 24 GB GPU for LoRA at all.
        """
        return "bfloat16" if self.bf16 and (self.strategy == "deepspeed" or self.lora_rank > 0) else "float32"


def check_inputs(config: TrainConfig) -> None:
    """Refuse local records or a local model that do not exist; needs no Ray, so an entry point checks before
    it starts a cluster."""
    if "://" not in config.data and not Path(config.data).exists():
        raise DataError(f"training data not found: {config.data} (--data takes a Parquet file or a directory of them)")
    check_model_path(config.model)


@dataclass
class StepPlan:
    """How many optimizer steps the run takes; identical on every worker (equal data shards)."""

    records: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int


def plan_steps(records: int, config: TrainConfig) -> StepPlan:
    """Ray Train splits the data equally, so every worker sees records // num_workers rows per epoch."""
    per_worker = records // config.num_workers
    if per_worker == 0:
        raise DataError(f"{records} records cannot feed {config.num_workers} workers: collect more or lower "
                        "--num-workers")
    steps_per_epoch = math.ceil(per_worker / config.batch_size)
    total = config.max_steps or config.epochs * steps_per_epoch
    return StepPlan(
        records=records,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=math.ceil(total / steps_per_epoch),
        warmup_steps=math.ceil(config.warmup_ratio * total),
    )
