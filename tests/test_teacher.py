"""The built-in teacher's parts (tokenizer, recipe, model init, AR records) and, in one slow test, a
toy teacher trained end to end through the project's trainer and loaded like any hub model."""

from __future__ import annotations

import json
import shutil
import threading

import pyarrow.parquet as pq
import pytest
import torch
from filelock import FileLock
from transformers import AutoTokenizer

from cllm.config import load_config
from cllm.models.teacher import (
    METADATA_FILE,
    SHIPPED_DIR,
    TeacherConfig,
    default_cache_dir,
    ensure_builtin_teacher,
    init_model,
    shipped_teacher,
    weights_digest,
    write_ar_records,
)
from cllm.models.tokenizer import train_tokenizer
from cllm.tasks import arith


@pytest.fixture(scope="module")
def problems():
    return arith.generate(300, "train", seed=0)


@pytest.fixture(scope="module")
def task_tokenizer(problems, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer((p.prompt + p.answer for p in problems), directory, vocab_size=400)
    return AutoTokenizer.from_pretrained(directory)  # what every stage will load


def test_tokenizer_round_trips_task_text_with_single_digit_tokens(task_tokenizer, problems):
    tok = task_tokenizer
    for problem in problems[:50]:
        prompt_ids = tok(problem.prompt)["input_ids"]
        answer_ids = tok(problem.answer, add_special_tokens=False)["input_ids"]
        assert prompt_ids[0] == tok.bos_token_id
        assert tok.decode(prompt_ids + answer_ids, skip_special_tokens=True) == problem.prompt + problem.answer
        # prompt and answer encode the same apart as together (training and decoding agree)
        assert prompt_ids + answer_ids == tok(problem.prompt + problem.answer)["input_ids"]
    pieces = tok.convert_ids_to_tokens(tok(" Mia has 123 apples.", add_special_tokens=False)["input_ids"])
    assert pieces == ["\u2581Mia", "\u2581has", "\u2581", "1", "2", "3", "\u2581apples", "."]
    assert len(tok.convert_ids_to_tokens(tok("\n#### 42", add_special_tokens=False)["input_ids"])) == 5


def test_tokenizer_special_tokens_and_text_outside_the_task(task_tokenizer):
    tok = task_tokenizer
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    assert tok.padding_side == "left"
    text = "Zebra quiz: (x^2 + y) / 7 = ?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.unk_token_id in tok("caf\u00e9", add_special_tokens=False)["input_ids"]
    batch = tok(["Mia has 3", "Noah has 12 apples"], padding=True)
    assert batch["input_ids"][0][0] == tok.pad_token_id and batch["attention_mask"][0][0] == 0


def test_recipe_cache_key_and_config_loading(tmp_path, monkeypatch):
    base = TeacherConfig()
    assert base.cache_key() == TeacherConfig().cache_key()
    assert TeacherConfig(lr=1e-3).cache_key() != base.cache_key()
    assert TeacherConfig(eval_problems=10).cache_key() == base.cache_key()  # eval does not change weights
    assert not base.ordered_feed and TeacherConfig(ordered_feed=True).cache_key() != base.cache_key()
    config = load_config(TeacherConfig, ["--hidden-size", "64", "--max-steps", "5"])
    assert (config.hidden_size, config.max_steps) == (64, 5)
    with pytest.raises(ValueError):
        TeacherConfig(no_such_key=1)
    monkeypatch.setenv("CLLM_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("CLLM_HOME")
    assert default_cache_dir().parts[-2:] == (".cache", "cllm")


def test_init_model_is_seeded_and_stops_at_eos(task_tokenizer):
    config = TeacherConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    first, second = init_model(config, task_tokenizer), init_model(config, task_tokenizer)
    assert first.config.model_type == "llama"
    assert first.config.vocab_size == len(task_tokenizer)
    assert first.generation_config.eos_token_id == task_tokenizer.eos_token_id
    assert first.generation_config.pad_token_id == task_tokenizer.pad_token_id
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_ar_records(task_tokenizer, problems, tmp_path):
    path = write_ar_records(problems[:20], task_tokenizer, tmp_path / "ar.parquet")
    rows = pq.read_table(path).to_pylist()
    assert len(rows) == 20 and set(rows[0]) == {"prompt_ids", "target_ids"}
    for row, problem in zip(rows, problems, strict=False):
        assert row["prompt_ids"][0] == task_tokenizer.bos_token_id
        assert row["target_ids"][-1] == task_tokenizer.eos_token_id
        assert task_tokenizer.decode(row["target_ids"], skip_special_tokens=True) == problem.answer


TOY = dict(
    n_problems=64, tokenizer_problems=64, vocab_size=300, hidden_size=32, intermediate_size=64,
    num_layers=1, num_heads=2, batch_size=4, num_workers=2, max_steps=3, eval_problems=4, eval_batch_size=4,
)


@pytest.mark.slow
def test_toy_teacher_is_trained_once_cached_and_loads_like_a_hub_model(tmp_path):
    from cllm.decoding.jacobi import ar_generate
    from cllm.models.loading import encode_prompts, format_prompt, load_model

    config = TeacherConfig(**TOY)
    path = ensure_builtin_teacher(tmp_path, config)
    assert path == tmp_path / config.cache_key()
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", METADATA_FILE} <= names
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".training-")] == []
    metadata = json.loads((path / METADATA_FILE).read_text())
    assert metadata["recipe"]["max_steps"] == 3 and 0.0 <= metadata["heldout_accuracy"] <= 1.0
    assert metadata["heldout_problems"] == 4
    assert metadata["cache_key"] == config.cache_key() == path.name
    assert metadata["weights_sha256"] == weights_digest(path)

    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_builtin_teacher(tmp_path, config) == path  # cached: no second training
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    loaded = load_model(str(path))
    chat = format_prompt(loaded.tokenizer, [{"role": "user", "content": "Mia has 3 apples."}], chat=True)
    assert chat == arith.format_prompt("Mia has 3 apples.")  # chat clients get the task's prompt format
    assert loaded.model.config.model_type == "llama"
    prompts = [p.prompt for p in arith.generate(2, "test")]
    input_ids, attention_mask = encode_prompts(loaded.tokenizer, prompts)
    special = dict(eos_token_id=loaded.tokenizer.eos_token_id, pad_token_id=loaded.tokenizer.pad_token_id)
    out = ar_generate(loaded.model, input_ids, attention_mask, max_new_tokens=8, **special)
    expected = loaded.model.generate(input_ids, attention_mask=attention_mask, do_sample=False,
                                     max_new_tokens=8, **special)
    assert out.sequences.shape[1] > input_ids.shape[1]
    assert torch.equal(out.sequences, expected)

    # A second process asking while the first trains waits on the lock, then uses the finished model.
    other = TeacherConfig(**TOY, seed=1)
    target = tmp_path / other.cache_key()
    results = []
    with FileLock(str(target) + ".lock"):
        waiter = threading.Thread(target=lambda: results.append(ensure_builtin_teacher(tmp_path, other)))
        waiter.start()
        waiter.join(timeout=2)
        assert waiter.is_alive()  # blocked: someone else holds the lock
        shutil.copytree(path, target)  # "the other process" finishes its model
    waiter.join(timeout=30)
    assert results == [target]
    assert (target / "model.safetensors").stat().st_mtime_ns == (path / "model.safetensors").stat().st_mtime_ns


def test_a_teacher_cached_without_a_chat_template_gets_one(tmp_path, tiny_model_dir):
    import shutil

    from transformers import AutoTokenizer

    from cllm.models.teacher import add_chat_template

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "teacher")
    (model_dir / "chat_template.jinja").unlink()  # where transformers 5 keeps a tokenizer's template
    assert AutoTokenizer.from_pretrained(model_dir).chat_template is None
    weights = (model_dir / "model.safetensors").read_bytes()
    add_chat_template(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).chat_template == arith.CHAT_TEMPLATE
    assert (model_dir / "model.safetensors").read_bytes() == weights


def fake_teacher(source, directory, config: TeacherConfig):
    """A model directory labelled as `config`'s teacher, as `train_teacher` would label it."""
    directory = shutil.copytree(source, directory)
    metadata = {"recipe": config.model_dump(), "cache_key": config.cache_key(),
                "weights_sha256": weights_digest(directory)}
    (directory / METADATA_FILE).write_text(json.dumps(metadata))
    return directory


def test_a_packaged_teacher_is_used_only_for_its_own_recipe_and_intact_weights(tmp_path, tiny_model_dir):
    config = TeacherConfig(**TOY)
    packaged = fake_teacher(tiny_model_dir, tmp_path / "packaged", config)
    assert shipped_teacher(config, packaged) == packaged
    assert shipped_teacher(TeacherConfig(**TOY, seed=1), packaged) is None  # another recipe trains its own
    weights = packaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # damaged in transit
    assert shipped_teacher(config, packaged) is None


def test_the_package_ships_the_default_recipe_teacher_and_a_first_run_uses_it(tmp_path):
    assert shipped_teacher(TeacherConfig()) == SHIPPED_DIR
    metadata = json.loads((SHIPPED_DIR / METADATA_FILE).read_text())
    assert metadata["recipe"] == TeacherConfig().model_dump()
    assert metadata["heldout_accuracy"] >= 0.8 and metadata["heldout_problems"] >= 200
    assert ensure_builtin_teacher(tmp_path) == SHIPPED_DIR
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing cached
