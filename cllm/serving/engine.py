"""The continuous engine: requests join and leave between Jacobi iterations; one `step()` at a time.

A static batch (`cllm.serving.static`) decodes to its end, so a request that arrives meanwhile waits for
the slowest row. Here each step is:

  schedule  the scheduler's plan (`cllm.serving.scheduler`): who leaves, who joins, whether a pass runs
  prefill   the joining requests, together, in a cache of their own; their first tokens come from it and
            their rows merge into the running cache (`cllm.serving.runner`)
  run       one Jacobi iteration of every running row, each window cut to the step's token budget
  commit    what each row made final becomes its request's tokens; rows that are done leave the cache
            (finished, or failed alone), and columns no live row attends to are dropped

and returns, as data, what each request gained (`EngineOutput`) and what the step did (`StepStats`). It
never calls out: detokenising, stop sequences and delivery to clients happen after the step
(`cllm.serving.output`, `cllm.serving.bridge`). Each request decodes to greedy `generate(do_sample=False)`
of its prompt alone, or, with sampling settings, to `ar_generate` of its prompt alone with the same
settings, whoever shares its passes and whenever it arrived. Nothing here imports Ray.
"""

from __future__ import annotations

import logging
import time

import torch

from cllm.decoding.core import special_tokens
from cllm.decoding.modes import MODES
from cllm.models.loading import LoadedModel, context_length
from cllm.serving.config import ServeConfig
from cllm.serving.request import EngineOutput, Request, RequestStatus, StepResult, StepStats
from cllm.serving.runner import ModelRunner, Running
from cllm.serving.scheduler import Budget, Limits, Scheduler, admit

logger = logging.getLogger("ray.serve")


class Engine:
    """Step-wise continuous batching over one model; `add` and `abort` may be called from other threads."""

    def __init__(self, loaded: LoadedModel, config: ServeConfig):
        model = loaded.model
        special = special_tokens(loaded.tokenizer, model.generation_config)
        self.eos_ids = set(special.eos_ids)
        self.context = context_length(model)
        self.limits = Limits(self.context, model.get_input_embeddings().num_embeddings, config.max_new_tokens)
        mode = MODES[config.mode]
        block_size = mode.block_size(config.block_size)
        self.runner = ModelRunner(model, mode, block_size=block_size, init=config.init, max_iters=config.max_iters,
                                  eos_ids=self.eos_ids, pad_id=special.pad_id, seed=config.seed,
                                  max_rows=config.max_batch_size)
        self.scheduler = Scheduler(block_size=block_size, blocks=self.runner.blocks,
                                   max_running=config.max_batch_size,
                                   max_tokens_per_step=config.max_tokens_per_step, prefill_first=config.prefill_first)
        self.steps = 0

    # --- the outside: requests in, requests out -------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request; it joins the running rows at a next step. One that could not decode raises
        `RequestError` here, so it can never fail a shared step."""
        admit(request, self.limits)
        self.scheduler.add(request)

    def abort(self, request: Request) -> None:
        """Stop a request: a waiting one never starts, a running one leaves the cache at the next step."""
        self.scheduler.abort(request)

    def has_work(self) -> bool:
        return bool(self.runner.running or self.scheduler.waiting)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return len(self.runner.running)

    @property
    def cache_width(self) -> int:
        return 0 if self.runner.cache is None else self.runner.cache.width

    # --- one step -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> StepResult:
        """Schedule, prefill, run, commit. A request whose prefill or pass fails on its own fails alone; a pass
        that fails for the batch as a whole fails the requests in it (the cache can no longer be trusted) and
        leaves the engine empty and ready for the next request."""
        stats, start = StepStats(), time.perf_counter()
        outputs: dict[str, EngineOutput] = {}
        plan = self.scheduler.schedule([entry.request for entry in self.runner.running])
        for request in plan.dropped:
            self.end(request, RequestStatus.FINISHED_ABORTED, outputs)
        try:
            for entry in self.runner.running:
                if entry.request in plan.leaving:  # aborted, or already ended by its text
                    entry.row.done = True
                    if not entry.request.finished:
                        entry.request.status = RequestStatus.FINISHED_ABORTED
            stats.finished += self.retire(outputs)
            if plan.joining:
                stats.admitted = self.prefill(plan.joining, plan.join_budget, outputs)
                stats.finished += self.retire(outputs)  # rows whose first token already ended them
            if plan.runs_pass and self.runner.running:
                self.run_pass(stats, outputs)
        except Exception as err:
            logger.exception("decoding step failed; failing its %d requests", self.num_running)
            for entry in self.runner.reset():
                entry.request.fail(err)
                self.end(entry.request, RequestStatus.FINISHED_ERROR, outputs)
        stats.finished += self.retire(outputs)
        self.runner.compact()
        self.steps += 1
        stats.seconds = time.perf_counter() - start
        stats.parts = self.runner.timer.take()
        return StepResult(list(outputs.values()), stats)

    def prefill(self, requests: list[Request], budget: Budget, outputs: dict[str, EngineOutput]) -> int:
        """Admit a group; if its prefill fails, each request alone, so one that cannot prefill fails by itself."""
        started = time.perf_counter()
        for request in requests:
            request.started_at = request.started_at or started  # a retry alone after a failed group keeps it
        try:
            prefilled = self.runner.prefill(requests)
        except Exception as err:
            if len(requests) > 1:
                logger.warning("prefill of %d requests failed (%s: %s); admitting them one by one",
                               len(requests), type(err).__name__, err)
                return sum(self.prefill([request], budget, outputs) for request in requests)
            logger.exception("prefill failed; failing its request")
            requests[0].fail(err)
            self.end(requests[0], RequestStatus.FINISHED_ERROR, outputs)
            return 0
        entries = self.runner.join(prefilled, budget)
        for entry in entries:
            entry.request.status = RequestStatus.RUNNING
        self.commit(entries, outputs)
        return len(entries)

    def run_pass(self, stats: StepStats, outputs: dict[str, EngineOutput]) -> None:
        """One Jacobi iteration of every running row under the step's token budget."""
        running = list(self.runner.running)
        budget = self.scheduler.budget(len(running))
        committed_before = sum(len(entry.row.generated) for entry in running)
        outcome = self.runner.run_pass(budget)
        stats.running, stats.window, stats.slots = len(running), budget.width, outcome.slots
        failed = outcome.failed
        for i, error in failed.items():
            logger.error("request failed in a decoding pass and leaves it (%s); %d others go on", error,
                         len(running) - len(failed))
            running[i].request.fail(error)
            running[i].row.done = True
        if failed:
            return
        stats.committed = sum(len(entry.row.generated) for entry in running) - committed_before
        stats.passes = len(running)
        for entry in running:
            entry.request.batch_size = max(entry.request.batch_size, len(running))
        self.commit(running, outputs, after_pass=True)

    def commit(self, entries: list[Running], outputs: dict[str, EngineOutput], after_pass: bool = False) -> None:
        """What each row made final since it was last looked at (its prefill, or the pass just run) becomes its
        request's tokens."""
        now = time.perf_counter()
        for entry in entries:
            request, row = entry.request, entry.row
            new = row.generated[len(request.tokens) :]
            if after_pass:
                request.accept(len(new))
            request.commit(new, now)
            request.forward_passes = row.forwards
            request.decode_seconds = now - entry.admitted_at
            self.output(request, outputs).new_tokens.extend(new)

    def retire(self, outputs: dict[str, EngineOutput]) -> int:
        """Rows that are done leave the cache now; their requests end (EOS, max_tokens, or as already named)."""
        ended = self.runner.remove_finished()
        now = time.perf_counter()
        for entry in ended:
            request = entry.request
            request.forward_passes = entry.row.forwards
            request.decode_seconds = now - entry.admitted_at
            ended_on_eos = bool(request.tokens) and request.tokens[-1] in self.eos_ids
            self.end(request, RequestStatus.FINISHED_STOPPED if ended_on_eos else RequestStatus.FINISHED_LENGTH,
                     outputs)
        return len(ended)

    @staticmethod
    def output(request: Request, outputs: dict[str, EngineOutput]) -> EngineOutput:
        return outputs.setdefault(request.request_id, EngineOutput(request, []))

    def end(self, request: Request, status: RequestStatus, outputs: dict[str, EngineOutput]) -> None:
        """A request leaves the engine: its status is `status` unless something already ended it (aborted,
        failed, stopped by its text), and its output says it finished."""
        if not request.finished:
            request.status = status
        self.output(request, outputs).finished = True

    def run_until_idle(self, max_steps: int | None = None) -> int:
        """Step until no request is left (tests, offline use); returns the steps taken."""
        steps = 0
        while self.has_work() and (max_steps is None or steps < max_steps):
            self.step()
            steps += 1
        return steps
