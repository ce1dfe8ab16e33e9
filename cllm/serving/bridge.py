"""The bridge between an engine and the event loop that serves clients: `generate` and `abort`.

    EngineLoop   one turn of the engine thread: a step of the engine (continuous or static, the same
                 interface), then its outputs through the output processor; a request that reached a stop
                 sequence is dropped from the engine before its next step. Synchronous: tests and
                 offline use drive it directly.
    AsyncEngine  runs an `EngineLoop` back to back in a thread of its own while there is work, sleeps
                 otherwise, and outlives a failing step. `generate(requests)` admits a client request's
                 choices (a refusal raises there, before any output) and returns an `OutputStream`: their
                 `TextOutput`s, delivered on the caller's event loop as the engine thread makes them.
                 When the thread ends (stopped, or died), every request still waiting on it fails, and
                 `generate` refuses with `EngineStopped`: no client waits on a thread that is gone.

A step driven from the event loop (`await asyncio.to_thread(engine.step)`) would start only once the loop
had run everything queued before it, and under load the loop is busy streaming every request's text: the
engine would idle between passes while newcomers wait for their prefill. Here the next step starts the
moment the last one ends; the loop only adds requests and receives their text. Nothing here imports Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Sequence

from cllm.models.loading import LoadedModel
from cllm.serving.config import ServeConfig
from cllm.serving.engine import Engine
from cllm.serving.output import OutputProcessor, TextOutput
from cllm.serving.request import Request, StepStats
from cllm.serving.static import StaticEngine

logger = logging.getLogger("ray.serve")

ENGINES = {"continuous": Engine, "static": StaticEngine}  # ServeConfig.engine -> the engine it names


class EngineStopped(RuntimeError):
    """The engine thread has ended: nothing will decode a request handed to it."""


class EngineLoop:
    """A step of the engine, then its outputs turned into text."""

    def __init__(self, engine: Engine | StaticEngine, processor: OutputProcessor):
        self.engine, self.processor = engine, processor

    def step(self) -> tuple[StepStats, list[TextOutput]]:
        result = self.engine.step()
        processed = self.processor.process(result.outputs)
        for request in processed.stopped:
            self.engine.abort(request)
        return result.stats, processed.texts


class OutputStream:
    """The text outputs of one client request's choices, on the event loop that asked for them."""

    def __init__(self, requests: Sequence[Request], loop: asyncio.AbstractEventLoop):
        self.requests = list(requests)
        self.loop = loop
        self.queue: asyncio.Queue[TextOutput] = asyncio.Queue()
        self.unfinished = len(self.requests)  # choices whose last output is not yet taken
        self.unarrived = len(self.requests)  # choices whose last output has not yet arrived
        self.ended = asyncio.Event()  # every choice's last output has arrived

    def put(self, output: TextOutput) -> None:
        """From the engine thread: hand an output to the event loop."""
        self.loop.call_soon_threadsafe(self.arrive, output)

    def arrive(self, output: TextOutput) -> None:
        self.queue.put_nowait(output)
        self.unarrived -= output.finished
        if not self.unarrived:
            self.ended.set()

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> TextOutput:
        if not self.unfinished:
            raise StopAsyncIteration
        return self.took(await self.queue.get())

    def ready(self) -> list[TextOutput]:
        """The outputs that arrived and are not yet taken, without waiting."""
        outputs = []
        while self.unfinished and not self.queue.empty():
            outputs.append(self.took(self.queue.get_nowait()))
        return outputs

    def took(self, output: TextOutput) -> TextOutput:
        self.unfinished -= output.finished
        return output

    async def wait_ended(self, timeout: float) -> None:
        """Until every choice has ended, or `timeout` seconds."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.ended.wait(), timeout)


class AsyncEngine:
    """An engine stepped in a thread of its own; `generate` and `abort` from any event loop."""

    _names = itertools.count(1)

    def __init__(self, engine: Engine | StaticEngine, tokenizer,
                 on_step: Callable[[StepStats], None] | None = None):
        self.engine = engine
        self.loop = EngineLoop(engine, OutputProcessor(tokenizer))
        self.on_step = on_step  # called in the engine thread after every step; hand off to another thread if slow
        self.streams: dict[str, OutputStream] = {}  # request id -> the stream its outputs go to
        self.lock = threading.Lock()  # guards `streams`
        self.wake = threading.Event()
        self.stopping = False
        self.ended = False  # the thread is through; set under `lock`, so no stream can be added after it
        self.thread = threading.Thread(target=self.run, name=f"cllm-engine-{next(self._names)}", daemon=True)
        self.thread.start()

    @classmethod
    def from_config(cls, loaded: LoadedModel, config: ServeConfig,
                    on_step: Callable[[StepStats], None] | None = None) -> AsyncEngine:
        return cls(ENGINES[config.engine](loaded, config), loaded.tokenizer, on_step)

    def generate(self, requests: Sequence[Request]) -> OutputStream:
        """Admit a client request's choices (a `RequestError` raises here, and none of them is queued) and
        return the stream of their outputs. Call from the event loop that will read the stream."""
        stream = OutputStream(requests, asyncio.get_running_loop())
        with self.lock:
            if self.ended:
                raise EngineStopped("the engine thread has stopped")
            for request in requests:
                self.streams[request.request_id] = stream
        added = []
        try:
            for request in requests:
                self.engine.add(request)
                added.append(request)
        except BaseException:
            self.abort(added)
            with self.lock:
                for request in requests:
                    self.streams.pop(request.request_id, None)
            raise
        self.wake.set()
        return stream

    def abort(self, requests: Sequence[Request]) -> None:
        """Stop requests (those that already ended are left alone): the engine drops them at its next step."""
        for request in requests:
            if not request.finished:
                self.engine.abort(request)
        self.wake.set()

    def run(self) -> None:
        try:
            while not self.stopping:
                if not self.engine.has_work():
                    self.wake.wait()
                    self.wake.clear()  # a request added from here on is seen by has_work() above
                    continue
                try:
                    stats, texts = self.loop.step()
                    self.publish(texts)
                    if self.on_step is not None:
                        self.on_step(stats)
                except Exception:  # a step fails the requests concerned itself; this keeps serving the rest
                    logger.exception("engine step failed")
        except BaseException:
            logger.exception("the engine thread died")
            raise
        finally:
            self.end_streams()

    def end_streams(self) -> None:
        """The thread is ending: each request still waiting for output fails and its stream gets its end."""
        with self.lock:
            self.ended = True
            streams, self.streams = self.streams, {}
        for request_id, stream in streams.items():
            request = next(r for r in stream.requests if r.request_id == request_id)
            if not request.finished:
                request.fail("the engine thread stopped before the request ended")
            with contextlib.suppress(Exception):  # its event loop may be gone too
                stream.put(TextOutput(request, "", finished=True))

    def publish(self, texts: list[TextOutput]) -> None:
        """Each output to its request's stream; a stream that cannot take it ends its request alone."""
        for output in texts:
            request = output.request
            with self.lock:
                stream = self.streams.pop(request.request_id, None) if output.finished else \
                    self.streams.get(request.request_id)
            if stream is None:
                continue
            try:
                stream.put(output)
            except Exception as err:  # its event loop is gone
                logger.warning("a request's stream failed (%s: %s); its request ends", type(err).__name__, err)
                with self.lock:
                    self.streams.pop(request.request_id, None)
                if not request.finished:
                    request.fail(err)
                    self.engine.abort(request)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """End the loop after the current step; requests still in the engine fail (see `end_streams`)."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout)
