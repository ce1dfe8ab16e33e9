"""Ray Serve deployment: an OpenAI-compatible server that answers with exact Jacobi decoding.

The request path, step by step:
  parse      bytes -> validated OpenAI request (`cllm.openai_api`), refusing what greedy decoding can't honour
  admit      tokenize, check the prompt and max_tokens against the context (`cllm.serving.admit`)
  decode     engine "continuous" (default): the job joins the replica's `cllm.engine.Engine`, which a
             thread of its own steps back to back (`cllm.engine.EngineThread`: one Jacobi iteration of
             every running request per step); requests join and leave between steps, so none waits for
             another to finish, and the event loop only parses, admits and streams
             engine "static": `@serve.batch` gathers concurrent jobs into one list, decoded to the end by
             one `cllm.serving.BatchDecoder` call in a worker thread
             either way, committed text streams out as it becomes final
  respond    JSON with OpenAI `usage` plus `jacobi_stats`, or Server-Sent Events ending in `data: [DONE]`

Only this module touches Ray Serve. Use `import_path: cllm.serve:build_app` in a Serve config
(see configs/serve.yaml).
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` type on the route
# methods through Serve's ingress wrapper.

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError, model_validator
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException

from cllm.config import ConfigError, StageConfig
from cllm.decoding import DecodeFields, check_token_ids
from cllm.engine import Engine, EngineThread, StepStats
from cllm.models import BUILTIN_MODEL, format_prompt, is_missing_path, load_model
from cllm.openai_api import (
    SSE_DONE,
    ChatCompletionRequest,
    ChatReply,
    CompletionReply,
    CompletionRequest,
    JacobiStats,
    ModelCard,
    ModelList,
    OpenAIError,
    Reply,
    error_body,
    new_id,
    now,
    parse_request,
    reject_unsupported,
    single_prompt,
    sse_event,
)
from cllm.serving import BatchDecoder, DecodeJob, Mode, admit, choice_sampling
from cllm.streaming import TextStream

logger = logging.getLogger("ray.serve")

DEFAULT_CLLM_DIR = Path("outputs/default/cllm")


def default_model_path() -> str:
    """The CLLM of the last default pipeline run, if there is one; otherwise the built-in teacher."""
    finished = (DEFAULT_CLLM_DIR / "config.json").is_file()  # a run still training has no model yet
    return str(DEFAULT_CLLM_DIR.resolve()) if finished else BUILTIN_MODEL


class ServeOptions(BaseModel):
    """How to batch, scale and listen; shared with the pipeline's `serve_options` section."""

    # "multiblock": two Jacobi blocks in flight per request (the fastest; exact like the others);
    # "jacobi": one block; "ar": one token per pass, the baseline
    mode: Mode = "multiblock"
    # batching (per replica): "continuous" admits requests between Jacobi iterations, "static" decodes
    # each @serve.batch to its end
    engine: Literal["continuous", "static"] = "continuous"
    max_batch_size: int = Field(8, ge=1)  # continuous: the most requests running at once
    max_tokens_per_step: int = Field(256, ge=1)  # continuous: running requests x block size per pass, at most
    # continuous: a step that admits requests runs no pass (their first tokens come sooner; the running
    # rows wait one prefill, never two in a row)
    prefill_first: bool = True
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    # requests a replica accepts: those past max_batch_size wait in its queue and join between steps.
    # Near max_batch_size they would wait in the proxy's router instead, which retries with backoff and
    # leaves the replica short of work (64 clients here: 788 tokens/s at 32, 2,340 at 128)
    max_ongoing_requests: int = Field(128, ge=1)
    # autoscaling and resources
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    # how fast Serve scales (its own defaults): load averaged over look_back_period_s, held that long first
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float | None = Field(None, ge=0)  # None: one per replica when the cluster has GPUs
    # where the HTTP proxy listens (pipelines/serve.py, the pipeline's --serve)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "cllm"
    route_prefix: str = "/"
    # streaming: after a request's first text, at most one write per this many seconds (the text of the
    # passes in between goes together): fewer messages through the proxy; 0: a write per pass
    stream_interval_s: float = Field(0.0, ge=0, le=10)
    # a larger request body gets a 413 before it is parsed; 4 MiB holds a 128k-token prompt as text or ids
    max_request_bytes: int = Field(4 * 2**20, ge=1)

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

    model: str = Field(default_factory=default_model_path)
    model_name: str | None = None  # the id clients send as "model"; default: the model directory's name
    seed: int = 0  # for the random initial guesses; never changes the output
    device: str = "auto"
    dtype: str = "auto"
    ray_address: str = "local"

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model).name or self.model


# ---------------------------------------------------------------------------------------------------------
# The Serve deployment

api = FastAPI(title="cllm-ray: OpenAI-compatible Jacobi decoding server")


@api.exception_handler(StarletteHTTPException)  # unknown route, wrong method: OpenAI-shaped too
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)


class ServeMetrics:
    """Replica metrics, exported by Ray's metrics agent (Prometheus)."""

    def __init__(self):
        self.requests = metrics.Counter(
            "cllm_requests", description="HTTP requests by route and status", tag_keys=("route", "status")
        )
        self.generated_tokens = metrics.Counter(
            "cllm_generated_tokens", description="tokens generated", tag_keys=("mode",)
        )
        self.tokens_per_forward = metrics.Histogram(
            "cllm_tokens_per_forward",
            description="tokens committed per decoding forward pass, per request",
            boundaries=[1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0],
            tag_keys=("mode",),
        )
        self.time_to_first_token = metrics.Histogram(
            "cllm_time_to_first_token_s",
            description="seconds from request arrival to its first token",
            boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            tag_keys=("mode",),
        )
        self.queue_seconds = metrics.Histogram(
            "cllm_queue_seconds",
            description="seconds from request arrival to the start of its prefill (part of the first-token time)",
            boundaries=[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            tag_keys=("mode",),
        )
        self.waiting = metrics.Gauge("cllm_waiting_requests", description="requests queued for the engine")
        self.running = metrics.Gauge("cllm_running_requests", description="requests in the engine's passes")
        self.step_seconds = metrics.Histogram(
            "cllm_step_seconds",
            description="seconds per engine step (admission prefill + one batched Jacobi pass)",
            boundaries=[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0],
            tag_keys=("mode",),
        )
        self.tokens_per_step = metrics.Histogram(
            "cllm_tokens_per_step",
            description="tokens made final by one engine step, all running requests together",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
            tag_keys=("mode",),
        )

    def record_step(self, stats: StepStats, waiting: int, running: int, mode: str) -> None:
        self.waiting.set(waiting)
        self.running.set(running)
        if stats.running:
            self.step_seconds.observe(stats.seconds, tags={"mode": mode})
            self.tokens_per_step.observe(stats.committed, tags={"mode": mode})


@serve.deployment(name="JacobiServer")
@serve.ingress(api)
class JacobiServer:
    """One replica: a model, a batch queue, and the OpenAI routes."""

    def __init__(self, config: dict):
        self.config = ServeConfig.model_validate(config)
        loaded = load_model(self.config.model, device=self.config.device, dtype=self.config.dtype)
        self.tokenizer = loaded.tokenizer
        self.decoder = BatchDecoder(loaded, self.config, mode=self.config.mode, seed=self.config.seed)
        self.metrics = ServeMetrics()
        self.engine: Engine | None = None
        self.stepper: EngineThread | None = None  # steps the engine; started by the first request (on this loop)
        if self.config.engine == "continuous":
            self.engine = Engine(
                loaded,
                self.config,
                mode=self.config.mode,
                seed=self.config.seed,
                max_running=self.config.max_batch_size,
                max_tokens_per_step=self.config.max_tokens_per_step,
                prefill_first=self.config.prefill_first,
            )
        self.context = self.decoder.context
        self.vocab_size = loaded.model.get_input_embeddings().num_embeddings
        self.decode_batch.set_max_batch_size(self.config.max_batch_size)
        self.decode_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self.created = now()
        logger.info(
            "JacobiServer ready: model %s (%s), mode %s, %s engine, block %d, context %s, batch <= %d",
            self.config.served_name,
            self.config.model,
            self.config.mode,
            self.config.engine,
            self.config.block_size,
            self.context,
            self.config.max_batch_size,
        )

    def check_health(self) -> None:
        """Serve's periodic probe; a replica whose process died is replaced without it."""
        if self.decoder.model is None or self.tokenizer is None:
            raise RuntimeError("model not loaded")
        if self.stepper is not None and not self.stepper.alive:
            raise RuntimeError("the engine thread stopped")

    # --- routes -------------------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict:
        config = self.config
        health = {"status": "ok", "model": config.served_name, "mode": config.mode, "engine": config.engine}
        if self.engine is not None:
            health.update(waiting=self.engine.num_waiting, running=self.engine.num_running, steps=self.engine.steps)
        return health

    @api.get("/v1/models")
    async def models(self) -> dict:
        return ModelList(data=[ModelCard(id=self.config.served_name, created=self.created)]).model_dump()

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self.answer("completions", self.complete, request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self.answer("chat_completions", self.chat, request)

    # --- request handling ---------------------------------------------------------------------------------

    async def answer(self, route: str, handler, request: Request):
        """Run a route's handler; every refusal or failure becomes an OpenAI error body, never a traceback."""
        try:
            response = await handler(await self.read_body(request))
            status = 200
        except OpenAIError as err:
            response, status = JSONResponse(err.body(), status_code=err.status), err.status
        except Exception as err:
            logger.exception("unexpected error in %s", route)
            failure = OpenAIError(f"internal error: {type(err).__name__}", status=500)
            response, status = JSONResponse(failure.body(), status_code=500), 500
        self.metrics.requests.inc(tags={"route": route, "status": str(status)})
        return response

    async def read_body(self, request: Request) -> bytes:
        """The body, refused with a 413 once it passes `max_request_bytes` (read in chunks, never kept whole)."""
        limit = self.config.max_request_bytes
        too_large = OpenAIError(f"request body exceeds the server's limit of {limit} bytes", status=413,
                                code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    async def complete(self, raw: bytes):
        request = parse_request(raw, CompletionRequest)
        self.check_model(request.model)
        reject_unsupported(request)
        prompt = single_prompt(request)
        prompt_ids = self.encode_ids(prompt) if isinstance(prompt, list) else self.encode_text(prompt)
        reply = CompletionReply(id=new_id("cmpl"), created=now(), model=self.config.served_name)
        return await self.respond(request, prompt_ids, request.max_tokens, reply)

    async def chat(self, raw: bytes):
        request = parse_request(raw, ChatCompletionRequest)
        self.check_model(request.model)
        reject_unsupported(request)
        try:
            text = format_prompt(self.tokenizer, request.chat_messages(), chat=True)
        except Exception as err:  # no template, or the template refused the conversation
            raise OpenAIError(f"cannot apply the chat template: {err}", param="messages") from None
        prompt_ids = self.encode_text(text, param="messages")
        reply = ChatReply(id=new_id("chatcmpl"), created=now(), model=self.config.served_name)
        return await self.respond(request, prompt_ids, request.token_limit(), reply)

    async def respond(
        self, request: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int], max_tokens: int | None,
        reply: Reply,
    ):
        """Decode the request's n choices as rows of one batch (choice i samples with seed + i), whole or
        streamed; a sampled answer names its seed in the body (`seed`) and the `x-cllm-seed` header."""
        settings, reply.seed = choice_sampling(request.temperature, request.top_p, request.top_k, request.seed,
                                               request.n)
        jobs = [self.admit(prompt_ids, max_tokens, request.stop_sequences(), sampling) for sampling in settings]
        headers = {} if reply.seed is None else {"x-cllm-seed": str(reply.seed)}
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return self.stream(jobs, reply, include_usage=include_usage, headers=headers)
        await asyncio.gather(*(self.decode(job) for job in jobs))
        return JSONResponse(reply.full(jobs, self.stats(jobs)).model_dump(), headers=headers)

    def check_model(self, name: str) -> None:
        if name != self.config.served_name:
            raise OpenAIError(
                f"model {name!r} does not exist; this server serves {self.config.served_name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )

    def encode_text(self, text: str, param: str = "prompt") -> list[int]:
        if not text:
            raise OpenAIError(f"{param} is empty", param=param)
        try:
            return list(self.tokenizer(text)["input_ids"])
        except Exception as err:
            raise OpenAIError(f"cannot tokenize {param}: {err}", param=param) from None

    def encode_ids(self, ids: list[int]) -> list[int]:
        try:
            check_token_ids(ids, self.vocab_size)
        except ValueError as err:
            raise OpenAIError(str(err), param="prompt") from None
        return list(ids)

    def admit(self, prompt_ids: list[int], max_tokens: int | None, stop: list[str], sampling=None) -> DecodeJob:
        job = admit(prompt_ids, max_tokens, context=self.context, default_max_tokens=self.config.max_new_tokens,
                    text=TextStream(self.tokenizer, stop))
        job.sampling = sampling
        return job

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def decode_batch(self, jobs: list[DecodeJob]) -> list[DecodeJob]:
        """Concurrent requests of this replica, decoded by one batched call off the event loop."""
        await asyncio.to_thread(self.decoder.decode, jobs)
        return jobs

    # --- the continuous engine ----------------------------------------------------------------------------

    def step_recorder(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> Callable[[StepStats], None]:
        """`EngineThread.on_step`: the step's numbers go to the metrics on this replica's loop, off the engine."""
        mode = self.config.mode

        def on_step(stats: StepStats) -> None:
            waiting, running = engine.num_waiting, engine.num_running
            loop.call_soon_threadsafe(self.metrics.record_step, stats, waiting, running, mode)

        return on_step

    def submit(self, job: DecodeJob) -> asyncio.Future:
        """Queue a job for the engine; the future resolves (on this loop) once the job has ended."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future = loop.create_future()

        def resolve() -> None:
            if not ended.done():
                ended.set_result(job)

        job.on_done = lambda: loop.call_soon_threadsafe(resolve)
        if self.stepper is None:
            self.stepper = EngineThread(self.engine, on_step=self.step_recorder(self.engine, loop))
        self.stepper.add(job)
        return ended

    def cancel(self, job: DecodeJob) -> None:
        """Stop a job (a no-op once it ended): the engine drops its row at its next step."""
        if self.stepper is not None:
            self.stepper.abort(job)
        else:
            job.cancelled = True

    def __del__(self):
        if getattr(self, "stepper", None) is not None:
            self.stepper.stop(timeout=5)

    async def run_job(self, job: DecodeJob) -> DecodeJob:
        """Decode one job to its end by the configured engine."""
        if self.engine is None:
            return await self.decode_batch(job)
        return await self.submit(job)

    async def decode(self, job: DecodeJob) -> DecodeJob:
        try:
            await self.run_job(job)
        except asyncio.CancelledError:
            self.cancel(job)  # the client disconnected: free its row for the others (engine: next step)
            raise
        self.record(job)
        if job.error is not None:
            raise OpenAIError(f"decoding failed: {job.error}", status=500)
        return job

    def stream(self, jobs: list[DecodeJob], reply: Reply, *, include_usage: bool, headers: dict) -> StreamingResponse:
        """Send text as it is committed; the decode thread hands (choice, delta) pairs to this request's queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        for index, job in enumerate(jobs):
            job.on_text = lambda delta, index=index: loop.call_soon_threadsafe(queue.put_nowait, (index, delta))
        decoding = asyncio.gather(*(self.run_job(job) for job in jobs))
        decoding.add_done_callback(lambda _: queue.put_nowait(None))
        decoding.add_done_callback(lambda future: self.note_stream_end(future, jobs))

        async def deltas() -> AsyncIterator[str]:
            """The text events; text that queued up meanwhile goes in one write, one event per choice: under
            load every write is a message from replica to proxy, and the proxy shares the machine."""
            while (item := await queue.get()) is not None:
                ready: dict[int, str] = {}
                while item is not None:
                    ready[item[0]] = ready.get(item[0], "") + item[1]
                    if queue.empty():
                        break
                    item = queue.get_nowait()  # None: the end, right behind the last text
                yield "".join(reply.delta(text, index) for index, text in ready.items())
                if item is None:
                    return
                if self.config.stream_interval_s:  # what comes meanwhile goes in one write; the end goes at once
                    await asyncio.wait([decoding], timeout=self.config.stream_interval_s)

        async def events() -> AsyncIterator[str]:
            try:
                if opening := "".join(reply.opening(index) for index in range(len(jobs))):
                    yield opening
                async for text in deltas():
                    yield text
                ending = []
                try:
                    decoding.result()
                    for job in jobs:
                        self.record(job)
                        if job.error is not None:
                            raise RuntimeError(job.error)
                    ending += [reply.closing(job, self.stats([job]), index) for index, job in enumerate(jobs)]
                    if include_usage:
                        ending.append(reply.usage_only(jobs))
                except Exception as err:
                    logger.exception("streamed request failed")
                    ending.append(sse_event(error_body(f"decoding failed: {err}", type="server_error")))
                yield "".join(ending) + SSE_DONE
            finally:
                for job in jobs:
                    self.cancel(job)  # no-op after the end; stops the rows if the client left early

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )

    @staticmethod
    def note_stream_end(future: asyncio.Future, jobs: list[DecodeJob]) -> None:
        """Retrieve the decode's outcome, so a client that left early costs one log line, not a traceback."""
        failure = None if future.cancelled() else future.exception()
        if failure is not None and any(job.cancelled for job in jobs):
            tokens = sum(len(job.tokens) for job in jobs)
            logger.info("client left a stream after %d tokens (%s)", tokens, type(failure).__name__)
        elif failure is not None:
            logger.warning("streamed request failed: %s: %s", type(failure).__name__, failure)

    def stats(self, jobs: list[DecodeJob]) -> JacobiStats:
        """How a request's choices were decoded, together (one choice: exactly its own numbers)."""
        passes = sum(job.forward_passes for job in jobs)
        decoded = sum(len(job.tokens) - 1 for job in jobs if job.forward_passes)
        waits = [job.time_to_first_token for job in jobs if job.time_to_first_token is not None]
        queued = [job.queue_seconds for job in jobs if job.queue_seconds is not None]
        return JacobiStats(
            mode=self.config.mode,
            block_size=1 if self.config.mode == "ar" else self.config.block_size,
            forward_passes=passes,
            tokens_per_forward=round(decoded / passes if passes else 0.0, 4),
            batch_size=max(job.batch_size for job in jobs),  # continuous: the most requests sharing a pass
            decode_seconds=round(max(job.decode_seconds for job in jobs), 4),
            first_token_seconds=round(min(waits), 4) if waits else None,  # the answer's first text
            queue_seconds=round(min(queued), 4) if queued else None,
        )

    def record(self, job: DecodeJob) -> None:
        tags = {"mode": self.config.mode}
        if job.tokens:
            self.metrics.generated_tokens.inc(len(job.tokens), tags=tags)
        if job.forward_passes:
            self.metrics.tokens_per_forward.observe(job.tokens_per_forward, tags=tags)
        if job.time_to_first_token is not None:
            self.metrics.time_to_first_token.observe(job.time_to_first_token, tags=tags)
        if job.queue_seconds is not None:
            self.metrics.queue_seconds.observe(job.queue_seconds, tags=tags)
        logger.info(
            "request: %d prompt + %d new tokens, %s, %d forward passes, %.2f tokens/forward, batch %d, "
            "first token %.3fs (queued %.3fs)",
            len(job.prompt_ids),
            len(job.tokens),
            job.finish_reason,
            job.forward_passes,
            job.tokens_per_forward,
            job.batch_size,
            job.time_to_first_token or 0.0,
            job.queue_seconds or 0.0,
        )


# ---------------------------------------------------------------------------------------------------------
# Application builder


def replica_gpus(config: ServeConfig) -> float:
    """GPUs per replica: as configured, else one when the cluster (before Ray starts: this host) has any."""
    if config.num_gpus is not None:
        return config.num_gpus
    import ray

    if ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return 1.0 if torch.cuda.is_available() else 0.0


def deployment_options(config: ServeConfig) -> dict:
    """Serve options of the JacobiServer deployment: autoscaling bounds, queue depth, resources."""
    return {
        "autoscaling_config": {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
            "look_back_period_s": config.look_back_period_s,
        },
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": replica_gpus(config)},
    }


def serve_file_values(path: str | Path) -> dict:
    """ServeConfig values from a Ray Serve config file (configs/serve.yaml): the first application's
    `args`, its name and route prefix, and the HTTP host and port, so one file serves both entry points."""
    from cllm.config import read_yaml

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


def ready_config(args: dict | ServeConfig | None = None) -> ServeConfig:
    """The config replicas get: the served name fixed first, then `builtin` turned into its directory here
    (trained once if needed), so a replica only ever loads a ready model."""
    from cllm.teacher import resolve_model  # an entry point's job: `serve run` enters through build_app

    config = checked_config(args)
    named = config.model_copy(update={"model_name": config.served_name})
    return checked_config(named.model_copy(update={"model": resolve_model(config.model)}))


def build_app(args: dict | ServeConfig | None = None) -> serve.Application:
    """The Serve application (`import_path: cllm.serve:build_app`); `args` are ServeConfig fields."""
    config = ready_config(args)
    return JacobiServer.options(**deployment_options(config)).bind(config.model_dump())


def serve_until_stopped(config: ServeConfig) -> None:
    """Deploy on the connected Ray cluster and block until Ctrl-C or SIGTERM; then shut Serve down."""
    import signal

    def interrupt(*_) -> None:
        raise KeyboardInterrupt

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
