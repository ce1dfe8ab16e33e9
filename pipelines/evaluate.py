"""Compare decoding methods side by side on held-out prompts (what `cllm bench` runs).

    python pipelines/evaluate.py --models builtin --models outputs/default/cllm --limit 300 --output-dir report
    python pipelines/evaluate.py --config configs/bench.yaml

Keys are BenchConfig's (cllm/cli.py): the models, the data, the decoding settings and the methods.
"""

from __future__ import annotations

import checkout  # noqa: F401  (cllm importable here and in Ray workers, without installing)

from cllm.cli import BenchConfig, bench
from cllm.config import load_config
from cllm.errors import run_main


def main(argv: list[str]) -> list:
    return bench(load_config(BenchConfig, argv))


if __name__ == "__main__":
    run_main(main)
