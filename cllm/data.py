"""Training records -> padded tensor batches (pure Python + torch; the Ray layer only feeds records).

Two record kinds (Parquet rows, read as dicts of Python lists):
- AR records `{prompt_ids, target_ids}`: next-token training on target_ids (the teacher's pretraining).
- Trajectory records (spec §2) `{prompt_id, block_idx, prompt_len, prefix_ids, states, fixed_point,
  num_iters, eos_in_block, labels?}`: each gives one consistency example and one AR example.

Batches are right-padded to their longest sequence; `attention_mask` marks real tokens and padding
never carries loss.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch

from cllm.losses import IGNORE_INDEX, consistency_loss_mask

AR_COLUMNS = ("prompt_ids", "target_ids")
TRAJECTORY_COLUMNS = ("prompt_len", "prefix_ids", "states", "fixed_point")


def check_columns(columns: Iterable[str], objective: str) -> None:
    """Fail early, naming the missing columns, when the data does not fit the objective."""
    needed = AR_COLUMNS if objective == "ar" else TRAJECTORY_COLUMNS
    missing = [c for c in needed if c not in set(columns)]
    if missing:
        kind = "AR records" if objective == "ar" else "trajectory records"
        raise ValueError(f"objective {objective!r} needs {kind} with columns {list(needed)}; missing {missing}")


def record_name(record: dict) -> str:
    return f"record (prompt_id={record.get('prompt_id')}, block_idx={record.get('block_idx')})"


def check_trajectory(record: dict) -> None:
    prefix, fixed_point = record["prefix_ids"], record["fixed_point"]
    if not fixed_point:
        raise ValueError(f"{record_name(record)} has an empty fixed_point")
    if not 0 < record["prompt_len"] <= len(prefix):
        raise ValueError(f"{record_name(record)}: prompt_len {record['prompt_len']} outside 1..{len(prefix)}")
    for state in record["states"] or []:
        if len(state) < len(fixed_point):
            raise ValueError(f"{record_name(record)} has a state shorter than its fixed point")


def record_length(record: dict) -> int:
    """Tokens the record's consistency (or AR) example spans: what its batch pads to."""
    if "prefix_ids" in record:
        return len(record["prefix_ids"] or ()) + len(record["fixed_point"] or ())
    return len(record.get("prompt_ids") or ()) + len(record.get("target_ids") or ())


# ----- examples: one record -> token lists -----


def ar_example(record: dict, mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """(input ids, labels) for an AR record: loss on target_ids (and on the prompt if not masked)."""
    prompt, target = list(record["prompt_ids"]), list(record["target_ids"])
    if not target:
        raise ValueError("an AR record has empty target_ids")
    labels = ([IGNORE_INDEX] * len(prompt) if mask_prompt else prompt) + target
    return prompt + target, labels


def teacher_ar_example(record: dict, mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """AR on the teacher's output so far: [prefix, y*] with the response tokens as labels."""
    ids = list(record["prefix_ids"]) + list(record["fixed_point"])
    n_prompt = record["prompt_len"]
    labels = ([IGNORE_INDEX] * n_prompt if mask_prompt else ids[:n_prompt]) + ids[n_prompt:]
    return ids, labels


def labels_ar_example(
    record: dict, eos_token_ids: Sequence[int], mask_prompt: bool = True
) -> tuple[list[int], list[int]] | None:
    """AR on the dataset's ground-truth answer (EOS appended if missing); None when the record has none."""
    answer = record.get("labels")
    if not answer:
        return None
    answer = list(answer)
    if eos_token_ids and answer[-1] not in eos_token_ids:
        answer.append(eos_token_ids[0])
    prompt = list(record["prefix_ids"][: record["prompt_len"]])
    labels = ([IGNORE_INDEX] * len(prompt) if mask_prompt else prompt) + answer
    return prompt + answer, labels


def consistency_example(record: dict, rng: random.Random, kind: str = "global") -> tuple[list[int], list[int]]:
    """(student sequence, target sequence), both [prefix, block].

    global: a uniformly drawn state y^(j) against the fixed point y*.
    local: y^(j) against the next state y^(j+1) (the fixed point after the last state).
    A record with no states gives (y*, y*): its loss mask is empty, so it adds only AR.
    """
    prefix, fixed_point = list(record["prefix_ids"]), list(record["fixed_point"])
    n = len(fixed_point)
    trajectory = [list(s)[:n] for s in (record["states"] or [])] + [fixed_point]
    if len(trajectory) == 1:
        return prefix + fixed_point, prefix + fixed_point
    j = rng.randrange(len(trajectory) - 1)
    target = trajectory[j + 1] if kind == "local" else fixed_point
    return prefix + trajectory[j], prefix + target


# ----- collation: many examples -> padded tensors -----


def pad_right(sequences: Sequence[Sequence[int]], pad_value: int) -> torch.Tensor:
    length = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [pad_value] * (length - len(s)) for s in sequences], dtype=torch.long)


def attention_mask_of(sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    return pad_right([[1] * len(s) for s in sequences], 0)


def truncate_left(ids: list[int], max_len: int | None) -> tuple[list[int], int]:
    """Keep the last `max_len` tokens; returns the kept tokens and how many were cut."""
    if max_len is None or len(ids) <= max_len:
        return ids, 0
    cut = len(ids) - max_len
    return ids[cut:], cut


def collate_ar(
    records: Sequence[dict], *, pad_token_id: int, mask_prompt: bool = True, max_len: int | None = None
) -> dict[str, torch.Tensor]:
    """Batch of AR records: input_ids, attention_mask, labels (IGNORE_INDEX on prompt and padding)."""
    ids, labels = [], []
    for record in records:
        seq, lab = ar_example(record, mask_prompt)
        seq, cut = truncate_left(seq, max_len)
        ids.append(seq)
        labels.append(lab[cut:])
    return {
        "input_ids": pad_right(ids, pad_token_id),
        "attention_mask": attention_mask_of(ids),
        "labels": pad_right(labels, IGNORE_INDEX),
    }


def collate_consistency(
    records: Sequence[dict],
    *,
    rng: random.Random,
    pad_token_id: int,
    eos_token_ids: Sequence[int] = (),
    consistency: str = "global",
    ar_source: str = "teacher",
    mask_prompt: bool = True,
    max_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Batch of trajectory records for `cllm.losses.cllm_loss`.

    Keys: input_ids (prefix + state), target_ids (prefix + y* or next state), attention_mask,
    loss_mask (from `consistency_loss_mask`), ar_labels; plus ar_input_ids / ar_attention_mask unless
    the AR example is exactly target_ids (global consistency on the teacher output), which lets the
    loss share one forward. That choice depends on the config only, so every worker runs the same
    number of forwards (ZeRO-3 gathers weights in each).
    """
    if consistency not in ("global", "local"):
        raise ValueError(f"consistency must be 'global' or 'local', got {consistency!r}")
    if ar_source not in ("teacher", "labels"):
        raise ValueError(f"ar_source must be 'teacher' or 'labels', got {ar_source!r}")
    eos_token_ids = list(eos_token_ids)
    states, targets, fixed, starts, ar_ids, ar_labels = [], [], [], [], [], []
    for record in records:
        check_trajectory(record)
        state, target = consistency_example(record, rng, consistency)
        fixed_seq = list(record["prefix_ids"]) + list(record["fixed_point"])
        n_block = len(record["fixed_point"])
        if max_len is not None and n_block > max_len:
            raise ValueError(f"{record_name(record)}: block of {n_block} tokens exceeds max_len {max_len}")
        state, cut = truncate_left(state, max_len)
        states.append(state)
        targets.append(target[cut:])
        fixed.append(fixed_seq[cut:])
        starts.append(len(record["prefix_ids"]) - cut)
        example = labels_ar_example(record, eos_token_ids, mask_prompt) if ar_source == "labels" else None
        seq, lab = example or teacher_ar_example(record, mask_prompt)
        seq, cut = truncate_left(seq, max_len)
        ar_ids.append(seq)
        ar_labels.append(lab[cut:])
    batch = {
        "input_ids": pad_right(states, pad_token_id),
        "target_ids": pad_right(targets, pad_token_id),
        "attention_mask": attention_mask_of(states),
    }
    batch["loss_mask"] = consistency_loss_mask(
        batch["input_ids"],
        pad_right(fixed, pad_token_id),
        batch["attention_mask"],
        torch.tensor(starts),
        eos_token_ids,
    )
    batch["ar_labels"] = pad_right(ar_labels, IGNORE_INDEX)
    if not (consistency == "global" and ar_source == "teacher"):
        batch["ar_input_ids"] = pad_right(ar_ids, pad_token_id)
        batch["ar_attention_mask"] = attention_mask_of(ar_ids)
    return batch
