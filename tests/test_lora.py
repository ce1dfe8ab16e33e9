"""LoRA consistency training through PEFT, and gradient checkpointing: the step functions on a tiny Llama
in-process, then one LoRA run through Ray Train that checkpoints and resumes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import char_tokenizer, checkpoints, config_for, save_model_dir, tiny_model, write_trajectories
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from cllm.decoding.jacobi import jacobi_generate
from cllm.models.loading import encode_prompts, load_model
from cllm.train.config import TrainConfig
from cllm.train.driver import run_training
from cllm.train.engines import trainable
from cllm.train.loop import compute_loss, make_batch
from cllm.train.lora import ADAPTER_DIR, MODEL_DIR, base_model, prepare_model, save_model_files

PROMPTS = ["12+7=", "abc", "hello world"]


def lora_config(tmp_path: Path, model_dir: Path | str = "tiny", **overrides) -> TrainConfig:
    values = dict(model=str(model_dir), data="unused", output_dir=str(tmp_path / "out"), lr=1e-2, lora_rank=4)
    return TrainConfig(**(values | overrides))


def fixed_batch(tmp_path: Path, config: TrainConfig) -> dict:
    records = pq.read_table(write_trajectories(tmp_path / "traj.parquet")).to_pylist()[:8]
    tokens = {"pad": 0, "eos": [2], "max_len": 512}
    return make_batch(records, config, tokens, random.Random(0), "cpu")


def train_steps(model, batch: dict, config: TrainConfig, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(trainable(model), lr=config.lr)
    losses = []
    for _ in range(steps):
        loss = compute_loss(model, batch, config).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def base_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}


def test_only_the_adapter_trains_and_the_loss_goes_down(tmp_path):
    config = lora_config(tmp_path)
    model = prepare_model(tiny_model("llama").train(), config)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_A" in name or "lora_B" in name for name in names)
    assert any("mlp" in name for name in names) and not any("lm_head" in name for name in names)  # all-linear
    before = base_weights(model)
    adapter = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    losses = train_steps(model, fixed_batch(tmp_path, config), config, steps=8)
    assert losses[-1] < 0.7 * losses[0], losses
    after = base_weights(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not torch.equal(adapter[k], p) for k, p in model.named_parameters() if k in adapter)


def test_named_target_modules_limit_the_adapter(tmp_path):
    model = prepare_model(tiny_model("llama"), lora_config(tmp_path, lora_target_modules=["q_proj", "v_proj"]))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert all(".q_proj." in name or ".v_proj." in name for name in names)


def greedy_outputs(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """HF greedy and Jacobi decoding of the same prompts (both exact in fp32)."""
    input_ids, mask = encode_prompts(tokenizer, PROMPTS)
    with torch.no_grad():
        hf = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            pad_token_id=0)
    jacobi = jacobi_generate(model, input_ids, mask, max_new_tokens=12, block_size=4,
                             eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)
    return hf, jacobi.sequences


def trained_lora_model(tmp_path: Path, model_dir: Path, **overrides):
    config = lora_config(tmp_path, model_dir, **overrides)
    model = prepare_model(load_model(str(model_dir), dtype="float32").model.train(), config)
    train_steps(model, fixed_batch(tmp_path, config), config, steps=4)
    return model.eval(), config


def test_merged_export_decodes_like_base_plus_adapter(tiny_model_dir, tmp_path):
    model, config = trained_lora_model(tmp_path, tiny_model_dir)
    tokenizer = char_tokenizer()
    expected_hf, expected_jacobi = greedy_outputs(model.get_base_model(), tokenizer)  # unmerged: base + adapter
    base_hf, _ = greedy_outputs(load_model(str(tiny_model_dir)).model, tokenizer)
    assert not torch.equal(base_hf, expected_hf)  # the adapter changed what the model says

    save_model_files(model, tmp_path / "ckpt", tokenizer, config, export=True)
    exported = tmp_path / "ckpt" / MODEL_DIR
    assert (exported / "model.safetensors").is_file() and not (exported / "adapter_config.json").exists()
    merged = load_model(str(exported), dtype="float32").model  # a plain HF directory: no PEFT needed
    assert not any("lora" in name for name, _ in merged.named_parameters())
    merged_hf, merged_jacobi = greedy_outputs(merged, tokenizer)
    assert torch.equal(merged_hf, expected_hf) and torch.equal(merged_jacobi, expected_jacobi)
    assert torch.equal(expected_jacobi, expected_hf)
    assert (tmp_path / "ckpt" / ADAPTER_DIR / "adapter_model.safetensors").is_file()


def test_unmerged_export_is_the_adapter_and_its_base(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = Path("base-copy")
    save_model_dir(relative, AutoModelForCausalLM.from_pretrained(tiny_model_dir), char_tokenizer())
    model, config = trained_lora_model(tmp_path, relative, merge_lora=False)
    tokenizer = char_tokenizer()
    expected_hf, _ = greedy_outputs(model.get_base_model(), tokenizer)
    save_model_files(model, tmp_path / "ckpt", tokenizer, config, export=True)
    exported = tmp_path / "ckpt" / MODEL_DIR
    adapter_config = json.loads((exported / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / relative).resolve())  # absolute
    assert not (exported / "model.safetensors").exists()
    # transformers' PEFT integration loads the base the adapter names and puts the adapter on it
    reloaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert torch.equal(greedy_outputs(reloaded, tokenizer)[0], expected_hf)


@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_qlora_trains_an_adapter_on_a_quantized_base_and_merges_into_plain_weights(tiny_model_dir, tmp_path,
                                                                                    quantize):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit, Linear8bitLt
    from peft import PeftModel

    config = lora_config(tmp_path, tiny_model_dir, quantize=quantize)
    loaded = load_model(str(tiny_model_dir), dtype="float32", quantize=quantize)
    quantized = Linear4bit if quantize == "4bit" else Linear8bitLt
    assert any(isinstance(module, quantized) for module in loaded.model.modules())
    model = prepare_model(loaded.model.train(), config)
    trainable_names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable_names and all("lora_A" in name or "lora_B" in name for name in trainable_names)
    losses = train_steps(model, fixed_batch(tmp_path, config), config, steps=8)
    assert losses[-1] < 0.7 * losses[0], losses

    tokenizer = char_tokenizer()
    save_model_files(model.eval(), tmp_path / "ckpt", tokenizer, config, export=True)
    exported = tmp_path / "ckpt" / MODEL_DIR
    assert stored_dtypes(exported / "model.safetensors") == {"F32"}  # plain weights, no quantization state
    merged = load_model(str(exported), dtype="float32").model
    assert not any(isinstance(module, quantized) for module in merged.modules())
    # the export is the adapter on the unquantized base, and decodes exactly like it
    base = load_model(str(tiny_model_dir), dtype="float32").model
    with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "ckpt" / ADAPTER_DIR))
    expected_hf, _ = greedy_outputs(with_adapter.get_base_model(), tokenizer)  # unmerged: base + adapter
    merged_hf, merged_jacobi = greedy_outputs(merged, tokenizer)
    assert torch.equal(merged_hf, expected_hf) and torch.equal(merged_jacobi, merged_hf)
    assert not torch.equal(merged_hf, greedy_outputs(load_model(str(tiny_model_dir)).model, tokenizer)[0])


def test_quantize_needs_lora_under_ddp(tmp_path):
    with pytest.raises(ValueError, match="lora_rank > 0"):
        lora_config(tmp_path, quantize="4bit", lora_rank=0)
    with pytest.raises(ValueError, match="strategy ddp"):
        lora_config(tmp_path, quantize="4bit", strategy="deepspeed")


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, lora_rank):
    config = lora_config(tmp_path, lora_rank=lora_rank)
    batch = fixed_batch(tmp_path, config)

    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(1)  # the same LoRA init either way
        options = config.model_copy(update={"gradient_checkpointing": checkpointing})
        model = prepare_model(tiny_model("llama").train(), options)
        assert base_model(model).model.layers[0].gradient_checkpointing == checkpointing
        loss = compute_loss(model, batch, config).total
        loss.backward()
        return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain_grads = loss_and_grads(False)
    checkpointed_loss, checkpointed_grads = loss_and_grads(True)
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain_grads.keys() == checkpointed_grads.keys()
    for name, grad in plain_grads.items():
        assert checkpointed_grads[name] is not None, name
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.extended
def test_lora_run_checkpoints_and_resumes(local_ray, tiny_model_dir, tmp_path):
    data = write_trajectories(tmp_path / "traj.parquet")
    config = config_for(tmp_path, tiny_model_dir, data, max_steps=2, lora_rank=4, lr=1e-2, gradient_checkpointing=True)
    first = run_training(config)
    assert first.metrics["step"] == 2 and first.metrics["start_step"] == 0
    middle, last = checkpoints(config)
    assert {p.name for p in middle.iterdir()} >= {ADAPTER_DIR, "trainer_state.pt"}
    assert not (middle / MODEL_DIR).exists()  # only the adapter until the end
    assert (last / MODEL_DIR / "model.safetensors").is_file()
    state = torch.load(last / "trainer_state.pt", weights_only=False)
    adapter_params = 2 * 7 * 2  # 2 layers x 7 linear layers x (A, B)
    assert len(state["optimizer"]["state"]) == adapter_params  # optimizer state for the adapter only
    merged = load_model(str(first.model_dir)).model
    assert not any("lora" in name for name, _ in merged.named_parameters())

    resumed_config = config.model_copy(update={"max_steps": 3, "merge_lora": False, "output_dir": str(tmp_path / "b")})
    resumed = run_training(resumed_config)
    assert resumed.metrics["start_step"] == 2 and resumed.metrics["step"] == 3
    adapter_config = json.loads((resumed.model_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())


def stored_dtypes(path: Path) -> set[str]:
    """The dtypes a safetensors file stores ("F32", "BF16", ...), read without loading the tensors."""
    with safe_open(str(path), "pt") as stored:
        return {stored.get_slice(name).get_dtype() for name in stored.keys()}  # noqa: SIM118 (not iterable)


@pytest.mark.parametrize("options, expected", [
    (dict(bf16=False, lora_rank=4), "float32"),
    (dict(bf16=True, lora_rank=4), "bfloat16"),
    (dict(bf16=True, strategy="deepspeed", lora_rank=0), "bfloat16"),
    (dict(bf16=True, lora_rank=0), "float32"),  # DDP full finetuning steps the weights themselves: fp32 under autocast
])
def test_weights_load_in_bf16_only_where_nothing_steps_them_in_fp32(tmp_path, options, expected):
    assert lora_config(tmp_path, **options).weights_dtype == expected


@pytest.mark.slow
def test_lora_with_bf16_keeps_the_base_in_bf16_and_the_adapter_in_fp32(local_ray, tiny_model_dir, tmp_path):
    data = write_trajectories(tmp_path / "traj.parquet")
    config = config_for(tmp_path, tiny_model_dir, data, bf16=True, max_steps=2, lora_rank=4, lr=1e-2)
    result = run_training(config)
    assert result.metrics["step"] == 2 and result.metrics["ar_loss"] > 0
    last = checkpoints(config)[-1]
    assert stored_dtypes(last / ADAPTER_DIR / "adapter_model.safetensors") == {"F32"}
    assert stored_dtypes(result.model_dir / "model.safetensors") == {"BF16"}  # the base's dtype, merged
    merged = load_model(str(result.model_dir), dtype="bfloat16").model
    assert not any("lora" in name for name, _ in merged.named_parameters())


@pytest.mark.slow
def test_qlora_run_through_ray_train_checkpoints_resumes_and_exports(local_ray, tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    data = write_trajectories(tmp_path / "traj.parquet")
    config = config_for(tmp_path, tiny_model_dir, data, max_steps=2, lora_rank=4, lr=1e-2, quantize="4bit")
    first = run_training(config)
    assert first.metrics["step"] == 2 and first.metrics["ar_loss"] > 0
    assert stored_dtypes(checkpoints(config)[-1] / ADAPTER_DIR / "adapter_model.safetensors") == {"F32"}
    merged = load_model(str(first.model_dir), dtype="float32").model
    assert not any("lora" in name for name, _ in merged.named_parameters())
    resumed = run_training(config.model_copy(update={"max_steps": 3}))  # the adapter goes back on the base
    assert resumed.metrics["start_step"] == 2 and resumed.metrics["step"] == 3


@pytest.mark.slow
@pytest.mark.extended
def test_lora_under_deepspeed_zero3_exports_the_merged_model(local_ray, tiny_model_dir, tmp_path):
    data = write_trajectories(tmp_path / "traj.parquet")
    config = config_for(
        tmp_path, tiny_model_dir, data, strategy="deepspeed", zero_stage=3, bf16=True, max_steps=1, lora_rank=4
    )
    first = run_training(config)
    assert first.metrics["step"] == 1
    merged = load_model(str(first.model_dir)).model
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert merged.config.num_hidden_layers == 2
    assert stored_dtypes(first.model_dir / "model.safetensors") == {"BF16"}  # as trained, not upcast
    resumed = run_training(config.model_copy(update={"max_steps": 2}))  # the adapter comes back from the shards
    assert resumed.metrics["start_step"] == 1 and resumed.metrics["step"] == 2
