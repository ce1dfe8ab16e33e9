"""One request on its way through the server, and the errors that refuse one; no Ray, no HTTP.

A `Request` is one choice of a client's request: its prompt ids, how many tokens it may get, how it
samples, where its text stops. The engine fills in the rest as it decodes (committed tokens, timings,
status), and hands what each step added back as `EngineOutput`s. A request that cannot be served as
asked raises a `RequestError` naming the parameter at fault; the API layer turns it into an HTTP error.
`StepResult` is what either engine's `step()` returns: an `EngineOutput` per request it touched, and
`StepStats` for metrics.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Literal

from cllm.decoding.sampling import SamplingParams, fresh_seed

FinishReason = Literal["stop", "length"]


class RequestError(ValueError):
    """A request the engine refuses; `param` names the request field at fault (None: the request as a whole)."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class ContextLengthError(RequestError):
    """The prompt, or the prompt and max_tokens together, do not fit the model's context."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for the engine
    RUNNING = "running"  # prefilled, its row in the engine's passes
    FINISHED_STOPPED = "stop"  # an EOS token or a stop sequence ended it
    FINISHED_LENGTH = "length"  # it got max_tokens tokens
    FINISHED_ABORTED = "aborted"  # its client went away
    FINISHED_ERROR = "error"  # decoding it failed (`Request.error` says why)

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


_ids = itertools.count(1)


@dataclass(eq=False)  # identity: two requests with the same prompt are two requests
class Request:
    prompt_ids: list[int]
    max_tokens: int | None  # None: as many as the server's default allows within the context (set at admission)
    sampling: SamplingParams | None = None  # None: greedy
    stop: tuple[str, ...] = ()  # stop sequences: the text ends before the first one
    index: int = 0  # which choice of its client's request this is
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrived: float = field(default_factory=time.perf_counter)
    status: RequestStatus = RequestStatus.WAITING
    tokens: list[int] = field(default_factory=list)  # committed: final, in order
    error: str | None = None
    started_at: float | None = None  # its prefill began (admitted by the engine, or its static batch started)
    first_token_at: float | None = None
    forward_passes: int = 0  # decoding passes it took part in (prefill excluded)
    accepted: list[int] = field(default_factory=list)  # accepted[k]: its decoding passes that made k tokens final
    batch_size: int = 0  # the most requests that shared one of its passes
    decode_seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> FinishReason | None:
        """OpenAI's reason: "stop" (EOS or a stop sequence), "length" (max_tokens); None if it did not end so."""
        if self.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            return self.status.value
        return None

    def fail(self, error: BaseException | str) -> None:
        self.status = RequestStatus.FINISHED_ERROR
        self.error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"

    def commit(self, tokens: list[int], at: float) -> None:
        """Take newly final tokens (the first ones mark the request's first-token time)."""
        if tokens and self.first_token_at is None:
            self.first_token_at = at
        self.tokens.extend(tokens)

    def accept(self, count: int) -> None:
        """A decoding pass made `count` of its tokens final: the pass's accepted length, in speculative terms."""
        if len(self.accepted) <= count:
            self.accepted.extend([0] * (count + 1 - len(self.accepted)))
        self.accepted[count] += 1

    @property
    def tokens_per_forward(self) -> float:
        """Decoded tokens per pass this request took part in (its first token comes from prefill)."""
        return (len(self.tokens) - 1) / self.forward_passes if self.forward_passes else 0.0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrived

    @property
    def queue_seconds(self) -> float | None:
        """The part of the first-token wait spent queued, before any computing for this request."""
        return None if self.started_at is None else self.started_at - self.arrived


@dataclass
class EngineOutput:
    """What one engine step did for one request: the tokens it made final, and whether the request ended."""

    request: Request
    new_tokens: list[int]
    finished: bool = False


@dataclass
class StepStats:
    """What one `step()` did, for metrics."""

    admitted: int = 0
    running: int = 0  # rows in the Jacobi pass
    window: int = 0  # block size this step allowed per row
    slots: int = 0  # window tokens forwarded (the budgeted quantity)
    committed: int = 0  # tokens made final by the pass (prefill's first tokens excluded)
    passes: int = 0  # request passes: each request's part in the batched pass (committed / passes: acceptance)
    finished: int = 0
    seconds: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)  # seconds by part of the step (continuous engine)


@dataclass
class StepResult:
    outputs: list[EngineOutput]  # one per request the step touched
    stats: StepStats


def choice_sampling(
    temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None, n: int | None
) -> tuple[list[SamplingParams | None], int | None]:
    """The sampling settings of each of a request's n choices, and the seed to send back (None: greedy).

    Omitted or 0 temperature is greedy (the server's default; top_p/top_k then change nothing). Choice i
    samples with seed + i, so choice 0 of an n-choice request is the answer of the same request with n=1;
    a request without a seed gets a random one.
    """
    choices = n or 1
    if not temperature:
        return [None] * choices, None
    seed = fresh_seed() if seed is None else seed
    return [
        SamplingParams(temperature=temperature, top_p=1.0 if top_p is None else top_p, top_k=top_k or 0,
                       seed=seed + i)
        for i in range(choices)
    ], seed
