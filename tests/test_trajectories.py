"""Trajectory records without Ray: planning, decoding one batch, cleaning, augmentation, the Parquet layout."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cllm.data.trajectories import (
    PROMPT_TOO_LONG,
    REPEATED_NGRAM,
    TOKEN_RUN,
    TRAJECTORY_FIELDS,
    TRAJECTORY_SCHEMA,
    DecodeSettings,
    augment_record,
    augment_states,
    batch_seed,
    clean_blocks,
    decode_batch,
    drop_reason,
    longest_run,
    plan_batches,
    plan_prompts,
    prompt_sampling,
    read_trajectories,
    records_to_table,
    repeats_earlier_ngram,
)
from cllm.decoding.core import left_pad, response_budget
from cllm.decoding.jacobi import ar_generate, jacobi_generate
from cllm.models.loading import encode_prompts

EOS, PAD = 2, 0
PROMPTS = ["The cat sat on", "1 + 2 =", "Question: how many legs does a spider have?\nAnswer:", "Hi"]


def block(response_before, fixed_point, prompt=(7, 7, 7), **extra):
    """A record whose prompt is `prompt` and whose earlier response is `response_before`."""
    return {"prompt_id": 0, "block_idx": 1, "prompt_len": len(prompt), "prefix_ids": list(prompt) + response_before,
            "states": [], "fixed_point": fixed_point, "num_iters": 1, "eos_in_block": False, **extra}


# ----- cleaning -----


def test_longest_run_counts_only_runs_reaching_the_start():
    assert longest_run([1, 1, 1, 2, 3]) == 3
    assert longest_run([1, 1, 1, 2, 3], start=3) == 1
    assert longest_run([1, 2, 2, 2, 2], start=3) == 4  # the run began before `start` and reaches into it
    assert longest_run([]) == 0


def test_token_run_of_ten_is_dropped_nine_is_kept():
    assert drop_reason(block([], [5] * 10 + [1])) == TOKEN_RUN
    assert drop_reason(block([], [5] * 9 + [1])) is None
    assert drop_reason(block([5] * 4, [5] * 6 + [1])) == TOKEN_RUN  # a run crossing the block boundary
    assert drop_reason(block([5] * 10, [1, 2, 3])) is None  # the run belongs to an earlier block
    assert drop_reason(block([], [1, 2, 3], prompt=[7] * 12)) is None  # the prompt is not teacher output
    assert drop_reason(block([], [5] * 12), max_token_run=0) is None  # filter disabled
    assert drop_reason(block([], [5] * 4), max_token_run=4) == TOKEN_RUN


def test_sentence_repetition_is_dropped_when_enabled():
    sentence = [11, 12, 13, 14, 15]
    record = block(sentence + [20], sentence[:4] + [9])
    assert repeats_earlier_ngram(sentence + [20] + sentence[:4], start=6, n=4)
    assert not repeats_earlier_ngram(sentence + [20] + sentence[:4], start=6, n=5)
    assert drop_reason(record, repeat_ngram=4) == REPEATED_NGRAM
    assert drop_reason(record, repeat_ngram=5) is None
    assert drop_reason(record) is None  # off by default: the reference only filters token runs


def test_clean_blocks_counts_what_it_drops():
    records = [block([], [1, 2, 3]), block([], [4] * 10), block([4] * 9, [4, 6]), block([], [8, 9])]
    kept, dropped = clean_blocks(records)
    assert kept == [records[0], records[3]]
    assert dropped == {TOKEN_RUN: 2}


# ----- augmentation -----


def test_augmentation_corrects_only_later_wrong_tokens():
    fixed_point = [1, 2, 3, 4, 5, 6]
    states = [[1, 9, 9, 9, 9, 9], [1, 2, 9, 4, 9, 9], [1, 2, 3, 4, 5, 9]]
    rng = random.Random(0)
    assert augment_states(states, fixed_point, 0.0, rng) == states
    assert augment_states(states, fixed_point, 1.0, rng) == [
        [1, 9, 3, 4, 5, 6], [1, 2, 9, 4, 5, 6], [1, 2, 3, 4, 5, 9]
    ]
    partial = augment_states(states, fixed_point, 0.5, random.Random(1))
    for state, new in zip(states, partial, strict=True):
        first_wrong = next(i for i, t in enumerate(state) if t != fixed_point[i])
        assert new[first_wrong] != fixed_point[first_wrong]  # still wrong where the state first was
        assert all(n in (s, f) for s, n, f in zip(state, new, fixed_point, strict=True))


def test_augment_record_is_seeded_by_the_block_and_leaves_the_input_alone():
    record = block([], [1, 2, 3, 4, 5, 6, 7, 8], states=[[1] + [0] * 7, [1, 2] + [0] * 6])
    original = [list(s) for s in record["states"]]
    first, again = augment_record(record, 0.5, seed=3), augment_record(record, 0.5, seed=3)
    assert first == again
    assert record["states"] == original
    other_block = augment_record({**record, "block_idx": 2}, 0.5, seed=3)
    other_seed = augment_record(record, 0.5, seed=4)
    assert first["states"] != other_block["states"] or first["states"] != other_seed["states"]


# ----- planning -----


def test_plan_prompts_sets_aside_prompts_that_fill_the_context(tokenizer):
    records = [{"prompt": "1 + 1 =", "answer": "2"}, {"prompt": "x" * 40, "answer": None}, {"prompt": "ab"}]
    prompts, dropped = plan_prompts(records, tokenizer, chat=False, context=40, eos_token_id=EOS)
    assert dropped == {PROMPT_TOO_LONG: [1]}
    assert [p["prompt_id"] for p in prompts] == [0, 2]
    assert prompts[0]["input_ids"] == tokenizer("1 + 1 =")["input_ids"]
    assert prompts[0]["labels"] == tokenizer("2", add_special_tokens=False)["input_ids"] + [EOS]
    assert prompts[1]["labels"] is None


def test_plan_prompts_applies_the_chat_template(tokenizer):
    prompts, _ = plan_prompts([{"prompt": "hi"}], tokenizer, chat=True, context=None,
                              eos_token_id=EOS)
    assert tokenizer.decode(prompts[0]["input_ids"]) == "<s>user: hi\nassistant: "


def test_plan_batches_groups_by_length_and_covers_every_prompt_once():
    prompts = [{"prompt_id": i, "input_ids": [1] * n, "labels": None} for i, n in enumerate([5, 2, 9, 2, 7])]
    batches = plan_batches(prompts, 2)
    assert [b["batch_id"] for b in batches] == [0, 1, 2]
    assert [[p["prompt_id"] for p in b["prompts"]] for b in batches] == [[1, 3], [0, 4], [2]]
    assert plan_batches(list(reversed(prompts)), 2) == batches  # fixed by the prompts, not their order


def test_response_budget_stops_at_the_context():
    assert response_budget(64, None, [10, 20]) == 64
    assert response_budget(64, 512, [10, 20]) == 64
    assert response_budget(64, 100, [10, 60]) == 40


# ----- decoding one batch -----


def settings(**overrides) -> DecodeSettings:
    values = dict(block_size=8, max_new_tokens=24, eos_token_ids=(EOS,), pad_token_id=PAD, context=512,
                  max_token_run=0, seed=5)
    return DecodeSettings(**{**values, **overrides})


def test_left_pad_is_the_layout_of_encode_prompts(tokenizer):
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    mine_ids, mine_mask = left_pad([tokenizer(p)["input_ids"] for p in PROMPTS], tokenizer.pad_token_id, "cpu")
    assert torch.equal(ids, mine_ids) and torch.equal(mask, mine_mask)


def test_decode_batch_returns_the_decoders_trajectories_under_dataset_ids(llama_model, tokenizer):
    prompts = [{"prompt_id": 10 + i, "input_ids": tokenizer(p)["input_ids"], "labels": [i, EOS]}
               for i, p in enumerate(PROMPTS)]
    records, stats = decode_batch(llama_model, {"batch_id": 3, "prompts": prompts}, settings())

    input_ids, mask = encode_prompts(tokenizer, PROMPTS)
    out = jacobi_generate(llama_model, input_ids, mask, max_new_tokens=24, block_size=8, eos_token_id=[EOS],
                          pad_token_id=PAD, return_trajectories=True, seed=batch_seed(5, 3))
    expected = sorted(
        ({**t, "prompt_id": 10 + t["prompt_id"], "labels": [t["prompt_id"], EOS], "batch_id": 3}
         for t in out.trajectories),
        key=lambda r: (r["prompt_id"], r["block_idx"]),
    )
    assert records == expected
    assert (stats.prompts, stats.blocks, stats.rows) == (4, len(expected), len(expected))
    assert stats.generated_tokens == sum(out.new_tokens)


def test_decode_batch_cleans_and_augments(llama_model, tokenizer):
    prompts = [{"prompt_id": i, "input_ids": tokenizer(p)["input_ids"], "labels": None} for i, p in enumerate(PROMPTS)]
    batch = {"batch_id": 0, "prompts": prompts}
    plain, _ = decode_batch(llama_model, batch, settings())
    kept, stats = decode_batch(llama_model, batch, settings(repeat_ngram=1))  # any repeated token
    expected, dropped = clean_blocks(plain, max_token_run=0, repeat_ngram=1)
    assert 0 < dropped[REPEATED_NGRAM] < len(plain)
    assert kept == expected and stats.dropped == dropped and stats.rows == len(kept)
    augmented, _ = decode_batch(llama_model, batch, settings(augment_prob=1.0))
    assert [r["fixed_point"] for r in augmented] == [r["fixed_point"] for r in plain]
    assert augmented == [augment_record(r, 1.0, seed=5) for r in plain]


def test_sampled_trajectories_end_at_what_ar_sampling_draws(llama_model, tokenizer):
    """A prompt's fixed points are the sample AR decoding draws with its seed, in any batch it lands in."""
    prompts = [{"prompt_id": 20 + i, "input_ids": tokenizer(p)["input_ids"], "labels": None}
               for i, p in enumerate(PROMPTS)]
    sampled = settings(temperature=0.8, top_p=0.95)
    together, _ = decode_batch(llama_model, {"batch_id": 0, "prompts": prompts}, sampled)
    greedy, _ = decode_batch(llama_model, {"batch_id": 0, "prompts": prompts}, settings())
    for prompt in prompts:
        params = prompt_sampling(sampled, prompt["prompt_id"])
        ids = torch.tensor([prompt["input_ids"]])
        drawn = ar_generate(llama_model, ids, max_new_tokens=24, eos_token_id=[EOS], sampling=params)
        expected = drawn.sequences[0, ids.shape[1] : ids.shape[1] + drawn.new_tokens[0]].tolist()
        alone, _ = decode_batch(llama_model, {"batch_id": 9, "prompts": [prompt]}, sampled)
        for records in (together, alone):
            blocks = sorted((r for r in records if r["prompt_id"] == prompt["prompt_id"]), key=lambda r: r["block_idx"])
            assert sum((r["fixed_point"] for r in blocks), []) == expected
    assert [r["fixed_point"] for r in together] != [r["fixed_point"] for r in greedy]
    assert prompt_sampling(settings(), 20) is None


def test_decode_batch_cuts_the_response_at_the_context(llama_model, tokenizer):
    long_prompt = "a b c d e " * 50  # 500 characters: 12 tokens of room in a 512-token context
    prompts = [{"prompt_id": 0, "input_ids": tokenizer(long_prompt)["input_ids"], "labels": None}]
    records, stats = decode_batch(llama_model, {"batch_id": 0, "prompts": prompts}, settings(max_new_tokens=64))
    assert stats.generated_tokens <= 512 - len(long_prompt)
    assert sum(len(r["fixed_point"]) for r in records) == stats.generated_tokens


# ----- storage -----


def test_records_round_trip_through_parquet(tmp_path, llama_model, tokenizer):
    prompts = [{"prompt_id": i, "input_ids": tokenizer(p)["input_ids"], "labels": [1, EOS] if i else None}
               for i, p in enumerate(PROMPTS)]
    records, _ = decode_batch(llama_model, {"batch_id": 0, "prompts": prompts}, settings())
    records.append({**block([], [EOS], labels=None, batch_id=0), "prompt_id": 99})  # no states, no labels
    table = records_to_table(records)
    assert table.schema == TRAJECTORY_SCHEMA
    assert table.schema.field("states").type == pa.list_(pa.list_(pa.int32()))
    pq.write_table(table, tmp_path / "part-0.parquet")
    (tmp_path / "_manifest.json").write_text("{}")  # readers skip it
    assert read_trajectories(tmp_path) == [{k: r[k] for k in TRAJECTORY_FIELDS} for r in records]


def test_records_to_table_rejects_a_missing_field():
    with pytest.raises(KeyError):
        records_to_table([{"prompt_id": 0}])
