"""Records -> padded batches: examples, masks, padding, truncation, bad records."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from cllm.train.batches import (
    block_chains,
    check_columns,
    collate_ar,
    collate_consistency,
    collate_progressive,
    consistency_example,
    noise_target,
    record_length,
    scheduled_state,
)
from cllm.train.losses import (
    ANSWER_SEGMENT,
    IGNORE_INDEX,
    PAD_SEGMENT,
    PROMPT_SEGMENT,
    clean_segment,
    noisy_segment,
)

PAD, EOS = 0, 2


def trajectory(prefix, prompt_len, states, fixed_point, labels=None, block_idx=0):
    return {
        "prompt_id": 7,
        "block_idx": block_idx,
        "prompt_len": prompt_len,
        "prefix_ids": prefix,
        "states": states,
        "fixed_point": fixed_point,
        "num_iters": len(states) + 1,
        "eos_in_block": EOS in fixed_point,
        "labels": labels,
    }


# A second block of a response: prompt [1, 5, 6], first block [10, 11], this block [12, 13, 14].
SECOND_BLOCK = trajectory([1, 5, 6, 10, 11], 3, [[30, 31, 32], [12, 31, 32]], [12, 13, 14])
# A final block cut at EOS (2 tokens) whose states still hold the full window of 3.
LAST_BLOCK = trajectory([1, 8], 2, [[40, 41, 42]], [20, EOS], labels=[20, 21])
NO_STATES = trajectory([1, 9], 2, [], [25, 26])


def test_check_columns_names_what_is_missing():
    check_columns(["prompt_ids", "target_ids"], "ar")
    check_columns(["prompt_len", "prefix_ids", "states", "fixed_point", "labels"], "consistency")
    with pytest.raises(ValueError, match=r"missing \['target_ids'\]"):
        check_columns(["prompt_ids"], "ar")
    with pytest.raises(ValueError, match="states"):
        check_columns(["prompt_ids", "target_ids"], "consistency")


def test_consistency_example_draws_states_uniformly():
    record = trajectory([1], 1, [[5, 5], [6, 5], [6, 7]], [6, 8])
    rng = random.Random(0)
    picks = Counter(tuple(consistency_example(record, rng)[0][1:]) for _ in range(3000))
    assert set(picks) == {(5, 5), (6, 5), (6, 7)}
    assert all(800 < n < 1200 for n in picks.values())
    # Local consistency pairs a state with the next one, the last state with the fixed point.
    rng = random.Random(1)
    pairs = {tuple(map(tuple, consistency_example(record, rng, "local"))) for _ in range(200)}
    assert pairs == {((1, 5, 5), (1, 6, 5)), ((1, 6, 5), (1, 6, 7)), ((1, 6, 7), (1, 6, 8))}


def test_collate_consistency_pads_right_and_masks_from_the_first_wrong_token():
    batch = collate_consistency([SECOND_BLOCK, LAST_BLOCK], rng=random.Random(0), pad_token_id=PAD, eos_token_ids=[EOS])
    ids, target, attn, mask = (
        batch["input_ids"],
        batch["target_ids"],
        batch["attention_mask"],
        batch["loss_mask"],
    )
    assert ids.shape == target.shape == attn.shape == mask.shape == (2, 8)
    assert attn.tolist() == [[1] * 8, [1] * 4 + [0] * 4]
    assert target.tolist() == [[1, 5, 6, 10, 11, 12, 13, 14], [1, 8, 20, EOS, 0, 0, 0, 0]]
    # Row 1: the state is cut to the fixed point's length (2 tokens) and padded.
    assert ids[1].tolist() == [1, 8, 40, 41, 0, 0, 0, 0]
    assert mask[1].nonzero().flatten().tolist() == [1, 2]  # predictions of block tokens 0 and 1 (EOS)
    # Row 0: whichever state was drawn, the kept logits start one before its first wrong token.
    first_wrong = next(i for i in range(5, 8) if ids[0, i] != target[0, i])
    assert mask[0].nonzero().flatten().tolist() == list(range(first_wrong - 1, 7))
    # Global consistency on teacher output: AR labels align with target_ids, the prompt is masked.
    assert "ar_input_ids" not in batch
    assert batch["ar_labels"].tolist() == [
        [IGNORE_INDEX] * 3 + [10, 11, 12, 13, 14],
        [IGNORE_INDEX] * 2 + [20, EOS] + [IGNORE_INDEX] * 4,
    ]


def test_record_without_states_adds_only_ar():
    batch = collate_consistency([NO_STATES], rng=random.Random(0), pad_token_id=PAD, eos_token_ids=[EOS])
    assert torch.equal(batch["input_ids"], batch["target_ids"])
    assert not batch["loss_mask"].any()
    assert batch["ar_labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 25, 26]]


def test_ground_truth_labels_replace_the_teacher_output_where_present():
    batch = collate_consistency(
        [LAST_BLOCK, SECOND_BLOCK],
        rng=random.Random(0),
        pad_token_id=PAD,
        eos_token_ids=[EOS],
        ar_source="labels",
        consistency="local",
    )
    # Row 0 has labels [20, 21]: EOS is appended; row 1 has none and falls back to the teacher output.
    assert batch["ar_input_ids"].tolist() == [[1, 8, 20, 21, EOS, 0, 0, 0], [1, 5, 6, 10, 11, 12, 13, 14]]
    assert batch["ar_attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 8]
    assert batch["ar_labels"][0].tolist() == [IGNORE_INDEX] * 2 + [20, 21, EOS] + [IGNORE_INDEX] * 3
    # Local consistency: row 0's only state pairs with the fixed point; the mask still follows y*.
    assert batch["target_ids"][0].tolist()[:4] == [1, 8, 20, EOS]


def test_unmasked_prompt_and_left_truncation():
    batch = collate_consistency(
        [SECOND_BLOCK],
        rng=random.Random(0),
        pad_token_id=PAD,
        eos_token_ids=[EOS],
        mask_prompt=False,
        max_len=5,
    )
    # 8 tokens cut to the last 5: the block (3) and the first response block (2) stay.
    assert batch["target_ids"].tolist() == [[10, 11, 12, 13, 14]]
    assert batch["ar_labels"].tolist() == [[10, 11, 12, 13, 14]]
    first_wrong = next(i for i in range(2, 5) if batch["input_ids"][0, i] != batch["target_ids"][0, i])
    assert batch["loss_mask"][0].nonzero().flatten().tolist() == list(range(first_wrong - 1, 4))
    with pytest.raises(ValueError, match="exceeds max_len"):
        collate_consistency([SECOND_BLOCK], rng=random.Random(0), pad_token_id=PAD, max_len=2)


def test_collate_ar_masks_prompt_and_padding():
    records = [
        {"prompt_ids": [1, 5, 6], "target_ids": [7, EOS]},
        {"prompt_ids": [1], "target_ids": [8, 9, EOS]},
    ]
    batch = collate_ar(records, pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, EOS], [1, 8, 9, EOS, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX] * 3 + [7, EOS],
        [IGNORE_INDEX, 8, 9, EOS, IGNORE_INDEX],
    ]
    unmasked = collate_ar(records, pad_token_id=PAD, mask_prompt=False)
    assert unmasked["labels"][0].tolist() == [1, 5, 6, 7, EOS]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (trajectory([1, 2], 1, [], []), "empty fixed_point"),
        (trajectory([1, 2], 3, [], [4]), "prompt_len"),
        (trajectory([1, 2], 1, [[4]], [4, 5]), "shorter than its fixed point"),
    ],
)
def test_bad_trajectory_records_raise_value_error(record, message):
    with pytest.raises(ValueError, match=message):
        collate_consistency([record], rng=random.Random(0), pad_token_id=PAD)
    with pytest.raises(ValueError, match="empty target_ids"):
        collate_ar([{"prompt_ids": [1], "target_ids": []}], pad_token_id=PAD)


def test_record_length_is_the_example_it_pads_to():
    assert record_length({"prefix_ids": [1, 2, 3], "fixed_point": [4, 5], "states": []}) == 5
    assert record_length({"prompt_ids": [1, 2], "target_ids": [3, 4, 5, 6]}) == 6


# ----- progressive objective: packed runs of blocks -----

# One response to the prompt [1, 5, 6]: blocks [10, 11], [12, 13, 14] (SECOND_BLOCK) and [15, EOS].
FIRST_BLOCK = trajectory([1, 5, 6], 3, [[10, 30]], [10, 11], labels=[10, 21])
THIRD_BLOCK = trajectory([1, 5, 6, 10, 11, 12, 13, 14], 3, [[15, 33, 34]], [15, EOS], labels=[10, 21], block_idx=2)
RESPONSE = [FIRST_BLOCK, SECOND_BLOCK | {"block_idx": 1, "labels": [10, 21]}, THIRD_BLOCK]


def test_block_chains_group_consecutive_blocks_of_a_prompt_in_order():
    other = NO_STATES | {"prompt_id": 8}
    chains = block_chains([RESPONSE[2], other, RESPONSE[0], RESPONSE[1]])
    assert [[r["block_idx"] for r in c] for c in chains] == [[0, 1, 2], [0]]
    assert chains[1][0]["prompt_id"] == 8
    # A missing block breaks the run: the block after it starts a new one from its own prefix.
    assert [[r["block_idx"] for r in c] for c in block_chains([RESPONSE[0], RESPONSE[2]])] == [[0], [2]]
    # Records without a prompt id stay on their own.
    loose = [{k: v for k, v in r.items() if k != "prompt_id"} for r in RESPONSE]
    assert [len(c) for c in block_chains(loose)] == [1, 1, 1]


def test_noise_targets_go_from_easy_to_hard_and_cycle():
    assert [noise_target(b, (0.2, 0.8), 4) for b in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.2, 0.4])
    assert noise_target(3, (0.5, 1.0), 1) == 0.5


def test_scheduled_state_is_the_one_closest_to_the_target_noise():
    record = trajectory([1], 1, [[9, 9, 9, 9], [6, 9, 9, 9], [6, 7, 9, 9], [6, 7, 8, 9]], [6, 7, 8, 5])
    # wrong fractions: 1.0, 0.75, 0.5, 0.25
    assert [scheduled_state(record, t) for t in (0.0, 0.3, 0.5, 1.0)] == [
        [6, 7, 8, 9], [6, 7, 8, 9], [6, 7, 9, 9], [9, 9, 9, 9]
    ]
    assert scheduled_state(record, 0.625) == [6, 9, 9, 9]  # a tie takes the noisier state
    assert scheduled_state(NO_STATES, 0.5) == [25, 26]  # no states: the fixed point (no consistency loss)


def test_collate_progressive_packs_noisy_and_clean_blocks_at_shared_positions():
    batch = collate_progressive(RESPONSE + [NO_STATES | {"prompt_id": 8}], pad_token_id=PAD, eos_token_ids=[EOS],
                                noise_levels=(0.0, 1.0), noise_period=3)
    ids, pos, seg = batch["input_ids"][0].tolist(), batch["position_ids"][0].tolist(), batch["segment_ids"][0].tolist()
    assert ids == [1, 5, 6, 10, 30, 10, 11, 12, 31, 32, 12, 13, 14, 15, 33, 15, EOS]
    assert pos == [0, 1, 2, 3, 4, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 8, 9]
    assert seg == [PROMPT_SEGMENT] * 3 + [noisy_segment(0)] * 2 + [clean_segment(0)] * 2 + [
        noisy_segment(1)] * 3 + [clean_segment(1)] * 3 + [noisy_segment(2)] * 2 + [clean_segment(2)] * 2
    # Block 1 (noise 0.5) took [30, 31, 32] -> [12, 31, 32]: of its two states, 2/3 wrong is closer than 1.
    # The first token of a block is predicted by the last clean token before it, in both streams.
    predictor = batch["predictor"][0].tolist()
    assert predictor[5] == predictor[3] == 2 and predictor[10] == predictor[7] == 6
    assert predictor[4] == 3 and predictor[6] == 5 and predictor[13] == predictor[15] == 12
    partner = batch["partner"][0].tolist()
    assert [partner[i] for i in (3, 4, 7, 8, 9, 13, 14)] == [5, 6, 10, 11, 12, 15, 16]
    # Consistency from the first wrong token to EOS; AR on every clean token up to EOS; nothing on padding.
    assert batch["kl_mask"][0].nonzero().flatten().tolist() == [4, 8, 9, 14]
    labels = batch["ar_labels"][0].tolist()
    assert [t for t in labels if t != IGNORE_INDEX] == [10, 11, 12, 13, 14, 15, EOS]
    assert batch["segment_ids"][1].tolist() == [PROMPT_SEGMENT] * 2 + [noisy_segment(0)] * 2 + [
        clean_segment(0)] * 2 + [PAD_SEGMENT] * 11
    assert batch["attention_mask"][1].tolist() == [1] * 6 + [0] * 11
    assert not batch["kl_mask"][1].any() and batch["ar_labels"][1, 6:].eq(IGNORE_INDEX).all()


def test_collate_progressive_puts_ground_truth_answers_in_the_row():
    batch = collate_progressive(RESPONSE, pad_token_id=PAD, eos_token_ids=[EOS], ar_source="labels")
    seg = batch["segment_ids"][0]
    answer = seg == ANSWER_SEGMENT
    assert batch["input_ids"][0, answer].tolist() == [10, 21, EOS]  # EOS appended
    assert batch["position_ids"][0, answer].tolist() == [3, 4, 5]  # right after the prompt
    assert batch["predictor"][0, answer].tolist()[0] == 2  # the last prompt token predicts the answer
    labelled = batch["ar_labels"][0] != IGNORE_INDEX
    assert torch.equal(labelled, answer)  # the clean blocks carry no AR labels then
    unmasked = collate_progressive(RESPONSE, pad_token_id=PAD, eos_token_ids=[EOS], ar_source="labels",
                                   mask_prompt=False)
    assert unmasked["ar_labels"][0, :3].tolist() == [IGNORE_INDEX, 5, 6]  # the prompt too, but its first token


def test_collate_progressive_splits_runs_that_pass_max_len_and_cuts_long_contexts():
    # Positions 0..9 do not fit in 8: blocks 0 and 1 (3 + 2 + 3 = 8) then block 2 from its own prefix.
    batch = collate_progressive(RESPONSE, pad_token_id=PAD, eos_token_ids=[EOS], max_len=8, ar_source="labels")
    assert batch["input_ids"].shape[0] == 2
    assert (batch["segment_ids"][0] == ANSWER_SEGMENT).sum() == 3
    # Row 1: the prefix of 8 tokens + 2 block tokens cut to 8 positions; the answer no longer fits.
    assert batch["position_ids"][1, :6].tolist() == [0, 1, 2, 3, 4, 5]
    assert batch["input_ids"][1, :6].tolist() == [6, 10, 11, 12, 13, 14]
    assert not (batch["segment_ids"][1] == ANSWER_SEGMENT).any()
    assert [t for t in batch["ar_labels"][1].tolist() if t != IGNORE_INDEX] == [15, EOS]
    with pytest.raises(ValueError, match="exceeds max_len"):
        collate_progressive(RESPONSE, pad_token_id=PAD, max_len=2)
    with pytest.raises(ValueError, match="shorter than its fixed point"):
        collate_progressive([trajectory([1, 2], 1, [[4]], [4, 5])], pad_token_id=PAD)
