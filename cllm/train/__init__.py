"""Consistency (and plain AR) training on Ray Train.

    config   TrainOptions (the knobs, shared with the pipeline), TrainConfig, RECIPES, the step plan
    driver   read the records, run a TorchTrainer, export the final model         (runs in the driver)
    loop     one worker: batches, loss, optimizer step, checkpoint reports       (runs in each worker)
    engines  DDP and DeepSpeed ZeRO, each with its checkpoint format
    lora     gradient checkpointing, LoRA adapters (PEFT), the model part of a checkpoint
    feed     the reproducible order in which records reach the workers

This file imports nothing, so a Ray Data task that needs only `feed` does not import torch.
"""
