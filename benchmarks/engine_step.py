"""Where a serving-engine step goes: the continuous engine in this process, kept full with `rows` requests
(a finished request is replaced before the next step, as closed-loop clients would), no Ray and no HTTP.

    python benchmarks/engine_step.py --model outputs/default/cllm
    python benchmarks/engine_step.py --model builtin --rows 4 --mode jacobi
    python benchmarks/engine_step.py --model outputs/default/cllm --rows 4 --static --prefill-groups 1,4,16

It prints the mean milliseconds per step and the share of each part: the forward passes (the model),
prefills of joining requests, the cache work around them (rows joining, leaving, columns dropped), and
the per-row bookkeeping. The parts are timed by wrapping the engine's functions, so their sum is a little
below the step time (the rest is the step's own glue). `--static` also decodes the same prompts in
static batches of `rows` (the static engine's `BatchDecoder`, each batch to its end) for tokens/s side by
side; `--prefill-groups` times the prefill of that many prompts together (what admitting them costs).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from pydantic import Field  # noqa: E402

import cllm.engine as engine_module  # noqa: E402
from cllm.config import StageConfig, load_config  # noqa: E402
from cllm.decoding import DecodeFields, left_pad  # noqa: E402
from cllm.engine import Engine  # noqa: E402
from cllm.jacobi import prefill  # noqa: E402
from cllm.kv_cache import check_supported  # noqa: E402
from cllm.models import load_model  # noqa: E402
from cllm.serving import BatchDecoder, DecodeJob  # noqa: E402
from cllm.streaming import TextStream  # noqa: E402
from cllm.tasks import arith  # noqa: E402
from cllm.teacher import resolve_model  # noqa: E402

PARTS = {  # engine function -> the part of a step it is
    "jacobi_forward": "forward", "branch_forward": "forward", "prefill": "prefill",
    "merge_caches": "cache: rows join", "reserve": "cache: rows join", "drop_rows": "cache: rows leave",
    "retire_rows": "cache: rows leave",  # before the engine's cache kept spare rows and columns
    "compact": "cache: columns dropped", "roll_back_cache": "cache: pass rolled back",
    "roll_back_slots": "cache: pass rolled back", "advance_row": "rows: commit", "advance_lane": "rows: commit",
}


class StepConfig(StageConfig):
    model: str = "builtin"
    mode: Literal["multiblock", "jacobi", "ar"] = "multiblock"
    rows: int = Field(16, ge=1)  # requests kept running
    block_size: int = Field(16, ge=1)
    max_tokens_per_step: int = Field(256, ge=1)
    max_tokens: int = Field(64, ge=1)  # per request
    warmup_steps: int = Field(60, ge=0)
    steps: int = Field(300, ge=1)
    threads: int = Field(1, ge=1)
    static: bool = False  # also: the same prompts in static batches of `rows`
    prefill_groups: list[int] = []  # also: the prefill of this many prompts together


def new_job(loaded, prompt: str, max_tokens: int) -> DecodeJob:
    return DecodeJob(prompt_ids=loaded.tokenizer(prompt)["input_ids"], max_tokens=max_tokens,
                     text=TextStream(loaded.tokenizer))


def timed(spent: Counter, part: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[part] += time.perf_counter() - start

    return wrapper


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(StepConfig, sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(cfg.threads)
    loaded = load_model(resolve_model(cfg.model), device="cpu", dtype="float32")
    prompts = [p.prompt for p in arith.generate(64, split="test", seed=0)]
    spent: Counter = Counter()
    for name, part in PARTS.items():
        if hasattr(engine_module, name):  # the engine of an older checkout lacks some
            setattr(engine_module, name, timed(spent, part, getattr(engine_module, name)))
    for name in ("ONE_BLOCK", "LANES"):  # the steps the engine calls through its row kinds
        if (kind := getattr(engine_module, name, None)) is not None:
            steps = {f.name: getattr(kind, f.name) for f in fields(kind)}
            setattr(engine_module, name, replace(kind, **{
                field: timed(spent, PARTS[fn.__name__], fn) for field, fn in steps.items()
                if getattr(fn, "__name__", None) in PARTS
            }))
    engine = Engine(loaded, DecodeFields(block_size=cfg.block_size), mode=cfg.mode, max_running=cfg.rows,
                    max_tokens_per_step=cfg.max_tokens_per_step)
    sent = 0

    def keep_full() -> None:
        nonlocal sent
        while engine.num_running + engine.num_waiting < cfg.rows:
            engine.add(new_job(loaded, prompts[sent % len(prompts)], cfg.max_tokens))
            sent += 1

    for _ in range(cfg.warmup_steps):
        keep_full()
        engine.step()
    spent.clear()
    committed, admitted, start = 0, 0, time.perf_counter()
    for _ in range(cfg.steps):
        keep_full()
        stats = engine.step()
        committed, admitted = committed + stats.committed, admitted + stats.admitted
    total = time.perf_counter() - start
    print(f"{cfg.mode}, {cfg.rows} rows, block {cfg.block_size}, budget {cfg.max_tokens_per_step}: "
          f"{1000 * total / cfg.steps:.2f} ms/step, {committed / total:.0f} tokens/s committed by passes, "
          f"{(committed + admitted) / total:.0f} with the first tokens from prefill")
    for part, seconds in spent.most_common():
        print(f"  {part:26s} {1000 * seconds / cfg.steps:6.2f} ms/step  {100 * seconds / total:5.1f}%")
    if cfg.static:
        static_batches(cfg, loaded, prompts)
    for size in cfg.prefill_groups:
        prefill_group(loaded, prompts[:size])


def static_batches(cfg: StepConfig, loaded, prompts: list[str]) -> None:
    """The same prompts, `rows` at a time, each batch decoded to its end (the static engine)."""
    decoder = BatchDecoder(loaded, DecodeFields(block_size=cfg.block_size), mode=cfg.mode)
    decoder.decode([new_job(loaded, p, cfg.max_tokens) for p in prompts[: cfg.rows]])  # warm-up, jobs of its own
    jobs = [new_job(loaded, p, cfg.max_tokens) for p in prompts]
    start = time.perf_counter()
    for i in range(0, len(jobs), cfg.rows):
        decoder.decode(jobs[i : i + cfg.rows])
    total = time.perf_counter() - start
    print(f"static batches of {cfg.rows}: {sum(len(j.tokens) for j in jobs) / total:.0f} tokens/s "
          f"(first tokens included)")


def prefill_group(loaded, prompts: list[str], repeats: int = 20) -> None:
    ids, mask = left_pad([loaded.tokenizer(p)["input_ids"] for p in prompts], 0)
    layout = check_supported(loaded.model)
    with torch.inference_mode():
        prefill(loaded.model, layout, ids, mask.bool())
        start = time.perf_counter()
        for _ in range(repeats):
            prefill(loaded.model, layout, ids, mask.bool())
    seconds = (time.perf_counter() - start) / repeats
    print(f"prefill of {len(prompts)} prompt(s) together ({ids.shape[1]} tokens wide): {1000 * seconds:.2f} ms, "
          f"{1000 * seconds / len(prompts):.2f} ms per prompt")


if __name__ == "__main__":
    main()
