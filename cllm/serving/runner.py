"""The model runner of the continuous engine: the running rows, their KV cache, and the passes over them.

    RunningCache   one rectangle of KV entries [rows, columns] and its boolean mask, changed together:
                   rows join (right-aligned, the narrower side padded on the left with masked entries,
                   exactly like a left-padded prompt), rows leave (the last rows move into their places),
                   a pass's entries are kept or rolled back, columns no live row attends to are dropped.
                   Its layers are `cllm.decoding.kv_cache.ReservedLayer`s, views into buffers with spare rows and
                   columns, so a step copies only what changes.
    ModelRunner    prefills joining requests in a cache of their own (their first token comes from it)
                   and merges their rows in; runs one Jacobi iteration of every running row within the
                   step's `Budget` (`jacobi.jacobi_forward`, or `multiblock.branch_forward` for
                   rows with several blocks in flight), commits each row's agreeing run and rolls back
                   the rest; removes finished rows.

Every row's position ids are its own (`Row.position`) and masked entries are never seen, so a row's tokens
do not depend on who shares its passes or when it joined. Nothing here imports Ray.
"""

from __future__ import annotations

import copy
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from cllm.decoding.core import left_pad
from cllm.decoding.guesses import NgramPool
from cllm.decoding.jacobi import Decoding, Row, advance_row, begin_row, jacobi_forward, prefill, roll_back_cache
from cllm.decoding.kv_cache import ReservedLayer, check_supported
from cllm.decoding.modes import DecodingMode
from cllm.decoding.multiblock import (
    Lane,
    MultiBlock,
    advance_lane,
    begin_lane,
    branch_forward,
    roll_back_slots,
    shrink_lane,
)
from cllm.serving.request import Request
from cllm.serving.scheduler import Budget


def holds(layer) -> bool:
    """Whether a cache layer holds tensors (layers without a cache of their own hold none)."""
    return getattr(layer, "is_initialized", False) and layer.keys is not None


def stack_masks(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Rows of `upper` then rows of `lower`, right-aligned: the narrower one gets masked columns on the left
    (the cache's own rows move the same way: `ReservedLayer.append_rows`)."""
    width = max(upper.shape[1], lower.shape[1])
    return torch.cat([F.pad(mask, (width - mask.shape[1], 0)) for mask in (upper, lower)])


class RunningCache:
    """The KV cache of the running rows and its mask [rows, columns]; every change updates both."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor):
        self.cache, self.mask = cache, mask

    @classmethod
    def reserve(cls, cache: DynamicCache, mask: torch.Tensor, rows: int) -> RunningCache:
        """A prefill's cache as the running cache: every layer that holds tensors gets spare rows (at most
        `rows` in all) and spare columns."""
        cache.layers = [
            ReservedLayer(layer.keys, layer.values, max_rows=rows) if holds(layer)
            else layer for layer in cache.layers
        ]
        return cls(cache, mask)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def layers(self) -> list:
        """The layers that hold tensors."""
        return [layer for layer in self.cache.layers if holds(layer)]

    def append(self, joining: DynamicCache, joining_mask: torch.Tensor) -> None:
        """The joining rows below the running ones, right-aligned."""
        for old, new in zip(self.cache.layers, joining.layers, strict=True):
            if holds(new):  # else a layer that keeps no cache of its own
                old.append_rows(new.keys, new.values)
        self.mask = stack_masks(self.mask, joining_mask)

    def drop_rows(self, done: list[bool]) -> list[int]:
        """Remove the done rows; each hole they leave among the first rows takes one of the last live rows, so
        only moved rows are copied. Returns, for each remaining row, the old row it holds."""
        live = done.count(False)
        holes = [i for i in range(live) if done[i]]
        movers = [i for i in range(live, len(done)) if not done[i]]
        order = list(range(live))
        for source, target in zip(movers, holes, strict=True):
            order[target] = source
        for layer in self.layers():
            layer.move_rows(movers, holes, live)
        self.mask = self.mask[order]
        return order

    def row_alone(self, row: int) -> RunningCache:
        """A cache of its own for one row: a copy of that row only (a deep copy of the cache would copy every
        row and the spare buffers, which at real sizes may not fit beside the cache)."""
        alone = copy.copy(self.cache)
        alone.layers = [
            ReservedLayer(layer.keys[row : row + 1], layer.values[row : row + 1], max_rows=1) if holds(layer)
            else copy.deepcopy(layer) for layer in self.cache.layers
        ]
        return RunningCache(alone, self.mask[row : row + 1])

    def roll_back(self, roll_back: Callable[[DynamicCache, torch.Tensor, list], torch.Tensor], kept: list) -> None:
        """After a pass: keep each row's committed entries (`kept`, in the row kind's terms), drop the rest."""
        self.mask = roll_back(self.cache, self.mask, kept)

    def undo_pass(self) -> None:
        """Forget the entries a failed pass wrote into the layers it reached."""
        for layer in self.layers():
            if layer.keys.shape[-2] > self.width:
                layer.crop(self.width - layer.keys.shape[-2])

    def compact(self, max_holes: float = 0.25) -> None:
        """Drop the columns no live row attends to: holes every row has, and columns of rows that left.

        Leading ones go by moving the cache's view (no copy); once more than `max_holes` of the remaining
        columns are unused, the cache is copied without them. Positions are per row and a dropped column is
        masked for every row, so no attention changes.
        """
        used = self.mask.any(0)
        if bool(used.all()):
            return
        leading = int(used.int().argmax()) if bool(used.any()) else len(used)
        if leading:
            for layer in self.layers():
                layer.drop_left(leading)
            self.mask, used = self.mask[:, leading:], used[leading:]
        if (~used).sum() > max_holes * len(used):
            index = used.nonzero().squeeze(1)
            for layer in self.layers():
                layer.keep_columns(index)
            self.mask = self.mask[:, index]


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


ONE_BLOCK = RowKind(Row, Decoding, begin_row, shrink_window, advance_row, roll_back_cache)
LANES = RowKind(Lane, MultiBlock, begin_lane, shrink_lane, advance_lane, roll_back_slots)


@dataclass
class Running:
    """A request in the runner: its request (what the client sees) and its row (what the decoder sees)."""

    request: Request
    row: Row
    admitted_at: float  # its prefill ended


@dataclass
class PassOutcome:
    slots: int  # window tokens forwarded: rows x the widest window (what the token budget bounds)
    failed: dict[int, str] = field(default_factory=dict)  # rows (by position) that failed alone, with their errors


@dataclass
class Prefilled:
    """Requests after their prefill: their own cache and their first tokens, not yet running."""

    requests: list[Request]
    cache: RunningCache
    first_tokens: list[int]


class StepTimer:
    """Seconds spent per part of the engine's steps, for benchmarks (benchmarks/engine_step.py)."""

    def __init__(self):
        self.seconds: Counter = Counter()

    @contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The seconds counted since the last `take`."""
        seconds, self.seconds = dict(self.seconds), Counter()
        return seconds


class ModelRunner:
    """The running rows of one model, in cache order, and the prefills and passes over them."""

    def __init__(self, model, mode: DecodingMode, *, block_size: int, init: str, max_iters: int | None,
                 eos_ids: set[int], pad_id: int, seed: int, max_rows: int):
        self.model = model
        self.layout = check_supported(model)
        self.kind = LANES if mode.several_blocks else ONE_BLOCK
        self.block_size, self.init, self.max_rows, self.pad_id = block_size, init, max_rows, pad_id
        # the configured settings; each prefill and pass decodes with a copy cut to its budget (`decoding`)
        self.settings = self.kind.decoding(
            block_size=block_size, max_iters=max_iters or block_size, eos_ids=eos_ids, pad_token_id=pad_id,
            init=init, rng=random.Random(seed), on_commit=None, record=False,
        )
        self.blocks = getattr(self.settings, "blocks", 1)  # most blocks in flight: multi-block's measured K
        self.blocks_spawned = 0  # blocks opened behind another in flight, over the runner's life
        self.running: list[Running] = []
        self.cache: RunningCache | None = None
        self.next_index = 0
        self.timer = StepTimer()

    @property
    def rows(self) -> list[Row]:
        return [entry.row for entry in self.running]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def decoding(self, budget: Budget) -> Decoding:
        """The settings one prefill or pass decodes with: blocks no longer (and no more) than its budget allows."""
        cut: dict[str, int] = {"block_size": budget.block_size}
        if isinstance(self.settings, MultiBlock):
            cut["blocks"] = budget.blocks
        return replace(self.settings, **cut)

    def new_row(self, request: Request) -> Row:
        self.next_index += 1
        pool = NgramPool(self.block_size) if self.init == "ngram" else None
        return self.kind.row(index=self.next_index, prompt=list(request.prompt_ids), budget=request.max_tokens,
                             pool=pool, sampling=request.sampling)

    def prefill(self, requests: list[Request]) -> Prefilled:
        """One pass over the requests' prompts together, in a cache of their own; the first token of each."""
        input_ids, prompt_mask = left_pad([r.prompt_ids for r in requests], self.pad_id, device=self.device)
        prompt_mask = prompt_mask.bool()
        with self.timer("prefill"):
            cache, first_tokens = prefill(self.model, self.layout, input_ids, prompt_mask,
                                          [r.sampling for r in requests])
        return Prefilled(requests, RunningCache(cache, prompt_mask), first_tokens)

    def join(self, prefilled: Prefilled, budget: Budget) -> list[Running]:
        """The prefilled requests become running rows: each takes its first token and opens its first block(s)
        within `budget`; their cache rows go below the running ones."""
        now = time.perf_counter()
        entries = [Running(request, self.new_row(request), now) for request in prefilled.requests]
        dec = self.decoding(budget)
        for entry, token in zip(entries, prefilled.first_tokens, strict=True):
            self.kind.begin(entry.row, token, dec)
        self.note(dec)
        # they count as running first, so a failing merge fails them along with the rest instead of losing them
        self.running.extend(entries)
        joining = prefilled.cache
        with self.timer("cache: rows join"):
            if self.cache is None:
                self.cache = RunningCache.reserve(joining.cache, joining.mask, self.max_rows)
            else:
                self.cache.append(joining.cache, joining.mask)
        return entries

    def forward(self, cache: RunningCache, rows: list[Row]) -> list[list[int]]:
        """One pass over the rows' windows: each slot's prediction."""
        with self.timer("forward"):
            if self.kind is LANES:
                return branch_forward(self.model, self.layout, cache.cache, cache.mask, rows, self.pad_id)
            return jacobi_forward(self.model, self.layout, cache.cache, cache.mask, rows, self.pad_id)

    def run_pass(self, budget: Budget) -> PassOutcome:
        """One Jacobi iteration of every running row within `budget`: forward, commit, roll back.

        When the batched forward fails, the pass is undone and each row runs alone on a copy of its cache row;
        those that fail alone are named in the outcome, the others keep their state and go on at the next pass.
        If every row passes alone (the pass fails only together), it raises.
        """
        rows = self.rows
        for row in rows:
            self.kind.shrink(row, budget.width)
        slots = len(rows) * max(len(row.window) for row in rows)
        try:
            predictions = self.forward(self.cache, rows)
        except Exception:
            if failed := self.culprits():
                return PassOutcome(slots, failed)
            raise
        dec = self.decoding(budget)
        with self.timer("rows: commit"):
            kept = [self.kind.advance(row, preds, dec) for row, preds in zip(rows, predictions, strict=True)]
        with self.timer("cache: pass rolled back"):
            self.cache.roll_back(self.kind.roll_back, kept)
        self.note(dec)
        return PassOutcome(slots)

    def culprits(self) -> dict[int, str]:
        """After a failed pass: the rows that fail alone, with their errors."""
        self.cache.undo_pass()
        failed = {}
        for i, entry in enumerate(self.running):
            try:
                self.forward(self.cache.row_alone(i), [entry.row])
            except Exception as err:
                failed[i] = f"{type(err).__name__}: {err}"
        return failed

    def note(self, dec: Decoding) -> None:
        self.blocks_spawned += getattr(dec, "blocks_spawned", 0)

    def remove_finished(self) -> list[Running]:
        """Rows that are done leave the cache (the last rows move into their places); returns their entries."""
        ended = [entry for entry in self.running if entry.row.done]
        if not ended:
            return []
        if self.cache is None:  # a join failed before the cache held its rows
            self.running = [entry for entry in self.running if not entry.row.done]
            return ended
        with self.timer("cache: rows leave"):
            order = self.cache.drop_rows([entry.row.done for entry in self.running])
        self.running = [self.running[i] for i in order]
        if not self.running:  # nothing left to attend to: the next request starts from an empty cache
            self.cache = None
        return ended

    def compact(self) -> None:
        if self.cache is not None:
            with self.timer("cache: columns dropped"):
                self.cache.compact()

    def reset(self) -> list[Running]:
        """Drop every row and the cache (after a failure the cache can no longer be trusted)."""
        ended, self.running, self.cache = self.running, [], None
        return ended
