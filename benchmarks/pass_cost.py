"""What a Jacobi pass costs, in AR steps, and where its time goes (batch 1, CPU).

    python benchmarks/pass_cost.py                      # the built-in teacher's shape, random weights
    python benchmarks/pass_cost.py --model builtin      # the trained teacher itself
    python benchmarks/pass_cost.py --model smollm2 --widths 2,4,8,16,32 --threads 2   # per block size

With `--widths`, only the sweep: each width's engine pass in AR steps, which is also the tokens per pass
Jacobi decoding needs at that block size to break even with the AR loop. With `--report` (a `cllm bench`
report.json of the same model) as well, each Jacobi result's histogram of tokens committed per pass predicts
its tokens per pass at every narrower block, and so its speed over the AR loop there:

    python benchmarks/pass_cost.py --model smollm2-cllm --widths 2,4,8,16 --threads 2 --report out/report.json

A pass's cost in AR steps is the time of one window-w forward against a cached prefix of ~100 tokens,
divided by the time of one 1-token forward against the same prefix. Both are timed two ways: the model
call alone, and the engine's whole pass (`jacobi_forward` + `roll_back_cache`, the Python around the
model included), each followed by a crop back to the prefix. Then torch.profiler's top operators and
cProfile's top Python functions for the window-16 engine pass.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cllm.decoding.jacobi import Row, jacobi_forward, prefill, roll_back_cache
from cllm.decoding.kv_cache import check_supported
from cllm.decoding.multiblock import Lane, branch_forward, roll_back_slots
from cllm.models.loading import cache_keyword


def builtin_shape(vocab: int = 512) -> LlamaForCausalLM:
    """The built-in teacher's shape (hidden 192, 4 layers, 4 heads, MLP 512), randomly initialised."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).float().eval()


class Pass:
    """A prefilled cache of `prefix` tokens and one window forward against it, rolled back after each call."""

    def __init__(self, model, prefix: int):
        self.model, self.layout = model, check_supported(model)
        vocab = model.config.vocab_size
        self.prompt = torch.randint(3, vocab, (1, prefix))
        self.mask = torch.ones(1, prefix, dtype=torch.bool)
        self.cache, _ = prefill(model, self.layout, self.prompt, self.mask)
        self.prefix = prefix

    def crop_back(self) -> None:
        self.cache.crop(-(self.cache.get_seq_length() - self.prefix))

    def model_call(self, width: int) -> None:
        ids = torch.randint(3, self.model.config.vocab_size, (1, width))
        positions = self.prefix + torch.arange(width)[None]
        key_mask = torch.ones(1, self.prefix + width, dtype=torch.bool)
        self.model(input_ids=ids, attention_mask=key_mask, position_ids=positions,
                   **{cache_keyword(type(self.model)): self.cache}, use_cache=True)
        self.crop_back()

    def guesses(self, width: int) -> list[int]:
        return torch.randint(3, self.model.config.vocab_size, (width,)).tolist()

    def engine(self, width: int) -> None:
        """The plain engine's pass (`cllm.decoding.jacobi`): the head at position `prefix`, one token committed."""
        row = Row(index=0, prompt=self.prompt[0].tolist(), budget=10**6, generated=[5], window=self.guesses(width))
        jacobi_forward(self.model, self.layout, self.cache, self.mask, [row], 0)
        roll_back_cache(self.cache, self.mask, [1])
        self.crop_back()

    def multiblock(self, width: int, branch: int = 0) -> None:
        """`cllm.decoding.multiblock`'s pass: its own 4-D mask, and a recycled branch of `branch` tokens when asked."""
        lane = Lane(index=0, prompt=self.prompt[0].tolist(), budget=10**6, generated=[5], window=self.guesses(width),
                    branches=[self.guesses(branch)] if branch else [])
        branch_forward(self.model, self.layout, self.cache, self.mask, [lane], 0)
        roll_back_slots(self.cache, self.mask, [[0]])
        self.crop_back()


def fastest(calls: dict[str, Callable], samples: int) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per call of each, sampled interleaved: the fastest wall-clock sample, and the median CPU time.

    On a shared machine the other processes only ever add wall-clock time, so the fastest of many
    interleaved samples is the least disturbed view of every variant alike; the thread's CPU time leaves
    out the time spent waiting for a core.
    """
    for fn in calls.values():
        for _ in range(3):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(samples):
        for name, fn in calls.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.thread_time() - start_cpu)
    return {name: min(ts) for name, ts in wall.items()}, {name: statistics.median(ts) for name, ts in cpu.items()}


def operator_times(fn, calls: int, rounds: int) -> dict[str, tuple[float, float]]:
    """torch.profiler's self CPU seconds per call of `fn` by operator (the least of `rounds` profiles), and
    how many times per call the operator runs."""
    from torch.profiler import ProfilerActivity, profile

    found: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn()
        for e in prof.key_averages():
            seconds = e.self_cpu_time_total / calls / 1e6
            found[e.key] = (min(seconds, found.get(e.key, (seconds,))[0]), e.count / calls)
    return found


def python_functions(fn, calls: int, rows: int) -> tuple[float, str]:
    """Python function calls per call of `fn`, and cProfile's top functions by their own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(rows)
    return stats.total_calls / calls, "\n".join(out.getvalue().splitlines()[4:])


def block_sizes(text: str) -> list[int]:
    widths = [int(w) for w in text.split(",")]
    if any(w < 1 for w in widths):
        raise ValueError(text)
    return widths


def predicted_tokens_per_pass(histogram: dict[int, int], width: int) -> float:
    """Tokens per pass at block `width` from a histogram of tokens committed per pass at a wider block.

    A pass commits the run of window tokens the model confirms, and a narrower window caps that run at its
    width; guesses and the model's agreement are taken to be alike in the first `width` positions.
    """
    passes = sum(histogram.values())
    return sum(count * min(k, width) for k, count in histogram.items()) / passes if passes else 0.0


def jacobi_histograms(report: Path) -> tuple[int, dict[str, dict[int, int]]]:
    """The block size of a `cllm bench` report and each model's Jacobi histogram of tokens committed per pass."""
    data = json.loads(report.read_text())
    found = {r["model"]: {int(k): v for k, v in r["commit_histogram"].items()}
             for r in data["results"] if r["method"] == "jacobi" and r["commit_histogram"]}
    if not found:
        raise SystemExit(f"{report} holds no Jacobi result with a commit histogram")
    return int(data["settings"]["block_size"]), found


def predict(costs: dict[int, float], report: Path, measured_block: int, histograms: dict[str, dict[int, int]]) -> None:
    """Per model of the report: predicted tokens per pass and speed over the AR loop at each measured width."""
    widths = [w for w in costs if w <= measured_block]
    print(f"\nPredicted from the Jacobi histograms of {report} (block {measured_block}): tokens per pass at block w, "
          "and that over the pass's cost in AR steps (the speed over the AR loop)")
    print("| model | " + " | ".join(f"block {w}" for w in widths) + " | best |")
    print("| --- | " + " | ".join("---:" for _ in widths) + " | --- |")
    for model, histogram in histograms.items():
        speed = {w: predicted_tokens_per_pass(histogram, w) / costs[w] for w in widths}
        jacobi = {w: v for w, v in speed.items() if w > 1}  # a 1-token window is the AR loop itself
        best = max(jacobi, key=jacobi.get) if jacobi else None
        cells = " | ".join(f"{predicted_tokens_per_pass(histogram, w):.2f} / {speed[w]:.2f}x" for w in widths)
        verdict = f"block {best}" if best is not None and speed[best] > 1 else "the AR loop"
        print(f"| {model} | {cells} | {verdict} |")


def sweep(bench: Pass, widths: list[int], samples: int, threads: int, report: Path | None = None) -> None:
    """One row per block size: what its Jacobi pass (and a two-block multi-block pass) costs in AR steps."""
    variants = {"engine pass, 1 token": lambda: bench.engine(1)}
    for w in widths:
        variants[f"jacobi {w}"] = lambda w=w: bench.engine(w)
        variants[f"multiblock {w}"] = lambda w=w: bench.multiblock(2 * w)
    best, cpu = fastest(variants, samples)
    one, one_cpu = best["engine pass, 1 token"], cpu["engine pass, 1 token"]
    print(f"prefix {bench.prefix}, {threads} thread(s), batch 1, {samples} interleaved samples; AR step "
          f"{1e3 * one:.2f} ms (fastest), {1e3 * one_cpu:.2f} ms (median CPU). A Jacobi pass of block w beats the AR "
          "loop only at more tokens per pass than its cost in AR steps.")
    print("| block | Jacobi pass ms | AR steps | AR steps (CPU) | 2-block multi-block pass ms | AR steps "
          "| AR steps (CPU) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for w in widths:
        j, m = f"jacobi {w}", f"multiblock {w}"
        print(f"| {w} | {1e3 * best[j]:.2f} | {best[j] / one:.2f} | {cpu[j] / one_cpu:.2f} | "
              f"{1e3 * best[m]:.2f} | {best[m] / one:.2f} | {cpu[m] / one_cpu:.2f} |")
    if report:
        predict({w: best[f"jacobi {w}"] / one for w in widths}, report, *jacobi_histograms(report))


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model directory or 'builtin' (default: random weights)")
    parser.add_argument("--prefix", type=int, default=100)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=12, help="profiler rows to print")
    parser.add_argument("--widths", type=block_sizes, default=None,
                        help="comma-separated block sizes: print only their pass costs (no profiles)")
    parser.add_argument("--report", type=Path, default=None,
                        help="with --widths: a `cllm bench` report.json whose Jacobi histograms predict the speed "
                        "at each width")
    args = parser.parse_args()
    if args.report and not args.widths:
        parser.error("--report needs --widths: the block sizes whose speed it predicts")
    if args.report:
        jacobi_histograms(args.report)  # a bad report fails before the model loads
    torch.set_num_threads(args.threads)
    if args.model:
        from cllm.models.loading import load_model
        from cllm.models.teacher import resolve_model

        model = load_model(resolve_model(args.model), device="cpu").model
    else:
        model = builtin_shape()
    bench = Pass(model, args.prefix)
    if args.widths:
        sweep(bench, args.widths, args.samples, args.threads, args.report)
        return
    w = args.width
    variants = {
        "model call, 1 token": lambda: bench.model_call(1),
        f"model call, {w} tokens": lambda: bench.model_call(w),
        "engine pass, 1 token": lambda: bench.engine(1),
        f"engine pass, {w} tokens": lambda: bench.engine(w),
        f"multiblock pass, {w} tokens": lambda: bench.multiblock(w),
        f"multiblock pass, {2 * w} tokens (2 blocks)": lambda: bench.multiblock(2 * w),
        f"multiblock pass, {2 * w} + {w // 2} tokens (2 blocks, 1 branch)": lambda: bench.multiblock(2 * w, w // 2),
    }
    best, cpu = fastest(variants, args.samples)
    print(f"prefix {args.prefix}, {args.threads} thread(s), batch 1, {args.samples} interleaved samples; "
          "AR steps: over the engine's 1-token pass (the model call's for model calls)")
    print("| pass | fastest ms | AR steps | median CPU ms | AR steps (CPU) |\n| --- | ---: | ---: | ---: | ---: |")
    for name, seconds in best.items():
        one = "model call, 1 token" if name.startswith("model") else "engine pass, 1 token"
        print(f"| {name} | {1e3 * seconds:.2f} | {seconds / best[one]:.2f} | {1e3 * cpu[name]:.2f} | "
              f"{cpu[name] / cpu[one]:.2f} |")

    calls, rounds = 20, 10
    one = operator_times(lambda: bench.engine(1), calls, rounds)
    wide = operator_times(lambda: bench.engine(w), calls, rounds)
    print(f"\ntorch.profiler, self CPU ms per engine pass, least of {rounds} profiles of {calls} passes "
          f"(the top {args.rows} of the {w}-token pass; calls per pass in brackets)")
    print(f"| operator | 1 token | {w} tokens | difference |\n| --- | ---: | ---: | ---: |")
    for key in sorted(wide, key=lambda k: wide[k][0], reverse=True)[: args.rows]:
        before, count = one.get(key, (0.0, 0.0))
        after, wide_count = wide[key]
        print(f"| {key} | {1e3 * before:.3f} ({count:g}) | {1e3 * after:.3f} ({wide_count:g}) | "
              f"{1e3 * (after - before):+.3f} |")
    total_one, total_wide = sum(t for t, _ in one.values()), sum(t for t, _ in wide.values())
    print(f"| all operators | {1e3 * total_one:.3f} | {1e3 * total_wide:.3f} | {1e3 * (total_wide - total_one):+.3f} |")
    for name, fn in (("engine pass, 1 token", lambda: bench.engine(1)), (f"engine pass, {w} tokens",
                     lambda: bench.engine(w)), (f"multiblock pass, {w} tokens", lambda: bench.multiblock(w))):
        count, _ = python_functions(fn, calls, 1)
        print(f"Python function calls per {name}: {count:.0f}")
    _, table = python_functions(lambda: bench.engine(w), 100, 25)
    print(f"\ncProfile, engine pass of {w} tokens, functions by their own time over 100 passes:")
    print(table)


if __name__ == "__main__":
    main()
