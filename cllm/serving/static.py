"""The static engine: whole batches, each decoded to its end by one call of the mode's offline decoder.

Waiting requests gather for up to `batch_wait_timeout_s` after the first (or until `max_batch_size` wait);
then the batch is split into groups that fit the context together (`fitting_groups`) and each group is
decoded by one `generate` call of its mode (`cllm.decoding.modes`: `jacobi_generate`, `multiblock_generate`, or
Jacobi with a block of one for AR) in a worker thread, while the next requests queue. The call's
`on_commit` only records what it made final; `step()` returns that as data, like the continuous engine
(`cllm.serving.engine`), whose outward interface this engine shares: `add`, `abort`, `has_work`, `step`.
A row whose request ended meanwhile (aborted, or stopped by its text) stops at its next commit.
Nothing here imports Ray.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

from cllm.decoding.core import left_pad, room_for, special_tokens
from cllm.decoding.modes import MODES
from cllm.models.loading import LoadedModel, context_length
from cllm.serving.config import ServeConfig
from cllm.serving.request import EngineOutput, Request, RequestStatus, StepResult, StepStats
from cllm.serving.scheduler import Limits, admit

logger = logging.getLogger("ray.serve")


def fitting_groups(requests: list[Request], context: int | None) -> list[list[Request]]:
    """Split a batch so each group's padded prompt + largest max_tokens fits the context.

    Left padding makes every row as long as the longest prompt, so a short prompt with a large
    max_tokens cannot share a call with a long prompt; each request alone always fits (checked at admission).
    """
    if context is None:
        return [requests]
    groups: list[list[Request]] = []
    for request in requests:
        for group in groups:
            width = max(len(r.prompt_ids) for r in [*group, request])
            if max(r.max_tokens for r in [*group, request]) <= room_for(context, width):
                group.append(request)
                break
        else:
            groups.append([request])
    return groups


class StaticEngine:
    """Batches decoded to their end; `add` and `abort` may be called from other threads."""

    def __init__(self, loaded: LoadedModel, config: ServeConfig):
        self.model = loaded.model
        special = special_tokens(loaded.tokenizer, self.model.generation_config)
        self.eos_ids = set(special.eos_ids)
        self.eos_token_id, self.pad_id = list(special.eos_ids) or None, special.pad_id
        self.context = context_length(self.model)
        self.limits = Limits(self.context, self.model.get_input_embeddings().num_embeddings, config.max_new_tokens)
        self.mode = MODES[config.mode]
        self.options = self.mode.options(config, config.seed)
        self.max_batch_size, self.batch_wait = config.max_batch_size, config.batch_wait_timeout_s
        self.waiting: deque[Request] = deque()
        self.aborted: set[str] = set()
        self.lock = threading.Lock()  # guards `waiting`, `aborted` and `window_opened` against other threads
        self.arrived = threading.Event()
        self.window_opened: float | None = None  # when the first of the waiting requests came
        self.members: dict[str, Request] = {}  # requests added and not yet ended (engine thread only)
        self.batch: list[Request] | None = None  # the batch in the worker thread
        self.events: queue.SimpleQueue = queue.SimpleQueue()  # what the worker reports, in order
        self.steps = 0

    # --- the outside: requests in, requests out -------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request for the next batch; one that could not decode raises `RequestError` here."""
        admit(request, self.limits)
        with self.lock:
            if not self.waiting:
                self.window_opened = time.perf_counter()
            self.waiting.append(request)
            self.members[request.request_id] = request
        self.arrived.set()

    def abort(self, request: Request) -> None:
        """Stop a request: a waiting one never starts, a decoding one's row stops at its next commit."""
        with self.lock:
            self.aborted.add(request.request_id)
        self.arrived.set()

    def has_work(self) -> bool:
        return bool(self.waiting or self.batch is not None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.members) - len(self.waiting)

    # --- one step: start a batch when one is due, collect what the running one committed ---------------------

    def step(self, timeout: float = 0.05) -> StepResult:
        """What happened since the last step, waiting at most `timeout` seconds for the running batch."""
        stats, start = StepStats(), time.perf_counter()
        outputs: dict[str, EngineOutput] = {}
        self.apply_aborts(outputs, stats)
        if self.batch is None and (batch := self.take_batch()):
            self.batch = batch
            stats.admitted = len(batch)
            threading.Thread(target=self.decode, args=(batch,), name="cllm-static-batch", daemon=True).start()
        if self.batch is not None:
            self.collect(outputs, stats, timeout)
        self.steps += 1
        stats.seconds = time.perf_counter() - start
        return StepResult(list(outputs.values()), stats)

    def apply_aborts(self, outputs: dict[str, EngineOutput], stats: StepStats) -> None:
        with self.lock:
            aborted, self.aborted = self.aborted, set()
            for request in [r for r in self.waiting if r.request_id in aborted]:
                self.waiting.remove(request)
        for request_id in aborted:
            if (request := self.members.get(request_id)) is not None:
                self.end(request, RequestStatus.FINISHED_ABORTED, outputs, stats)

    def take_batch(self) -> list[Request] | None:
        """The next batch, once `max_batch_size` requests wait or the first has waited `batch_wait_timeout_s`;
        until then, wait (at most that long) for more."""
        with self.lock:
            if not self.waiting:
                return None
            now = time.perf_counter()
            due = self.window_opened + self.batch_wait
            if len(self.waiting) >= self.max_batch_size or now >= due:
                batch = [self.waiting.popleft() for _ in range(min(self.max_batch_size, len(self.waiting)))]
                self.window_opened = now if self.waiting else None
                return batch
            self.arrived.clear()
        self.arrived.wait(due - now)
        return None

    def collect(self, outputs: dict[str, EngineOutput], stats: StepStats, timeout: float) -> None:
        """Apply the worker's reports: the first one waited for, then every one already there."""
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self.apply(event, outputs, stats)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return

    def apply(self, event: tuple, outputs: dict[str, EngineOutput], stats: StepStats) -> None:
        kind, *data = event
        if kind == "done":  # the worker is through the whole batch
            self.batch = None
            return
        if kind == "started":
            group, at = data
            for request in self.live(group):
                request.status, request.started_at, request.batch_size = RequestStatus.RUNNING, at, len(group)
        elif kind == "commit":
            request, tokens, at = data
            if request.request_id not in self.members:
                return  # it ended meanwhile: what its row made final after that is dropped
            if request.tokens:
                request.forward_passes += 1  # each pass commits once per row; the first commit is prefill's
                request.accept(len(tokens))
                stats.committed += len(tokens)
                stats.passes += 1
            request.commit(tokens, at)
            request.decode_seconds = at - request.started_at
            self.output(request, outputs).new_tokens.extend(tokens)
        elif kind == "ended":
            group, passes, seconds = data
            for request, count in zip(group, passes, strict=True):
                if request.request_id in self.members:
                    request.forward_passes, request.decode_seconds = count, seconds
                    ended_on_eos = bool(request.tokens) and request.tokens[-1] in self.eos_ids
                    status = RequestStatus.FINISHED_STOPPED if ended_on_eos else RequestStatus.FINISHED_LENGTH
                    self.end(request, status, outputs, stats)
        elif kind == "failed":
            group, error = data
            for request in self.live(group):
                request.fail(error)
                self.end(request, RequestStatus.FINISHED_ERROR, outputs, stats)

    def live(self, requests: list[Request]) -> list[Request]:
        return [request for request in requests if request.request_id in self.members]

    @staticmethod
    def output(request: Request, outputs: dict[str, EngineOutput]) -> EngineOutput:
        return outputs.setdefault(request.request_id, EngineOutput(request, []))

    def end(self, request: Request, status: RequestStatus, outputs: dict[str, EngineOutput],
            stats: StepStats) -> None:
        """A request leaves the engine: its status is `status` unless something already ended it, and its
        output says it finished (once: later reports of its row are dropped)."""
        self.members.pop(request.request_id, None)
        if not request.finished:
            request.status = status
        self.output(request, outputs).finished = True
        stats.finished += 1

    # --- the worker thread -----------------------------------------------------------------------------------

    def decode(self, batch: list[Request]) -> None:
        """Decode a batch group by group, reporting to the engine thread through `events`."""
        try:
            for group in fitting_groups(batch, self.context):
                live = [request for request in group if not request.finished]
                if not live:
                    continue
                try:
                    self.decode_group(live)
                except Exception as err:
                    logger.exception("decoding a static batch of %d failed", len(live))
                    self.events.put(("failed", live, f"{type(err).__name__}: {err}"))
        finally:
            self.events.put(("done",))

    def decode_group(self, group: list[Request]) -> None:
        start = time.perf_counter()
        self.events.put(("started", group, start))
        device = next(self.model.parameters()).device
        input_ids, mask = left_pad([request.prompt_ids for request in group], self.pad_id)

        def on_commit(row: int, tokens: list[int]) -> bool:
            """Record a row's final tokens; True stops a row whose request ended meanwhile."""
            request = group[row]
            if request.finished:
                return True
            self.events.put(("commit", request, tokens, time.perf_counter()))
            return False

        out = self.mode.generate(
            self.model, input_ids.to(device), mask.to(device), max_new_tokens=[r.max_tokens for r in group],
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_id, on_commit=on_commit,
            sampling=[r.sampling for r in group], **self.options,
        )
        seconds = time.perf_counter() - start
        self.events.put(("ended", group, out.row_forward_passes, seconds))
        logger.info(
            "decoded batch of %d (%s): %d forward passes, %.2f tokens/forward, %d tokens, %.3fs",
            len(group), self.mode.name, out.forward_passes, out.tokens_per_forward, sum(out.new_tokens), seconds,
        )
