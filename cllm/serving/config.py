"""How to serve: the server's settings (`ServeOptions`, `ServeConfig`) and where they come from.

Ray-free on purpose: the pipeline (`cllm.pipeline`) reads `ServeConfig` and `ServeOptions` without
importing Ray Serve or FastAPI; only `cllm.serving.api` deploys them. The engines take their settings
from a `ServeConfig` and declare no defaults of their own, so every default is written once, here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from cllm.config import ConfigError, StageConfig, read_yaml
from cllm.decoding.core import DecodeFields
from cllm.decoding.modes import CHOICES, FASTEST, ModeName
from cllm.models.loading import BUILTIN_MODEL, is_missing_path

DEFAULT_CLLM_DIR = Path("outputs/default/cllm")


def default_model_path() -> str:
    """The CLLM of the last default pipeline run, if there is one; otherwise the built-in teacher."""
    finished = (DEFAULT_CLLM_DIR / "config.json").is_file()  # a run still training has no model yet
    return str(DEFAULT_CLLM_DIR.resolve()) if finished else BUILTIN_MODEL


class ServeOptions(BaseModel):
    """How to batch, scale and listen; shared with the pipeline's `serve_options` section."""

    mode: ModeName = Field(FASTEST, description=CHOICES)
    engine: Literal["continuous", "static"] = Field(
        "continuous", description="batching per replica: continuous admits requests between Jacobi iterations, "
                                  "static decodes each gathered batch to its end")
    # The running-rows cap, the token budget and the autoscaling target were chosen with the load benchmark
    # (docs/results.md, "Serving defaults"): past the cap, newcomers wait for a whole request to finish.
    max_batch_size: int = Field(32, ge=1, description="continuous: the most requests running at once")
    max_tokens_per_step: int = Field(
        256, ge=1, description="continuous: running requests x block size per pass, at most")
    prefill_first: bool = Field(
        True, description="continuous: a step that admits requests runs no pass (their first tokens come sooner; the "
                          "running rows wait one prefill, never two in a row)")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="static: seconds to wait for more requests to fill a batch")
    # Near max_batch_size the waiting requests would queue in the proxy's router instead, which retries with
    # backoff and leaves the replica short of work (docs/results.md, "Serving under load").
    max_ongoing_requests: int = Field(
        128, ge=1, description="requests a replica accepts; those past max_batch_size wait in its queue and join "
                               "between steps")
    min_replicas: int = Field(1, ge=0, description="autoscaling: the fewest replicas")
    max_replicas: int = Field(1, ge=1, description="autoscaling: the most replicas")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="autoscaling: the requests per replica it aims for")
    upscale_delay_s: float = Field(
        30.0, ge=0, description="autoscaling: seconds the load must stay high before adding a replica")
    downscale_delay_s: float = Field(
        600.0, ge=0, description="autoscaling: seconds the load must stay low before removing a replica")
    look_back_period_s: float = Field(
        30.0, gt=0, description="autoscaling: seconds the load is averaged over")
    num_cpus: float = Field(1.0, ge=0, description="CPUs each replica reserves")
    num_gpus: float | None = Field(
        None, ge=0, description="GPUs each replica reserves; None: 1 when the cluster has GPUs, else 0")
    host: str = Field(
        "127.0.0.1", description="the address the HTTP proxy listens on (pipelines/serve.py, the pipeline's --serve)")
    port: int = Field(8000, ge=1, le=65535, description="the HTTP proxy's port")
    app_name: str = Field("cllm", description="the Ray Serve application's name")
    route_prefix: str = Field("/", description="the URL path the API is served under")
    stream_interval_s: float = Field(
        0.0, ge=0, le=10, description="streaming: after a request's first text, at most one write per this many "
                                      "seconds (fewer messages through the proxy); 0: a write per pass")
    max_request_bytes: int = Field(
        4 * 2**20, ge=1, description="a larger request body gets a 413 before it is parsed; 4 MiB holds a "
                                     "128k-token prompt")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="stopping (SIGTERM or Ctrl-C to pipelines/serve.py, a replica Serve stops): seconds "
                                "the requests in flight get to finish; new requests meanwhile get a 503")
    health_check_period_s: float = Field(
        2.0, gt=0, description="seconds between Serve's health checks of a replica; one whose engine thread died "
                               "fails them and is replaced after three failures in a row")
    health_check_timeout_s: float = Field(
        30.0, gt=0, description="seconds a health check may take before it counts as a failure")

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        return self


class ServeConfig(StageConfig, DecodeFields, ServeOptions):
    """How to serve: which model, how to decode (max_new_tokens: a request's default max_tokens), how to scale."""

    model: str = Field(
        default_factory=default_model_path,
        description="a Hugging Face directory or hub name, a GGUF file, or builtin; by default the CLLM of the last "
                    "default pipeline run (outputs/default/cllm), else builtin")
    model_name: str | None = Field(
        None, description="the id clients send as model; None: the model directory's name")
    seed: int = Field(0, description="seeds the random initial guesses; never changes the output")
    device: str = Field("auto", description="cpu, cuda, or auto (cuda when available)")
    dtype: str = Field(
        "auto", description="float32, bfloat16 or float16; auto: bfloat16 on GPUs that support it, else float32")
    ray_address: str = Field(
        "local", description="the Ray cluster to use: local starts one, auto joins a running one, or an address")

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model).name or self.model


def serve_file_values(path: str | Path) -> dict:
    """ServeConfig values from a Ray Serve config file (configs/serve.yaml): the first application's
    `args`, its name and route prefix, and the HTTP host and port, so one file serves both entry points."""
    data = read_yaml(path)
    if "applications" not in data:
        return data  # already plain ServeConfig keys
    apps = data.get("applications") or []
    if not apps:
        raise ConfigError(f"{path} lists no application")
    app, http = apps[0], data.get("http_options") or {}
    values = dict(app.get("args") or {})
    for key, source in (("app_name", app.get("name")), ("route_prefix", app.get("route_prefix")),
                        ("host", http.get("host")), ("port", http.get("port"))):
        if source is not None:
            values.setdefault(key, source)
    return values


def checked_config(args: dict | ServeConfig | None = None) -> ServeConfig:
    """A valid ServeConfig with the model path made absolute (replicas may start in another directory)."""
    if isinstance(args, ServeConfig):
        config = args
    else:
        try:
            config = ServeConfig.model_validate(args or {})
        except ValidationError as err:
            raise ConfigError(f"ServeConfig: {err}") from err
    path = Path(config.model).expanduser()
    if path.exists():
        return config.model_copy(update={"model": str(path.resolve())})
    if is_missing_path(config.model):
        raise ConfigError(f"model path {config.model!r} does not exist")
    return config
