"""Serve a CLLM behind an OpenAI-compatible HTTP API (Ray Serve), until interrupted.

    python pipelines/serve.py                                   # default model on http://127.0.0.1:8000
    python pipelines/serve.py --model outputs/run1/cllm --port 8001 --mode ar
    python pipelines/serve.py --config configs/serve.yaml --max-replicas 2

The default model is the CLLM of the last default pipeline run (outputs/default/cllm) if there is one,
otherwise the built-in teacher. Keys are ServeConfig's (cllm/serving/config.py). On a running cluster,
`serve deploy configs/serve.yaml` deploys the same application. The server's imports (Ray Serve, torch,
transformers) wait until the command line is read and the model path is found: `--help` and a mistake
answer at once.
"""

from __future__ import annotations

import checkout  # noqa: F401  (cllm importable here and in Ray workers, without installing)

from cllm.config import ArgumentParser, load_config
from cllm.errors import run_main
from cllm.serving.config import ServeConfig, checked_config, serve_file_values


def parse(argv: list[str]) -> ServeConfig:
    """ServeConfig keys from `--config FILE` (plain keys, or a Ray Serve config file) and the command line."""
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    values = serve_file_values(known.config) if known.config else {}
    return load_config(ServeConfig, rest, **values)


def main(argv: list[str]) -> None:
    config = checked_config(parse(argv))  # a bad setting or a missing model path fails here, before those imports
    import ray

    from cllm.serving.api import ready_config, serve_until_stopped

    config = ready_config(config)  # builtin becomes its directory (trained once if needed), before Ray starts
    ray.init(address=config.ray_address, include_dashboard=False)
    try:
        serve_until_stopped(config)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    run_main(main)
