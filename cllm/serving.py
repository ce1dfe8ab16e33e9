"""The Ray-free request/decode layer of the server: admit a request, decode batches of them, stream text.

    admit    tokenized prompt + max_tokens checked against the context -> a DecodeJob (a job that would
             fail never joins a batch)
    decode   static: one batched `jacobi_generate` (or `ar_generate`) call; its `on_commit` feeds each
             job's TextStream (`deliver`), which applies stop sequences and hands text deltas to streaming
             clients; continuous: `cllm.engine.Engine` admits jobs between Jacobi iterations instead
    sample   a request's temperature/top_p/top_k/seed/n become one `SamplingParams` per choice
             (`choice_sampling`); each choice is its own job, so n samples are rows of one batch

`cllm.serve` wraps this in a Ray Serve deployment; nothing here imports Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from cllm.decoding import DecodeFields, left_pad, room_for, special_tokens
from cllm.jacobi import ar_generate, jacobi_generate
from cllm.models import LoadedModel, context_length
from cllm.multiblock import multiblock_generate
from cllm.openai_api import OpenAIError
from cllm.sampling import SamplingParams, fresh_seed
from cllm.streaming import TextStream

logger = logging.getLogger("ray.serve")

Mode = Literal["jacobi", "ar", "multiblock"]  # "ar": one token per pass, the baseline; "multiblock": K = 2


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
    started_at: float | None = None  # its prefill began: admitted by the engine, or its static batch started
    first_token_at: float | None = None
    forward_passes: int = 0
    batch_size: int = 0
    decode_seconds: float = 0.0
    error: str | None = None
    on_done: Callable[[], None] | None = None  # continuous engine: called (from its thread) once the job ended
    sampling: SamplingParams | None = None  # None: greedy

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
            if max(j.max_tokens for j in [*group, job]) <= room_for(context, width):
                group.append(job)
                break
        else:
            groups.append([job])
    return groups


class BatchDecoder:
    """Decodes a list of jobs with one batched Jacobi (or AR) call and routes committed tokens to each job."""

    def __init__(self, loaded: LoadedModel, decode: DecodeFields, mode: Mode = "jacobi", seed: int = 0):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.decode_settings, self.mode, self.seed = decode, mode, seed
        self.context = context_length(self.model)
        special = special_tokens(self.tokenizer, self.model.generation_config)
        self.eos_ids = set(special.eos_ids)
        self.eos_token_id = list(special.eos_ids) or None
        self.pad_id = special.pad_id

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
        for job in live:
            job.started_at = start
        out = self.generate(
            input_ids.to(device), mask.to(device), [job.max_tokens for job in live], self.commit_hook(live),
            [job.sampling for job in live],
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
            self.mode,
            out.forward_passes,
            out.tokens_per_forward,
            sum(out.new_tokens),
            seconds,
        )

    def generate(self, input_ids, mask, budgets: list[int], on_commit, sampling=None):
        common = dict(
            max_new_tokens=budgets,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_id,
            on_commit=on_commit,
            sampling=sampling,
        )
        if self.mode == "ar":
            return ar_generate(self.model, input_ids, mask, **common)
        settings = self.decode_settings
        if self.mode == "multiblock":
            return multiblock_generate(
                self.model, input_ids, mask, block_size=settings.block_size, init=settings.init, seed=self.seed,
                **common,
            )
        return jacobi_generate(
            self.model,
            input_ids,
            mask,
            block_size=settings.block_size,
            init=settings.init,
            max_iters=settings.max_iters,
            seed=self.seed,
            **common,
        )

    @staticmethod
    def commit_hook(jobs: list[DecodeJob]) -> Callable[[int, list[int]], bool]:
        """`on_commit` for a batch: feed the row's job; True stops the row (stop sequence, client gone)."""

        def on_commit(row: int, tokens: list[int]) -> bool:
            return deliver(jobs[row], tokens)

        return on_commit

    def finish(self, job: DecodeJob) -> None:
        finish_job(job, self.eos_ids)


def deliver(job: DecodeJob, tokens: list[int]) -> bool:
    """Hand a job its newly final tokens and stream their text; True: stop its row (stop sequence, client
    gone, or its own failure, which must not end the decoding of the requests sharing its steps)."""
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
    except Exception as err:
        logger.exception("request failed while streaming; stopping its row")
        job.error = f"{type(err).__name__}: {err}"
        return True


def finish_job(job: DecodeJob, eos_ids: set[int]) -> None:
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
    ended_on_eos = bool(job.tokens) and job.tokens[-1] in eos_ids
    job.finish_reason = "stop" if job.text.stopped or ended_on_eos else "length"


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


def admit(prompt_ids: list[int], max_tokens: int | None, *, context: int | None, default_max_tokens: int,
          text: TextStream) -> DecodeJob:
    """Check a request against the context before it joins a batch, so it can never fail one."""
    n = len(prompt_ids)
    if n == 0:
        raise OpenAIError("prompt is empty (it encodes to no tokens)", param="prompt")
    room = room_for(context, n)
    if room is not None and room < 1:
        raise OpenAIError(
            f"prompt is {n} tokens; the model's context is {context} tokens, leaving no room to generate",
            param="prompt",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = default_max_tokens if room is None else min(default_max_tokens, room)
    elif room is not None and max_tokens > room:
        raise OpenAIError(
            f"max_tokens {max_tokens} + prompt {n} tokens exceeds the model's context of {context} "
            f"tokens (at most {room} new tokens for this prompt)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return DecodeJob(prompt_ids=prompt_ids, max_tokens=max_tokens, text=text)
