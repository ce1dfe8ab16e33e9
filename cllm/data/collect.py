"""Trajectory collection as a Ray Data job (spec §2).

    driver   load_task -> tokenize -> plan fixed decode batches        (`cllm.data.trajectories`, no Ray)
    Ray Data from_items(one row per planned batch)
             -> map_batches(TrajectoryDecoder, ActorPoolStrategy)       one model replica per actor
             -> write_parquet(output)                                   one row per block

Resumable: batches are fixed by the plan (not by the run), so a rerun decodes only the batches the
output does not hold yet (`cllm.data.store`) and reproduces the rows of an uninterrupted run.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from transformers import GenerationConfig

from cllm.data.collect_config import CollectConfig
from cllm.data.store import exclusive, open_manifest, record_run, scan_output
from cllm.data.trajectories import (
    PROMPT_TOO_LONG,
    TRAJECTORY_SCHEMA,
    BatchStats,
    DecodeSettings,
    decode_batch,
    plan_batches,
    plan_prompts,
    records_to_table,
)
from cllm.decoding.core import special_tokens
from cllm.errors import ConfigError, DataError
from cllm.models.loading import absolute_if_local, causal_lm_config, context_length, load_model, load_tokenizer
from cllm.tasks import READ_REASONS, SET_ASIDE_REASONS, Task

logger = logging.getLogger(__name__)


# What a manifest written before a setting existed collected with (`open_manifest`).
SETTINGS_BEFORE_THEY_EXISTED = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}


# The config keys that decide the rows; a resumed run must match them.
ROW_SETTINGS = (
    "dataset", "split", "limit", "seed", "prompt_field", "answer_field", "test_fraction", "split_seed", "chat",
    "block_size",
    "max_new_tokens", "init", "max_iters", "batch_size", "max_token_run", "repeat_ngram", "augment_prob", "dtype",
    "temperature", "top_k", "top_p",
)


@dataclass
class CollectionPlan:
    """What the driver decides before any actor starts."""

    model_path: str
    settings: DecodeSettings
    batches: list[dict]
    records: int
    dropped_prompts: dict[str, list[int]]


@dataclass
class CollectResult:
    output: Path
    prompts: int  # prompts planned (dataset records minus those set aside)
    prompts_decoded: int  # by this run
    prompts_skipped: int  # already in the output
    rows_written: int  # by this run
    rows_total: int  # in the output now
    bytes_total: int
    blocks: int  # decoded by this run, kept or dropped
    generated_tokens: int
    seconds: float  # wall time of this run's Ray Data job (actor start-up included)
    decode_seconds: float  # time the actors spent decoding, summed over actors
    prompts_per_s: float
    blocks_per_s: float
    tokens_per_s: float
    complete: bool
    dropped_prompts: dict[str, int] = field(default_factory=dict)
    dropped_blocks: dict[str, int] = field(default_factory=dict)  # by this run

    def summary(self) -> str:
        lines = [
            f"trajectories in {self.output}: {self.rows_total} rows ({self.bytes_total / 1e6:.2f} MB) "
            f"for {self.prompts} prompts{'' if self.complete else ' (incomplete)'}",
            f"this run: {self.prompts_decoded} prompts decoded, {self.prompts_skipped} already written, "
            f"{self.rows_written} rows written in {self.seconds:.1f}s",
            f"throughput: {self.prompts_per_s:.2f} prompts/s, {self.blocks_per_s:.2f} blocks/s, "
            f"{self.tokens_per_s:.1f} generated tokens/s",
        ]
        if self.dropped_blocks:
            lines.append(f"blocks dropped by cleaning: {self.dropped_blocks}")
        if self.dropped_prompts:
            lines.append(f"prompts set aside: {self.dropped_prompts}")
        return "\n".join(lines)


# ----- driver: plan -----


def plan_collection(config: CollectConfig, resolve_model: Callable[[str], str] = str,
                    task: Task | None = None) -> CollectionPlan:
    """Load the dataset, then the tokenizer, tokenize, and fix the decode batches (no Ray needed).

    `resolve_model` turns the model reference into a directory (an entry point passes the one that
    builds the built-in teacher); it runs after the dataset loaded, so bad data fails before any model work.
    `task` is the split when the caller has read it already (`pipelines/collect.py` reads it before this
    module's imports).
    """
    if task is None:
        task = config.load_split(config.split, config.limit, config.seed)
    model_path = absolute_if_local(resolve_model(config.model))
    context = context_length(SimpleNamespace(config=causal_lm_config(model_path)))
    tokenizer = load_tokenizer(model_path)
    special = special_tokens(tokenizer, generation_config(model_path))
    prompts, dropped = plan_prompts(task.records, tokenizer, chat=config.chat, context=context,
                                    eos_token_id=special.eos_id)
    dropped = {**task.set_aside, **dropped}  # rows unreadable as prompts (numbered by row), then by prompt id
    if not prompts:
        raise DataError(f"no prompt of {config.dataset!r} can be decoded: {describe_dropped(dropped, context)}")
    if dropped:
        logger.warning("setting aside %s", describe_dropped(dropped, context))
    settings = DecodeSettings(
        block_size=config.block_size,
        max_new_tokens=config.max_new_tokens,
        eos_token_ids=special.eos_ids,
        pad_token_id=special.pad_id,
        context=context,
        init=config.init,
        max_iters=config.max_iters,
        seed=config.seed,
        max_token_run=config.max_token_run,
        repeat_ngram=config.repeat_ngram,
        augment_prob=config.augment_prob,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
    )
    return CollectionPlan(model_path, settings, plan_batches(prompts, config.batch_size), len(task), dropped)


def generation_config(model_path: str) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json
        return None


def describe_dropped(dropped: dict[str, list[int]], context: int | None) -> str:
    parts = []
    for reason, ids in dropped.items():
        shown = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
        if reason == PROMPT_TOO_LONG:
            why = f"longer than the model's context of {context} tokens"
        else:
            why = SET_ASIDE_REASONS.get(reason, reason)
        numbered = "rows" if reason in READ_REASONS else "prompt ids"
        parts.append(f"{len(ids)} prompt(s) {why} ({numbered} {shown})")
    return "; ".join(parts) or "the dataset has no prompts"


# ----- Ray: the actor pool -----


@ray.remote(num_cpus=0)
class RunStats:
    """Collects each decoded batch's `BatchStats` for the driver (Ray Data's write returns nothing)."""

    def __init__(self):
        self.batches: list[BatchStats] = []

    def add(self, stats: BatchStats) -> None:
        self.batches.append(stats)

    def get(self) -> list[BatchStats]:
        return self.batches


class TrajectoryDecoder:
    """Ray Data actor: one teacher replica; each call decodes planned batches into block rows."""

    def __init__(self, model_path: str, settings: DecodeSettings, device: str, dtype: str | None,
                 threads: int, stats):
        torch.set_num_threads(threads)  # tiny models stall with more intra-op threads than CPUs
        self.model = load_model(model_path, device=device, dtype=dtype).model
        self.settings = settings
        self.stats = stats

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = []
        for batch in table.to_pylist():
            records, stats = decode_batch(self.model, batch, self.settings)
            ray.get(self.stats.add.remote(stats))
            rows.extend(records)
        return records_to_table(rows)


def gpus_per_actor(config: CollectConfig) -> float:
    if config.num_gpus_per_actor is not None:
        return config.num_gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def check_resources(actors: int, cpus: float, gpus: float) -> None:
    """Refuse a pool the cluster cannot hold (Ray Data would wait for it forever)."""
    have = ray.cluster_resources()
    for name, each in (("CPU", cpus), ("GPU", gpus)):
        if actors * each > have.get(name, 0):
            raise ConfigError(
                f"{actors} actor(s) x {each:g} {name} need {actors * each:g} {name}s; the Ray cluster has "
                f"{have.get(name, 0):g}: lower --actors or the per-actor {name} count"
            )


def decode_and_write(
    config: CollectConfig, plan: CollectionPlan, batches: list[dict]
) -> tuple[list[BatchStats], float]:
    """The Ray Data job: planned batches -> actor pool -> Parquet. Returns the batches' stats and wall time."""
    actors = min(config.actors, len(batches))
    gpus = gpus_per_actor(config)
    check_resources(actors, config.cpus_per_actor, gpus)
    # On the driver's node: a worker node lost mid-run must not take the batches' stats with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    stats = RunStats.options(scheduling_strategy=here).remote()
    started = time.perf_counter()
    dataset = ray.data.from_items(batches, override_num_blocks=len(batches))  # one block per batch
    trajectories = dataset.map_batches(
        TrajectoryDecoder,
        fn_constructor_kwargs={
            "model_path": plan.model_path,
            "settings": plan.settings,
            "device": "cuda" if gpus > 0 else "cpu",
            "dtype": config.dtype,
            "threads": max(1, int(config.cpus_per_actor)),
            "stats": stats,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=1,  # one planned batch per call: its rows leave the actor, and reach a file, together
        batch_format="pyarrow",
        num_cpus=config.cpus_per_actor,
        num_gpus=gpus,
    )
    # Writing is light I/O: without a CPU of its own it is never starved by actors holding every CPU, and
    # one writer per actor keeps up without starting a worker process per file.
    trajectories.write_parquet(
        config.output, schema=TRAJECTORY_SCHEMA, compression="zstd",  # ~20% smaller than snappy here
        ray_remote_args={"num_cpus": 0}, concurrency=actors,
    )
    seconds = time.perf_counter() - started
    return ray.get(stats.get.remote()), seconds


# ----- the stage -----


def row_settings(config: CollectConfig, model_path: str) -> dict:
    return {"model_path": model_path, **{key: getattr(config, key) for key in ROW_SETTINGS}}


def run_collection(config: CollectConfig, plan: CollectionPlan | None = None) -> CollectResult:
    """Collect the trajectories of every planned prompt not yet in `config.output` (needs Ray initialised)."""
    plan = plan or plan_collection(config)
    output = Path(config.output)
    with exclusive(output):
        return collect_into(output, config, plan)


def collect_into(output: Path, config: CollectConfig, plan: CollectionPlan) -> CollectResult:
    manifest = open_manifest(output, row_settings(config, plan.model_path), SETTINGS_BEFORE_THEY_EXISTED, {
        "records": plan.records,
        "prompts": sum(len(b["prompts"]) for b in plan.batches),
        "batches": len(plan.batches),
        "dropped_prompts": plan.dropped_prompts,
    })
    done = scan_output(output).batches | set(manifest["empty_batches"])
    todo = [batch for batch in plan.batches if batch["batch_id"] not in done]
    stats, seconds = decode_and_write(config, plan, todo) if todo else ([], 0.0)
    final = scan_output(output)
    # A batch whose blocks were all dropped has no rows to mark it done: the manifest remembers it.
    empty = set(manifest["empty_batches"]) | {s.batch_id for s in stats if s.rows == 0}
    complete = all(b["batch_id"] in final.batches | empty for b in plan.batches)
    record_run(output, manifest, stats, seconds, empty, complete)
    decoded = sum(s.prompts for s in stats)
    blocks = sum(s.blocks for s in stats)
    tokens = sum(s.generated_tokens for s in stats)
    return CollectResult(
        output=output,
        prompts=manifest["prompts"],
        prompts_decoded=decoded,
        prompts_skipped=manifest["prompts"] - sum(len(b["prompts"]) for b in todo),
        rows_written=sum(s.rows for s in stats),
        rows_total=final.rows,
        bytes_total=final.bytes,
        blocks=blocks,
        generated_tokens=tokens,
        seconds=seconds,
        decode_seconds=sum(s.seconds for s in stats),
        prompts_per_s=decoded / seconds if seconds else 0.0,
        blocks_per_s=blocks / seconds if seconds else 0.0,
        tokens_per_s=tokens / seconds if seconds else 0.0,
        complete=complete,
        dropped_prompts={reason: len(ids) for reason, ids in plan.dropped_prompts.items()},
        dropped_blocks=dict(sum((s.dropped for s in stats), Counter())),
    )

