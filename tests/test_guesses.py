"""Initial guesses: the n-gram pool's look-ups and each strategy's shape."""

from __future__ import annotations

import random

import pytest

from cllm.decoding.guesses import GUESS_STRATEGIES, NgramPool, initial_guess


def test_pool_continues_after_one_and_two_token_keys():
    pool = NgramPool(width=3)
    pool.observe([1, 2, 3, 4, 5])
    assert pool.after_one[2] == [3, 4, 5]
    assert pool.after_two[(1, 2)] == [3, 4, 5]
    assert pool.continuation(None, 3, 2) == [4, 5]
    assert pool.continuation(1, 2, 3) == [3, 4, 5]


def test_two_token_key_wins_over_one_token_key():
    pool = NgramPool(width=2)
    pool.observe([7, 1, 8, 9])  # after 1: [8, 9]; after (7, 1): [8, 9]
    pool.observe([6, 1, 4, 4])  # after 1: [4, 4] (newer); after (6, 1): [4, 4]
    assert pool.continuation(None, 1, 2) == [4, 4]  # the most recent continuation of 1
    assert pool.continuation(7, 1, 2) == [8, 9]  # (7, 1) remembers its own


def test_continuation_chains_lookups_and_stops_at_a_miss():
    pool = NgramPool(width=2)
    pool.observe([1, 2, 3])
    pool.observe([3, 4])
    assert pool.continuation(None, 1, 10) == [2, 3, 4]  # 1 -> [2, 3], then 3 -> [4], then 4 misses
    assert pool.continuation(None, 99, 5) == []


def test_ngram_guess_pads_a_short_continuation_with_its_last_token():
    pool = NgramPool(width=4)
    pool.observe([5, 6, 7])
    guess = initial_guess("ngram", length=5, context=[9, 5], prompt=[9], pad_token_id=0, rng=random.Random(0),
                          pool=pool)
    assert guess == [6, 7, 7, 7, 7]
    empty = initial_guess("ngram", length=3, context=[9, 8], prompt=[9], pad_token_id=0, rng=random.Random(0))
    assert empty == [8, 8, 8]  # no pool: repeat the known token


@pytest.mark.parametrize("strategy", GUESS_STRATEGIES)
def test_every_strategy_gives_the_asked_length(strategy):
    guess = initial_guess(strategy, length=6, context=[3, 4, 5], prompt=[3, 4], pad_token_id=0,
                          rng=random.Random(1), pool=NgramPool(6))
    assert len(guess) == 6
    if strategy == "prompt":
        assert set(guess) <= {3, 4}
    if strategy == "pad":
        assert guess == [0] * 6
    if strategy == "repeat":
        assert guess == [5] * 6
    assert initial_guess(strategy, length=0, context=[3], prompt=[3], pad_token_id=0, rng=random.Random(1)) == []


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown init strategy"):
        initial_guess("beam", length=2, context=[1], prompt=[1], pad_token_id=0, rng=random.Random(0))
