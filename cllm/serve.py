"""Ray Serve deployment: an OpenAI-compatible server that answers with exact Jacobi decoding.

The request path, step by step:
  parse      bytes -> validated OpenAI request (cllm.openai_api), refusing what greedy decoding can't honour
  admit      tokenize, check the prompt and max_tokens against the context -> a DecodeJob; a job that
             would fail never joins a batch
  batch      `@serve.batch` gathers concurrent jobs of a replica into one list
  decode     one batched `jacobi_generate` (or `ar_generate`) call in a worker thread; its `on_commit`
             feeds each job's TextStream, which applies stop sequences and pushes text to streaming clients
  respond    JSON with OpenAI `usage` plus `jacobi_stats`, or Server-Sent Events ending in `data: [DONE]`

`BatchDecoder` and `DecodeJob` are plain PyTorch/Python; only `JacobiServer` and `build_app` touch Ray.
Use `import_path: cllm.serve:build_app` in a Serve config (see pipelines/serve_config.yaml).
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` type on the route
# methods through Serve's ingress wrapper.

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field, ValidationError, model_validator
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException

from cllm.config import ConfigError, StageConfig
from cllm.jacobi import ar_generate, eos_set, jacobi_generate
from cllm.models import BUILTIN_MODEL, LoadedModel, context_length, format_prompt, load_model
from cllm.openai_api import (
    SSE_DONE,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    JacobiStats,
    ModelCard,
    ModelList,
    OpenAIError,
    Usage,
    error_body,
    new_id,
    now,
    parse_request,
    reject_unsupported,
    single_prompt,
    sse_event,
)
from cllm.streaming import TextStream

logger = logging.getLogger("ray.serve")

DEFAULT_CLLM_DIR = Path("outputs/default/cllm")


def default_model_path() -> str:
    """The CLLM of the last default pipeline run, if there is one; otherwise the built-in teacher."""
    finished = (DEFAULT_CLLM_DIR / "config.json").is_file()  # a run still training has no model yet
    return str(DEFAULT_CLLM_DIR.resolve()) if finished else BUILTIN_MODEL


class ServeConfig(StageConfig):
    """How to serve: which model, how to decode, how to batch and scale, where to listen."""

    model: str = Field(default_factory=default_model_path)
    model_name: str | None = None  # the id clients send as "model"; default: the model directory's name
    mode: Literal["jacobi", "ar"] = "jacobi"  # "ar": greedy one token per pass, the baseline
    block_size: int = Field(16, ge=1)
    init: Literal["prompt", "repeat", "pad", "ngram"] = "prompt"  # cllm.guesses.GUESS_STRATEGIES
    max_iters: int | None = Field(None, ge=1)
    seed: int = 0  # for the random initial guesses; never changes the output
    default_max_tokens: int = Field(256, ge=1)
    device: str = "auto"
    dtype: str = "auto"
    # batching (per replica)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_ongoing_requests: int = Field(32, ge=1)
    # autoscaling and resources
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float | None = Field(None, ge=0)  # None: one per replica when the cluster has GPUs
    # where the stand-alone entry point (pipelines/serve.py) listens
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    app_name: str = "cllm"
    route_prefix: str = "/"
    ray_address: str = "local"

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches can never fill"
            )
        return self

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model).name or self.model


# ---------------------------------------------------------------------------------------------------------
# Batched decoding (plain PyTorch; runs in a worker thread of the replica)


@dataclass
class DecodeJob:
    """One admitted request on its way through a batched decode (shared by event loop and decode thread)."""

    prompt_ids: list[int]
    max_tokens: int
    text: TextStream
    arrived: float = field(default_factory=time.perf_counter)
    on_text: Callable[[str], None] | None = None  # streaming: receives text deltas (from the decode thread)
    cancelled: bool = False  # the client went away: its row stops at the next commit
    tokens: list[int] = field(default_factory=list)
    finish_reason: Literal["stop", "length"] | None = None
    first_token_at: float | None = None
    forward_passes: int = 0
    batch_size: int = 0
    decode_seconds: float = 0.0
    error: str | None = None

    @property
    def tokens_per_forward(self) -> float:
        """Decoded tokens per pass this request took part in (its first token comes from prefill)."""
        return (len(self.tokens) - 1) / self.forward_passes if self.forward_passes else 0.0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrived


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask, the layout `generate` and `jacobi_generate` expect."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return input_ids, mask


def fitting_groups(jobs: list[DecodeJob], context: int | None) -> list[list[DecodeJob]]:
    """Split a batch so each group's padded prompt + largest max_tokens fits the context.

    Left padding makes every row as long as the longest prompt, so a short prompt with a large
    max_tokens cannot share a call with a long prompt; each job alone always fits (checked at admission).
    """
    if context is None:
        return [jobs]
    groups: list[list[DecodeJob]] = []
    for job in jobs:
        for group in groups:
            width = max(len(j.prompt_ids) for j in [*group, job])
            if width + max(j.max_tokens for j in [*group, job]) <= context:
                group.append(job)
                break
        else:
            groups.append([job])
    return groups


class BatchDecoder:
    """Decodes a list of jobs with one batched Jacobi (or AR) call and routes committed tokens to each job."""

    def __init__(self, loaded: LoadedModel, config: ServeConfig):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = config
        self.context = context_length(self.model)
        generation = self.model.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_token_id = eos
        self.eos_ids = eos_set(eos)
        self.pad_id = generation.pad_token_id if generation.pad_token_id is not None else self.tokenizer.pad_token_id

    def decode(self, jobs: list[DecodeJob]) -> None:
        for group in fitting_groups(jobs, self.context):
            self.decode_group(group)

    def decode_group(self, jobs: list[DecodeJob]) -> None:
        live = [job for job in jobs if not job.cancelled]
        if not live:
            return
        input_ids, mask = left_pad([job.prompt_ids for job in live], self.pad_id)
        device = next(self.model.parameters()).device
        start = time.perf_counter()
        out = self.generate(
            input_ids.to(device), mask.to(device), [job.max_tokens for job in live], self.commit_hook(live)
        )
        seconds = time.perf_counter() - start
        for row, job in enumerate(live):
            job.forward_passes = out.row_forward_passes[row]
            job.batch_size = len(live)
            job.decode_seconds = seconds
            self.finish(job)
        logger.info(
            "decoded batch of %d (%s): %d forward passes, %.2f tokens/forward, %d tokens, %.3fs",
            len(live),
            self.config.mode,
            out.forward_passes,
            out.tokens_per_forward,
            sum(out.new_tokens),
            seconds,
        )

    def generate(self, input_ids, mask, budgets: list[int], on_commit):
        common = dict(
            max_new_tokens=budgets,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_id,
            on_commit=on_commit,
        )
        if self.config.mode == "ar":
            return ar_generate(self.model, input_ids, mask, **common)
        return jacobi_generate(
            self.model,
            input_ids,
            mask,
            block_size=self.config.block_size,
            init=self.config.init,
            max_iters=self.config.max_iters,
            seed=self.config.seed,
            **common,
        )

    @staticmethod
    def commit_hook(jobs: list[DecodeJob]) -> Callable[[int, list[int]], bool]:
        """`on_commit` for a batch: feed the row's job; True stops the row (stop sequence, client gone)."""

        def on_commit(row: int, tokens: list[int]) -> bool:
            job = jobs[row]
            if job.cancelled:
                return True
            try:
                if job.first_token_at is None:
                    job.first_token_at = time.perf_counter()
                job.tokens.extend(tokens)
                delta = job.text.push(tokens)
                if delta and job.on_text is not None:
                    job.on_text(delta)
                return job.text.stopped
            except Exception as err:  # one request's failure must not end its batch-mates' decoding
                logger.exception("request failed while streaming; stopping its row")
                job.error = f"{type(err).__name__}: {err}"
                return True

        return on_commit

    def finish(self, job: DecodeJob) -> None:
        """Flush held-back text and name why the request ended."""
        if job.error is not None or job.cancelled:
            return
        try:
            tail = job.text.finish()
            if tail and job.on_text is not None:
                job.on_text(tail)
        except Exception as err:
            job.error = f"{type(err).__name__}: {err}"
            return
        ended_on_eos = bool(job.tokens) and job.tokens[-1] in self.eos_ids
        job.finish_reason = "stop" if job.text.stopped or ended_on_eos else "length"


# ---------------------------------------------------------------------------------------------------------
# Response shapes for the two routes (defined before JacobiServer: Serve ships the deployment class
# with the module globals that exist when it is decorated)


@dataclass
class Reply:
    """Builds one request's response objects: the full answer, or its stream of chunks."""

    id: str
    created: int
    model: str

    @staticmethod
    def usage(job: DecodeJob) -> Usage:
        n, m = len(job.prompt_ids), len(job.tokens)
        return Usage(prompt_tokens=n, completion_tokens=m, total_tokens=n + m)

    def opening(self) -> str:
        return ""

    def usage_only(self, job: DecodeJob) -> str:
        return sse_event(
            {
                "id": self.id,
                "object": self.chunk_object,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self.usage(job).model_dump(),
            }
        )


class CompletionReply(Reply):
    chunk_object = "text_completion"

    def full(self, job: DecodeJob, stats: JacobiStats) -> CompletionResponse:
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[CompletionChoice(text=job.text.text, finish_reason=job.finish_reason)],
            usage=self.usage(job),
            jacobi_stats=stats,
        )

    def chunk(self, text: str, finish_reason=None, stats: JacobiStats | None = None) -> CompletionResponse:
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[CompletionChoice(text=text, finish_reason=finish_reason)],
            jacobi_stats=stats,
        )

    def delta(self, text: str) -> str:
        return sse_event(self.chunk(text))

    def closing(self, job: DecodeJob, stats: JacobiStats) -> str:
        return sse_event(self.chunk("", job.finish_reason, stats))


class ChatReply(Reply):
    chunk_object = "chat.completion.chunk"

    def full(self, job: DecodeJob, stats: JacobiStats) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[ChatChoice(message=AssistantMessage(content=job.text.text), finish_reason=job.finish_reason)],
            usage=self.usage(job),
            jacobi_stats=stats,
        )

    def chunk(self, delta: ChatDelta, finish_reason=None, stats: JacobiStats | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)],
            jacobi_stats=stats,
        )

    def opening(self) -> str:
        return sse_event(self.chunk(ChatDelta(role="assistant", content="")))

    def delta(self, text: str) -> str:
        return sse_event(self.chunk(ChatDelta(content=text)))

    def closing(self, job: DecodeJob, stats: JacobiStats) -> str:
        return sse_event(self.chunk(ChatDelta(), job.finish_reason, stats))


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


@serve.deployment(name="JacobiServer")
@serve.ingress(api)
class JacobiServer:
    """One replica: a model, a batch queue, and the OpenAI routes."""

    def __init__(self, config: dict):
        self.config = ServeConfig.model_validate(config)
        loaded = load_model(self.config.model, device=self.config.device, dtype=self.config.dtype)
        self.tokenizer = loaded.tokenizer
        self.decoder = BatchDecoder(loaded, self.config)
        self.context = self.decoder.context
        self.vocab_size = loaded.model.get_input_embeddings().num_embeddings
        self.decode_batch.set_max_batch_size(self.config.max_batch_size)
        self.decode_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self.metrics = ServeMetrics()
        self.created = now()
        logger.info(
            "JacobiServer ready: model %s (%s), mode %s, block %d, context %s, batch <= %d",
            self.config.served_name,
            self.config.model,
            self.config.mode,
            self.config.block_size,
            self.context,
            self.config.max_batch_size,
        )

    def check_health(self) -> None:
        """Serve's periodic probe; a replica whose process died is replaced without it."""
        if self.decoder.model is None or self.tokenizer is None:
            raise RuntimeError("model not loaded")

    # --- routes -------------------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.config.served_name, "mode": self.config.mode}

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
            response = await handler(await request.body())
            status = 200
        except OpenAIError as err:
            response, status = JSONResponse(err.body(), status_code=err.status), err.status
        except Exception as err:
            logger.exception("unexpected error in %s", route)
            failure = OpenAIError(f"internal error: {type(err).__name__}", status=500)
            response, status = JSONResponse(failure.body(), status_code=500), 500
        self.metrics.requests.inc(tags={"route": route, "status": str(status)})
        return response

    async def complete(self, raw: bytes):
        request = parse_request(raw, CompletionRequest)
        self.check_model(request.model)
        reject_unsupported(request)
        prompt = single_prompt(request)
        prompt_ids = self.encode_ids(prompt) if isinstance(prompt, list) else self.encode_text(prompt)
        job = self.admit(prompt_ids, request.max_tokens, request.stop_sequences())
        reply = CompletionReply(id=new_id("cmpl"), created=now(), model=self.config.served_name)
        if request.stream:
            return self.stream(
                job,
                reply,
                include_usage=bool(request.stream_options and request.stream_options.include_usage),
            )
        await self.decode(job)
        return reply.full(job, self.stats(job)).model_dump()

    async def chat(self, raw: bytes):
        request = parse_request(raw, ChatCompletionRequest)
        self.check_model(request.model)
        reject_unsupported(request)
        try:
            text = format_prompt(self.tokenizer, request.chat_messages(), chat=True)
        except Exception as err:  # no template, or the template refused the conversation
            raise OpenAIError(f"cannot apply the chat template: {err}", param="messages") from None
        job = self.admit(self.encode_text(text, param="messages"), request.token_limit(), request.stop_sequences())
        reply = ChatReply(id=new_id("chatcmpl"), created=now(), model=self.config.served_name)
        if request.stream:
            return self.stream(
                job,
                reply,
                include_usage=bool(request.stream_options and request.stream_options.include_usage),
            )
        await self.decode(job)
        return reply.full(job, self.stats(job)).model_dump()

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
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise OpenAIError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}", param="prompt")
        return list(ids)

    def admit(self, prompt_ids: list[int], max_tokens: int | None, stop: list[str]) -> DecodeJob:
        """Check a request against the context before it joins a batch, so it can never fail one."""
        n = len(prompt_ids)
        if n == 0:
            raise OpenAIError("prompt is empty (it encodes to no tokens)", param="prompt")
        room = None if self.context is None else self.context - n
        if room is not None and room < 1:
            raise OpenAIError(
                f"prompt is {n} tokens; the model's context is {self.context} tokens, leaving no room to generate",
                param="prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = self.config.default_max_tokens if room is None else min(self.config.default_max_tokens, room)
        elif room is not None and max_tokens > room:
            raise OpenAIError(
                f"max_tokens {max_tokens} + prompt {n} tokens exceeds the model's context of {self.context} "
                f"tokens (at most {room} new tokens for this prompt)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return DecodeJob(prompt_ids=prompt_ids, max_tokens=max_tokens, text=TextStream(self.tokenizer, stop))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def decode_batch(self, jobs: list[DecodeJob]) -> list[DecodeJob]:
        """Concurrent requests of this replica, decoded by one batched call off the event loop."""
        await asyncio.to_thread(self.decoder.decode, jobs)
        return jobs

    async def decode(self, job: DecodeJob) -> DecodeJob:
        try:
            await self.decode_batch(job)
        except asyncio.CancelledError:
            job.cancelled = True  # the client disconnected: free its row for the others
            raise
        self.record(job)
        if job.error is not None:
            raise OpenAIError(f"decoding failed: {job.error}", status=500)
        return job

    def stream(self, job: DecodeJob, reply: Reply, *, include_usage: bool) -> StreamingResponse:
        """Send text as it is committed; the decode thread hands deltas to this request's queue."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        job.on_text = lambda delta: loop.call_soon_threadsafe(queue.put_nowait, delta)
        decoding = asyncio.ensure_future(self.decode_batch(job))
        decoding.add_done_callback(lambda _: queue.put_nowait(None))

        async def events() -> AsyncIterator[str]:
            try:
                if opening := reply.opening():
                    yield opening
                while (delta := await queue.get()) is not None:
                    yield reply.delta(delta)
                try:
                    decoding.result()
                    self.record(job)
                    if job.error is not None:
                        raise RuntimeError(job.error)
                    yield reply.closing(job, self.stats(job))
                    if include_usage:
                        yield reply.usage_only(job)
                except Exception as err:
                    logger.exception("streamed request failed")
                    yield sse_event(error_body(f"decoding failed: {err}", type="server_error"))
                yield SSE_DONE
            finally:
                job.cancelled = True  # no-op after the end; stops the row if the client left early

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def stats(self, job: DecodeJob) -> JacobiStats:
        return JacobiStats(
            mode=self.config.mode,
            block_size=1 if self.config.mode == "ar" else self.config.block_size,
            forward_passes=job.forward_passes,
            tokens_per_forward=round(job.tokens_per_forward, 4),
            batch_size=job.batch_size,
            decode_seconds=round(job.decode_seconds, 4),
        )

    def record(self, job: DecodeJob) -> None:
        tags = {"mode": self.config.mode}
        if job.tokens:
            self.metrics.generated_tokens.inc(len(job.tokens), tags=tags)
        if job.forward_passes:
            self.metrics.tokens_per_forward.observe(job.tokens_per_forward, tags=tags)
        if job.time_to_first_token is not None:
            self.metrics.time_to_first_token.observe(job.time_to_first_token, tags=tags)
        logger.info(
            "request: %d prompt + %d new tokens, %s, %d forward passes, %.2f tokens/forward, batch %d, "
            "first token %.3fs",
            len(job.prompt_ids),
            len(job.tokens),
            job.finish_reason,
            job.forward_passes,
            job.tokens_per_forward,
            job.batch_size,
            job.time_to_first_token or 0.0,
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
        },
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": replica_gpus(config)},
    }


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
    if config.model.startswith(("/", ".", "~")) or config.model.count("/") > 1:  # a path, not a hub name
        raise ConfigError(f"model path {config.model!r} does not exist")
    return config


def build_app(args: dict | ServeConfig | None = None) -> serve.Application:
    """The Serve application (`import_path: cllm.serve:build_app`); `args` are ServeConfig fields."""
    config = checked_config(args)
    return JacobiServer.options(**deployment_options(config)).bind(config.model_dump())
