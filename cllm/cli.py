"""`cllm` command line: `cllm bench` compares decoding methods side by side on one or more models.

Importing this module imports no torch, transformers or Ray (the modules it names import them where they
decode), so `cllm bench --help` and a mistake on the command line answer at once.
"""

from __future__ import annotations

import sys

from pydantic import Field

from cllm.config import StageConfig, load_config
from cllm.decoding.core import DecodeFields
from cllm.errors import ConfigError, run_main
from cllm.evaluate import (
    EvalOptions,
    data_summary,
    evaluate_models,
    evaluation_stages,
    markdown_table,
    reference_table,
    write_report,
)
from cllm.models.loading import BUILTIN_MODEL, check_model_path
from cllm.models.teacher import resolve_model
from cllm.tasks import DataFields


class BenchConfig(StageConfig, DataFields, DecodeFields, EvalOptions):
    """Decode held-out prompts with every method on every model, in one run."""

    models: list[str] = Field(
        default_factory=lambda: [BUILTIN_MODEL], min_length=1,
        description="the models compared, each a Hugging Face directory or hub name, a GGUF file, or builtin "
                    "(repeat the option for several; the first is the reference)")
    seed: int = Field(0, description="seeds the built-in task and the random initial guesses")
    device: str | None = Field(None, description="cpu or cuda; None: cuda when available")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU; None: torch's default")
    output_dir: str | None = Field(
        None, description="write the report (JSON, Markdown, plots) here; None: print the tables only")


def bench(config: BenchConfig) -> list:
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    task = config.load_split(config.split, config.limit, config.seed)
    metric, reason = task.metric(config.metric)
    for name in config.models:  # a missing model fails now, not after the models before it were evaluated
        check_model_path(name)
    models = {name: resolve_model(name) for name in config.models}
    results = evaluate_models(models, task, methods=config.methods, decode=config, chat=config.chat,
                              device=config.device, metric=metric, reference=config.models[0],
                              batch_size=config.batch_size)
    print(markdown_table(results))
    if any(r.same_output is not None for r in results):
        print("\nAgainst the first model's greedy outputs:\n" + reference_table(results))
    if config.output_dir:
        write_report(results, config.output_dir, settings=config.model_dump(),
                     data=data_summary(task, metric, reason), stages=evaluation_stages(results, task))
    return results


USAGE = """usage: cllm COMMAND [options]

commands:
  bench    compare decoding methods side by side on one or more models (cllm bench --help lists its options)"""


def command(argv: list[str]) -> list | None:
    """Run the command `argv` names; with none, the usage on stderr and exit code 2, as argparse does."""
    if argv[:1] == ["bench"]:
        return bench(load_config(BenchConfig, argv[1:], prog="cllm bench"))
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return None
    if not argv:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    raise ConfigError(f"unknown command {argv[0]!r}: the command is bench (cllm bench --help lists its options)")


def main(argv: list[str] | None = None) -> None:
    """The `cllm` console script. It returns nothing: the script's wrapper passes a return value to `sys.exit`,
    which would print it and end a successful run with status 1."""
    run_main(command, argv)


if __name__ == "__main__":
    main()
