"""Loading through cllm.models.loading: the real from_pretrained path, on a model saved locally."""

from __future__ import annotations

import json

import pytest
import torch

from cllm.decoding.jacobi import jacobi_generate
from cllm.models.loading import ModelLoadError, encode_prompts, format_prompt, load_model, pick_dtype


def test_saved_model_reloads_and_decodes_the_same(tiny_model_dir, llama_model, tokenizer):
    loaded = load_model(str(tiny_model_dir))
    assert loaded.device.type == "cpu" and next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.tokenizer.padding_side == "left" and loaded.tokenizer.pad_token_id == 0
    input_ids, mask = encode_prompts(loaded.tokenizer, ["Hello there", "a much longer prompt here"])
    reloaded = jacobi_generate(loaded.model, input_ids, mask, max_new_tokens=20, block_size=8, eos_token_id=None)
    original = jacobi_generate(llama_model, input_ids, mask, max_new_tokens=20, block_size=8, eos_token_id=None)
    assert torch.equal(reloaded.sequences, original.sequences)
    assert loaded.context_length == 512


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_directory_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load a model config"):
        load_model(str(tmp_path))


def test_non_causal_model_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_model(str(tmp_path))


def test_chat_template_and_plain_prompts(tokenizer):
    text = format_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    assert text == "<s>user: hi\nassistant: "
    assert format_prompt(tokenizer, "plain") == "plain"
    assert format_prompt(tokenizer, "hi", chat=True) == text


def test_dtype_choice():
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype(torch.device("cpu"), "int3")


def test_empty_prompt_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="empty prompt"):
        encode_prompts(tokenizer, ["ok", ""])


def test_a_relative_local_model_path_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    from cllm.models.loading import absolute_if_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()
    assert absolute_if_local("teacher") == str(tmp_path / "teacher")
    assert absolute_if_local("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub name stays a name
