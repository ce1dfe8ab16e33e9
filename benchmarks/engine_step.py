"""Where a serving-engine step goes: the continuous engine in this process, kept full with `rows` requests
(a finished request is replaced before the next step, as closed-loop clients would), no Ray and no HTTP.

    python benchmarks/engine_step.py --model outputs/default/cllm
    python benchmarks/engine_step.py --model builtin --rows 4 --mode jacobi
    python benchmarks/engine_step.py --model outputs/default/cllm --rows 4 --static --prefill-groups 1,4,16

It prints the mean milliseconds per turn of the engine thread (a step, then its outputs turned into text)
and the share of each part: the forward passes (the model), prefills of joining requests, the cache work
around them (rows joining, leaving, columns dropped), the per-row bookkeeping, and detokenising. The
engine times its parts itself (`StepStats.parts`), so their sum is a little below the step time (the
rest is the step's own glue). `--static` also decodes the same prompts with the static engine, in batches
of `rows` each decoded to its end, for tokens/s side by side; `--prefill-groups` times the prefill of that
many prompts together (what admitting them costs).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from pydantic import Field  # noqa: E402

from cllm.config import StageConfig, load_config  # noqa: E402
from cllm.decoding.core import left_pad  # noqa: E402
from cllm.decoding.jacobi import prefill  # noqa: E402
from cllm.decoding.kv_cache import check_supported  # noqa: E402
from cllm.decoding.modes import FASTEST, ModeName  # noqa: E402
from cllm.models.loading import load_model  # noqa: E402
from cllm.models.teacher import resolve_model  # noqa: E402
from cllm.serving.bridge import EngineLoop  # noqa: E402
from cllm.serving.config import ServeConfig  # noqa: E402
from cllm.serving.engine import Engine  # noqa: E402
from cllm.serving.output import OutputProcessor  # noqa: E402
from cllm.serving.request import Request  # noqa: E402
from cllm.serving.static import StaticEngine  # noqa: E402
from cllm.tasks import arith  # noqa: E402

TEXT = "text: detokenise, stop sequences"  # the output processor's part of the engine thread's turn


class StepConfig(StageConfig):
    model: str = "builtin"
    mode: ModeName = FASTEST
    rows: int = Field(16, ge=1)  # requests kept running
    block_size: int = Field(16, ge=1)
    max_tokens_per_step: int = Field(256, ge=1)
    max_tokens: int = Field(64, ge=1)  # per request
    warmup_steps: int = Field(60, ge=0)
    steps: int = Field(300, ge=1)
    threads: int = Field(1, ge=1)
    static: bool = False  # also: the same prompts in static batches of `rows`
    prefill_groups: list[int] = []  # also: the prefill of this many prompts together

    def serve_config(self, **engine) -> ServeConfig:
        """The engines' settings: the server's defaults, these sizes."""
        ongoing = ServeConfig.model_fields["max_ongoing_requests"].default
        return ServeConfig(model=self.model, mode=self.mode, block_size=self.block_size, max_batch_size=self.rows,
                           max_tokens_per_step=self.max_tokens_per_step, max_ongoing_requests=max(self.rows, ongoing),
                           **engine)


def new_request(loaded, prompt: str, max_tokens: int) -> Request:
    return Request(prompt_ids=loaded.tokenizer(prompt)["input_ids"], max_tokens=max_tokens)


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(StepConfig, sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(cfg.threads)
    loaded = load_model(resolve_model(cfg.model), device="cpu", dtype="float32")
    prompts = [p.prompt for p in arith.generate(64, split="test", seed=0)]
    engine = Engine(loaded, cfg.serve_config())
    turn = EngineLoop(engine, OutputProcessor(loaded.tokenizer))
    sent = 0

    def keep_full() -> None:
        nonlocal sent
        while engine.num_running + engine.num_waiting < cfg.rows:
            engine.add(new_request(loaded, prompts[sent % len(prompts)], cfg.max_tokens))
            sent += 1

    for _ in range(cfg.warmup_steps):
        keep_full()
        turn.step()
    spent: Counter = Counter()
    committed, admitted, start = 0, 0, time.perf_counter()
    for _ in range(cfg.steps):
        keep_full()
        began = time.perf_counter()
        stats, _ = turn.step()
        spent.update(stats.parts)
        spent[TEXT] += time.perf_counter() - began - stats.seconds
        committed, admitted = committed + stats.committed, admitted + stats.admitted
    total = time.perf_counter() - start
    print(f"{cfg.mode}, {cfg.rows} rows, block {cfg.block_size}, budget {cfg.max_tokens_per_step}: "
          f"{1000 * total / cfg.steps:.2f} ms/step, {committed / total:.0f} tokens/s committed by passes, "
          f"{(committed + admitted) / total:.0f} with the first tokens from prefill")
    for part, seconds in spent.most_common():
        print(f"  {part:32s} {1000 * seconds / cfg.steps:6.2f} ms/step  {100 * seconds / total:5.1f}%")
    if cfg.static:
        static_batches(cfg, loaded, prompts)
    for size in cfg.prefill_groups:
        prefill_group(loaded, prompts[:size])


def static_batches(cfg: StepConfig, loaded, prompts: list[str]) -> None:
    """The same prompts, `rows` at a time, each batch decoded to its end (the static engine)."""
    engine = StaticEngine(loaded, cfg.serve_config(engine="static", batch_wait_timeout_s=0.0))

    def decode(requests: list[Request]) -> None:
        for request in requests:
            engine.add(request)
        while engine.has_work():
            engine.step()

    decode([new_request(loaded, p, cfg.max_tokens) for p in prompts[: cfg.rows]])  # warm-up, requests of its own
    requests = [new_request(loaded, p, cfg.max_tokens) for p in prompts]
    start = time.perf_counter()
    decode(requests)
    total = time.perf_counter() - start
    print(f"static batches of {cfg.rows}: {sum(len(r.tokens) for r in requests) / total:.0f} tokens/s "
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
