"""What a worker does to the model before an engine wraps it (gradient checkpointing, a LoRA adapter through
PEFT), and how the model is written into a checkpoint.

    full finetuning  every checkpoint holds `model/`, the HF model (resume loads it)
    LoRA             every checkpoint holds `adapter/`, the PEFT adapter (resume puts it back on the base);
                     the final one also `model/`: the merged HF model, or with `merge_lora` off the adapter,
                     whose adapter_config.json names the base model to load it onto
    QLoRA            LoRA on a base quantized by bitsandbytes (`quantize`); the merged model is the adapter
                     folded into the base loaded again unquantized: merging into quantized weights would
                     round the adapter away, and a standard HF directory holds plain weights
"""

from __future__ import annotations

from pathlib import Path

from cllm.train.config import TrainConfig, TrainOptions

MODEL_DIR = "model"  # HF model folder inside a checkpoint
ADAPTER_DIR = "adapter"  # PEFT adapter folder inside a LoRA run's checkpoint
ALL_LINEAR = "all-linear"  # PEFT: every Linear/Conv1D layer except the output head


def lora_config(options: TrainOptions):
    """Unnamed target modules mean every linear layer of attention and MLP: consistency training changes
    what the model predicts at every position, and adapting q/v only (PEFT's per-model default) learns less."""
    from peft import LoraConfig

    return LoraConfig(
        r=options.lora_rank,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=options.lora_target_modules or ALL_LINEAR,
        task_type="CAUSAL_LM",
    )


def base_reference(model: str) -> str:
    """How the adapter names its base: an absolute path for a local directory (the export may be read from
    another working directory), the hub name otherwise."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def is_lora(model) -> bool:
    return hasattr(model, "peft_config")  # a PeftModel, without importing peft for full finetuning


def base_model(model):
    """The transformers model under a PEFT wrapper (itself without one)."""
    return model.get_base_model() if is_lora(model) else model


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing: DDP sees each parameter's gradient once, and frozen inputs need no grad.
    The embedding output is still marked as needing a gradient, so that LoRA layers inside a checkpointed
    block get theirs whatever checkpoint flavour transformers picks."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def add_lora(model, options: TrainOptions, base: str, adapter_dir: Path | None = None):
    """Wrap the model in a trainable PEFT adapter: a fresh one, or the one saved in `adapter_dir` (resume)."""
    from peft import PeftModel, get_peft_model

    if adapter_dir is not None:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    else:
        peft_model = get_peft_model(model, lora_config(options))
    peft_model.peft_config["default"].base_model_name_or_path = base_reference(base)
    return peft_model


def prepare_model(model, config: TrainConfig, checkpoint_dir: Path | None = None):
    """The model as the engine should train it. `checkpoint_dir` is a DDP checkpoint to take the adapter
    from (DeepSpeed restores the adapter weights itself, from its own shards)."""
    if config.quantize != "none":
        from peft import prepare_model_for_kbit_training

        # freezes the base and keeps the layers bitsandbytes leaves unquantized (norms, embeddings) in fp32
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if config.lora_rank == 0:
        return model
    adapter_dir = checkpoint_dir / ADAPTER_DIR if checkpoint_dir is not None else None
    return add_lora(model, config, config.model, adapter_dir)


def write_hf_dir(model, directory: Path, tokenizer) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def save_model_files(model, directory: Path, tokenizer, config: TrainConfig, export: bool) -> None:
    """Write the model part of a checkpoint (see the module docstring for the layout)."""
    if not is_lora(model):
        write_hf_dir(model, directory / MODEL_DIR, tokenizer)
        return
    write_hf_dir(model, directory / ADAPTER_DIR, tokenizer)  # a PeftModel saves only its adapter
    if not export:
        return
    if config.quantize != "none" and config.merge_lora:
        model = unquantized_with_adapter(config, directory / ADAPTER_DIR)
    export_lora(model, directory / MODEL_DIR, tokenizer, config.merge_lora)


def unquantized_with_adapter(config: TrainConfig, adapter_dir: Path):
    """The base loaded again in plain weights (`weights_dtype`, on the CPU) with the trained adapter on it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(config.model, dtype=getattr(torch, config.weights_dtype))
    return PeftModel.from_pretrained(base, str(adapter_dir))


def export_lora(model, directory: Path, tokenizer, merge: bool) -> None:
    """The final model. Merging folds the adapter into the base weights in place, so it is the last thing
    done to the model: what is left is a plain transformers model that needs no PEFT to load."""
    if merge:
        write_hf_dir(model.merge_and_unload(), directory, tokenizer)
    else:
        write_hf_dir(model, directory, tokenizer)
