"""Sampling with Jacobi decoding: TPF, tokens/s and accuracy of AR vs Jacobi at several temperatures.

    python benchmarks/sampling.py --model outputs/default/cllm --limit 100 --temperatures 0,0.3,0.7,1.0

Held-out problems of the built-in task at batch size 1; problem i is sampled with seed i, so AR, Jacobi
and multi-block Jacobi draw the same noise and must return the same tokens (the last column counts the
outputs equal to AR's). The methods alternate problem by problem, so a change in machine load hits all
alike.
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
from cllm.decoding.modes import BASELINE, JACOBI, MODES, ModeName  # noqa: E402
from cllm.decoding.sampling import SamplingParams  # noqa: E402
from cllm.models.loading import context_length, load_model  # noqa: E402
from cllm.models.teacher import resolve_model  # noqa: E402
from cllm.tasks import load_task  # noqa: E402


class SamplingBenchConfig(StageConfig, DecodeFields):
    model: str = "builtin"
    limit: int = Field(100, ge=1)
    temperatures: list[float] = [0.0, 0.3, 0.7, 1.0]
    top_p: float = Field(1.0, gt=0, le=1)
    threads: int = Field(1, ge=1)
    methods: list[ModeName] = [name for name in MODES if name != BASELINE]  # besides AR, the reference


def decode(loaded, ids, method: str, sampling: SamplingParams | None, cfg: SamplingBenchConfig, eos: list[int]):
    budget = response_budget(cfg.max_new_tokens, context_length(loaded.model), [ids.shape[1]])
    mode = MODES[method]
    return mode.generate(loaded.model, ids, max_new_tokens=budget, eos_token_id=eos, sampling=sampling,
                         **mode.options(cfg))


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(SamplingBenchConfig, sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(cfg.threads)
    loaded = load_model(resolve_model(cfg.model), device="cpu", dtype="float32")
    task = load_task("builtin:arith", "test", cfg.limit)
    tokenizer = loaded.tokenizer
    eos = list(special_tokens(tokenizer, loaded.model.generation_config).eos_ids)
    encoded = [tokenizer(prompt, return_tensors="pt")["input_ids"] for prompt in task.prompts]
    decode(loaded, encoded[0], JACOBI.name, None, cfg, eos)  # warm-up
    print(f"model {cfg.model}, {len(encoded)} held-out problems, block {cfg.block_size}, batch 1, top_p {cfg.top_p}")
    print("| temperature | method | TPF | tokens/s | speedup vs AR | accuracy | == AR |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for temperature in cfg.temperatures:
        runs = {method: {"tokens": [], "passes": 0, "seconds": 0.0} for method in [BASELINE, *cfg.methods]}
        for i, ids in enumerate(encoded):
            sampling = SamplingParams(temperature=temperature, top_p=cfg.top_p, seed=i) if temperature else None
            for method, run in runs.items():
                start = time.perf_counter()
                out = decode(loaded, ids, method, sampling, cfg, eos)
                run["seconds"] += time.perf_counter() - start
                run["tokens"].append(out.sequences[0, ids.shape[1] : ids.shape[1] + out.new_tokens[0]].tolist())
                run["passes"] += out.row_forward_passes[0]
        speed = {method: sum(map(len, run["tokens"])) / run["seconds"] for method, run in runs.items()}
        for method, run in runs.items():
            decoded = sum(max(len(tokens) - 1, 0) for tokens in run["tokens"])
            texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in run["tokens"]]
            same = sum(a == b for a, b in zip(runs[BASELINE]["tokens"], run["tokens"], strict=True))
            print(f"| {temperature} | {method} | {decoded / run['passes']:.2f} | {speed[method]:.1f} | "
                  f"{speed[method] / speed[BASELINE]:.2f}x | {100 * task.accuracy(texts):.1f}% | "
                  f"{same}/{len(encoded)} |", flush=True)


if __name__ == "__main__":
    main()
