"""Training records -> padded tensor batches (pure Python + torch; the Ray layer only feeds records).

Two record kinds (Parquet rows, read as dicts of Python lists):
- AR records `{prompt_ids, target_ids}`: next-token training on target_ids (the teacher's pretraining).
- Trajectory records (spec §2) `{prompt_id, block_idx, prompt_len, prefix_ids, states, fixed_point,
  num_iters, eos_in_block, labels?}`: each gives one consistency example and one AR example, or, for the
  progressive objective, the consecutive blocks of one prompt in a batch pack into one sequence.

Batches are right-padded to their longest sequence; `attention_mask` marks real tokens and padding
never carries loss.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from cllm.errors import DataError
from cllm.train.losses import (
    ANSWER_SEGMENT,
    IGNORE_INDEX,
    PAD_SEGMENT,
    PROMPT_SEGMENT,
    RESPONSE_SEGMENT,
    clean_segment,
    consistency_loss_mask,
    noisy_segment,
)

AR_COLUMNS = ("prompt_ids", "target_ids")
TRAJECTORY_COLUMNS = ("prompt_len", "prefix_ids", "states", "fixed_point")


def check_columns(columns: Iterable[str], objective: str) -> None:
    """Fail early, naming the missing columns, when the data does not fit the objective."""
    needed = AR_COLUMNS if objective == "ar" else TRAJECTORY_COLUMNS
    missing = [c for c in needed if c not in set(columns)]
    if missing:
        kind = "AR records" if objective == "ar" else "trajectory records"
        raise DataError(f"objective {objective!r} needs {kind} with columns {list(needed)}; missing {missing}")


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


def ground_truth_answer(record: dict, eos_token_ids: Sequence[int]) -> list[int] | None:
    """The record's dataset answer with EOS appended if missing; None when it has none."""
    answer = record.get("labels")
    if not answer:
        return None
    answer = list(answer)
    if eos_token_ids and answer[-1] not in eos_token_ids:
        answer.append(eos_token_ids[0])
    return answer


def labels_ar_example(
    record: dict, eos_token_ids: Sequence[int], mask_prompt: bool = True
) -> tuple[list[int], list[int]] | None:
    """AR on the dataset's ground-truth answer (EOS appended if missing); None when the record has none."""
    answer = ground_truth_answer(record, eos_token_ids)
    if answer is None:
        return None
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
    """Batch of trajectory records for `cllm.train.losses.cllm_loss`.

    Keys: input_ids (prefix + state), target_ids (prefix + y* or next state), attention_mask,
    loss_mask (from `consistency_loss_mask`), ar_labels; plus ar_input_ids / ar_attention_mask unless
    the AR example is exactly target_ids (global consistency on the teacher output), which lets the
    loss share one forward. That choice depends on the config only, so every worker runs the same
    number of forwards (ZeRO-3 gathers weights in each).
    """
    if consistency not in ("global", "local"):
        raise ValueError(f"consistency must be 'global' or 'local' here (progressive: collate_progressive), "
                         f"got {consistency!r}")
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


# ----- progressive objective: the consecutive blocks of a prompt packed into one sequence -----
#
# One row of the batch is `context | noisy_0 | clean_0 | noisy_1 | clean_1 | ... | answer?`: the context is
# the first block's prefix, noisy_k a scheduled state of block k and clean_k its fixed point, both at the
# positions block k has in the response. `cllm.train.losses.packed_attention_mask` turns the segment and position
# of every token into the block-structured mask, so one forward gives the student logits (noisy blocks)
# and the targets (clean blocks) of every block at once.
#
# A noisy block sees the earlier CLEAN blocks, not the earlier noisy ones (Jacobi Forcing's choice): the
# engine decodes one block at a time on top of committed, exact tokens, so that is the prefix a block has
# when it is refined; each noisy block then gets exactly the global-consistency loss of its own record
# (tests/test_losses.py checks it, gradients included). Conditioning on earlier noisy blocks would train
# for multi-block decoding, where later blocks are drafted on unconverged ones.


def block_chains(records: Sequence[dict]) -> list[list[dict]]:
    """The records as runs of consecutive blocks of one prompt, each run in block order.

    Block b continues the run when its prefix is the previous block's prefix plus that block's fixed point;
    a block dropped by cleaning (or fed in another batch) breaks the run, and the next block starts a new
    one whose context is its own prefix. Runs keep the order in which their prompts first appear.
    """
    by_prompt: dict[tuple, list[dict]] = {}
    for index, record in enumerate(records):
        prompt_id = record.get("prompt_id")
        key = ("prompt", prompt_id) if prompt_id is not None else ("row", index)
        by_prompt.setdefault(key, []).append(record)
    chains = []
    for blocks in by_prompt.values():
        blocks = sorted(blocks, key=lambda r: r.get("block_idx") or 0)
        chains.append([blocks[0]])
        for block in blocks[1:]:
            last = chains[-1][-1]
            if list(block["prefix_ids"]) == list(last["prefix_ids"]) + list(last["fixed_point"]):
                chains[-1].append(block)
            else:
                chains.append([block])
    return chains


def fit_chains(chains: Sequence[list[dict]], max_len: int | None) -> list[list[dict]]:
    """Split runs whose positions would pass `max_len` (a run spans its context plus its blocks)."""
    if max_len is None:
        return list(chains)
    fitted = []
    for chain in chains:
        run, span = [], 0
        for block in chain:
            n_block = len(block["fixed_point"])
            if n_block > max_len:
                raise ValueError(f"{record_name(block)}: block of {n_block} tokens exceeds max_len {max_len}")
            if run and span + n_block > max_len:
                fitted.append(run)
                run = []
            if not run:
                span = len(block["prefix_ids"])
            run.append(block)
            span += n_block
        fitted.append(run)
    return fitted


def noise_target(block_idx: int, levels: tuple[float, float], period: int) -> float:
    """The fraction of wrong tokens block `block_idx` trains on: linear from easy to hard, every `period` blocks."""
    low, high = levels
    return low + (high - low) * (block_idx % period) / (period - 1) if period > 1 else low


def wrong_fraction(state: Sequence[int], fixed_point: Sequence[int]) -> float:
    return sum(a != b for a, b in zip(state, fixed_point, strict=False)) / len(fixed_point)


def scheduled_state(record: dict, target: float) -> list[int]:
    """The state whose fraction of wrong tokens is closest to `target` (the noisier on a tie); y* if none."""
    fixed_point = list(record["fixed_point"])
    states = [list(s)[: len(fixed_point)] for s in record["states"] or []]
    if not states:
        return fixed_point
    return min(states, key=lambda state: abs(wrong_fraction(state, fixed_point) - target))


def kept_block_tokens(state: Sequence[int], fixed_point: Sequence[int], eos_token_ids: Sequence[int]) -> range:
    """Block tokens whose predictions carry consistency loss: first wrong token .. first EOS of y*.

    The same rule as `cllm.train.losses.consistency_loss_mask`, indexed by the predicted token.
    """
    wrong = [i for i, (a, b) in enumerate(zip(state, fixed_point, strict=True)) if a != b]
    if not wrong:
        return range(0)
    return range(wrong[0], eos_length(fixed_point, eos_token_ids))


def eos_length(fixed_point: Sequence[int], eos_token_ids: Sequence[int]) -> int:
    """Tokens of y* up to and including its first EOS (all of them without one)."""
    eos = set(eos_token_ids)
    return next((i + 1 for i, token in enumerate(fixed_point) if token in eos), len(fixed_point))


@dataclass
class PackedRow:
    """One packed sequence, per token: id, position, segment, the index of the token whose logit predicts
    it, its clean partner (noisy tokens: the same block position in y*), consistency flag and AR label."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    predictors: list[int] = field(default_factory=list)
    partners: list[int] = field(default_factory=list)
    kl: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def add(self, token: int, position: int, segment: int, predictor: int, *,
            partner: int = 0, kl: bool = False, label: int = IGNORE_INDEX) -> None:
        self.ids.append(token)
        self.positions.append(position)
        self.segments.append(segment)
        self.predictors.append(predictor)
        self.partners.append(partner)
        self.kl.append(int(kl))
        self.labels.append(label)


def pack_chain(
    chain: Sequence[dict],
    *,
    eos_token_ids: Sequence[int],
    answer: list[int] | None,
    noise_levels: tuple[float, float],
    noise_period: int,
    mask_prompt: bool = True,
    cut: int = 0,
) -> PackedRow:
    """`context | noisy_0 | clean_0 | ... | answer?` for one run of blocks.

    AR labels sit on the answer (the dataset's ground truth) when given, else on the clean blocks up to
    EOS (and on the prompt unless `mask_prompt`). `cut` drops that many tokens from the left of the
    context (positions then start at 0).
    """
    row = PackedRow()
    context = list(chain[0]["prefix_ids"])[cut:]
    prompt_len = chain[0]["prompt_len"] - cut
    for i, token in enumerate(context):
        in_prompt = i < prompt_len
        label = token if in_prompt and i > 0 and not mask_prompt else IGNORE_INDEX
        row.add(token, i, PROMPT_SEGMENT if in_prompt else RESPONSE_SEGMENT, max(i - 1, 0), label=label)
    before_block = len(context) - 1  # the token whose logit predicts the next block's first token
    for k, record in enumerate(chain):
        fixed_point = list(record["fixed_point"])
        n, start = len(fixed_point), len(context) + sum(len(r["fixed_point"]) for r in chain[:k])
        state = scheduled_state(record, noise_target(record.get("block_idx", k), noise_levels, noise_period))
        kept = kept_block_tokens(state, fixed_point, eos_token_ids)
        n_ar = 0 if answer else eos_length(fixed_point, eos_token_ids)
        noisy, clean = len(row.ids), len(row.ids) + n
        for i, token in enumerate(state):
            row.add(token, start + i, noisy_segment(k), before_block if i == 0 else noisy + i - 1,
                    partner=clean + i, kl=i in kept)
        for i, token in enumerate(fixed_point):
            row.add(token, start + i, clean_segment(k), before_block if i == 0 else clean + i - 1,
                    label=token if i < n_ar else IGNORE_INDEX)
        before_block = clean + n - 1
    for i, token in enumerate(answer or ()):
        row.add(token, prompt_len + i, ANSWER_SEGMENT, prompt_len - 1 if i == 0 else len(row.ids) - 1, label=token)
    return row


def collate_progressive(
    records: Sequence[dict],
    *,
    pad_token_id: int,
    eos_token_ids: Sequence[int] = (),
    ar_source: str = "teacher",
    noise_levels: tuple[float, float] = (0.0, 1.0),
    noise_period: int = 4,
    mask_prompt: bool = True,
    max_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Batch of trajectory records for `cllm.train.losses.progressive_loss`: one packed row per run of blocks.

    Keys: input_ids, position_ids, segment_ids (PAD_SEGMENT on padding), attention_mask (real tokens),
    predictor (index of the logit that predicts each token), partner (a noisy token's clean partner),
    kl_mask (noisy tokens carrying consistency loss), ar_labels. With ar_source "labels", a record's
    ground-truth answer rides in the same row as one more segment that sees only the prompt.
    `max_len` bounds the positions a row spans, as it bounds `collate_consistency`'s sequences.
    """
    if ar_source not in ("teacher", "labels"):
        raise ValueError(f"ar_source must be 'teacher' or 'labels', got {ar_source!r}")
    eos_token_ids = list(eos_token_ids)
    for record in records:
        check_trajectory(record)
    rows = []
    for chain in fit_chains(block_chains(records), max_len):
        span = len(chain[0]["prefix_ids"]) + sum(len(r["fixed_point"]) for r in chain)
        cut = max(0, span - max_len) if max_len is not None else 0
        answer = ground_truth_answer(chain[0], eos_token_ids) if ar_source == "labels" else None
        if answer and (cut or (max_len is not None and chain[0]["prompt_len"] + len(answer) > max_len)):
            answer = None  # does not fit: AR on the clean blocks, as a record without labels
        rows.append(pack_chain(chain, eos_token_ids=eos_token_ids, answer=answer,
                               noise_levels=noise_levels, noise_period=noise_period, mask_prompt=mask_prompt,
                               cut=cut))
    return {
        "input_ids": pad_right([r.ids for r in rows], pad_token_id),
        "position_ids": pad_right([r.positions for r in rows], 0),
        "segment_ids": pad_right([r.segments for r in rows], PAD_SEGMENT),
        "attention_mask": attention_mask_of([r.ids for r in rows]),
        "predictor": pad_right([r.predictors for r in rows], 0),
        "partner": pad_right([r.partners for r in rows], 0),
        "kl_mask": pad_right([r.kl for r in rows], 0).bool(),
        "ar_labels": pad_right([r.labels for r in rows], IGNORE_INDEX),
    }
