"""What every decoder around the engine shares: its settings, its special tokens, its context arithmetic.

Collection, evaluation, serving, the benchmarks and the pipeline all decode with `cllm.decoding.jacobi`; they take
their decoding knobs from `DecodeFields`, their EOS and pad ids from `special_tokens`, and cut each
request to the model's context with `room_for`/`response_budget`, so no two of them can disagree.

Only `left_pad` needs torch, and imports it itself: every stage config inherits `DecodeFields`, and reading a
command line must not cost torch's import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from cllm.decoding.guesses import GUESS_STRATEGIES

if TYPE_CHECKING:
    import torch

GuessStrategy = Literal[GUESS_STRATEGIES]  # the allowed values are the strategies the code implements


class DecodeFields(BaseModel):
    """The decoding knobs, declared once; stage configs inherit them (flat keys: `--block-size 32`)."""

    block_size: int = Field(16, ge=1, description="tokens refined together by one Jacobi pass")
    max_new_tokens: int = Field(
        256, ge=1, description="new tokens per prompt at most (fewer where the model's context ends)")
    init: GuessStrategy = Field(
        "prompt", description="initial guesses of a block; they never change the output, only the passes it takes")
    max_iters: int | None = Field(None, ge=1, description="passes per block before it restarts; None: block_size")


@dataclass(frozen=True)
class SpecialTokens:
    eos_ids: tuple[int, ...]  # the tokenizer's EOS first: it is the one appended to answer labels
    pad_id: int

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None


def special_tokens(tokenizer, generation_config=None) -> SpecialTokens:
    """EOS ids (the tokenizer's, then any more the generation config stops on) and the pad id."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    configured = getattr(generation_config, "eos_token_id", None)
    configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    eos += [token for token in configured if token not in eos]
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = getattr(generation_config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    return SpecialTokens(eos_ids=tuple(eos), pad_id=pad)


def room_for(context: int | None, prompt_length: int) -> int | None:
    """New tokens a prompt leaves in the model's context (None: no limit); <= 0 means it does not fit."""
    return None if context is None else context - prompt_length


def response_budget(max_new_tokens: int, context: int | None, prompt_lengths: Sequence[int]) -> int:
    """New tokens for a batch: max_new_tokens, cut so the longest prompt's response ends within the context."""
    room = room_for(context, max(prompt_lengths))
    return max_new_tokens if room is None else max(1, min(max_new_tokens, room))


def check_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Refuse token ids the model's embedding cannot look up (they would fail the forward pass)."""
    outside = [t for t in ids if not 0 <= t < vocab_size]
    if outside:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {outside[:5]}")


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask` for prompts given as token ids (what `generate` takes)."""
    import torch

    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("every prompt needs at least one token")
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad_token_id] * (width - len(row)) + list(row) for row in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
    return input_ids.to(device), attention_mask.to(device)
