"""The decoding modes, named once: what each is, and which offline generate function decodes it.

    jacobi      one Jacobi block in flight per row (`cllm.decoding.jacobi.jacobi_generate`)
    ar          Jacobi decoding with a block of one token: one token per pass, the exact AR baseline
    multiblock  several blocks in flight per row (`cllm.decoding.multiblock.multiblock_generate`, K = 2 by default)

Every decoder outside the decoding core (the serving engines, evaluation, the benchmarks, the server's
`mode` setting) reads a mode from `MODES` instead of testing names; nothing here imports Ray, and naming a
mode imports no torch either: a config's choices are read from here (the server's `mode`) while parsing a
command line, and only a mode's `generate` imports its decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cllm.decoding.core import DecodeFields


@dataclass(frozen=True)
class DecodingMode:
    name: str
    summary: str
    several_blocks: bool  # rows keep more than one block in flight (`cllm.decoding.multiblock.Lane`)
    one_token: bool  # a block of one token: each pass commits exactly one token (AR)
    takes_max_iters: bool  # `generate` restarts a block after `max_iters` passes

    @property
    def generate(self) -> Callable:
        """The offline decode of a whole batch (`jacobi_generate`'s signature): multi-block's for a mode that keeps
        several blocks in flight, Jacobi's for the others."""
        if self.several_blocks:
            from cllm.decoding.multiblock import multiblock_generate

            return multiblock_generate
        from cllm.decoding.jacobi import jacobi_generate

        return jacobi_generate

    def block_size(self, configured: int) -> int:
        """The block this mode decodes with: AR is Jacobi decoding with a block of one token."""
        return 1 if self.one_token else configured

    def options(self, decode: DecodeFields, seed: int = 0) -> dict:
        """`generate`'s keyword arguments for these decoding settings (a block of one needs no guesses)."""
        options: dict = {"block_size": self.block_size(decode.block_size)}
        if not self.one_token:
            options.update(init=decode.init, seed=seed)
            if self.takes_max_iters:
                options["max_iters"] = decode.max_iters
        return options


JACOBI = DecodingMode("jacobi", "one Jacobi block in flight per request", several_blocks=False, one_token=False,
                      takes_max_iters=True)
AR = DecodingMode("ar", "one token per pass (the baseline)", several_blocks=False, one_token=True,
                  takes_max_iters=True)
MULTIBLOCK = DecodingMode("multiblock", "two Jacobi blocks in flight per request (the fastest)", several_blocks=True,
                          one_token=False, takes_max_iters=False)

MODES: dict[str, DecodingMode] = {mode.name: mode for mode in (JACOBI, AR, MULTIBLOCK)}
ModeName = Literal[tuple(MODES)]  # a config field of this type accepts exactly the modes above
FASTEST = MULTIBLOCK.name  # measured on the built-in CLLMs (docs/results.md): the server's default
BASELINE = AR.name  # what speed-ups are measured against
CHOICES = "; ".join(f"{mode.name}: {mode.summary}" for mode in MODES.values()) + "; all exact"  # for help texts
