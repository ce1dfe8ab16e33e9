"""Serve a CLLM behind an OpenAI-compatible HTTP API (Ray Serve), until interrupted.

    python pipelines/serve.py                                   # default model on http://127.0.0.1:8000
    python pipelines/serve.py --model outputs/run1/cllm --port 8001 --mode ar
    python pipelines/serve.py --config my_serve.yaml --max-replicas 2

The default model is the CLLM of the last default pipeline run (outputs/default/cllm) if there is one,
otherwise the built-in teacher. Keys are ServeConfig's (cllm/serve.py). On a running cluster,
`serve deploy pipelines/serve_config.yaml` deploys the same application.
"""

from __future__ import annotations

import signal
import sys
import time

import checkout  # noqa: F401  (cllm importable here and in Ray workers, without installing)
import ray
from ray import serve

from cllm.config import load_config
from cllm.models import resolve_model_path
from cllm.serve import ServeConfig, build_app, checked_config


def resolve_model(config: ServeConfig) -> ServeConfig:
    """Fix the served name, then turn `builtin` into its directory here (training it once if needed),
    so replicas only ever load a ready model."""
    named = config.model_copy(update={"model_name": config.served_name})
    return checked_config(named.model_copy(update={"model": resolve_model_path(config.model)}))


def interrupt(*_) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    try:
        config = resolve_model(load_config(ServeConfig, sys.argv[1:] if argv is None else argv))
    except ValueError as err:  # ConfigError, ModelLoadError: a message, not a traceback
        sys.exit(f"error: {err}")
    ray.init(address=config.ray_address, include_dashboard=False)
    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops it as cleanly as Ctrl-C
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
        base = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
        print(
            f"serving {config.served_name!r} ({config.mode}, block {config.block_size}) at {base}/v1 "
            f"(health: {base}/healthz); Ctrl-C to stop",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
