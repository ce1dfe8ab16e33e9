"""Exact, batched, KV-cached Jacobi decoding.

A block of n tokens is the unknown of n equations y_i = argmax p(. | x, y_<i). One forward pass over the
block's live window refines every position at once; the leading run that already agrees with its own
predictions is final (committed into the KV cache), the rest is re-guessed by those predictions. The fixed
point is the greedy autoregressive output, so the result equals `generate(do_sample=False)` token for token.
With sampling settings the argmax becomes `cllm.decoding.sampling.choose_tokens`, whose noise is fixed per output
position by the seed: the fixed point is then the sequence AR decoding samples with that seed.

The steps, in the order they run:
  prefill          one pass over the prompt; its last logit gives the first token (already correct)
  begin_row        make that token final and open the first block
  jacobi_forward   one pass over every row's live window against the cached prefix
  agreeing_run     how far a window agrees with its shifted predictions
  advance_row      commit that run, re-guess the rest, close the block at its fixed point
  roll_back_cache  keep the committed entries' KV, drop the rest
  retire_rows      drop finished rows from the batch

Batching: rows commit different numbers of tokens per pass. The cache stays one rectangle; a row that
commits fewer tokens than the batch's maximum leaves masked holes, and explicit per-row position ids keep
its positions contiguous, so no row ever sees another row's tokens or its own discarded guesses.
Sliding-window models get masks built from those positions (see `cllm.decoding.kv_cache`); models whose cache cannot
be rolled back or masked that way are refused up front by `check_supported`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from cllm.decoding.guesses import GUESS_STRATEGIES, NgramPool, initial_guess
from cllm.decoding.kv_cache import AttentionLayout, check_supported, forward_mask, new_cache
from cllm.decoding.sampling import SamplingParams, choose_tokens
from cllm.models.loading import cache_keyword, context_length


@dataclass
class JacobiOutput:
    sequences: torch.Tensor  # [batch, prompt + generated], like generate(do_sample=False)
    new_tokens: list[int]  # generated tokens per row, EOS included
    forward_passes: int  # batched decoding passes, prefill excluded
    row_forward_passes: list[int]  # passes each row took part in
    commit_histogram: dict[int, int]  # tokens fixed by one pass -> how many passes fixed that many
    stationary_tokens: int  # tokens that were right and stayed right while an earlier token was wrong
    trajectories: list[dict] | None = None

    @property
    def tokens_per_forward(self) -> float:
        """Tokens fixed per decoding pass (the first token of each row comes from prefill)."""
        decoded = sum(max(n - 1, 0) for n in self.new_tokens)
        passes = sum(self.row_forward_passes)
        return decoded / passes if passes else 0.0


@dataclass
class Row:
    """One sequence of the batch: what is final, and the live Jacobi window of its current block."""

    index: int
    prompt: list[int]
    budget: int  # max new tokens
    generated: list[int] = field(default_factory=list)  # final tokens; generated[-1] heads the window
    window: list[int] = field(default_factory=list)  # [known-correct head, guesses...]
    block_start: int = 0  # index in `generated` of the current block's first token
    block_len: int = 0
    block_idx: int = 0
    states: list[list[int]] = field(default_factory=list)  # Jacobi states of the current block
    iters: int = 0  # passes spent on the current block
    forwards: int = 0
    done: bool = False
    pool: NgramPool | None = None
    sampling: SamplingParams | None = None  # None: greedy

    @property
    def position(self) -> int:
        """Position id of the window head: prompt tokens plus final tokens already in the cache."""
        return len(self.prompt) + len(self.generated) - 1

    def block_state(self) -> list[int]:
        return self.generated[self.block_start : -1] + self.window


@dataclass
class Decoding:
    """What every row's update needs: the stop rules and the running statistics."""

    block_size: int
    max_iters: int
    eos_ids: set[int]
    pad_token_id: int
    init: str
    rng: random.Random
    on_commit: Callable[[int, list[int]], bool | None] | None
    record: bool
    histogram: Counter = field(default_factory=Counter)
    stationary: int = 0
    trajectories: list[dict] = field(default_factory=list)


def prefill(
    model,
    layout: AttentionLayout,
    input_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    sampling: Sequence[SamplingParams | None] | None = None,
) -> tuple[DynamicCache, list[int]]:
    """Fill the KV cache with the prompt; the token chosen at its last position is the first new token."""
    cache = new_cache(model)
    position_ids = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=forward_mask(layout, prompt_mask, position_ids),
        position_ids=position_ids,
        **{cache_keyword(type(model)): cache},
        use_cache=True,
        logits_to_keep=1,
    ).logits
    return cache, choose_tokens(logits[:, -1:], sampling, [0] * len(logits))[:, 0].tolist()


def jacobi_forward(
    model, layout: AttentionLayout, cache: DynamicCache, cache_mask: torch.Tensor, rows: list[Row], pad_token_id: int
) -> list[list[int]]:
    """One Jacobi iteration for every row: forward the live windows, return the prediction at each slot.

    The prediction is the argmax, or the row's sampled choice with the noise of the slot's output position
    (`cllm.decoding.sampling`), so the fixed point is the sequence AR decoding samples with the same seed.
    Windows are right-padded to the widest; a pad slot sits after the real tokens, so under causal
    attention it changes nothing before it, and its KV is dropped by `roll_back_cache`.
    """
    width = max(len(row.window) for row in rows)
    device = cache_mask.device
    tokens = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row.window)] = torch.tensor(row.window)
    starts = torch.tensor([row.position for row in rows])
    last = torch.tensor([len(row.window) - 1 for row in rows])
    # a pad slot repeats its row's last position: a row ending at the context must not index past it
    position_ids = (starts[:, None] + torch.minimum(torch.arange(width), last[:, None])).to(device)
    window_mask = torch.ones(len(rows), width, dtype=torch.bool, device=device)
    key_mask = torch.cat([cache_mask, window_mask], dim=1)
    logits = model(
        input_ids=tokens.to(device),
        attention_mask=forward_mask(layout, key_mask, position_ids),
        position_ids=position_ids,
        **{cache_keyword(type(model)): cache},
        use_cache=True,
    ).logits
    first_positions = [len(row.generated) for row in rows]  # window[j] predicts output position len + j
    return choose_tokens(logits, [row.sampling for row in rows], first_positions).tolist()


def agreeing_run(window: list[int], predictions: list[int]) -> int:
    """Number k of guesses that equal the prediction made from everything before them.

    window[0..k] are then all correct, and predictions[k] is the correct next token.
    """
    k = 0
    while k < len(window) - 1 and window[k + 1] == predictions[k]:
        k += 1
    return k


def accept(row: Row, tokens: list[int], dec: Decoding) -> None:
    """Make `tokens` final for `row`, stopping at the first EOS, the budget, or the caller's stop signal."""
    tokens = tokens[: row.budget - len(row.generated)]
    for i, token in enumerate(tokens):
        if token in dec.eos_ids:
            tokens = tokens[: i + 1]
            break
    row.generated.extend(tokens)
    stop = dec.on_commit(row.index, tokens) if dec.on_commit is not None and tokens else False
    if stop or len(row.generated) >= row.budget or (tokens and tokens[-1] in dec.eos_ids):
        row.done = True


def start_block(row: Row, dec: Decoding) -> None:
    """New block: the known-correct head plus guesses, no longer than the tokens still wanted."""
    row.block_start = len(row.generated) - 1
    row.block_len = min(dec.block_size, row.budget - len(row.generated))
    row.iters = 0
    guesses = initial_guess(
        dec.init,
        length=row.block_len - 1,
        context=row.prompt + row.generated,
        prompt=row.prompt,
        pad_token_id=dec.pad_token_id,
        rng=dec.rng,
        pool=row.pool,
    )
    row.window = [row.generated[-1]] + guesses
    row.states = [row.block_state()]


def stationary_count(states: list[list[int]], fixed_point: list[int]) -> int:
    """Positions that settled on their final token before the iteration that committed them."""
    trajectory = [s[: len(fixed_point)] for s in states] + [fixed_point]
    count = 0
    for i, token in enumerate(fixed_point):
        committed = next(j for j, s in enumerate(trajectory) if s[: i + 1] == fixed_point[: i + 1])
        settled = len(trajectory) - 1
        while settled > 0 and trajectory[settled - 1][i] == token:
            settled -= 1
        count += settled < committed
    return count


def close_block(row: Row, fixed_point: list[int], dec: Decoding) -> None:
    """Record a finished block: its statistics, its trajectory, and its n-grams for later guesses."""
    states = [s[: len(fixed_point)] for s in row.states]
    if states and states[-1] == fixed_point:
        states.pop()  # the state that was verified is the fixed point itself
    if fixed_point:
        dec.stationary += stationary_count(states, fixed_point)
    if row.pool is not None:
        row.pool.observe(row.generated[max(row.block_start - 2, 0) :])
    if dec.record and fixed_point:
        dec.trajectories.append(
            {
                "prompt_id": row.index,
                "block_idx": row.block_idx,
                "prompt_len": len(row.prompt),
                "prefix_ids": row.prompt + row.generated[: row.block_start],
                "states": states,
                "fixed_point": fixed_point,
                "num_iters": row.iters,
                "eos_in_block": any(t in dec.eos_ids for t in fixed_point),
            }
        )
    row.block_idx += 1
    row.block_start += len(fixed_point)


def advance_row(row: Row, predictions: list[int], dec: Decoding) -> int:
    """Apply one Jacobi iteration's predictions to a row; return how many window entries' KV to keep."""
    window = row.window
    k = agreeing_run(window, predictions)
    converged = k == len(window) - 1
    row.iters += 1
    row.forwards += 1
    dec.histogram[k + 1] += 1
    block_end = row.block_start + row.block_len
    accept(row, window[1 : k + 1] + [predictions[k]], dec)
    if row.pool is not None and not converged:
        row.pool.observe(predictions[k : len(window)])
    if converged or row.done or row.iters >= dec.max_iters:
        final_end = len(row.generated) if row.done else len(row.generated) - 1
        close_block(row, row.generated[row.block_start : min(block_end, final_end)], dec)
        if row.done and len(row.generated) > row.block_start:  # the next block's head was final too
            row.iters = 0
            row.states = []
            close_block(row, row.generated[row.block_start :], dec)
        if not row.done:
            start_block(row, dec)
    else:
        row.window = [predictions[k]] + predictions[k + 1 : len(window) - 1]
        row.states.append(row.block_state())
    return k + 1


def begin_row(row: Row, first_token: int, dec: Decoding) -> None:
    """After prefill: the first token is final; open the first block (or close the row if that token ends it)."""
    if row.pool is not None:
        row.pool.observe(row.prompt)
    accept(row, [first_token], dec)
    if row.done:
        close_block(row, row.generated[:], dec)
    else:
        start_block(row, dec)


def roll_back_cache(cache: DynamicCache, cache_mask: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """Keep each row's committed window entries; crop what no row kept, mask what only some rows kept."""
    width = cache.get_seq_length() - cache_mask.shape[1]
    widest = max(kept)
    if widest < width:
        cache.crop(-(width - widest))
    device = cache_mask.device
    keep = torch.arange(widest, device=device)[None, :] < torch.tensor(kept, device=device)[:, None]
    return torch.cat([cache_mask, keep], dim=1)


def retire_rows(rows: list[Row], cache: DynamicCache, cache_mask: torch.Tensor):
    """Drop finished rows so later passes spend nothing on them."""
    live = [i for i, row in enumerate(rows) if not row.done]
    if len(live) == len(rows):
        return rows, cache_mask
    if not live:
        return [], cache_mask[:0]
    index = torch.tensor(live, dtype=torch.long, device=cache_mask.device)
    cache.batch_select_indices(index)
    return [rows[i] for i in live], cache_mask[index]


def eos_set(eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)


def validate_arguments(model, input_ids, attention_mask, max_new_tokens, block_size, init, max_iters):
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError("input_ids must be a 2-D tensor [batch, prompt_length]")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): every prompt needs a token")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
        if (attention_mask.sum(-1) == 0).any():
            raise ValueError("a row of attention_mask is all zeros: every prompt needs at least one token")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    budgets = [max_new_tokens] if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if not isinstance(max_new_tokens, int) and len(budgets) != input_ids.shape[0]:
        raise ValueError(f"max_new_tokens has {len(budgets)} entries for a batch of {input_ids.shape[0]}")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in budgets):
        raise ValueError(f"max_new_tokens must be integers >= 1, got {max_new_tokens!r}")
    if init not in GUESS_STRATEGIES:
        raise ValueError(f"unknown init strategy {init!r}: choose one of {', '.join(GUESS_STRATEGIES)}")
    if max_iters is not None and (not isinstance(max_iters, int) or max_iters < 1):
        raise ValueError(f"max_iters must be None or an integer >= 1, got {max_iters!r}")
    limit = context_length(model)
    if limit is not None:  # positions are per row, so each row's own length counts, not the padded width
        full = [input_ids.shape[1]] * input_ids.shape[0]
        lengths = attention_mask.sum(-1).tolist() if attention_mask is not None else full
        budgets = budgets * len(lengths) if isinstance(max_new_tokens, int) else budgets
        for row, (length, budget) in enumerate(zip(lengths, budgets, strict=True)):
            if length + budget > limit:
                raise ValueError(
                    f"row {row}: prompt length {length} + max_new_tokens {budget} exceeds the model's "
                    f"context of {limit} tokens"
                )


@torch.inference_mode()
def jacobi_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | Sequence[int],
    block_size: int = 16,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    init: str = "prompt",
    max_iters: int | None = None,
    return_trajectories: bool = False,
    on_commit: Callable[[int, list[int]], bool | None] | None = None,
    seed: int = 0,
    sampling: SamplingParams | Sequence[SamplingParams | None] | None = None,
) -> JacobiOutput:
    """Greedy (or seeded sampling) decoding by Jacobi iteration over blocks of `block_size` tokens; exact,
    only faster.

    `eos_token_id`/`pad_token_id` mean what they mean when passed explicitly to `generate`: no EOS means
    no early stop; no pad id pads finished rows with the (first) EOS id.
    `max_iters` caps the passes per block: a block still unconverged then restarts from its last
    correct token with fresh guesses (the output does not change).
    `on_commit(row, tokens)` receives tokens as they become final; returning True stops that row.
    `seed` seeds the random initial guesses of init="prompt" (it never changes the output).
    `sampling`: one `SamplingParams` for every row, or one per row (None: greedy). A row's output depends
    only on its prompt and its settings, and equals `ar_generate` with the same settings token for token.
    A model this engine cannot decode exactly raises ValueError up front (see `check_supported`).
    """
    layout = check_supported(model)
    validate_arguments(model, input_ids, attention_mask, max_new_tokens, block_size, init, max_iters)
    batch = DecodeBatch.of(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, sampling)
    dec = Decoding(
        block_size=block_size,
        max_iters=max_iters or block_size,
        eos_ids=batch.eos_ids,
        pad_token_id=batch.pad_token_id,
        init=init,
        rng=random.Random(seed),
        on_commit=on_commit,
        record=return_trajectories,
    )
    rows = [
        Row(index=i, prompt=prompt, budget=budget, pool=NgramPool(block_size) if init == "ngram" else None,
            sampling=params)
        for i, (prompt, budget, params) in enumerate(batch.rows())
    ]

    def one_pass(cache: DynamicCache, cache_mask: torch.Tensor, live: list[Row]) -> torch.Tensor:
        predictions = jacobi_forward(model, layout, cache, cache_mask, live, batch.pad_token_id)
        kept = [advance_row(row, preds, dec) for row, preds in zip(live, predictions, strict=True)]
        return roll_back_cache(cache, cache_mask, kept)

    forward_passes = decode_loop(model, layout, batch, rows, lambda row, token: begin_row(row, token, dec), one_pass)
    return JacobiOutput(
        **batch.output_fields(rows, dec, forward_passes),
        stationary_tokens=dec.stationary,
        trajectories=dec.trajectories if return_trajectories else None,
    )


@dataclass
class DecodeBatch:
    """The arguments every offline decode (`jacobi_generate`, `multiblock_generate`) normalises the same way."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor  # bool, on the ids' device
    budgets: list[int]
    sampling: list[SamplingParams | None]
    eos_ids: set[int]
    pad_token_id: int

    @classmethod
    def of(cls, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, sampling) -> DecodeBatch:
        """No pad id pads finished rows with the (first) EOS id, as `generate` does."""
        if pad_token_id is None:
            pad_token_id = eos_token_id if isinstance(eos_token_id, int) else next(iter(eos_token_id or []), 0)
        size = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask.to(input_ids.device).bool(),
            budgets=[max_new_tokens] * size if isinstance(max_new_tokens, int) else list(max_new_tokens),
            sampling=sampling_per_row(sampling, size),
            eos_ids=eos_set(eos_token_id),
            pad_token_id=pad_token_id,
        )

    def rows(self):
        """(prompt without padding, budget, sampling) per row."""
        for i in range(self.input_ids.shape[0]):
            yield self.input_ids[i][self.attention_mask[i]].tolist(), self.budgets[i], self.sampling[i]

    def output_fields(self, rows: list[Row], dec: Decoding, forward_passes: int) -> dict:
        """What every mode's output reports, in `generate`'s layout."""
        return dict(
            sequences=assemble_sequences(self.input_ids, rows, self.pad_token_id),
            new_tokens=[len(row.generated) for row in rows],
            forward_passes=forward_passes,
            row_forward_passes=[row.forwards for row in rows],
            commit_histogram=dict(sorted(dec.histogram.items())),
        )


def decode_loop(model, layout: AttentionLayout, batch: DecodeBatch, rows: list, begin, one_pass) -> int:
    """Prefill, start each row on its first token, then passes until every row is done; returns the passes.

    `begin(row, first_token)` opens a row's first block; `one_pass(cache, cache_mask, live_rows)` runs one
    forward over the live rows, advances them and returns the cache mask after rolling back what did not hold.
    """
    cache, first_tokens = prefill(model, layout, batch.input_ids, batch.attention_mask, batch.sampling)
    for row, token in zip(rows, first_tokens, strict=True):
        begin(row, token)
    forward_passes = 0
    live, cache_mask = retire_rows(rows, cache, batch.attention_mask)
    while live:
        cache_mask = one_pass(cache, cache_mask, live)
        forward_passes += 1
        live, cache_mask = retire_rows(live, cache, cache_mask)
    return forward_passes


def sampling_per_row(
    sampling: SamplingParams | Sequence[SamplingParams | None] | None, batch: int
) -> list[SamplingParams | None]:
    if sampling is None or isinstance(sampling, SamplingParams):
        return [sampling] * batch
    rows = list(sampling)
    if len(rows) != batch:
        raise ValueError(f"sampling has {len(rows)} entries for a batch of {batch}")
    if any(params is not None and not isinstance(params, SamplingParams) for params in rows):
        raise ValueError("sampling entries must be SamplingParams or None")
    return rows


def assemble_sequences(input_ids: torch.Tensor, rows: list[Row], pad_token_id: int) -> torch.Tensor:
    """Prompt plus generated tokens, rows that ended early padded, as `generate` lays them out."""
    width = max(len(row.generated) for row in rows)
    new = torch.full((len(rows), width), pad_token_id, dtype=input_ids.dtype)
    for i, row in enumerate(rows):
        new[i, : len(row.generated)] = torch.tensor(row.generated, dtype=input_ids.dtype)
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


def ar_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int | Sequence[int],
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    on_commit: Callable[[int, list[int]], bool | None] | None = None,
    sampling: SamplingParams | Sequence[SamplingParams | None] | None = None,
) -> JacobiOutput:
    """Autoregressive decoding (greedy, or sampled with `sampling`) on the same engine: a Jacobi block of one
    token is one AR step."""
    return jacobi_generate(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        block_size=1,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        on_commit=on_commit,
        sampling=sampling,
    )
