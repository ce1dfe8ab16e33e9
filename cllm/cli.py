"""`cllm` command line: `cllm bench` compares decoding methods side by side on one or more models."""

from __future__ import annotations

import sys

import torch
from pydantic import Field

from cllm.config import StageConfig, load_config
from cllm.decoding import DecodeFields
from cllm.evaluate import (
    EvalOptions,
    data_summary,
    evaluate_models,
    evaluation_stages,
    markdown_table,
    reference_table,
    write_report,
)
from cllm.models import BUILTIN_MODEL
from cllm.tasks import DataFields
from cllm.teacher import resolve_model


class BenchConfig(StageConfig, DataFields, DecodeFields, EvalOptions):
    """Decode held-out prompts with every method on every model, in one run."""

    models: list[str] = Field(default_factory=lambda: [BUILTIN_MODEL], min_length=1)
    seed: int = 0
    device: str | None = None  # default: cuda when available
    threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU")
    output_dir: str | None = None


def bench(config: BenchConfig) -> list:
    if config.threads:
        torch.set_num_threads(config.threads)
    task = config.load_split(config.split, config.limit, config.seed)
    metric, reason = task.metric(config.metric)
    models = {name: resolve_model(name) for name in config.models}
    results = evaluate_models(models, task, methods=config.methods, decode=config, chat=config.chat,
                              device=config.device, metric=metric, reference=config.models[0])
    print(markdown_table(results))
    if any(r.same_output is not None for r in results):
        print("\nAgainst the first model's greedy outputs:\n" + reference_table(results))
    if config.output_dir:
        write_report(results, config.output_dir, settings=config.model_dump(),
                     data=data_summary(task, metric, reason), stages=evaluation_stages(results, task))
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in {"bench"}:
        print("usage: cllm bench [--config FILE] [--models A --models B] [--dataset SPEC] [--limit N] ...")
        raise SystemExit(2)
    bench(load_config(BenchConfig, argv[1:]))


if __name__ == "__main__":
    main()
