"""The server's settings and its application builder, without a running Ray: what `build_app` accepts and
refuses, the deployment options it derives, configs/serve.yaml against Serve's own schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cllm.config import ConfigError
from cllm.serving.api import build_app, deployment_options
from cllm.serving.config import ServeConfig, default_model_path


def test_deployment_options_come_from_the_config():
    config = ServeConfig(model="x", min_replicas=1, max_replicas=3, target_ongoing_requests=5, num_cpus=2, num_gpus=1)
    options = deployment_options(config)
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 5,
        "upscale_delay_s": 30.0,
        "downscale_delay_s": 600.0,
        "look_back_period_s": 30.0,
    }
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert options["max_ongoing_requests"] == config.max_ongoing_requests
    # Serve's health checks and stop take the server's settings: a dead engine is replaced within seconds, a
    # stopping replica's requests in flight get the drain's time
    assert (options["health_check_period_s"], options["health_check_timeout_s"]) == (2.0, 30.0)
    assert options["graceful_shutdown_timeout_s"] == config.drain_timeout_s == 30.0
    auto = deployment_options(ServeConfig(model="x"))["ray_actor_options"]["num_gpus"]
    assert auto == (1.0 if torch.cuda.is_available() else 0.0)  # Ray is not running here: this host decides


def test_default_model_is_the_last_default_run_else_builtin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_model_path() == "builtin" == ServeConfig().model
    (tmp_path / "outputs" / "default" / "cllm").mkdir(parents=True)
    assert default_model_path() == "builtin"  # an unfinished run: no model in it yet
    (tmp_path / "outputs" / "default" / "cllm" / "config.json").write_text("{}")
    assert default_model_path() == str(tmp_path / "outputs" / "default" / "cllm") == ServeConfig().model


def test_serve_config_is_checked():
    with pytest.raises(ConfigError, match="min_replicas"):
        build_app({"model": "x", "min_replicas": 3, "max_replicas": 2})
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        build_app({"model": "x", "max_batch_size": 16, "max_ongoing_requests": 4})
    with pytest.raises(ConfigError, match="does not exist"):
        build_app({"model": "/no/such/model/dir"})
    with pytest.raises(ConfigError, match="extra"):
        build_app({"model": "x", "no_such_key": 1})


def test_serve_config_yaml_is_a_valid_serve_config():
    """configs/serve.yaml passes Serve's own schema and its args are a valid ServeConfig."""
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[1] / "configs" / "serve.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    (app,) = schema.applications
    assert app.import_path == "cllm.serving.api:build_app"
    config = ServeConfig.model_validate(app.args)
    assert config.min_replicas <= config.max_replicas
