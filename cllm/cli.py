"""`cllm` command line: `cllm bench` compares decoding methods side by side on one or more models."""

from __future__ import annotations

import sys
from typing import Literal

import torch
from pydantic import Field

from cllm.config import StageConfig, load_config
from cllm.evaluate import METHODS, evaluate_model, markdown_table, write_report
from cllm.models import BUILTIN_MODEL, load_model
from cllm.tasks import load_task

Method = Literal["hf_greedy", "ar", "jacobi", "jacobi_ngram", "hf_prompt_lookup"]


class BenchConfig(StageConfig):
    """Decode held-out prompts with every method on every model, in one run."""

    models: list[str] = Field(default_factory=lambda: [BUILTIN_MODEL], min_length=1)
    dataset: str = "builtin:arith"
    split: str = "test"
    limit: int = Field(50, ge=1)
    block_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    methods: list[Method] = Field(default_factory=lambda: list(METHODS), min_length=1)
    chat: bool = False
    threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU")
    output_dir: str | None = None


def bench(config: BenchConfig) -> list:
    if config.threads:
        torch.set_num_threads(config.threads)
    task = load_task(config.dataset, split=config.split, limit=config.limit)
    answers = task.answers if task.has_answers else None
    results = []
    for name in config.models:
        loaded = load_model(name)
        results += evaluate_model(
            loaded, task.prompts, answers, label=name, methods=tuple(config.methods), block_size=config.block_size,
            max_new_tokens=config.max_new_tokens, chat=config.chat,
            accuracy_fn=(lambda texts, refs: task.accuracy(texts)) if answers else None,
        )
    print(markdown_table(results))
    if config.output_dir:
        write_report(results, config.output_dir, settings=config.model_dump())
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in {"bench"}:
        print("usage: cllm bench [--config FILE] [--models A --models B] [--dataset SPEC] [--limit N] ...")
        raise SystemExit(2)
    bench(load_config(BenchConfig, argv[1:]))


if __name__ == "__main__":
    main()
