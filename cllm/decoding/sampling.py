"""Sampling that Jacobi decoding reproduces token for token: the randomness is fixed per output position.

Gumbel-max trick: with g standard Gumbel noise over the vocabulary, argmax(filtered_logits / T + g) is a
draw from softmax(filtered_logits / T), where the top-k/top-p filter sets the excluded logits to -inf. If
the noise g_i of output position i depends only on the request's seed and i, the sampled token is a
deterministic function of (logits, i), just as the greedy token is a function of the logits alone. The
sequence AR decoding samples is then the fixed point of the Jacobi iteration that uses the same g_i, and
Jacobi decoding returns it exactly, for the same reason it returns the greedy output.

The noise is counter-based, so it needs no state and no memory beyond what one pass uses: the uniform of
output position i and token v is the v-th output of SplitMix64 seeded with mix(key(seed) + i * golden),
computed on the logits' device for just the positions a pass forwards (O(window x vocab)); any position
can be recomputed at any time, and CPU and GPU draw the same numbers.

Temperature 0 is greedy: `choose_tokens` is then a plain argmax, nothing else runs.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / golden ratio
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64's finaliser constants


class SamplingParams(BaseModel):
    """How one row picks its tokens; the defaults are greedy decoding."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: float = Field(0.0, ge=0)  # 0: greedy (argmax); top_k/top_p then change nothing
    top_k: int = Field(0, ge=0)  # keep the k most likely tokens; 0: off
    top_p: float = Field(1.0, gt=0, le=1)  # keep the smallest set of most likely tokens with mass >= top_p
    seed: int = 0  # fixes the noise of every output position

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def fresh_seed() -> int:
    """A random seed for a request that named none (returned to the caller so it can be reproduced)."""
    return secrets.randbits(32)  # small enough for any JSON client to read back exactly


# --- the noise: a pure function of (seed, output position, token) -----------------------------------------


def mix64(x: int) -> int:
    """SplitMix64's finaliser on a Python int (the reference the tensor version must equal)."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * MIX1) & MASK64
    x = ((x ^ (x >> 27)) * MIX2) & MASK64
    return x ^ (x >> 31)


def as_int64(x: int) -> int:
    """The signed 64-bit integer with the same bits as the unsigned `x`."""
    x &= MASK64
    return x - (1 << 64) if x >> 63 else x


def shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (`>>` is arithmetic: it would copy the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64_tensor(z: torch.Tensor) -> torch.Tensor:
    """`mix64` elementwise on int64 tensors, whose arithmetic wraps around like unsigned 64-bit ints."""
    z = (z ^ shift_right(z, 30)) * as_int64(MIX1)
    z = (z ^ shift_right(z, 27)) * as_int64(MIX2)
    return z ^ shift_right(z, 31)


def uniform_noise(seed: int, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u[i, v] in (0, 1), float64, for output positions `positions` [n] and every token v < vocab_size."""
    key = as_int64(mix64(seed + GOLDEN))
    streams = mix64_tensor(key + positions.long() * as_int64(GOLDEN))  # one SplitMix64 stream per position
    tokens = torch.arange(1, vocab_size + 1, device=positions.device, dtype=torch.long)
    bits = shift_right(mix64_tensor(streams[:, None] + tokens * as_int64(GOLDEN)), 11)  # top 53 bits
    return (bits.double() + 0.5) * 2.0**-53


def gumbel_noise(seed: int, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise [n, vocab] for the given output positions: -log(-log(u))."""
    return -torch.log(-torch.log(uniform_noise(seed, positions, vocab_size)))


# --- the filter and the choice ----------------------------------------------------------------------------


def filter_logits(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set every token outside the top-k, then outside the top-p nucleus, to -inf (the last dim is the vocab).

    The nucleus is the most likely tokens up to and including the one whose cumulative mass reaches top_p.
    """
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
        drop = torch.zeros_like(outside).scatter(-1, order, outside)  # back to vocabulary order
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def sample_positions(logits: torch.Tensor, params: SamplingParams, positions: torch.Tensor) -> torch.Tensor:
    """One row's tokens at `positions`: argmax(filtered_logits / T + g[position]) per slot, logits [slots, vocab]."""
    scores = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    noise = gumbel_noise(params.seed, positions, logits.shape[-1]).to(scores.dtype)
    return (scores + noise).argmax(-1)


def choose_tokens(
    logits: torch.Tensor,
    sampling: Sequence[SamplingParams | None] | None = None,
    first_positions: Sequence[int] | None = None,
    depths: torch.Tensor | None = None,
) -> torch.Tensor:
    """The token every decoder takes at each slot of logits [rows, slots, vocab], in place of argmax.

    Slot j of row r is output position first_positions[r] + depths[r, j] (0 is the first generated token);
    `depths` defaults to j, a window of consecutive positions (multi-block branches restart it). A row
    without sampling settings, or at temperature 0, takes the argmax.
    """
    tokens = logits.argmax(-1)
    if sampling is None or all(params is None or params.greedy for params in sampling):
        return tokens
    if depths is None:
        depths = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    for r, params in enumerate(sampling):
        if params is not None and not params.greedy:
            tokens[r] = sample_positions(logits[r], params, first_positions[r] + depths[r].to(logits.device))
    return tokens
