"""Multi-block settings side by side: tokens per pass and tokens/s over the AR loop, per setting.

    python benchmarks/multiblock_sweep.py --model outputs/default/cllm --limit 80 --threads 2

Held-out problems of the built-in task at batch size 1, block 16. Every prompt is decoded by the AR
loop, plain Jacobi and each multi-block setting in turn before the next prompt, so a change in machine
load hits every setting alike. A setting is `K/spawn_after/recycle/recycle_len` (`--settings 2/0.25/0/8`).
Every output must equal the AR loop's: the last column counts it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from pydantic import Field  # noqa: E402

from cllm.config import StageConfig, load_config  # noqa: E402
from cllm.decoding.core import DecodeFields, response_budget, special_tokens  # noqa: E402
from cllm.decoding.modes import BASELINE, JACOBI, MODES, MULTIBLOCK  # noqa: E402
from cllm.models.loading import context_length, load_model  # noqa: E402
from cllm.models.teacher import resolve_model  # noqa: E402
from cllm.tasks import load_task  # noqa: E402

DEFAULT_SETTINGS = ["2/0.5/1/8", "2/0.5/0/8", "2/0.25/0/8", "2/0/0/8", "3/0.25/0/8", "2/0.25/1/4", "2/0.5/1/2"]


class SweepConfig(StageConfig):
    model: str = "builtin"
    limit: int = Field(80, ge=1)
    block_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    threads: int = Field(2, ge=1)
    settings: list[str] = DEFAULT_SETTINGS


def parse_setting(text: str) -> dict:
    blocks, spawn_after, recycle, recycle_len = text.split("/")
    return dict(blocks=int(blocks), spawn_after=float(spawn_after), recycle=int(recycle),
                recycle_len=int(recycle_len))


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(SweepConfig, sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(cfg.threads)
    loaded = load_model(resolve_model(cfg.model), device="cpu", dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    eos = list(special_tokens(tokenizer, model.generation_config).eos_ids)
    task = load_task("builtin:arith", "test", cfg.limit)
    prompts = [tokenizer(prompt, return_tensors="pt")["input_ids"] for prompt in task.prompts]

    decode = DecodeFields(block_size=cfg.block_size)

    def decoder(name: str):
        mode, settings = (MODES[name], {}) if name in MODES else (MULTIBLOCK, parse_setting(name))
        return lambda ids, budget: mode.generate(model, ids, max_new_tokens=budget, eos_token_id=eos,
                                                 **mode.options(decode), **settings)

    names = [BASELINE, JACOBI.name, *cfg.settings]
    decoders = {name: decoder(name) for name in names}
    runs = {name: {"seconds": 0.0, "tokens": [], "passes": 0} for name in names}
    decoders[JACOBI.name](prompts[0], 16)  # warm-up
    for ids in prompts:
        budget = response_budget(cfg.max_new_tokens, context_length(model), [ids.shape[1]])
        for name in names:
            start = time.perf_counter()
            out = decoders[name](ids, budget)
            runs[name]["seconds"] += time.perf_counter() - start
            runs[name]["tokens"].append(out.sequences[0, ids.shape[1] : ids.shape[1] + out.new_tokens[0]].tolist())
            runs[name]["passes"] += out.row_forward_passes[0]
    print(f"model {cfg.model}, {len(prompts)} held-out problems, block {cfg.block_size}, batch 1, "
          f"{cfg.threads} thread(s); setting = K/spawn_after/recycle/recycle_len")
    print("| decoder | TPF | tokens/s | vs AR loop | == AR |")
    print("| --- | ---: | ---: | ---: | ---: |")
    ar_speed = sum(map(len, runs[BASELINE]["tokens"])) / runs[BASELINE]["seconds"]
    for name, run in runs.items():
        speed = sum(map(len, run["tokens"])) / run["seconds"]
        tpf = sum(max(len(t) - 1, 0) for t in run["tokens"]) / run["passes"]
        same = sum(a == b for a, b in zip(runs[BASELINE]["tokens"], run["tokens"], strict=True))
        label = name if name in MODES else f"{MULTIBLOCK.name} {name}"
        print(f"| {label} | {tpf:.2f} | {speed:.1f} | {speed / ar_speed:.2f}x | {same}/{len(prompts)} |")


if __name__ == "__main__":
    main()
