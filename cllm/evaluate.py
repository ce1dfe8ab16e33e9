"""Side-by-side evaluation of decoding methods: speed (TPF, tokens/s, speedup), accuracy, exactness.

Every method decodes the same prompts at batch size 1, interleaved prompt by prompt, so a change in
machine load hits all methods alike. Forward passes are counted by a hook on the model itself, the
same way for `transformers`' own loops and for ours. Nothing is dropped from the statistics.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cllm.jacobi import ar_generate, jacobi_generate
from cllm.models import LoadedModel, context_length, format_prompt, response_budget

METHODS = ("hf_greedy", "ar", "jacobi", "jacobi_ngram", "hf_prompt_lookup")
BASELINE = "hf_greedy"


@dataclass
class MethodResult:
    model: str
    method: str
    prompts: int = 0
    new_tokens: int = 0
    decode_tokens: int = 0  # tokens after the first of each prompt (the first comes from prefill)
    decode_forwards: int = 0  # forward passes after prefill
    too_long: int = 0  # prompts that leave no room in the model's context, not decoded
    seconds: float = 0.0
    exact: int = 0  # prompts whose output equals greedy AR token for token
    accuracy: float | None = None
    speedup: float | None = None  # tokens/s relative to hf_greedy on the same model
    speedup_vs_ar: float | None = None  # tokens/s relative to the project's AR loop (when "ar" ran)
    commit_histogram: dict[int, int] = field(default_factory=dict)

    @property
    def tokens_per_forward(self) -> float:
        return self.decode_tokens / self.decode_forwards if self.decode_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tokens_per_forward"] = round(self.tokens_per_forward, 4)
        out["tokens_per_second"] = round(self.tokens_per_second, 2)
        out["exact_fraction"] = self.exact / self.prompts if self.prompts else None
        return out


@contextmanager
def count_forwards(model):
    """Count calls of the model's forward (one per pass, whoever drives the loop)."""
    calls = [0]
    handle = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def decoders(loaded: LoadedModel, *, block_size: int, lookup_tokens: int) -> dict[str, Callable]:
    """Each method as `fn(input_ids, max_new_tokens) -> (new token ids, commit histogram or None)`, batch 1."""
    model, tokenizer = loaded.model, loaded.tokenizer
    common = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    def hf(**extra):
        def run(ids, budget):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=budget,
                                 **common, **extra)
            return out[0, ids.shape[1]:].tolist(), None
        return run

    def ours(fn, **extra):
        def run(ids, budget):
            out = fn(model, ids, max_new_tokens=budget, **common, **extra)
            return out.sequences[0, ids.shape[1]:].tolist(), out.commit_histogram
        return run

    return {
        "hf_greedy": hf(),
        "ar": ours(ar_generate),
        "jacobi": ours(jacobi_generate, block_size=block_size, init="prompt"),
        "jacobi_ngram": ours(jacobi_generate, block_size=block_size, init="ngram"),
        "hf_prompt_lookup": hf(prompt_lookup_num_tokens=lookup_tokens),
    }


def strip_after_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


def evaluate_model(
    loaded: LoadedModel,
    prompts: list,
    answers: list | None = None,
    *,
    label: str | None = None,
    methods: tuple[str, ...] = METHODS,
    block_size: int = 16,
    max_new_tokens: int = 256,
    lookup_tokens: int = 10,
    chat: bool = False,
    accuracy_fn: Callable[[list[str], list], float] | None = None,
) -> list[MethodResult]:
    """Decode every prompt with every method; return one result per method.

    Each prompt gets `max_new_tokens` or what is left of the model's context, whichever is less; a
    prompt that fills the context is not decoded and is counted in `too_long` (and fails the run
    when no prompt fits).
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown evaluation methods {sorted(unknown)}: choose from {METHODS}")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    methods = tuple(dict.fromkeys((BASELINE, *methods)))  # exactness is judged against greedy AR
    tokenizer = loaded.tokenizer
    run = decoders(loaded, block_size=block_size, lookup_tokens=lookup_tokens)
    results = {m: MethodResult(model=label or loaded.name, method=m) for m in methods}
    texts: dict[str, list[str]] = {m: [] for m in methods}
    histograms = {m: Counter() for m in methods}
    encoded = [
        tokenizer(format_prompt(tokenizer, p, chat=chat), return_tensors="pt")["input_ids"].to(loaded.device)
        for p in prompts
    ]
    context = context_length(loaded.model)
    fitting = [ids for ids in encoded if context is None or ids.shape[1] < context]
    too_long = len(encoded) - len(fitting)
    if not fitting:
        raise ValueError(f"every prompt fills the model's context of {context} tokens: nothing to evaluate")
    encoded = fitting
    budgets = [response_budget(max_new_tokens, context, [ids.shape[1]]) for ids in encoded]
    for method in methods:  # warm-up: first calls pay for allocation and lazy initialisation
        run[method](encoded[0], budgets[0])
    for ids, budget in zip(encoded, budgets, strict=True):
        reference = None
        for method in methods:
            with count_forwards(loaded.model) as calls:
                start = time.perf_counter()
                tokens, histogram = run[method](ids, budget)
                seconds = time.perf_counter() - start
            tokens = strip_after_eos(tokens, tokenizer.eos_token_id)
            reference = tokens if method == BASELINE else reference
            result = results[method]
            result.prompts += 1
            result.new_tokens += len(tokens)
            result.decode_tokens += max(len(tokens) - 1, 0)
            result.decode_forwards += max(calls[0] - 1, 0)
            result.seconds += seconds
            result.exact += tokens == reference
            histograms[method].update(histogram or {})
            texts[method].append(tokenizer.decode(tokens, skip_special_tokens=True))
    baseline_tps = results[BASELINE].tokens_per_second
    ar_tps = results["ar"].tokens_per_second if "ar" in results else 0.0
    for method, result in results.items():
        result.too_long = too_long
        result.speedup = result.tokens_per_second / baseline_tps if baseline_tps else None
        result.speedup_vs_ar = result.tokens_per_second / ar_tps if ar_tps else None
        result.commit_histogram = dict(sorted(histograms[method].items()))
        if answers is not None and accuracy_fn is not None:
            result.accuracy = accuracy_fn(texts[method], answers)
    return list(results.values())


# ----- the report -----


def markdown_table(results: list[MethodResult]) -> str:
    lines = [
        "| model | method | TPF | tokens/s | speedup vs HF greedy | speedup vs AR loop | accuracy | equals greedy AR |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def ratio(value: float | None) -> str:
        return f"{value:.2f}x" if value is not None else "n/a"

    for r in results:
        accuracy = f"{100 * r.accuracy:.1f}%" if r.accuracy is not None else "n/a"
        lines.append(
            f"| {r.model} | {r.method} | {r.tokens_per_forward:.2f} | {r.tokens_per_second:.1f} | {ratio(r.speedup)} | "
            f"{ratio(r.speedup_vs_ar)} | {accuracy} | {r.exact}/{r.prompts} |"
        )
    return "\n".join(lines)


def plot_report(results: list[MethodResult], directory: Path) -> list[Path]:
    """Bar charts of TPF and speedup per model x method, and the histogram of tokens fixed per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in results))
    methods = list(dict.fromkeys(r.method for r in results))
    by_key = {(r.model, r.method): r for r in results}
    paths = []
    for name, value, ylabel in (
        ("tpf.png", lambda r: r.tokens_per_forward, "tokens per forward"),
        ("speedup.png", lambda r: r.speedup or 0.0, "speedup vs HF greedy"),
    ):
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(models)
        for i, model in enumerate(models):
            xs = [j + i * width for j in range(len(methods))]
            ys = [value(by_key[(model, m)]) if (model, m) in by_key else 0 for m in methods]
            ax.bar(xs, ys, width=width, label=model)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(methods))], methods, rotation=15)
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        fig.savefig(directory / name)
        plt.close(fig)
        paths.append(directory / name)
    fig, ax = plt.subplots(figsize=(8, 4))
    for r in results:
        if r.commit_histogram and r.method.startswith("jacobi"):
            total = sum(r.commit_histogram.values())
            ks = sorted(r.commit_histogram)
            ax.plot(ks, [r.commit_histogram[k] / total for k in ks], marker="o", label=f"{r.model} {r.method}")
    ax.set_xlabel("tokens fixed by one forward pass")
    ax.set_ylabel("fraction of passes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "commit_histogram.png")
    plt.close(fig)
    paths.append(directory / "commit_histogram.png")
    return paths


def write_report(results: list[MethodResult], directory: str | Path, settings: dict | None = None) -> dict[str, Path]:
    """report.json (one entry per model x method), report.md (the table) and the plots."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    report = {"settings": settings or {}, "results": [r.to_dict() for r in results]}
    (directory / "report.json").write_text(json.dumps(report, indent=2))
    notes = "".join(f"\n{r.model}: {r.too_long} prompt(s) fill the model's context and were not decoded.\n"
                    for r in results if r.method == BASELINE and r.too_long)
    (directory / "report.md").write_text("# CLLM evaluation\n\n" + markdown_table(results) + "\n" + notes)
    paths = {"json": directory / "report.json", "markdown": directory / "report.md"}
    for path in plot_report(results, directory):
        paths[path.stem] = path
    return paths
