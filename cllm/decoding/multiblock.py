"""Multi-block Jacobi decoding with rejection recycling: more guesses per pass, the same exact output.

Plain Jacobi decoding refines one block at a time. Here up to `blocks` blocks are in flight per row: the
live window is `[head | block_0 | block_1 | ...]`, one causal forward over all of it against the cached
committed prefix, so block_1's guesses are refined conditioned on block_0's current guesses. Commits are
the same as in the plain mode: the agreeing run from the head, whose whole prefix agreed, so it is exactly
greedy. The run usually ends inside block_0 (only block_0 commits), but it may run on through block_0's
fixed point into block_1; blocks whose every position is final close, and the next block becomes block_0.

Spawning: a block is added behind the newest one once the newest has *settled*: the first `spawn_after`
fraction of its positions are final or kept their guess through the last pass. A block spawned earlier
would be refined against a context that is still mostly wrong and cost window width for nothing; a
settled block_0 is usually a pass or two from its fixed point, so its successor starts from a nearly
right context (Jacobi Forcing's "spawn once the newest block is mostly accepted").

Rejection recycling: the greedy tails that a pass predicts and that do not commit (the rejected part of
the window) are fed to an `NgramPool`, beside the prompt and the committed text. When the head (with the
token before it) is a key of the pool, its continuation is verified in the same pass as an extra branch
that follows the head: the branch's tokens see the cached prefix, the head and their own branch only
(a 4-D mask, position ids restarting after the head). A branch is only a guess; what commits is its
agreeing run against the model's own predictions, so the output stays exact. A branch that agrees
further than the window commits instead; its KV entries are kept and the window's are masked as holes,
like the holes batching already leaves (see `cllm.decoding.jacobi`).

Cost: on a CPU a pass costs more the wider it is (on the built-in model's shape, batch 1, one thread, each
window token adds about 0.04 AR steps, all of it matrix-multiply arithmetic: benchmarks/pass_cost.py), so
extra blocks and branches pay only where they raise tokens per pass faster than the window grows.
Measured on the built-in CLLMs (docs/results.md): a second block opened once a quarter of the newest is
settled pays; recycled branches raise tokens per pass by ~0.15 but cost more than that on a CPU, so the
defaults are K = 2, spawn_after 0.25, no recycling (`recycle` > 0 turns it on, for hardware where a wider
pass is nearly free).
With sampling settings every slot takes `cllm.decoding.sampling.choose_tokens` with the noise of the output position
it predicts (head + depth, in a branch too), so the output equals AR sampling with the same seed.

The steps, in the order they run (prefill, accept and retire_rows are the plain mode's):
  begin_lane       after prefill: the first token, then the first block
  open_block       a new block behind the last one in flight, filled by the init strategy
  recycled         the pool's continuations of the head, the extra branches of this pass
  branch_forward   one pass over every row's window and branches, with a 4-D mask built here
  best_branch      the branch whose agreeing run is longest, and the tokens it commits
  advance_lane     commit, re-guess every open position, close finished blocks, spawn a settled one
  roll_back_slots  keep each row's committed KV entries, wherever in the pass they sit
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from cllm.decoding.guesses import NgramPool, initial_guess
from cllm.decoding.jacobi import (
    DecodeBatch,
    Decoding,
    JacobiOutput,
    Row,
    accept,
    agreeing_run,
    decode_loop,
    jacobi_forward,
    validate_arguments,
)
from cllm.decoding.kv_cache import AttentionLayout, as_attention_mask, check_supported
from cllm.decoding.sampling import SamplingParams, choose_tokens
from cllm.models.loading import cache_keyword


@dataclass
class MultiBlockOutput(JacobiOutput):
    recycled_tokens: int = 0  # tokens committed by a recycled branch beyond what the window's run gave
    blocks_spawned: int = 0  # blocks opened behind another block still in flight


@dataclass
class MultiBlock(Decoding):
    """The plain mode's settings plus the multi-block ones."""

    blocks: int = 2  # K: blocks in flight per row
    spawn_after: float = 0.25  # fraction of the newest block that must be settled before the next opens
    recycle: int = 0  # recycled branches verified per row and pass
    recycle_len: int = 8  # tokens per recycled branch
    recycled_tokens: int = 0
    blocks_spawned: int = 0


@dataclass
class Lane(Row):
    """A row with several blocks in flight: `window` is [head, guesses of every open block]."""

    spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in `generated` of each open block
    branches: list[list[int]] = field(default_factory=list)  # recycled continuations verified this pass

    @property
    def head_index(self) -> int:
        return len(self.generated) - 1

    def guess_end(self) -> int:
        """Guesses stop one short of the budget: the pass's last prediction fills the final slot."""
        return self.budget - 1


def open_block(lane: Lane, dec: MultiBlock) -> None:
    """A new block behind the last one in flight (or right after the head), its guesses from the init strategy."""
    start = lane.spans[-1][1] if lane.spans else lane.head_index
    end = min(start + dec.block_size, lane.guess_end())
    if end <= start:
        return
    if lane.spans:
        dec.blocks_spawned += 1
    else:
        lane.window = [lane.generated[-1]]
    first = max(start, len(lane.generated))
    context = lane.prompt + lane.generated + lane.window[1:]
    lane.window = lane.window + initial_guess(
        dec.init, length=end - first, context=context, prompt=lane.prompt,
        pad_token_id=dec.pad_token_id, rng=dec.rng, pool=lane.pool,
    )
    lane.spans.append((start, end))


def begin_lane(lane: Lane, first_token: int, dec: MultiBlock) -> None:
    """After prefill: the first token is final; open the first block (unless that token ended the row)."""
    if lane.pool is not None:
        lane.pool.observe(lane.prompt + [first_token])
    accept(lane, [first_token], dec)
    if not lane.done:
        open_block(lane, dec)


def shrink_lane(lane: Lane, width: int) -> None:
    """Keep the window's first `width` slots (the serving engine's per-pass budget): the blocks they cut
    end there, the blocks past them close unopened; the next block opens from the new end."""
    if len(lane.window) <= width:
        return
    lane.window = lane.window[:width]
    end = lane.head_index + width
    lane.spans = [(start, min(stop, end)) for start, stop in lane.spans if start < end]


def recycled(lane: Lane, dec: MultiBlock) -> list[list[int]]:
    """Pool continuations of the head that differ from the window's own guesses: this pass's extra branches."""
    length = min(dec.recycle_len, lane.guess_end() - len(lane.generated))
    if lane.pool is None or dec.recycle == 0 or length <= 0:
        return []
    head = lane.generated[-1]
    previous = lane.generated[-2] if len(lane.generated) > 1 else (lane.prompt[-1] if lane.prompt else None)
    branches: list[list[int]] = []
    for key in (previous, None):  # the two-token key first, then the head alone
        branch = lane.pool.continuation(key, head, length)
        if branch and branch != lane.window[1 : 1 + len(branch)] and branch not in branches:
            branches.append(branch)
    return branches[: dec.recycle]


def branch_layout(lane: Lane, width: int, pad_token_id: int) -> tuple[list[int], list[int], list[int]]:
    """Tokens, branch id and depth after the head of each slot: the window is branch 0, pad slots branch -1.

    A pad slot repeats the row's last depth: a row whose answer ends at the context must not get a
    position past it (learned position tables end there), and no real slot sees a pad slot."""
    tokens, branch, depth = list(lane.window), [0] * len(lane.window), list(range(len(lane.window)))
    for b, guess in enumerate(lane.branches, start=1):
        tokens += guess
        branch += [b] * len(guess)
        depth += range(1, len(guess) + 1)
    pad = width - len(tokens)
    return tokens + [pad_token_id] * pad, branch + [-1] * pad, depth + [depth[-1]] * pad


def branch_mask(
    layout: AttentionLayout, cache_mask: torch.Tensor, branch: torch.Tensor, depth: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """4-D masks: a slot sees the committed cache, the head, and the slots of its own branch up to its depth."""
    batch, width = branch.shape
    own = (branch[:, :, None] == branch[:, None, :]) & (depth[:, None, :] <= depth[:, :, None])
    own[:, :, 0] = True  # every branch follows the head
    visible = torch.cat([cache_mask[:, None, :].expand(batch, width, -1), own], dim=-1)
    if not layout.slides:
        return as_attention_mask(visible, layout)
    key_positions = torch.cat([cache_mask.long().cumsum(-1) - 1, positions], dim=-1)
    sliding = as_attention_mask(visible & (positions[:, :, None] - key_positions[:, None, :] < layout.sliding_window),
                                layout)
    if not layout.mixed:
        return sliding
    return {"full_attention": as_attention_mask(visible, layout), "sliding_attention": sliding}


def branch_forward(
    model, layout: AttentionLayout, cache: DynamicCache, cache_mask: torch.Tensor, lanes: list[Lane], pad_token_id: int,
) -> list[list[int]]:
    """One pass over every row's window and recycled branches; the prediction (greedy or sampled) at each slot.

    The 4-D mask is built here even when no row has a branch: transformers takes a 4-D mask as it is,
    which spares it building its own from the 2-D one on every pass (see benchmarks/pass_cost.py). A
    family that numbers positions from the 2-D mask (`layout.explicit_masks` False, never given branches) takes
    the plain `jacobi_forward`.
    """
    if not layout.explicit_masks:
        return jacobi_forward(model, layout, cache, cache_mask, lanes, pad_token_id)
    width = max(len(lane.window) + sum(map(len, lane.branches)) for lane in lanes)
    tokens, branch, depth = map(list, zip(*(branch_layout(lane, width, pad_token_id) for lane in lanes), strict=True))
    device = cache_mask.device
    depth = torch.tensor(depth, device=device)
    positions = torch.tensor([lane.position for lane in lanes], device=device)[:, None] + depth
    logits = model(
        input_ids=torch.tensor(tokens, device=device),
        attention_mask=branch_mask(layout, cache_mask, torch.tensor(branch, device=device), depth, positions),
        position_ids=positions,
        **{cache_keyword(type(model)): cache},
        use_cache=True,
    ).logits
    first_positions = [len(lane.generated) for lane in lanes]  # the head's slot predicts this output position
    return choose_tokens(logits, [lane.sampling for lane in lanes], first_positions, depth).tolist()


def best_branch(lane: Lane, predictions: list[int], run: int) -> tuple[list[int], list[int], int]:
    """(tokens to commit, slots whose KV to keep, recycled branch index or 0) of the longest agreeing run.

    `run` is the window's `agreeing_run`; a branch's guess j agrees when it equals the prediction at the
    slot before it (the head's prediction for j = 0).
    """
    window = lane.window
    best = (window[1 : run + 1] + [predictions[run]], list(range(run + 1)), 0)
    offset = len(window)
    for b, guess in enumerate(lane.branches, start=1):
        slots = [0] + list(range(offset, offset + len(guess)))  # the slot that predicts each guess, then the last
        agree = 0
        while agree < len(guess) and guess[agree] == predictions[slots[agree]]:
            agree += 1
        if agree > len(best[0]) - 1:
            best = (guess[:agree] + [predictions[slots[agree]]], slots[: agree + 1], b)
        offset += len(guess)
    return best


def next_guesses(lane: Lane, predictions: list[int], won: int, head: int, first: int, end: int) -> list[int]:
    """New guesses for positions [first, end) of `generated`: each the prediction from the slot before it.

    `head` is the pass's head index; the winning branch's predictions come first where it reaches (its
    context agreed longest), the window's after.
    """
    offset = len(lane.window) + sum(len(g) for g in lane.branches[: won - 1]) if won else 0
    reach = head + 1 + len(lane.branches[won - 1]) if won else head
    guesses = []
    for index in range(first, end):
        if won and index <= reach:
            guesses.append(predictions[offset + index - head - 2] if index > head + 1 else predictions[0])
        else:
            guesses.append(predictions[index - head - 1])
    return guesses


def settled(lane: Lane, before: dict[int, int], dec: MultiBlock) -> bool:
    """Whether the newest block's first `spawn_after` fraction is final or kept its guess through this pass."""
    start, end = lane.spans[-1]
    cut = start + math.ceil(dec.spawn_after * (end - start))
    head = lane.head_index
    return all(index <= head or before.get(index) == lane.window[index - head] for index in range(start, cut))


def advance_lane(lane: Lane, predictions: list[int], dec: MultiBlock) -> list[int]:
    """Apply one pass to a row: commit the best run, re-guess the rest, close and spawn blocks; return kept slots."""
    old_head = lane.head_index
    before = {old_head + i: token for i, token in enumerate(lane.window)}
    run = agreeing_run(lane.window, predictions)
    commit, kept, won = best_branch(lane, predictions, run)
    lane.forwards += 1
    dec.histogram[len(commit)] += 1
    dec.recycled_tokens += len(commit) - (run + 1)
    if lane.pool is not None and run < len(lane.window) - 1:
        lane.pool.observe(predictions[run : len(lane.window)])  # the window's rejected greedy tail
    accept(lane, commit, dec)
    if lane.done:
        return kept
    if lane.pool is not None:
        lane.pool.observe(lane.generated[-len(commit) - 2 :])
    end = lane.spans[-1][1]
    guesses = next_guesses(lane, predictions, won, old_head, len(lane.generated), end)
    lane.window = [lane.generated[-1]] + guesses
    while lane.spans and lane.spans[0][1] <= len(lane.generated):
        lane.spans.pop(0)
    if not lane.spans or (len(lane.spans) < dec.blocks and settled(lane, before, dec)):
        open_block(lane, dec)  # the next block_0, or a block behind a settled newest one
    return kept


def roll_back_slots(cache: DynamicCache, cache_mask: torch.Tensor, kept: list[list[int]]) -> torch.Tensor:
    """Keep each row's committed slots of the pass; crop what no row kept, mask the rest as holes."""
    width = cache.get_seq_length() - cache_mask.shape[1]
    widest = max(max(slots) + 1 for slots in kept)
    if widest < width:
        cache.crop(-(width - widest))
    keep = torch.zeros(len(kept), widest, dtype=torch.bool)
    for row, slots in enumerate(kept):
        keep[row, slots] = True
    return torch.cat([cache_mask, keep.to(cache_mask.device)], dim=1)


@torch.inference_mode()
def multiblock_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | Sequence[int],
    block_size: int = 16,
    blocks: int = 2,
    spawn_after: float = 0.25,
    recycle: int = 0,
    recycle_len: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    init: str = "prompt",
    on_commit: Callable[[int, list[int]], bool | None] | None = None,
    seed: int = 0,
    sampling: SamplingParams | Sequence[SamplingParams | None] | None = None,
) -> MultiBlockOutput:
    """Greedy decoding by multi-block Jacobi iteration with rejection recycling; equals `generate(do_sample=False)`,
    or, with `sampling`, AR sampling with the same seeds (`ar_generate`).

    `blocks` (K) is the most blocks in flight per row, `spawn_after` the settled fraction of the newest block
    that opens the next, `recycle` the recycled branches verified per pass (0: none), each of up to
    `recycle_len` tokens (default: half a block). The other arguments are `jacobi_generate`'s.
    """
    layout = check_supported(model)
    validate_arguments(model, input_ids, attention_mask, max_new_tokens, block_size, init, None)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks must be an integer >= 1, got {blocks!r}")
    if not 0.0 <= spawn_after <= 1.0:
        raise ValueError(f"spawn_after must be a fraction in [0, 1], got {spawn_after!r}")
    if isinstance(recycle, bool) or not isinstance(recycle, int) or recycle < 0:
        raise ValueError(f"recycle must be an integer >= 0, got {recycle!r}")
    if not layout.explicit_masks:
        recycle = 0  # its positions come from the 2-D mask, which cannot describe branches
    batch = DecodeBatch.of(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, sampling)
    dec = MultiBlock(
        block_size=block_size, max_iters=block_size, eos_ids=batch.eos_ids, pad_token_id=batch.pad_token_id,
        init=init, rng=random.Random(seed), on_commit=on_commit, record=False, blocks=blocks,
        spawn_after=spawn_after, recycle=recycle, recycle_len=recycle_len or max(block_size // 2, 1),
    )
    pooled = recycle > 0 or init == "ngram"
    lanes = [
        Lane(index=i, prompt=prompt, budget=budget, pool=NgramPool(block_size) if pooled else None, sampling=params)
        for i, (prompt, budget, params) in enumerate(batch.rows())
    ]

    def one_pass(cache: DynamicCache, cache_mask: torch.Tensor, live: list[Lane]) -> torch.Tensor:
        for lane in live:
            lane.branches = recycled(lane, dec)
        predictions = branch_forward(model, layout, cache, cache_mask, live, batch.pad_token_id)
        kept = [advance_lane(lane, preds, dec) for lane, preds in zip(live, predictions, strict=True)]
        return roll_back_slots(cache, cache_mask, kept)

    forward_passes = decode_loop(model, layout, batch, lanes, lambda lane, token: begin_lane(lane, token, dec),
                                 one_pass)
    return MultiBlockOutput(
        **batch.output_fields(lanes, dec, forward_passes),
        stationary_tokens=0,  # not tracked: blocks overlap in a pass, so per-block trajectories are not kept
        recycled_tokens=dec.recycled_tokens,
        blocks_spawned=dec.blocks_spawned,
    )
