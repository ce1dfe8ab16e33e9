"""The real-size dry run's model building (scripts/realsize_dry_run.py), at a tiny width: the config
round-trips as Qwen2.5-0.5B's shapes, the tokenizer has Qwen's id layout, and every stage's entry point
takes the directory. The full-size run is the script itself, not a test."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from cllm.data.collect import CollectConfig, plan_collection
from cllm.data.trajectories import decode_batch
from cllm.decoding.core import DecodeFields, special_tokens
from cllm.evaluate import evaluate_model
from cllm.models.loading import load_model
from cllm.serving.config import checked_config
from cllm.tasks import load_task
from cllm.train.batches import collate_consistency
from cllm.train.config import TrainConfig
from cllm.train.lora import prepare_model
from cllm.train.losses import cllm_loss

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "realsize_dry_run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("realsize_dry_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


dry_run = load_script()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen-tiny")
    dry_run.build_model_dir(directory, size="tiny")
    return directory


def test_the_real_config_has_qwen_0_5b_shapes_and_parameter_count():
    config = dry_run.qwen_config("real")
    with torch.device("meta"):  # shapes only: no 2 GB allocation
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2.5-0.5B's published count
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_config_round_trips_through_the_directory(model_dir):
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "qwen2"
    assert (config.vocab_size, config.tie_word_embeddings, config.max_position_embeddings) == (151936, True, 32768)
    assert config.rope_parameters["rope_theta"] == 1e6
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)


def test_tokenizer_has_qwen_id_layout_and_round_trips_text(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == 151646
    assert tokenizer.convert_tokens_to_ids(dry_run.SPECIALS) == [151643, 151644, 151645]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    text = "Question: Mia has 12 apples and finds 7 more. How many? é中"
    ids = tokenizer(text)["input_ids"]
    assert max(ids) < dry_run.TRAINED_VOCAB  # text never encodes to a filler
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([dry_run.TRAINED_VOCAB + 5]).startswith("<x")  # a filler decodes to printable text


def test_every_stage_entry_point_takes_the_directory(model_dir, tmp_path):
    config = CollectConfig(model=str(model_dir), output=str(tmp_path / "t"), limit=2, batch_size=2, block_size=8,
                           max_new_tokens=12, max_token_run=0)
    plan = plan_collection(config)
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    assert loaded.model.get_input_embeddings().num_embeddings == 151936  # not resized to the tokenizer
    records, stats = decode_batch(loaded.model, plan.batches[0], plan.settings)
    assert records and stats.generated_tokens > 0

    special = special_tokens(loaded.tokenizer, loaded.model.generation_config)
    assert special.eos_ids == (151645, 151643)
    batch = collate_consistency(records, rng=random.Random(0), pad_token_id=special.pad_id,
                                eos_token_ids=special.eos_ids)
    train_config = TrainConfig(model=str(model_dir), data="unused", output_dir=str(tmp_path / "m"), lora_rank=8,
                               gradient_checkpointing=True)
    model = prepare_model(loaded.model.train(), train_config)
    loss = cllm_loss(model, batch, ar_weight=train_config.ar_weight).total
    loss.backward()
    assert torch.isfinite(loss)

    fresh = load_model(str(model_dir), device="cpu", dtype="float32")
    task = load_task("builtin:arith", "test", 2, 0)
    results = evaluate_model(fresh, task.prompts, methods=("jacobi",), decode=DecodeFields(block_size=8,
                                                                                           max_new_tokens=12))
    assert all(r.exact == r.prompts == 2 for r in results)
    assert checked_config({"model": str(model_dir)}).model == str(model_dir.resolve())


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT.parent / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_refuses_clearly_without_a_gpu(tmp_path, capsys):
    gpu_check = load_gpu_check()
    assert gpu_check.main(["--output-dir", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before building anything
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--checks", "decode-bf16,nope"])
