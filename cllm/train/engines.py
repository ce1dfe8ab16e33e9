"""The two ways a worker steps the model, each with its own checkpoint format.

    DDP        torch DDP (gloo on CPU, NCCL on GPU), AdamW, cosine schedule; rank 0 saves the HF model
               (every checkpoint loads with `from_pretrained`), or a LoRA run's adapter, and the optimizer state
    DeepSpeed  ZeRO-0..3 with torch's AdamW; every rank saves its shards, the final checkpoint also the
               consolidated HF model (merged, or the adapter, for a LoRA run)

Both optimize only the parameters that require a gradient: all of them, or a LoRA adapter's.
"""

from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import ray.train.torch
import torch
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

from cllm.train.config import StepPlan, TrainConfig
from cllm.train.lora import MODEL_DIR, add_lora, base_model, export_lora, is_lora, save_model_files, write_hf_dir

DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"


class DDPEngine:
    """torch DDP (gloo on CPU, NCCL on GPU) + AdamW + cosine schedule; bf16 through autocast."""

    def __init__(self, model, config: TrainConfig, plan: StepPlan, checkpoint_dir: Path | None):
        self.config = config
        self.model = ray.train.torch.prepare_model(model)
        self.optimizer = torch.optim.AdamW(trainable(model), lr=config.lr, weight_decay=config.weight_decay)
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
        """Rank 0 writes the HF model (every checkpoint is loadable), or the adapter, and the optimizer state."""
        if rank != 0:
            return
        save_model_files(self.module, directory, tokenizer, self.config, export)
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

        self.config, self.hf_config, self.lora = config, base_model(model).config, is_lora(model)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=trainable(model),
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
            model = AutoModelForCausalLM.from_config(self.hf_config, dtype=getattr(torch, self.config.weights_dtype))
            if self.lora:  # the consolidated state dict is the PEFT model's: base and adapter weights
                model = add_lora(model, self.config, self.config.model)
            model.load_state_dict(torch.load(weights_dir / "pytorch_model.bin", weights_only=True))
            if self.lora:
                export_lora(model, directory / MODEL_DIR, tokenizer, self.config.merge_lora)
            else:
                write_hf_dir(model, directory / MODEL_DIR, tokenizer)
        shutil.rmtree(weights_dir, ignore_errors=True)


def trainable(model) -> list[torch.nn.Parameter]:
    """What the optimizer steps: under LoRA only the adapter, so its state matches the adapter's on resume."""
    return [p for p in model.parameters() if p.requires_grad]


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


def make_engine(model, config: TrainConfig, plan: StepPlan, checkpoint_dir: Path | None):
    engine_cls = DeepSpeedEngine if config.strategy == "deepspeed" else DDPEngine
    return engine_cls(model, config, plan, checkpoint_dir)
