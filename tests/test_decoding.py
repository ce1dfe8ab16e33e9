"""The decoding settings and token bookkeeping every stage shares."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from cllm.decoding.core import DecodeFields, left_pad, response_budget, room_for, special_tokens
from cllm.models.loading import encode_prompts


def test_special_tokens_put_the_tokenizer_eos_first_then_the_generation_configs(tokenizer):
    assert special_tokens(tokenizer).eos_ids == (tokenizer.eos_token_id,)
    generation = GenerationConfig(eos_token_id=[7, tokenizer.eos_token_id, 9], pad_token_id=5)
    special = special_tokens(tokenizer, generation)
    assert special.eos_ids == (tokenizer.eos_token_id, 7, 9) and special.eos_id == tokenizer.eos_token_id
    assert special.pad_id == tokenizer.pad_token_id  # the tokenizer's pad wins: it padded the prompts


def test_special_tokens_without_a_pad_fall_back_to_the_generation_config_then_eos(tokenizer):
    class Bare:
        eos_token_id, pad_token_id = 4, None

    assert special_tokens(Bare(), GenerationConfig(pad_token_id=3)).pad_id == 3
    assert special_tokens(Bare()).pad_id == 4


def test_context_arithmetic():
    assert room_for(None, 50) is None and room_for(100, 60) == 40 and room_for(100, 100) == 0
    assert response_budget(64, 100, [10, 60]) == 40 and response_budget(64, None, [10]) == 64
    assert response_budget(64, 100, [100]) == 1  # never below one token; admission refuses the prompt


def test_left_pad_matches_the_tokenizer_layout(tokenizer):
    texts = ["abc", "a"]
    ids, mask = left_pad([tokenizer(t)["input_ids"] for t in texts], tokenizer.pad_token_id)
    expected_ids, expected_mask = encode_prompts(tokenizer, texts)
    assert torch.equal(ids, expected_ids) and torch.equal(mask, expected_mask)
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], 0)


def test_decode_fields_refuse_bad_values():
    with pytest.raises(ValueError, match="block_size"):
        DecodeFields(block_size=0)
    assert DecodeFields().block_size == 16 and DecodeFields().max_iters is None


def test_left_pad():
    ids, mask = left_pad([[7, 8, 9], [4]], pad_token_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
