"""Jacobi trajectories as training data (spec §2): plan the prompts, decode a batch, clean, augment, store.

Plain Python + torch, no Ray: `cllm.data.collect` runs `decode_batch` inside Ray Data actors, and the tests
run every step here without a cluster.

The steps, in the order they run:
  plan_prompts    format + tokenize on the driver, attach answer labels, set aside prompts that fill the context
  plan_batches    fixed groups of prompts of similar length: a batch's random initial guesses depend on the
                  whole batch, so a rerun must decode exactly the same groups to reproduce the same states
  decode_batch    `jacobi_generate(..., return_trajectories=True)`, remapped to dataset prompt ids; greedy, or
                  seeded sampling whose fixed points are the samples AR decoding would draw (`prompt_sampling`)
  clean_blocks    drop degenerate teacher output, counting why
  augment_record  optional: pull wrong tokens of intermediate states towards the fixed point
  records_to_table / read_trajectories   the Parquet layout
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cllm.decoding.core import left_pad, response_budget
from cllm.decoding.jacobi import jacobi_generate
from cllm.decoding.sampling import SamplingParams
from cllm.models.loading import format_prompt
from cllm.tasks import EMPTY_PROMPT, PROMPT_TOO_LONG

TOKENS = pa.list_(pa.int32())
TRAJECTORY_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.int64(), nullable=False),  # index of the record in the dataset split
        pa.field("block_idx", pa.int32(), nullable=False),
        pa.field("prompt_len", pa.int32(), nullable=False),  # prefix_ids[:prompt_len] is the prompt
        pa.field("prefix_ids", TOKENS, nullable=False),  # prompt + the fixed points of earlier blocks
        pa.field("states", pa.list_(TOKENS), nullable=False),  # initial guess .. state before the fixed point
        pa.field("fixed_point", TOKENS, nullable=False),
        pa.field("num_iters", pa.int32(), nullable=False),
        pa.field("eos_in_block", pa.bool_(), nullable=False),
        pa.field("labels", TOKENS),  # ground-truth answer + EOS; null when the dataset has no answers
        pa.field("batch_id", pa.int64(), nullable=False),  # the decode batch (the unit of resumption)
    ]
)
TRAJECTORY_FIELDS = tuple(TRAJECTORY_SCHEMA.names)

TOKEN_RUN = "token_run"
REPEATED_NGRAM = "repeated_ngram"


# ----- planning (driver side) -----


def plan_prompts(
    records: Sequence[dict],
    tokenizer,
    *,
    chat: bool,
    context: int | None,
    eos_token_id: int | None,
) -> tuple[list[dict], dict[str, list[int]]]:
    """Prompts ready to decode ({prompt_id, input_ids, labels}) and the ids set aside, by reason.

    prompt_id is the record's index in the split. A prompt is too long when it leaves no room in the
    model's context for a single new token; one that leaves less than the decoding budget gets a shorter
    response when its batch is decoded (`response_budget`).
    """
    texts = [format_prompt(tokenizer, record["prompt"], chat=chat) for record in records]
    encoded = tokenizer(texts)["input_ids"] if texts else []
    prompts, dropped = [], {PROMPT_TOO_LONG: [], EMPTY_PROMPT: []}
    for prompt_id, (record, input_ids) in enumerate(zip(records, encoded, strict=True)):
        if not input_ids:
            dropped[EMPTY_PROMPT].append(prompt_id)
        elif context is not None and len(input_ids) >= context:
            dropped[PROMPT_TOO_LONG].append(prompt_id)
        else:
            labels = answer_labels(tokenizer, record.get("answer"), eos_token_id)
            prompts.append({"prompt_id": prompt_id, "input_ids": list(input_ids), "labels": labels})
    return prompts, {reason: ids for reason, ids in dropped.items() if ids}


def answer_labels(tokenizer, answer: str | None, eos_token_id: int | None) -> list[int] | None:
    """The ground-truth answer as the model should produce it: its tokens, then EOS."""
    if answer is None:
        return None
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return ids + ([eos_token_id] if eos_token_id is not None else [])


def plan_batches(prompts: Sequence[dict], batch_size: int) -> list[dict]:
    """Groups of `batch_size` prompts, numbered from 0: {batch_id, prompts}.

    Prompts are grouped by length (then id): less left padding, and a batch whose budget the context
    cuts (`response_budget`) holds prompts that would each have been cut about as much.
    """
    ordered = sorted(prompts, key=lambda p: (len(p["input_ids"]), p["prompt_id"]))
    return [
        {"batch_id": start // batch_size, "prompts": ordered[start : start + batch_size]}
        for start in range(0, len(ordered), batch_size)
    ]


# ----- decoding one batch (inside an actor) -----


@dataclass(frozen=True)
class DecodeSettings:
    """Everything that decides a batch's rows, apart from the model and the prompts."""

    block_size: int
    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    context: int | None = None  # the model's context length
    init: str = "prompt"
    max_iters: int | None = None
    seed: int = 0
    max_token_run: int = 10  # 0 disables the filter
    repeat_ngram: int = 0  # 0 disables the filter
    augment_prob: float = 0.0  # 0 disables augmentation
    temperature: float = 0.0  # 0: greedy trajectories; > 0: seeded sampling (`cllm.decoding.sampling`), per prompt
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class BatchStats:
    """What one decode batch produced; the driver sums these into the run's throughput."""

    batch_id: int
    prompts: int = 0
    blocks: int = 0  # decoded, kept or not
    rows: int = 0  # kept
    generated_tokens: int = 0
    forward_passes: int = 0
    seconds: float = 0.0
    dropped: Counter = field(default_factory=Counter)


def batch_seed(seed: int, batch_id: int) -> int:
    """The initial-guess seed of one batch: fixed by the batch, not by the run that decodes it."""
    return seed * 1_000_003 + batch_id


def prompt_sampling(settings: DecodeSettings, prompt_id: int) -> SamplingParams | None:
    """A prompt's sampling settings: its noise is fixed by the run's seed and the prompt, not by its batch."""
    if settings.temperature == 0:
        return None
    return SamplingParams(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                          seed=settings.seed * 1_000_003 + prompt_id)


def decode_batch(model, batch: dict, settings: DecodeSettings) -> tuple[list[dict], BatchStats]:
    """Jacobi-decode one planned batch; return its cleaned (and optionally augmented) block records."""
    started = time.perf_counter()
    prompts = batch["prompts"]
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad([p["input_ids"] for p in prompts], settings.pad_token_id, device)
    out = jacobi_generate(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=response_budget(
            settings.max_new_tokens, settings.context, [len(p["input_ids"]) for p in prompts]
        ),
        block_size=settings.block_size,
        eos_token_id=list(settings.eos_token_ids),
        pad_token_id=settings.pad_token_id,
        init=settings.init,
        max_iters=settings.max_iters,
        return_trajectories=True,
        seed=batch_seed(settings.seed, batch["batch_id"]),
        sampling=[prompt_sampling(settings, p["prompt_id"]) for p in prompts],
    )
    records = [to_dataset_ids(t, prompts, batch["batch_id"]) for t in out.trajectories]
    records.sort(key=lambda r: (r["prompt_id"], r["block_idx"]))
    kept, dropped = clean_blocks(records, max_token_run=settings.max_token_run, repeat_ngram=settings.repeat_ngram)
    if settings.augment_prob > 0:
        kept = [augment_record(r, settings.augment_prob, settings.seed) for r in kept]
    stats = BatchStats(
        batch_id=batch["batch_id"],
        prompts=len(prompts),
        blocks=len(records),
        rows=len(kept),
        generated_tokens=sum(out.new_tokens),
        forward_passes=out.forward_passes,
        seconds=time.perf_counter() - started,
        dropped=dropped,
    )
    return kept, stats


def to_dataset_ids(trajectory: dict, prompts: Sequence[dict], batch_id: int) -> dict:
    """A decoder record (prompt_id = row in the batch) as a dataset record (prompt_id = dataset index)."""
    prompt = prompts[trajectory["prompt_id"]]
    return {**trajectory, "prompt_id": prompt["prompt_id"], "labels": prompt["labels"], "batch_id": batch_id}


# ----- cleaning -----


def longest_run(tokens: Sequence[int], start: int = 0) -> int:
    """Length of the longest run of one repeated token among the runs that reach index >= start."""
    best, run = 0, 0
    for i, token in enumerate(tokens):
        run = run + 1 if i > 0 and token == tokens[i - 1] else 1
        if i >= start:
            best = max(best, run)
    return best


def repeats_earlier_ngram(tokens: Sequence[int], start: int, n: int) -> bool:
    """Whether an n-gram ending at index >= start already occurred earlier (sentence-level repetition)."""
    first_seen: dict[tuple, int] = {}
    for i in range(len(tokens) - n + 1):
        first = first_seen.setdefault(tuple(tokens[i : i + n]), i)
        if first < i and i + n - 1 >= start:
            return True
    return False


def drop_reason(record: dict, *, max_token_run: int = 10, repeat_ngram: int = 0) -> str | None:
    """Why a block's teacher output is not worth training on, or None to keep it.

    The teacher output is the response so far (earlier fixed points) plus this block's fixed point; only
    repetition that reaches into this block counts, so a run crossing a block boundary is caught too.
    """
    response = list(record["prefix_ids"][record["prompt_len"] :])
    start = len(response)
    response += list(record["fixed_point"])
    if max_token_run and longest_run(response, start) >= max_token_run:
        return TOKEN_RUN
    if repeat_ngram and repeats_earlier_ngram(response, start, repeat_ngram):
        return REPEATED_NGRAM
    return None


def clean_blocks(
    records: Iterable[dict], *, max_token_run: int = 10, repeat_ngram: int = 0
) -> tuple[list[dict], Counter]:
    """Keep the blocks `drop_reason` accepts; count the others by reason."""
    kept, dropped = [], Counter()
    for record in records:
        reason = drop_reason(record, max_token_run=max_token_run, repeat_ngram=repeat_ngram)
        if reason is None:
            kept.append(record)
        else:
            dropped[reason] += 1
    return kept, dropped


# ----- augmentation -----


def augment_states(
    states: Sequence[Sequence[int]], fixed_point: Sequence[int], prob: float, rng: random.Random
) -> list[list[int]]:
    """Each state with some wrong tokens replaced by the fixed point's token.

    The first wrong token of a state is never corrected (so the state still needs the iteration it
    took); each later wrong token is corrected with probability `prob`.
    """
    augmented = []
    for state in states:
        state = list(state)
        wrong = [i for i in range(len(fixed_point)) if state[i] != fixed_point[i]]
        for i in wrong[1:]:
            if rng.random() < prob:
                state[i] = fixed_point[i]
        augmented.append(state)
    return augmented


def augment_record(record: dict, prob: float, seed: int = 0) -> dict:
    """`augment_states` on one record, seeded by the block itself so any batching gives the same result."""
    rng = random.Random(f"{seed}/{record['prompt_id']}/{record['block_idx']}")
    return {**record, "states": augment_states(record["states"], record["fixed_point"], prob, rng)}


# ----- storage -----


def records_to_table(records: Sequence[dict]) -> pa.Table:
    """Block records in the Parquet layout (`TRAJECTORY_SCHEMA`)."""
    columns = {name: [record[name] for record in records] for name in TRAJECTORY_FIELDS}
    return pa.Table.from_pydict(columns, schema=TRAJECTORY_SCHEMA)


def table_to_records(table: pa.Table) -> list[dict]:
    return table.select(list(TRAJECTORY_FIELDS)).to_pylist()


def read_trajectories(path: str | Path) -> list[dict]:
    """Every block record of a collection directory (or one file), ordered by prompt and block."""
    table = pq.read_table(path, schema=TRAJECTORY_SCHEMA)  # skips `_manifest.json` and other `_`/`.` names
    return sorted(table_to_records(table), key=lambda r: (r["prompt_id"], r["block_idx"]))
