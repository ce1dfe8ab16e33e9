"""Incremental detokenization and stop sequences (cllm.serving.output): pure, no model, no Ray."""

from __future__ import annotations

import random

import pytest
from conftest import byte_level_tokenizer

from cllm.models.tokenizer import build_tokenizer, wrap_tokenizer
from cllm.serving.output import REPLACEMENT, IncrementalDetokenizer, StopMatcher, TextStream

TEXT = "héllo wörld: 中文 and 🎉 ok"


@pytest.fixture(scope="module")
def byte_tok():
    return byte_level_tokenizer()


def stream_text(tokenizer, ids: list[int], chunks: list[int]) -> list[str]:
    """Deltas of an IncrementalDetokenizer fed `ids` in pieces of the given sizes, then finished."""
    detok, deltas, i = IncrementalDetokenizer(tokenizer), [], 0
    for size in chunks:
        deltas.append(detok.push(ids[i : i + size]))
        i += size
    deltas.append(detok.push(ids[i:]))
    deltas.append(detok.finish())
    return deltas


def test_multibyte_characters_are_never_split(byte_tok):
    ids = byte_tok(TEXT)["input_ids"]
    assert len(ids) > len(TEXT)  # multi-byte characters really span several tokens
    deltas = stream_text(byte_tok, ids, [1] * len(ids))
    assert "".join(deltas) == TEXT
    assert not any(REPLACEMENT in d for d in deltas)
    assert {"中", "文", "🎉", "é"} <= set(deltas)  # each arrives whole, once its last byte is committed


@pytest.mark.parametrize("seed", range(5))
def test_deltas_add_up_to_a_full_decode_of_arbitrary_tokens(byte_tok, seed):
    """Random bytes (invalid UTF-8 too) and special tokens in random commit sizes, like a model's output."""
    rng = random.Random(seed)
    ids = [rng.randrange(len(byte_tok)) for _ in range(200)] + byte_tok("中文🎉")["input_ids"] + [2]
    chunks = [rng.randint(1, 5) for _ in range(60)]
    deltas = stream_text(byte_tok, ids, chunks)
    assert "".join(deltas) == byte_tok.decode(ids, skip_special_tokens=True)


def test_word_level_tokenizer_with_space_markers():
    """The built-in teacher's kind of tokenizer: '▁' space markers and merged word tokens."""
    texts = ["Tom has 12 apples and buys 7 more. #### 19", "the answer is 42", "A + B = C"] * 20
    tokenizer = wrap_tokenizer(build_tokenizer(texts, vocab_size=120), model_max_length=256)
    text = "Tom buys 7 apples; the answer is 19 #### 19"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for chunks in ([1] * len(ids), [2, 3, 1, 4] * 10):
        assert "".join(stream_text(tokenizer, ids, chunks)) == tokenizer.decode(ids) == text


def test_unfinished_character_at_the_end_is_flushed_like_a_full_decode(byte_tok):
    ids = byte_tok("ab中")["input_ids"][:-1]  # cut inside the last character
    detok = IncrementalDetokenizer(byte_tok)
    assert detok.push(ids[:2]) == "ab"
    assert detok.push(ids[2:]) == ""  # held: the character is not complete
    assert detok.finish() == byte_tok.decode(ids)[2:] == REPLACEMENT


def test_stop_sequence_split_across_deltas_is_cut_and_never_sent():
    matcher = StopMatcher(["STOP"])
    sent = [matcher.push(d) for d in ["hello S", "T", "O", "P and more"]]
    assert "".join(sent) + matcher.finish() == "hello "
    assert matcher.stopped
    assert not any("S" in s for s in sent)
    assert matcher.push("later") == ""


def test_text_that_only_looks_like_a_stop_prefix_is_released():
    matcher = StopMatcher(["STOP"])
    sent = [matcher.push(d) for d in ["a ST", "AR", "T b", " ST"]]
    assert "".join(sent) + matcher.finish() == "a START b ST"
    assert not matcher.stopped


def test_earliest_of_several_stop_sequences_wins():
    matcher = StopMatcher(["\n\n", "x"])
    assert matcher.push("ab\n\ncx") == "ab"
    assert matcher.stopped


def test_no_stop_sequences_passes_text_straight_through():
    matcher = StopMatcher()
    assert matcher.push("abc") == "abc"
    assert matcher.finish() == ""


def test_empty_stop_sequence_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["a", ""])


def test_text_stream_stops_on_a_multibyte_stop_sequence(byte_tok):
    ids = byte_tok("one 中文 two")["input_ids"]
    stream = TextStream(byte_tok, stop=["文"])
    sent = []
    for token in ids:
        sent.append(stream.push([token]))
        if stream.stopped:
            break
    sent.append(stream.finish())
    assert "".join(sent) == stream.text == "one 中"
    assert stream.stopped
