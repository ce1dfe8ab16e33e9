"""Continuous batching for exact Jacobi decoding: requests join and leave between Jacobi iterations.

`cllm.serving.BatchDecoder` decodes a fixed batch to its end, so a request that arrives meanwhile waits
for the slowest row. The `Engine` here is step-wise instead; one `step()`:

  admit     prefill waiting requests in a cache of their own (their first token comes from it), then merge
            their cache rows into the running cache; with `prefill_first`, a step that admitted ends here
  budget    shrink every row's Jacobi window so running rows x window stays within `max_tokens_per_step`
  iterate   one `jacobi_forward` over every running row's window, in one batched pass (`branch_forward`
            for multi-block rows)
  commit    `advance_row` (`advance_lane`) per row: its agreeing run becomes final and streams out
            (`cllm.serving.deliver`)
  retire    finished, stopped or cancelled rows leave the cache (the last rows move into their places)
  compact   cache columns no live row attends to any more are dropped, so memory follows live requests

Cache layout: one rectangle [rows, columns] plus a boolean mask of the same shape. A joining group's
columns are aligned to the right end of the running rectangle, the narrower side padded on the left with
masked entries, exactly like a left-padded prompt. The rectangle is a view into buffers with spare rows
and columns (`cllm.kv_cache.ReservedLayer`), so a step copies only what changes: the window, the joining
rows, the rows moved into a leaver's place. Every row's position ids are its own (`Row.position`)
and masked entries are never seen, so a row's tokens do not depend on who shares its steps or when it
arrived: each request decodes to greedy `generate(do_sample=False)` of its prompt alone, or, with sampling
settings (`DecodeJob.sampling`), to `ar_generate` of its prompt alone with the same settings.

The mode decides the window: `mode="multiblock"` rows are `cllm.multiblock.Lane`s with up to two blocks in
flight, `mode="jacobi"` rows one block, and a window of one token is one AR step: `mode="ar"` is this
engine with block size 1. Nothing here imports Ray.
"""

from __future__ import annotations

import copy
import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from cllm.decoding import DecodeFields, check_token_ids, left_pad, room_for, special_tokens
from cllm.guesses import NgramPool
from cllm.jacobi import (
    Decoding,
    Row,
    advance_row,
    begin_row,
    jacobi_forward,
    prefill,
    roll_back_cache,
)
from cllm.kv_cache import ReservedLayer, check_supported
from cllm.models import LoadedModel, context_length
from cllm.multiblock import Lane, MultiBlock, advance_lane, begin_lane, branch_forward, roll_back_slots, shrink_lane
from cllm.serving import DecodeJob, Mode, deliver, finish_job

logger = logging.getLogger("ray.serve")


@dataclass
class StepStats:
    """What one `step()` did, for metrics."""

    admitted: int = 0
    running: int = 0  # rows in the Jacobi pass
    window: int = 0  # block size this step allowed per row
    slots: int = 0  # window tokens forwarded (the budgeted quantity)
    committed: int = 0  # tokens made final by the pass (prefill's first tokens excluded)
    finished: int = 0
    seconds: float = 0.0


@dataclass
class Running:
    """A request in the engine: its job (what the client sees) and its row (what the decoder sees)."""

    job: DecodeJob
    row: Row
    admitted_at: float


def holds(layer) -> bool:
    """Whether a cache layer holds tensors (layers without a cache of their own hold none)."""
    return getattr(layer, "is_initialized", False) and layer.keys is not None


def layer_tensors(cache: DynamicCache) -> list:
    return [layer for layer in cache.layers if holds(layer)]


def stack_masks(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Rows of `upper` then rows of `lower`, right-aligned: the narrower one gets masked columns on the left
    (the cache's own rows move the same way: `ReservedLayer.append_rows`)."""
    width = max(upper.shape[1], lower.shape[1])
    return torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for mask in (upper, lower)])


def reserve(cache: DynamicCache, rows: int) -> DynamicCache:
    """The running cache: every layer that holds tensors gets spare rows (up to `rows`) and spare columns."""
    cache.layers = [
        ReservedLayer(layer.keys, layer.values, spare_rows=max(0, rows - layer.keys.shape[0])) if holds(layer)
        else layer for layer in cache.layers
    ]
    return cache


def merge_caches(
    running: DynamicCache, running_mask: torch.Tensor, joining: DynamicCache, joining_mask: torch.Tensor
) -> torch.Tensor:
    """Append the joining rows to the running cache (in place), right-aligned; return the merged mask."""
    for old, new in zip(running.layers, joining.layers, strict=True):
        if holds(new):  # else a layer that keeps no cache of its own
            old.append_rows(new.keys, new.values)
    return stack_masks(running_mask, joining_mask)


def drop_rows(cache: DynamicCache, cache_mask: torch.Tensor, done: list[bool]) -> tuple[list[int], torch.Tensor]:
    """Remove the done rows; each hole they leave among the first rows takes one of the last live rows, so
    only moved rows are copied. Returns, for each new row, the old row it holds, and the new mask."""
    live = done.count(False)
    holes = [i for i in range(live) if done[i]]
    movers = [i for i in range(live, len(done)) if not done[i]]
    order = list(range(live))
    for source, target in zip(movers, holes, strict=True):
        order[target] = source
    for layer in layer_tensors(cache):
        layer.move_rows(movers, holes, live)
    return order, cache_mask[order]


def row_alone(cache: DynamicCache, row: int) -> DynamicCache:
    """A cache of its own for one row: a copy of that row only (a deep copy of the cache would copy every
    row and the spare buffers, which at real sizes may not fit beside the cache)."""
    alone = copy.copy(cache)
    alone.layers = [
        ReservedLayer(layer.keys[row : row + 1], layer.values[row : row + 1]) if holds(layer)
        else copy.deepcopy(layer) for layer in cache.layers
    ]
    return alone


def compact(cache: DynamicCache, cache_mask: torch.Tensor, max_holes: float = 0.25) -> torch.Tensor:
    """Drop the columns no live row attends to: holes every row has, and columns of rows that left.

    Leading ones go by moving the cache's view (no copy); once more than `max_holes` of the remaining
    columns are unused, the cache is copied without them. Positions are per row and a dropped column is
    masked for every row, so no attention changes.
    """
    used = cache_mask.any(0)
    if bool(used.all()):
        return cache_mask
    leading = int(used.int().argmax()) if bool(used.any()) else len(used)
    if leading:
        for layer in layer_tensors(cache):
            layer.drop_left(leading)
        cache_mask, used = cache_mask[:, leading:], used[leading:]
    if (~used).sum() > max_holes * len(used):
        index = used.nonzero().squeeze(1)
        for layer in layer_tensors(cache):
            layer.keep_columns(index)
        cache_mask = cache_mask[:, index]
    return cache_mask


def window_for(block_size: int, rows: int, max_tokens_per_step: int) -> int:
    """The widest window every row may have so the step forwards at most `max_tokens_per_step` tokens
    (never below 1: a single token per row is plain AR decoding)."""
    return max(1, min(block_size, max_tokens_per_step // max(rows, 1)))


def shrink_window(row: Row, width: int) -> None:
    """Drop the trailing guesses beyond `width`; the block ends earlier and the next one starts from there."""
    if len(row.window) <= width:
        return
    row.window = row.window[:width]
    row.block_len = len(row.generated) - 1 - row.block_start + width


@dataclass(frozen=True)
class RowKind:
    """What a mode's rows are, and the steps of the Jacobi iteration that differ between the two kinds."""

    row: type[Row]
    decoding: type[Decoding]  # the settings every row's update reads (MultiBlock adds blocks in flight)
    begin: Callable[[Row, int, Decoding], None]  # after prefill: take the first token, open the first block(s)
    shrink: Callable[[Row, int], None]  # fit the row's window to the step's budget
    advance: Callable[[Row, list[int], Decoding], Any]  # commit a pass's predictions; returns what to keep
    roll_back: Callable[[DynamicCache, torch.Tensor, list], torch.Tensor]  # drop the pass's unkept KV


ONE_BLOCK = RowKind(Row, Decoding, begin_row, shrink_window, advance_row, roll_back_cache)  # jacobi; ar: block 1
LANES = RowKind(Lane, MultiBlock, begin_lane, shrink_lane, advance_lane, roll_back_slots)  # multiblock


class Engine:
    """Step-wise continuous batching over one model; `add` and `abort` may be called from other threads."""

    def __init__(
        self,
        loaded: LoadedModel,
        decode: DecodeFields,
        *,
        mode: Mode = "jacobi",
        seed: int = 0,
        max_running: int = 8,
        max_tokens_per_step: int = 256,
        prefill_first: bool = True,
    ):
        self.model = loaded.model
        self.layout = check_supported(self.model)
        self.context = context_length(self.model)
        special = special_tokens(loaded.tokenizer, self.model.generation_config)
        self.eos_ids = set(special.eos_ids)
        self.pad_id = special.pad_id
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.block_size = 1 if mode == "ar" else decode.block_size
        self.kind = LANES if mode == "multiblock" else ONE_BLOCK
        self.init = decode.init
        self.max_running, self.max_tokens_per_step = max_running, max_tokens_per_step
        settings = dict(
            block_size=self.block_size,
            max_iters=decode.max_iters or self.block_size,
            eos_ids=self.eos_ids,
            pad_token_id=self.pad_id,
            init=decode.init,
            rng=random.Random(seed),
            on_commit=self.on_commit,
            record=False,
        )
        self.dec = self.kind.decoding(**settings)
        self.blocks = getattr(self.dec, "blocks", 1)  # most blocks in flight: multi-block's measured default K
        self.waiting: deque[DecodeJob] = deque()
        self.lock = threading.Lock()  # guards `waiting` against `add`/`abort` from other threads
        self.running: list[Running] = []
        self.by_index: dict[int, Running] = {}
        self.cache: DynamicCache | None = None
        self.cache_mask: torch.Tensor | None = None
        self.next_index = 0
        self.steps = 0
        self.prefill_first = prefill_first
        self.last_step_prefill_only = False

    # --- the outside: requests in, requests out -------------------------------------------------------------

    def add(self, job: DecodeJob) -> None:
        """Queue a request; it joins the running rows at the next step. One that could not decode is refused
        here (`cllm.serving.admit` checks the same for the server), so it can never fail a shared step."""
        if not job.prompt_ids or job.max_tokens < 1:
            raise ValueError("a request needs at least one prompt token and max_tokens >= 1")
        check_token_ids(job.prompt_ids, self.vocab_size)
        room = room_for(self.context, len(job.prompt_ids))
        if room is not None and job.max_tokens > room:
            raise ValueError(
                f"prompt {len(job.prompt_ids)} tokens + max_tokens {job.max_tokens} exceeds the context of "
                f"{self.context} tokens"
            )
        with self.lock:
            self.waiting.append(job)

    def abort(self, job: DecodeJob) -> None:
        """Stop a request: a waiting one never starts, a running one leaves the cache at the next step."""
        job.cancelled = True

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def cache_width(self) -> int:
        return 0 if self.cache_mask is None else self.cache_mask.shape[1]

    # --- one step -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> StepStats:
        """Admit, iterate once, commit, retire. A request whose prefill or pass fails on its own fails alone
        (`admit`, `fail_culprits`); a pass that fails for the batch as a whole fails the requests in it
        (the cache can no longer be trusted) and leaves the engine empty and ready for the next request."""
        stats = StepStats()
        start = time.perf_counter()
        try:
            self.drop_cancelled()
            stats.admitted = self.admit_waiting()
            stats.finished = self.retire()  # cancelled rows, and rows whose first token already ended them
            # prefill first: a step that admitted requests ends here, so those that arrived during that
            # prefill are admitted next without waiting for a pass; never twice in a row, so passes go on
            prefill_only = self.prefill_first and stats.admitted > 0 and not self.last_step_prefill_only
            self.last_step_prefill_only = prefill_only
            if self.running and not prefill_only:
                self.iterate(stats)
        except Exception as err:
            logger.exception("decoding step failed; failing its %d requests", len(self.running))
            self.fail_running(f"{type(err).__name__}: {err}")
        stats.finished += self.retire()
        self.steps += 1
        if self.cache is not None:
            self.cache_mask = compact(self.cache, self.cache_mask)
        stats.seconds = time.perf_counter() - start
        return stats

    def drop_cancelled(self) -> None:
        """Cancelled requests: out of the queue now, out of the cache at this step's retire."""
        with self.lock:
            for job in [job for job in self.waiting if job.cancelled]:
                self.waiting.remove(job)
                self.end(job)
        for entry in self.running:
            if entry.job.cancelled:
                entry.row.done = True

    def take_waiting(self) -> list[DecodeJob]:
        """As many queued requests as fit: at most `max_running` rows, and one window slot each in the budget."""
        room = min(self.max_running, self.max_tokens_per_step) - len(self.running)
        taken: list[DecodeJob] = []
        with self.lock:
            while self.waiting and len(taken) < room:
                taken.append(self.waiting.popleft())
        return taken

    def admit_waiting(self) -> int:
        """Prefill the newcomers together in a cache of their own, then merge their rows into the running cache."""
        jobs = self.take_waiting()
        return self.admit(jobs) if jobs else 0

    def admit(self, jobs: list[DecodeJob]) -> int:
        """Admit a group; if its prefill fails, each request alone, so one that cannot prefill fails by itself."""
        device = next(self.model.parameters()).device
        started = time.perf_counter()
        for job in jobs:
            job.started_at = job.started_at or started  # a retry alone after a failed group prefill keeps it
        input_ids, prompt_mask = left_pad([job.prompt_ids for job in jobs], self.pad_id, device=device)
        prompt_mask = prompt_mask.bool()
        try:
            cache, first_tokens = prefill(
                self.model, self.layout, input_ids, prompt_mask, [job.sampling for job in jobs]
            )
        except Exception as err:
            if len(jobs) > 1:
                logger.warning("prefill of %d requests failed (%s: %s); admitting them one by one",
                               len(jobs), type(err).__name__, err)
                return sum(self.admit([job]) for job in jobs)
            logger.exception("prefill failed; failing its request")
            jobs[0].error = f"{type(err).__name__}: {err}"
            self.end(jobs[0])
            return 0
        now = time.perf_counter()
        entries = [Running(job, self.new_row(job), now) for job in jobs]
        self.fit_budget(len(self.running) + len(jobs))
        for entry, token in zip(entries, first_tokens, strict=True):
            self.by_index[entry.row.index] = entry
            self.kind.begin(entry.row, token, self.dec)
        self.join(entries, cache, prompt_mask)
        return len(jobs)

    def new_row(self, job: DecodeJob) -> Row:
        self.next_index += 1
        pool = NgramPool(self.block_size) if self.init == "ngram" else None
        return self.kind.row(
            index=self.next_index, prompt=list(job.prompt_ids), budget=job.max_tokens, pool=pool,
            sampling=job.sampling,
        )

    def fit_budget(self, rows: int) -> int:
        """The widest window each of `rows` rows may have in this step's pass (`max_tokens_per_step`); blocks
        opened from now on get no wider, and a multi-block row opens no more blocks than fit."""
        width = window_for(self.block_size * self.blocks, rows, self.max_tokens_per_step)
        self.dec.block_size = min(self.block_size, width)
        if isinstance(self.dec, MultiBlock):
            self.dec.blocks = max(1, min(self.blocks, width // self.dec.block_size))
        return width

    def forward(self, cache: DynamicCache, cache_mask: torch.Tensor, rows: list[Row]) -> list[list[int]]:
        """One pass over the rows' windows: each slot's prediction."""
        if self.kind is LANES:
            return branch_forward(self.model, self.layout, cache, cache_mask, rows, self.pad_id)
        return jacobi_forward(self.model, self.layout, cache, cache_mask, rows, self.pad_id)

    def join(self, entries: list[Running], cache: DynamicCache, prompt_mask: torch.Tensor) -> None:
        """The new rows become running rows; their cache rows go below the running ones.

        They count as running first, so a failing merge fails them along with the rest instead of losing them.
        """
        self.running.extend(entries)
        if self.cache is None:
            self.cache, self.cache_mask = reserve(cache, self.max_running), prompt_mask
        else:
            self.cache_mask = merge_caches(self.cache, self.cache_mask, cache, prompt_mask)

    def iterate(self, stats: StepStats) -> None:
        """One Jacobi iteration of every running row under the step's token budget; commit and stream."""
        rows = [entry.row for entry in self.running]
        width = self.fit_budget(len(rows))
        for row in rows:
            self.kind.shrink(row, width)
        stats.running, stats.window = len(rows), width
        stats.slots = len(rows) * max(len(row.window) for row in rows)
        committed_before = sum(len(row.generated) for row in rows)
        try:
            predictions = self.forward(self.cache, self.cache_mask, rows)
        except Exception:
            if self.fail_culprits():
                return
            raise
        kept = [self.kind.advance(row, preds, self.dec) for row, preds in zip(rows, predictions, strict=True)]
        self.cache_mask = self.kind.roll_back(self.cache, self.cache_mask, kept)
        stats.committed = sum(len(row.generated) for row in rows) - committed_before
        for entry in self.running:
            entry.job.batch_size = max(entry.job.batch_size, len(rows))

    def on_commit(self, index: int, tokens: list[int]) -> bool:
        """`Decoding.on_commit`: route a row's final tokens to its request."""
        return deliver(self.by_index[index].job, tokens)

    def retire(self) -> int:
        """Finished rows leave the cache now; their requests end (text flushed, reason named, caller told)."""
        if not self.running:
            return 0
        ended = [entry for entry in self.running if entry.row.done]
        if not ended:
            return 0
        if self.cache is None:
            self.running = [entry for entry in self.running if not entry.row.done]
        else:
            order, self.cache_mask = drop_rows(self.cache, self.cache_mask, [e.row.done for e in self.running])
            self.running = [self.running[i] for i in order]
        for entry in ended:
            del self.by_index[entry.row.index]
            entry.job.forward_passes = entry.row.forwards
            entry.job.decode_seconds = time.perf_counter() - entry.admitted_at
            finish_job(entry.job, self.eos_ids)
            self.end(entry.job)
        if not self.running:  # nothing left to attend to: start the next request from an empty cache
            self.cache = self.cache_mask = None
        return len(ended)

    def fail_culprits(self) -> bool:
        """After a failed pass: undo its cache writes, then run each row alone on a copy of its cache row.
        Rows that fail alone fail; the others keep their state and try again at the next step. False when
        every row passes alone (the pass fails only together): the step then fails every request in it."""
        width = self.cache_mask.shape[1]
        for layer in layer_tensors(self.cache):  # the layers the pass reached hold its window: drop it
            if layer.keys.shape[-2] > width:
                layer.crop(width - layer.keys.shape[-2])
        culprits = {}
        for i, entry in enumerate(self.running):
            try:
                self.forward(row_alone(self.cache, i), self.cache_mask[i : i + 1], [entry.row])
            except Exception as err:
                culprits[i] = f"{type(err).__name__}: {err}"
        for i, error in culprits.items():
            logger.error("request failed in a decoding pass and leaves it (%s); %d others go on", error,
                         len(self.running) - len(culprits))
            self.running[i].job.error = error
            self.running[i].row.done = True
        return bool(culprits)

    def fail_running(self, error: str) -> None:
        for entry in self.running:
            entry.job.error = error
            entry.row.done = True
        self.cache = self.cache_mask = None

    @staticmethod
    def end(job: DecodeJob) -> None:
        """Tell the caller the job is over (its own callback's failure must not stop the engine)."""
        if job.on_done is None:
            return
        try:
            job.on_done()
        except Exception:
            logger.exception("a request's on_done callback failed")

    def run_until_idle(self, max_steps: int | None = None) -> int:
        """Step until no request is left (tests, offline use); returns the steps taken."""
        steps = 0
        while self.has_work() and (max_steps is None or steps < max_steps):
            self.step()
            steps += 1
        return steps


class EngineThread:
    """Steps an `Engine` back to back in a thread of its own while it has requests, and sleeps otherwise.

    A step driven from an event loop (`await asyncio.to_thread(engine.step)`) starts only once the loop
    has run everything queued before it, and under load the loop is busy streaming every request's text:
    the engine then idles between passes while newcomers wait for their prefill. Here the next step
    starts the moment the last one ends; the caller's loop only adds requests and receives their output.
    """

    _names = itertools.count(1)

    def __init__(self, engine: Engine, on_step: Callable[[StepStats], None] | None = None):
        self.engine = engine
        self.on_step = on_step  # called in this thread after every step; hand off to another thread if slow
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name=f"cllm-engine-{next(self._names)}", daemon=True)
        self.thread.start()

    def add(self, job: DecodeJob) -> None:
        """`Engine.add` (its refusals raise here, in the caller's thread), then wake the loop."""
        self.engine.add(job)
        self.wake.set()

    def abort(self, job: DecodeJob) -> None:
        self.engine.abort(job)
        self.wake.set()

    def run(self) -> None:
        while not self.stopping:
            if not self.engine.has_work():
                self.wake.wait()
                self.wake.clear()  # a request added from here on is seen by has_work() above
                continue
            try:
                stats = self.engine.step()
                if self.on_step is not None:
                    self.on_step(stats)
            except Exception:  # step() fails the requests concerned itself; this keeps serving the rest
                logger.exception("engine step failed")

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """End the loop after the current step (requests still in the engine are left as they are)."""
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout)
