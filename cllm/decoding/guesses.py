"""Initial guesses for a Jacobi block.

The guess never changes what Jacobi decoding returns, only how many iterations it takes: a token guessed
right (and the ones after it, if the model agrees) commit in the first pass.
"""

from __future__ import annotations

import random

GUESS_STRATEGIES = ("prompt", "repeat", "pad", "ngram")


class NgramPool:
    """Lookahead-style pool: for a key of one or two tokens, the continuation seen most recently after it.

    Fed with the prompt, every fixed point and the unconverged tails of Jacobi states, whose n-grams
    are often right a few iterations before they are confirmed.
    """

    def __init__(self, width: int):
        self.width = width
        self.after_one: dict[int, list[int]] = {}
        self.after_two: dict[tuple[int, int], list[int]] = {}

    def observe(self, tokens: list[int]) -> None:
        for i in range(len(tokens) - 1):
            continuation = tokens[i + 1 : i + 1 + self.width]
            self.after_one[tokens[i]] = continuation
            if i > 0:
                self.after_two[(tokens[i - 1], tokens[i])] = continuation

    def continuation(self, previous: int | None, last: int, length: int) -> list[int]:
        """Chain pool look-ups from (previous, last) until `length` tokens or a miss."""
        guess: list[int] = []
        while len(guess) < length:
            found = self.after_two.get((previous, last)) if previous is not None else None
            found = found or self.after_one.get(last)
            if not found:
                break
            guess.extend(found[: length - len(guess)])
            previous, last = (guess[-2] if len(guess) > 1 else last), guess[-1]
        return guess


def initial_guess(
    strategy: str,
    *,
    length: int,
    context: list[int],
    prompt: list[int],
    pad_token_id: int,
    rng: random.Random,
    pool: NgramPool | None = None,
) -> list[int]:
    """`length` guessed tokens to follow `context` (whose last token is already known to be correct)."""
    if length <= 0:
        return []
    last = context[-1]
    if strategy == "prompt":
        return [rng.choice(prompt) for _ in range(length)]
    if strategy == "repeat":
        return [last] * length
    if strategy == "pad":
        return [pad_token_id] * length
    if strategy == "ngram":
        previous = context[-2] if len(context) > 1 else None
        guess = pool.continuation(previous, last, length) if pool is not None else []
        return guess + [guess[-1] if guess else last] * (length - len(guess))
    raise ValueError(f"unknown init strategy {strategy!r}: choose one of {', '.join(GUESS_STRATEGIES)}")
