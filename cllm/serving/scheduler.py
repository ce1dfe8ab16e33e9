"""Which requests run in the next engine step, and with how many tokens each; no model, no Ray.

    admit       the fit check, done once when a request is added: a request that passes it can never
                fail a shared step for being too long (`admit`, used by both engines)
    queue       admitted requests wait in arrival order; `abort` may come from any thread
    schedule    a `StepPlan`: which running requests leave (aborted, or ended by their text), which
                waiting ones join (as many as `max_running` and the token budget leave room for), and
                whether the step runs a pass (`prefill_first`: a step that admits ends after the prefill,
                but never two such steps in a row, so the running rows never starve)
    budget      a `Budget`: how wide each row's window may be so running rows x window stays within
                `max_tokens_per_step`; blocks shrink (down to one token: AR) instead of rows waiting

The plan is data; the engine applies it (`cllm.serving.engine`).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from cllm.decoding.core import check_token_ids, room_for
from cllm.serving.request import ContextLengthError, Request, RequestError


@dataclass(frozen=True)
class Limits:
    """What a request is checked against when it is added."""

    context: int | None  # the model's context (None: no limit)
    vocab_size: int
    default_max_tokens: int  # for a request that names no max_tokens (cut to what the context leaves)


def admit(request: Request, limits: Limits) -> None:
    """Refuse a request that could not decode, and settle its max_tokens; raises `RequestError`."""
    n = len(request.prompt_ids)
    if n == 0:
        raise RequestError("prompt is empty (it encodes to no tokens)", param="prompt")
    if request.max_tokens is not None and request.max_tokens < 1:
        raise RequestError(f"max_tokens must be >= 1, got {request.max_tokens}", param="max_tokens")
    if any(not isinstance(s, str) or not s for s in request.stop):
        raise RequestError("stop sequences must be non-empty strings", param="stop")
    try:
        check_token_ids(request.prompt_ids, limits.vocab_size)
    except ValueError as err:
        raise RequestError(str(err), param="prompt") from None
    context, room = limits.context, room_for(limits.context, n)
    if room is not None and room < 1:
        raise ContextLengthError(
            f"prompt is {n} tokens; the model's context is {context} tokens, leaving no room to generate",
            param="prompt",
        )
    if request.max_tokens is None:
        request.max_tokens = limits.default_max_tokens if room is None else min(limits.default_max_tokens, room)
    elif room is not None and request.max_tokens > room:
        raise ContextLengthError(
            f"max_tokens {request.max_tokens} + prompt {n} tokens exceeds the model's context of {context} "
            f"tokens (at most {room} new tokens for this prompt)",
            param="max_tokens",
        )


def window_for(block_size: int, rows: int, max_tokens_per_step: int) -> int:
    """The widest window every row may have so the step forwards at most `max_tokens_per_step` tokens
    (never below 1: a single token per row is plain AR decoding)."""
    return max(1, min(block_size, max_tokens_per_step // max(rows, 1)))


@dataclass(frozen=True)
class Budget:
    """How many tokens each row may put into one pass."""

    width: int  # window slots per row
    block_size: int  # the longest block a row opens from now on
    blocks: int  # the most blocks a row keeps in flight (multi-block rows)


@dataclass
class StepPlan:
    """What one engine step does, decided before it starts."""

    leaving: list[Request]  # running requests to drop (aborted, or ended by their text)
    dropped: list[Request]  # waiting requests aborted before they started
    joining: list[Request]  # waiting requests to prefill; their rows join the running ones
    join_budget: Budget  # the blocks the joining rows open with
    runs_pass: bool  # False: the step ends after the prefill


class Scheduler:
    """The waiting queue and the step plans; `add` and `abort` may be called from any thread."""

    def __init__(self, *, block_size: int, blocks: int, max_running: int, max_tokens_per_step: int,
                 prefill_first: bool):
        self.block_size, self.blocks = block_size, blocks
        self.max_running, self.max_tokens_per_step = max_running, max_tokens_per_step
        self.prefill_first = prefill_first
        self.waiting: deque[Request] = deque()
        self.aborted: set[str] = set()  # request ids to drop at the next step
        self.lock = threading.Lock()  # guards `waiting` and `aborted` against other threads
        self.last_step_prefill_only = False

    def add(self, request: Request) -> None:
        with self.lock:
            self.waiting.append(request)

    def abort(self, request: Request) -> None:
        with self.lock:
            self.aborted.add(request.request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def budget(self, rows: int) -> Budget:
        """The widest window each of `rows` rows may have in one pass; a multi-block row opens no more blocks
        than fit in it."""
        width = window_for(self.block_size * self.blocks, rows, self.max_tokens_per_step)
        block_size = min(self.block_size, width)
        return Budget(width, block_size, max(1, min(self.blocks, width // block_size)))

    def schedule(self, running: list[Request]) -> StepPlan:
        with self.lock:
            aborted, self.aborted = self.aborted, set()
            dropped = [request for request in self.waiting if request.request_id in aborted]
            for request in dropped:
                self.waiting.remove(request)
            leaving = [request for request in running if request.request_id in aborted or request.finished]
            room = min(self.max_running, self.max_tokens_per_step) - (len(running) - len(leaving))
            joining = [self.waiting.popleft() for _ in range(min(max(room, 0), len(self.waiting)))]
        staying = len(running) - len(leaving)
        # prefill first: a step that admits ends after the prefill, so requests that arrive meanwhile are
        # admitted next without waiting for a pass; never twice in a row, so the passes go on
        prefill_only = self.prefill_first and bool(joining) and not self.last_step_prefill_only
        self.last_step_prefill_only = prefill_only
        return StepPlan(leaving, dropped, joining, self.budget(staying + len(joining)), runs_pass=not prefill_only)
