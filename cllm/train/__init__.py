"""Consistency (and plain AR) training on Ray Train.

    config   TrainOptions (the knobs, shared with the pipeline), TrainConfig, RECIPES, the step plan
    driver   read the records, run a TorchTrainer, export the final model         (runs in the driver)
    loop     one worker: batches, loss, optimizer step, checkpoint reports       (runs in each worker)
    engines  DDP and DeepSpeed ZeRO, each with its checkpoint format
    lora     gradient checkpointing, LoRA adapters (PEFT), the model part of a checkpoint
    feed     the reproducible order in which records reach the workers
    losses   the consistency and AR losses (global, progressive), on packed rows
    batches  trajectory and AR records into padded or packed tensors

What this layer may import: torch, Ray Train and Ray Data, DeepSpeed, PEFT, `cllm.models.loading`,
`cllm.decoding.core` (special tokens), `cllm.config`, `cllm.errors`; it reads the data layer's Parquet
rows, not its modules, and never imports serving or evaluation.
This file imports nothing, so a Ray Data task that needs only `feed` does not import torch.
"""
