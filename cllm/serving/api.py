"""The Ray Serve deployment: an OpenAI-compatible server that answers with exact Jacobi decoding.

The only module of `cllm.serving` that touches Ray Serve, FastAPI or HTTP. A request's path:
  parse      bytes -> validated OpenAI request (`protocol.parse_request`), refusing what this server
             cannot honour (`protocol.reject_unsupported`)
  tokenize   the prompt (or the chat template's rendering of the messages) -> token ids
  generate   one `Request` per choice, handed to the replica's `AsyncEngine` (`cllm.serving.bridge`), whose
             thread steps the engine and turns its outputs into text; a refusal there is a domain error
             (`RequestError`), answered here as an OpenAI error
  respond    JSON with OpenAI `usage` plus `jacobi_stats`, or Server-Sent Events ending in `data: [DONE]`

A replica's life: `check_health` (Serve's probe, every `health_check_period_s`) fails once its engine
thread has died, and Serve replaces it; /healthz answers 503 meanwhile, and so does every request.
`stop_serving` stops the app without cutting a request: each replica drains (new requests get a 503, those
in flight finish, for at most `drain_timeout_s`), then Serve stops the replicas, whose `__del__` stops the
engine thread. A replica Serve stops on its own (scale-down, replacement, `serve.delete`) also gets
`drain_timeout_s` for its requests in flight (Serve's `graceful_shutdown_timeout_s`).

Use `import_path: cllm.serving.api:build_app` in a Serve config (see configs/serve.yaml).
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` type on the route
# methods through Serve's ingress wrapper.

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence

import torch
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException

from cllm.decoding.modes import MODES
from cllm.models.loading import format_prompt, load_model
from cllm.serving.bridge import AsyncEngine, EngineStopped, OutputStream
from cllm.serving.config import ServeConfig, checked_config
from cllm.serving.protocol import (
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
from cllm.serving.request import ContextLengthError, Request, RequestError, StepStats, choice_sampling

logger = logging.getLogger("ray.serve")

api = FastAPI(title="cllm-ray: OpenAI-compatible Jacobi decoding server")


@api.exception_handler(StarletteHTTPException)  # unknown route, wrong method: OpenAI-shaped too
async def _http_error(_: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)


def openai_error(err: RequestError) -> OpenAIError:
    """A domain refusal as the OpenAI error a client gets."""
    code = "context_length_exceeded" if isinstance(err, ContextLengthError) else None
    return OpenAIError(err.message, param=err.param, code=code)


class ReleasingStream(StreamingResponse):
    """A streamed answer that runs `release` when it is over, even when it was cancelled before its body was
    read (the body's own `finally` never runs then)."""

    def __init__(self, content, release, **kwargs):
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


class ServeMetrics:
    """Replica metrics, exported by Ray's metrics agent (Prometheus)."""

    def __init__(self):
        self.requests = metrics.Counter(
            "cllm_requests", description="HTTP requests by route and status", tag_keys=("route", "status")
        )
        self.generated_tokens = metrics.Counter(
            "cllm_generated_tokens", description="tokens generated", tag_keys=("mode",)
        )
        # Their rates' ratio is the mean acceptance length (tokens per forward) over any window.
        self.committed_tokens = metrics.Counter(
            "cllm_committed_tokens",
            description="tokens made final by decoding passes (a request's first token, from its prefill, excluded)",
            tag_keys=("mode",),
        )
        self.decode_passes = metrics.Counter(
            "cllm_decode_passes",
            description="decoding passes, one per request in each batched pass (prefill excluded)",
            tag_keys=("mode",),
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
        if stats.passes:  # Ray's counters take positive increments only
            self.decode_passes.inc(stats.passes, tags={"mode": mode})
            if stats.committed:
                self.committed_tokens.inc(stats.committed, tags={"mode": mode})

    def record_request(self, request: Request, mode: str) -> None:
        tags = {"mode": mode}
        if request.tokens:
            self.generated_tokens.inc(len(request.tokens), tags=tags)
        if request.forward_passes:
            self.tokens_per_forward.observe(request.tokens_per_forward, tags=tags)
        if request.time_to_first_token is not None:
            self.time_to_first_token.observe(request.time_to_first_token, tags=tags)
        if request.queue_seconds is not None:
            self.queue_seconds.observe(request.queue_seconds, tags=tags)


@serve.deployment(name="JacobiServer")
@serve.ingress(api)
class JacobiServer:
    """One replica: a model, its engine in a thread of its own, and the OpenAI routes."""

    def __init__(self, config: dict):
        self.config = ServeConfig.model_validate(config)
        loaded = load_model(self.config.model, device=self.config.device, dtype=self.config.dtype)
        self.tokenizer = loaded.tokenizer
        self.metrics = ServeMetrics()
        self.loop: asyncio.AbstractEventLoop | None = None  # this replica's event loop, once a request came
        self.draining = False  # set by `drain`: every new request gets a 503
        self.in_flight = 0  # requests being answered, streams until their last event
        self.engine = AsyncEngine.from_config(loaded, self.config, on_step=self.record_step)
        self.created = now()
        logger.info(
            "JacobiServer ready: model %s (%s), mode %s, %s engine, block %d, context %s, batch <= %d",
            self.config.served_name,
            self.config.model,
            self.config.mode,
            self.config.engine,
            self.config.block_size,
            self.engine.engine.context,
            self.config.max_batch_size,
        )

    def check_health(self) -> None:
        """Serve's periodic probe: it fails once the engine thread has died, and Serve replaces the replica
        (a replica whose process died is replaced without it). A draining replica stays healthy: it is
        about to stop, and a replacement would only start to be stopped."""
        if not self.engine.alive:
            raise RuntimeError("the engine thread stopped")

    def unavailable(self) -> OpenAIError | None:
        """Why this replica takes no request now (a 503 for the client), or None."""
        if not self.engine.alive:
            return OpenAIError("the engine of this replica has stopped; it is being replaced", status=503,
                               code="engine_stopped")
        if self.draining:
            return OpenAIError("the server is shutting down", status=503, code="shutting_down")
        return None

    async def drain(self) -> int:
        """Take no new request (each gets a 503) and wait until those in flight are answered, at most
        `drain_timeout_s`; returns how many were left. `stop_serving` calls it on every replica before Serve
        stops them: `serve.shutdown` stops the HTTP proxies at once, which would cut the answers in flight."""
        self.draining = True
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        logger.info("drained: %d requests still in flight", self.in_flight)
        return self.in_flight

    def __del__(self):
        """Serve calls it when it stops the replica, after its requests in flight: the engine thread ends."""
        if getattr(self, "engine", None) is not None:
            self.engine.stop(timeout=5)

    def record_step(self, stats: StepStats) -> None:
        """`AsyncEngine.on_step`: the step's numbers go to the metrics on this replica's loop, off the engine."""
        if self.loop is not None:
            engine = self.engine.engine
            self.loop.call_soon_threadsafe(self.metrics.record_step, stats, engine.num_waiting, engine.num_running,
                                           self.config.mode)

    # --- routes -------------------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self):
        if refusal := self.unavailable():
            return JSONResponse(refusal.body(), status_code=refusal.status)
        config, engine = self.config, self.engine.engine
        return {"status": "ok", "model": config.served_name, "mode": config.mode, "engine": config.engine,
                "waiting": engine.num_waiting, "running": engine.num_running, "steps": engine.steps}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return ModelList(data=[ModelCard(id=self.config.served_name, created=self.created)]).model_dump()

    @api.post("/v1/completions")
    async def completions(self, request: HTTPRequest):
        return await self.answer("completions", self.complete, request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: HTTPRequest):
        return await self.answer("chat_completions", self.chat, request)

    # --- request handling ---------------------------------------------------------------------------------

    async def answer(self, route: str, handler, request: HTTPRequest):
        """Run a route's handler; every refusal or failure becomes an OpenAI error body, never a traceback.
        The request counts as in flight until its answer is out (a stream: until its last event)."""
        self.loop = self.loop or asyncio.get_running_loop()
        self.in_flight += 1
        streaming = False
        try:
            if refusal := self.unavailable():
                raise refusal
            response = await handler(await self.read_body(request))
            streaming, status = isinstance(response, StreamingResponse), 200
        except OpenAIError as err:
            response, status = JSONResponse(err.body(), status_code=err.status), err.status
        except Exception as err:
            logger.exception("unexpected error in %s", route)
            failure = OpenAIError(f"internal error: {type(err).__name__}", status=500)
            response, status = JSONResponse(failure.body(), status_code=500), 500
        finally:
            if not streaming:  # a stream leaves when its events end (`stream`)
                self.in_flight -= 1
        self.metrics.requests.inc(tags={"route": route, "status": str(status)})
        return response

    async def read_body(self, request: HTTPRequest) -> bytes:
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
        prompt_ids = list(prompt) if isinstance(prompt, list) else self.encode_text(prompt)
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

    async def respond(
        self, request: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int], max_tokens: int | None,
        reply: Reply,
    ):
        """Decode the request's n choices (choice i samples with seed + i), whole or streamed; a sampled
        answer names its seed in the body (`seed`) and the `x-cllm-seed` header."""
        settings, reply.seed = choice_sampling(request.temperature, request.top_p, request.top_k, request.seed,
                                               request.n)
        choices = [Request(prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling,
                           stop=tuple(request.stop_sequences()), index=i) for i, sampling in enumerate(settings)]
        try:
            outputs = self.engine.generate(choices)
        except RequestError as err:
            raise openai_error(err) from None
        except EngineStopped:
            raise self.unavailable() or OpenAIError("the engine has stopped", status=503) from None
        headers = {} if reply.seed is None else {"x-cllm-seed": str(reply.seed)}
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return self.stream(outputs, choices, reply, include_usage=include_usage, headers=headers)
        texts = ["" for _ in choices]
        try:
            async for output in outputs:
                texts[output.request.index] += output.text
        except asyncio.CancelledError:
            self.engine.abort(choices)  # the client disconnected: free its rows for the others
            raise
        self.record(choices)
        if failed := [choice.error for choice in choices if choice.error is not None]:
            raise OpenAIError(f"decoding failed: {failed[0]}", status=500)
        return JSONResponse(reply.full(choices, texts, self.stats(choices)).model_dump(), headers=headers)

    def stream(self, outputs: OutputStream, choices: list[Request], reply: Reply, *, include_usage: bool,
               headers: dict) -> StreamingResponse:
        """Send text as it is committed."""

        async def deltas() -> AsyncIterator[str]:
            """The text events; text that queued up meanwhile goes in one write, one event per choice: under
            load every write is a message from replica to proxy, and the proxy shares the machine."""
            async for first in outputs:
                ready: dict[int, str] = {}
                for output in [first, *outputs.ready()]:
                    ready[output.request.index] = ready.get(output.request.index, "") + output.text
                if text := "".join(reply.delta(text, index) for index, text in ready.items() if text):
                    yield text
                if self.config.stream_interval_s and outputs.unfinished:  # what comes meanwhile goes in one write
                    await outputs.wait_ended(self.config.stream_interval_s)

        released = False

        def release() -> None:
            """The stream leaves: once, whether its events ended, failed, or never began (a client that
            disconnects before the first write cancels the response before its body is read)."""
            nonlocal released
            if released:
                return
            released = True
            self.in_flight -= 1
            if outputs.unfinished:  # the client left early: stop its rows
                tokens = sum(len(choice.tokens) for choice in choices)
                logger.info("client left a stream after %d tokens", tokens)
                self.engine.abort(choices)

        async def events() -> AsyncIterator[str]:
            try:
                if opening := "".join(reply.opening(index) for index in range(len(choices))):
                    yield opening
                async for text in deltas():
                    yield text
                self.record(choices)
                if failed := [choice.error for choice in choices if choice.error is not None]:
                    logger.warning("streamed request failed: %s", failed[0])
                    ending = [sse_event(error_body(f"decoding failed: {failed[0]}", type="server_error"))]
                else:
                    ending = [reply.closing(choice, self.stats([choice]), i) for i, choice in enumerate(choices)]
                    if include_usage:
                        ending.append(reply.usage_only(choices))
                yield "".join(ending) + SSE_DONE
            finally:
                release()

        return ReleasingStream(
            events(),
            release,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )

    def stats(self, choices: Sequence[Request]) -> JacobiStats:
        """How a request's choices were decoded, together (one choice: exactly its own numbers)."""
        passes = sum(choice.forward_passes for choice in choices)
        decoded = sum(len(choice.tokens) - 1 for choice in choices if choice.forward_passes)
        waits = [choice.time_to_first_token for choice in choices if choice.time_to_first_token is not None]
        queued = [choice.queue_seconds for choice in choices if choice.queue_seconds is not None]
        return JacobiStats(
            mode=self.config.mode,
            block_size=MODES[self.config.mode].block_size(self.config.block_size),
            forward_passes=passes,
            tokens_per_forward=round(decoded / passes if passes else 0.0, 4),
            accepted_lengths=[sum(counts) for counts in itertools.zip_longest(
                *(choice.accepted for choice in choices), fillvalue=0)],
            batch_size=max(choice.batch_size for choice in choices),  # continuous: the most requests sharing a pass
            decode_seconds=round(max(choice.decode_seconds for choice in choices), 4),
            first_token_seconds=round(min(waits), 4) if waits else None,  # the answer's first text
            queue_seconds=round(min(queued), 4) if queued else None,
        )

    def record(self, choices: Sequence[Request]) -> None:
        for choice in choices:
            self.metrics.record_request(choice, self.config.mode)
            logger.info(
                "request: %d prompt + %d new tokens, %s, %d forward passes, %.2f tokens/forward, batch %d, "
                "first token %.3fs (queued %.3fs)",
                len(choice.prompt_ids),
                len(choice.tokens),
                choice.finish_reason,
                choice.forward_passes,
                choice.tokens_per_forward,
                choice.batch_size,
                choice.time_to_first_token or 0.0,
                choice.queue_seconds or 0.0,
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
        "health_check_period_s": config.health_check_period_s,
        "health_check_timeout_s": config.health_check_timeout_s,
        "graceful_shutdown_timeout_s": config.drain_timeout_s,
    }


def ready_config(args: dict | ServeConfig | None = None) -> ServeConfig:
    """The config replicas get: the served name fixed first, then `builtin` turned into its directory here
    (trained once if needed), so a replica only ever loads a ready model."""
    from cllm.models.teacher import resolve_model  # an entry point's job: `serve run` enters through build_app

    config = checked_config(args)
    named = config.model_copy(update={"model_name": config.served_name})
    return checked_config(named.model_copy(update={"model": resolve_model(config.model)}))


def build_app(args: dict | ServeConfig | None = None) -> serve.Application:
    """The Serve application (`import_path: cllm.serving.api:build_app`); `args` are ServeConfig fields."""
    config = ready_config(args)
    return JacobiServer.options(**deployment_options(config)).bind(config.model_dump())


def stop_serving(config: ServeConfig) -> None:
    """Stop the app without cutting a request, then shut Serve down. Every replica drains first (`drain`:
    new requests get a 503, those in flight finish), then the app is deleted (Serve stops the replicas;
    their `__del__` stops the engine thread), then Serve goes. In that order because `serve.shutdown`
    stops the HTTP proxies at once: a response still on its way would be cut."""
    try:
        handle = serve.get_deployment_handle("JacobiServer", config.app_name)
        left = handle.broadcast("drain").results(timeout_s=config.drain_timeout_s + 30, return_exceptions=True)
        logger.info("drained %d replicas (requests still in flight: %s)", len(left), left)
        serve.delete(config.app_name)
    except Exception as err:  # no such app (it never started), or a replica that is gone: stop all the same
        logger.warning("draining %r failed (%s: %s); shutting down", config.app_name, type(err).__name__, err)
    finally:
        serve.shutdown()


def serve_until_stopped(config: ServeConfig) -> None:
    """Deploy on the connected Ray cluster and block until Ctrl-C or SIGTERM; then stop (`stop_serving`).
    A second Ctrl-C or SIGTERM during the drain shuts down at once."""
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
        print(f"stopping: requests in flight get up to {config.drain_timeout_s:g}s to finish", flush=True)
    finally:
        stop_serving(config)
