"""What a training run needs, declared once: the pipeline's `train` section is `TrainOptions` itself."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from cllm.config import StageConfig, fill_unset
from cllm.models import BUILTIN_MODEL, recipe_kind

# Consistency-training defaults per kind of model. The built-in 1.8M-parameter teacher needs a large
# lr, and at the paper's w = 10 it lost 8 points of accuracy (81% vs 89%, TPF 2.82); w = 20 over two
# epochs of 1500 prompts gave TPF 3.06 at 90%, and a third epoch (on trajectories sampled at T 0.7,
# `cllm.collect.COLLECT_RECIPES`) multi-block TPF 5.73 vs 5.14 at 99.3% (measured, docs/results.md).
# Real models get the paper's.
RECIPES = {"builtin": {"lr": 1.5e-3, "ar_weight": 20.0, "epochs": 3},
           "model": {"lr": 2e-5, "ar_weight": 10.0, "epochs": 2}}
Recipe = Literal["builtin", "model"]


class TrainOptions(BaseModel):
    """The knobs of a run (not what it reads or writes); lr, ar_weight and epochs left unset take the model's
    recipe."""

    # progressive: a prompt's consecutive blocks packed in one sequence, one forward (cllm.data.collate_progressive)
    consistency: Literal["global", "local", "progressive"] = "global"
    # progressive only: block b trains on the state whose fraction of wrong tokens is closest to a level that
    # goes linearly from noise_low (easy) to noise_high (hard) over noise_period consecutive blocks, then again
    noise_low: float = Field(0.0, ge=0, le=1)
    noise_high: float = Field(1.0, ge=0, le=1)
    noise_period: int = Field(4, ge=1)
    ar_weight: float | None = Field(None, ge=0)  # w in L = L_consistency + w * L_AR
    ar_source: Literal["teacher", "labels"] = "labels"  # ground truth where a record has it, else teacher
    mask_prompt: bool = True  # no AR loss on prompt tokens
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    max_seq_len: int | None = Field(None, ge=1)  # default: the model's context length

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)  # < 1 leaves CPU for Ray Data on small machines
    threads_per_worker: int | None = Field(None, ge=1)  # torch intra-op threads; None: Ray's (the worker's CPUs)
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = Field(2, ge=0, le=3)
    bf16: bool = False  # left unset: on with GPUs

    batch_size: int = Field(16, ge=1)  # per worker
    lr: float | None = Field(None, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    epochs: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs
    shuffle_buffer: int = Field(256, ge=0)  # Ray Data local shuffle; 0 keeps file order
    length_window: int = Field(0, ge=0)  # batches of similar length cut from this many (less padding); 0: off
    ordered_feed: bool = True  # same records to the same worker in the same order every run (reproducible)
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=-1)
    log_every: int = Field(10, ge=1)

    # LoRA through PEFT (cllm/train/lora.py): only the adapter trains, the base weights stay frozen
    lora_rank: int = Field(0, ge=0)  # 0: full finetuning
    lora_alpha: int = Field(16, ge=1)  # the adapter's output is scaled by lora_alpha / lora_rank
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[str] | None = Field(None, min_length=1)  # None: every linear layer but the output head
    merge_lora: bool = True  # export the merged model (a plain HF dir); False: the adapter and its base's name
    # QLoRA: the frozen base loads quantized by bitsandbytes (NF4, double quantization, or int8); LoRA only,
    # DDP only. The export merges the adapter into the base loaded again unquantized, in `weights_dtype`.
    quantize: Literal["none", "4bit", "8bit"] = "none"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~1/3 more compute


class TrainConfig(StageConfig, TrainOptions):
    """One run: the options plus what it starts from, reads and writes; the same config drives AR training."""

    model: str = BUILTIN_MODEL  # HF dir or name to start from ("builtin": resolved by the entry point)
    data: str  # Parquet file or directory of records
    output_dir: str  # the trained model, as a standard HF directory
    storage_path: str | None = None  # Ray Train checkpoints; default <output_dir>/../ray_train
    run_name: str = "cllm-train"  # same storage_path + run_name => resume
    ray_address: str | None = None  # CLI only: None joins RAY_ADDRESS / a running cluster, "local" starts one
    objective: Literal["consistency", "ar"] = "consistency"  # "ar": plain next-token training
    recipe: Recipe | None = None  # which RECIPES entry fills lr/ar_weight/epochs; None: from the model
    use_gpu: bool = False
    seed: int = 0

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
