"""Models: turning a reference (a directory, a hub name, a GGUF file, `builtin`, `smollm2`) into a model.

    loading    load_model, prompt formatting and encoding, the model cache directory (CLLM_HOME)
    gguf       GGUF files, the `smollm2` and `smollm2-cllm` short names, shipping a LoRA adapter
    teacher    the built-in teacher: its recipe, its shipped weights, `resolve_model` for every reference
    tokenizer  the built-in task's tokenizer

What this layer may import: torch, transformers, PEFT, `gguf`, `cllm.config`, `cllm.errors`; the teacher's
recipe also trains through `cllm.train`. Never the serving layers. This file imports nothing.
"""
