"""Side-by-side evaluation of decoding methods: speed (TPF, tokens/s, speedup), accuracy, exactness.

Every method decodes the same prompts, interleaved prompt by prompt (batch by batch with `batch_size`
above 1), so a change in machine load hits all methods alike. At batch size 1 forward passes are counted
by a hook on the model itself, the same way for `transformers`' own loops and for ours; a batch counts
each row's own passes. Nothing is dropped from the statistics: a prompt
that cannot be decoded (too long for the context, no tokens) is set aside and counted by reason, and
every number is computed over the prompts decoded, with that count in the report.

torch is imported by the functions that decode: `EvalOptions` is a section of the pipeline's config and of
`cllm bench`'s, read along with any command line, `--help` included.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, model_validator

from cllm.decoding.core import DecodeFields, left_pad, response_budget, special_tokens
from cllm.decoding.modes import AR, JACOBI, MODES, MULTIBLOCK
from cllm.models.loading import LoadedModel, context_length, format_prompt, load_model
from cllm.tasks import EMPTY_PROMPT, PROMPT_TOO_LONG, Metric, Task, choose_metric, describe_set_aside, score

if TYPE_CHECKING:
    import torch

METHODS = ("hf_greedy", AR.name, JACOBI.name, "jacobi_ngram", "hf_prompt_lookup", MULTIBLOCK.name)  # modes by name
DEFAULT_METHODS = METHODS  # what a run compares unless told (the teacher: EvalOptions.teacher_methods)
BASELINE = "hf_greedy"
LOOKUP = "hf_prompt_lookup"
Method = Literal[METHODS]


class EvalOptions(BaseModel):
    """Which held-out prompts and which methods; shared by `cllm bench` and the pipeline's `eval` section."""

    split: str = Field("test", description="the dataset split whose prompts are evaluated")
    limit: int = Field(100, ge=1, description="the first N records of the split")
    methods: list[Method] = Field(
        default_factory=lambda: list(DEFAULT_METHODS), min_length=1,
        description="the decoding methods compared (repeat the option for several)")
    # The other baselines say nothing new on the teacher and cost a third of a first run's evaluation.
    teacher_methods: list[Method] = Field(
        default_factory=lambda: [AR.name, JACOBI.name], min_length=1,
        description="the pipeline's methods for the teacher: its accuracy and plain Jacobi's speed before training")
    metric: Metric = Field(
        "auto", description="numeric (GSM8K's final number), exact (the trimmed text), none, or auto (from the "
                            "answers)")
    batch_size: int = Field(
        1, ge=1, description="prompts decoded together (left-padded): above 1, tokens/s is the batch's throughput and "
                             "tokens per pass each row's; speed figures are quoted at 1")

    @model_validator(mode="after")
    def _batchable(self) -> EvalOptions:
        check_batchable([*self.methods, *self.teacher_methods], self.batch_size)
        return self


def check_batchable(methods: Sequence[str], batch_size: int) -> None:
    if batch_size > 1 and LOOKUP in methods:
        raise ValueError(f"{LOOKUP} decodes one prompt at a time (transformers' assisted generation): "
                         "leave it out of the methods or use batch_size 1")


@dataclass
class MethodResult:
    model: str
    method: str
    prompts: int = 0
    new_tokens: int = 0
    decode_tokens: int = 0  # tokens after the first of each prompt (the first comes from prefill)
    decode_forwards: int = 0  # forward passes after prefill
    set_aside: dict[str, int] = field(default_factory=dict)  # prompts not decoded, by reason
    seconds: float = 0.0
    exact: int = 0  # prompts whose output equals greedy AR token for token
    metric: str = "none"  # how `accuracy` was scored
    scored: int = 0  # decoded prompts with a reference answer: the accuracy's denominator
    correct: int = 0
    accuracy: float | None = None  # correct / scored; None when nothing was scored
    speedup: float | None = None  # tokens/s relative to hf_greedy on the same model
    speedup_vs_ar: float | None = None  # tokens/s relative to the project's AR loop (when "ar" ran)
    commit_histogram: dict[int, int] = field(default_factory=dict)
    # Against the reference model's greedy outputs (`compare_to_reference`); None without a reference.
    same_answer: int | None = None  # prompts whose final answer equals the reference's
    same_output: int | None = None  # prompts whose whole output equals the reference's, token for token
    reference_perplexity: float | None = None  # the reference's perplexity of this method's outputs
    perplexity_ratio: float | None = None  # that over the reference's perplexity of its own greedy outputs
    outputs: list[list[int]] = field(default_factory=list, repr=False)  # new tokens per decoded prompt

    @property
    def tokens_per_forward(self) -> float:
        return self.decode_tokens / self.decode_forwards if self.decode_forwards else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["outputs"]
        out["tokens_per_forward"] = round(self.tokens_per_forward, 4)
        out["tokens_per_second"] = round(self.tokens_per_second, 2)
        out["exact_fraction"] = self.exact / self.prompts if self.prompts else None
        return out


class Progress:
    """Prompts done out of the total, with a rate and the time left, on stderr: at a real model's size every method
    takes minutes, and a silent terminal looks like a hang. At most one line every `every` seconds, and the last."""

    def __init__(self, label: str, total: int, every: float = 10.0):
        self.label, self.total, self.every = label, total, every
        self.started = self.shown = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if done < self.total and now - self.shown < self.every:
            return
        self.shown = now
        rate = done / (now - self.started) if now > self.started else 0.0
        left = f", {math.ceil((self.total - done) / rate)} s left" if rate and done < self.total else ""
        print(f"{self.label}: {done}/{self.total} prompts ({rate:.2f} prompts/s{left})", file=sys.stderr, flush=True)


@contextmanager
def count_forwards(model):
    """Count calls of the model's forward (one per pass, whoever drives the loop)."""
    calls = [0]
    handle = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


@dataclass
class Decoded:
    """One method's decode of a batch: new tokens per row (up to the first EOS), passes after prefill per row."""

    tokens: list[list[int]]
    passes: list[int]
    histogram: dict[int, int] | None


def decoders(loaded: LoadedModel, *, decode: DecodeFields, lookup_tokens: int) -> dict[str, Callable]:
    """Each method as `fn(input_ids, attention_mask, max_new_tokens) -> Decoded`, on a left-padded batch.

    Every decoding mode of `cllm.decoding.modes` by its name, with the configured settings (multi-block: its measured
    defaults, rejection recycling off); "jacobi_ngram" is Jacobi with the n-gram pool's guesses. One prompt's
    passes are the model's forward calls after prefill, whoever drives the loop (`transformers`' assisted generation
    fixes several tokens per call too); a batch's are each row's: our loops count them, and `transformers`' greedy
    loop fixes one token per pass.
    """
    model = loaded.model
    special = special_tokens(loaded.tokenizer, model.generation_config)
    common = dict(eos_token_id=list(special.eos_ids) or None, pad_token_id=special.pad_id)

    def rows(sequences, prompt_width: int) -> list[list[int]]:
        return [strip_after_eos(row, special.eos_ids) for row in sequences[:, prompt_width:].tolist()]

    def hf(**extra):
        def run(ids, mask, budget):
            with count_forwards(model) as calls:
                out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=budget, **common,
                                     **extra)
            tokens = rows(out, ids.shape[1])
            passes = [calls[0] - 1] if len(tokens) == 1 else [max(len(t) - 1, 0) for t in tokens]
            return Decoded(tokens, passes, None)
        return run

    def ours(mode, settings: DecodeFields):
        def run(ids, mask, budget):
            with count_forwards(model) as calls:
                out = mode.generate(model, ids, attention_mask=mask, max_new_tokens=budget, **common,
                                    **mode.options(settings))
            passes = [calls[0] - 1] if ids.shape[0] == 1 else list(out.row_forward_passes)
            return Decoded(rows(out.sequences, ids.shape[1]), passes, out.commit_histogram)
        return run

    return {
        "hf_greedy": hf(),
        **{name: ours(mode, decode) for name, mode in MODES.items()},
        "jacobi_ngram": ours(JACOBI, decode.model_copy(update={"init": "ngram"})),
        LOOKUP: hf(prompt_lookup_num_tokens=lookup_tokens),
    }


def strip_after_eos(tokens: list[int], eos_ids: Sequence[int]) -> list[int]:
    ends = [i for i, token in enumerate(tokens) if token in eos_ids]
    return tokens[: ends[0] + 1] if ends else tokens


def evaluate_model(
    loaded: LoadedModel,
    prompts: list,
    answers: list | None = None,
    *,
    label: str | None = None,
    methods: tuple[str, ...] = METHODS,
    decode: DecodeFields | None = None,
    lookup_tokens: int = 10,
    chat: bool = False,
    metric: str = "auto",
    batch_size: int = 1,
) -> list[MethodResult]:
    """Decode every prompt with every method; return one result per method.

    Each prompt gets `max_new_tokens` or what is left of the model's context, whichever is less (a batch: what its
    longest prompt leaves); a prompt that fills the context (or has no tokens) is not decoded and is counted in
    `set_aside` (and fails the run when no prompt is left). Accuracy compares each decoded prompt's output with
    its own answer, by `metric` (resolved by `choose_metric` when "auto"); prompts without an answer
    are not scored.
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown evaluation methods {sorted(unknown)}: choose from {METHODS}")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    if answers is not None and len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
    check_batchable(methods, batch_size)
    metric = choose_metric(metric, answers)[0] if answers is not None else "none"
    methods = tuple(dict.fromkeys((BASELINE, *methods)))  # exactness is judged against greedy AR
    decode = decode or DecodeFields()
    tokenizer = loaded.tokenizer
    run = decoders(loaded, decode=decode, lookup_tokens=lookup_tokens)
    pad_id = special_tokens(tokenizer, loaded.model.generation_config).pad_id
    results = {m: MethodResult(model=label or loaded.name, method=m, metric=metric) for m in methods}
    texts: dict[str, list[str]] = {m: [] for m in methods}
    histograms = {m: Counter() for m in methods}
    context = context_length(loaded.model)
    decoded, encoded, set_aside = prepare_prompts(tokenizer, prompts, chat=chat, context=context)
    if not encoded:
        raise ValueError(f"no prompt can be decoded: {describe_set_aside(set_aside)} "
                         f"(the model's context is {context} tokens): nothing to evaluate")
    batches = [[ids[0].tolist() for ids in encoded[i : i + batch_size]] for i in range(0, len(encoded), batch_size)]
    # Warm-up: first calls pay for allocation and lazy initialisation. One block's worth covers prefill, a
    # Jacobi pass and a roll-back; a whole extra decode per method costs minutes at real size on a CPU.
    first, first_mask = left_pad(batches[0][:1], pad_id, loaded.device)
    for method in methods:
        run[method](first, first_mask, min(response_budget(decode.max_new_tokens, context, [first.shape[1]]),
                                           decode.block_size))
    progress = Progress(f"evaluate {label or loaded.name}", len(encoded))
    done = 0
    for batch in batches:
        ids, mask = left_pad(batch, pad_id, loaded.device)
        budget = response_budget(decode.max_new_tokens, context, [len(row) for row in batch])
        reference = None
        for method in methods:
            start = time.perf_counter()
            out = run[method](ids, mask, budget)
            seconds = time.perf_counter() - start
            reference = out.tokens if method == BASELINE else reference
            result = results[method]
            result.prompts += len(batch)
            result.new_tokens += sum(len(tokens) for tokens in out.tokens)
            result.decode_tokens += sum(max(len(tokens) - 1, 0) for tokens in out.tokens)
            result.decode_forwards += sum(out.passes)
            result.seconds += seconds
            result.exact += sum(a == b for a, b in zip(out.tokens, reference, strict=True))
            histograms[method].update(out.histogram or {})
            result.outputs += out.tokens
            texts[method] += tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        done += len(batch)
        progress.update(done)
    references = [answers[i] for i in decoded] if answers is not None else [None] * len(decoded)
    baseline_tps = results[BASELINE].tokens_per_second
    ar_tps = results[AR.name].tokens_per_second if AR.name in results else 0.0
    for method, result in results.items():
        result.set_aside = set_aside
        result.speedup = result.tokens_per_second / baseline_tps if baseline_tps else None
        result.speedup_vs_ar = result.tokens_per_second / ar_tps if ar_tps else None
        result.commit_histogram = dict(sorted(histograms[method].items()))
        result.correct, result.scored = score(metric, texts[method], references)
        result.accuracy = result.correct / result.scored if result.scored else None
    return list(results.values())


def prepare_prompts(
    tokenizer, prompts: list, *, chat: bool, context: int | None
) -> tuple[list[int], list[torch.Tensor], dict[str, int]]:
    """The indices and input ids (on CPU) of the prompts that can be decoded, and how many were set aside, by reason.

    The pipeline runs this before collection too, so an evaluation split with nothing to decode fails
    before any training.
    """
    decoded, encoded, set_aside = [], [], Counter()
    for index, prompt in enumerate(prompts):
        ids = tokenizer(format_prompt(tokenizer, prompt, chat=chat), return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            set_aside[EMPTY_PROMPT] += 1
        elif context is not None and ids.shape[1] >= context:
            set_aside[PROMPT_TOO_LONG] += 1
        else:
            decoded.append(index)
            encoded.append(ids)
    return decoded, encoded, dict(set_aside)


def evaluate_models(
    models: dict[str, str],
    task: Task,
    *,
    methods: Sequence[str] = METHODS,
    decode: DecodeFields | None = None,
    chat: bool = False,
    device: str | None = None,
    metric: str = "auto",
    methods_of: dict[str, Sequence[str]] | None = None,
    reference: str | None = None,
    batch_size: int = 1,
) -> list[MethodResult]:
    """Every method on every model ({label: model directory or hub name}), on the same prompts, in one run.

    `methods_of` gives some labels their own methods. `metric` is resolved once for the task
    (`Task.metric`), so every model is scored the same way. With `reference` (a label), every other model's
    outputs are also compared with the reference model's greedy ones (`compare_to_reference`).
    """
    metric = task.metric(metric)[0]
    results = []
    for label, path in models.items():
        loaded = load_model(path, device=device)
        results += evaluate_model(
            loaded, task.prompts, task.answers, label=label, methods=tuple((methods_of or {}).get(label, methods)),
            decode=decode, chat=chat, metric=metric, batch_size=batch_size,
        )
    if reference is not None and len(models) > 1:
        compare_to_reference(results, reference, load_model(models[reference], device=device), task.prompts, chat=chat)
    return results


def perplexity(model, prompts: Sequence[torch.Tensor], outputs: Sequence[list[int]]) -> float | None:
    """exp of the mean negative log-likelihood the model gives each prompt's output tokens, after its prompt."""
    import torch

    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for ids, tokens in zip(prompts, outputs, strict=True):
        if not tokens:
            continue
        target = torch.tensor(tokens, device=device)
        with torch.no_grad():
            logits = model(torch.cat([ids[0].to(device), target])[None]).logits[0, ids.shape[1] - 1 : -1]
        nll += torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum").item()
        count += len(tokens)
    return math.exp(nll / count) if count else None


def compare_to_reference(results: list[MethodResult], reference: str, loaded: LoadedModel, prompts: list, *,
                         chat: bool) -> None:
    """How far each model's outputs moved from the reference model's greedy outputs (a teacher's, before training):
    prompts with the same final answer, with the same whole output, and the reference's perplexity of them, a
    judge-free measure of drift (the reference row holds its perplexity of its own outputs, the ratio's base)."""
    from cllm.tasks.scoring import extract_answer

    base = next((r for r in results if r.model == reference and r.method == BASELINE), None)
    if base is None:
        raise ValueError(f"reference {reference!r} is not one of the evaluated models")
    tokenizer = loaded.tokenizer
    _, encoded, _ = prepare_prompts(tokenizer, prompts, chat=chat, context=context_length(loaded.model))
    answers = [extract_answer(tokenizer.decode(tokens, skip_special_tokens=True)) for tokens in base.outputs]
    own = perplexity(loaded.model, encoded, base.outputs)
    for result in results:
        if len(result.outputs) != len(base.outputs):
            continue  # decoded other prompts (another tokenizer or context): nothing to pair
        texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in result.outputs]
        result.same_output = sum(a == b for a, b in zip(result.outputs, base.outputs, strict=True))
        result.same_answer = sum(extract_answer(t) == a for t, a in zip(texts, answers, strict=True))
        if result.method == BASELINE:
            result.reference_perplexity = own if result is base else perplexity(loaded.model, encoded, result.outputs)
            result.perplexity_ratio = result.reference_perplexity / own if own else None


# ----- the report -----


def markdown_table(results: list[MethodResult]) -> str:
    lines = [
        "| model | method | TPF | tokens/s | speedup vs HF greedy | speedup vs AR loop | accuracy | equals greedy AR |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def ratio(value: float | None) -> str:
        return f"{value:.2f}x" if value is not None else "n/a"

    for r in results:
        accuracy = f"{100 * r.accuracy:.1f}% ({r.correct}/{r.scored})" if r.accuracy is not None else "n/a"
        lines.append(
            f"| {r.model} | {r.method} | {r.tokens_per_forward:.2f} | {r.tokens_per_second:.1f} | {ratio(r.speedup)} | "
            f"{ratio(r.speedup_vs_ar)} | {accuracy} | {r.exact}/{r.prompts} |"
        )
    return "\n".join(lines)


def evaluation_stages(results: list[MethodResult], task: Task | None = None) -> list[dict]:
    """One row per evaluated model: rows of the split, set aside (when read or when decoded), decoded, scored."""
    read_aside = task.set_aside_counts if task is not None else {}
    stages = []
    for r in results:
        if r.method != BASELINE:
            continue
        set_aside = {**read_aside, **r.set_aside}
        stages.append({
            "stage": f"evaluate {r.model}", "split": task.split if task is not None else None,
            "rows": r.prompts + sum(set_aside.values()), "set_aside": set_aside, "decoded": r.prompts,
            "scored": r.scored if r.metric != "none" else None, "metric": r.metric,
        })
    return stages


def data_summary(task: Task, metric: str, reason: str) -> dict:
    """What the report says about the data: where it came from, how it was read and split, how it is scored."""
    return {"dataset": task.name, "record_formats": task.formats, "eval_split": f"{task.split}: {task.source}",
            "metric": metric, "metric_reason": reason}


def stages_table(stages: list[dict]) -> str:
    lines = ["| stage | split | rows | set aside | decoded | scored |", "| --- | --- | ---: | --- | ---: | ---: |"]
    for stage in stages:
        scored = "n/a" if stage.get("scored") is None else f"{stage['scored']} ({stage.get('metric')})"
        lines.append(f"| {stage['stage']} | {stage.get('split') or ''} | {stage['rows']} | "
                     f"{describe_set_aside(stage['set_aside'])} | {stage['decoded']} | {scored} |")
    return "\n".join(lines)


def data_lines(data: dict) -> str:
    def text(value) -> str:
        return ", ".join(f"{v} {k}" for k, v in value.items()) if isinstance(value, dict) else str(value)

    return "\n".join(f"- {key.replace('_', ' ')}: {text(value)}" for key, value in data.items())


def markdown_report(results: list[MethodResult], data: dict, stages: list[dict]) -> str:
    metrics = sorted({r.metric for r in results})
    parts = ["# CLLM evaluation"]
    if data:
        parts.append("## Data\n\n" + data_lines(data))
    parts.append("## Prompts per stage\n\n" + stages_table(stages)
                 + "\n\nRows set aside are not decoded; every number below is over the prompts decoded.")
    parts.append(
        "## Results\n\n" + markdown_table(results)
        + f"\n\nAccuracy ({', '.join(metrics)}) is over the decoded prompts that have a reference answer, "
        "the count in brackets; n/a when nothing is scored. \"equals greedy AR\" counts the decoded prompts "
        "whose output is token for token hf_greedy's."
    )
    if any(r.same_output is not None for r in results):
        parts.append("## Against the reference model\n\n" + reference_table(results))
    return "\n\n".join(parts) + "\n"


def reference_table(results: list[MethodResult]) -> str:
    """Each model's greedy outputs against the reference model's: answers, whole outputs, the reference's perplexity."""
    rows = [r for r in results if r.method == BASELINE and r.same_output is not None]
    lines = ["| model | same final answer | same whole output | reference perplexity | vs its own outputs |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ppl = f"{r.reference_perplexity:.3f}" if r.reference_perplexity is not None else "n/a"
        ratio = f"{r.perplexity_ratio:.3f}x" if r.perplexity_ratio is not None else "n/a"
        lines.append(f"| {r.model} | {r.same_answer}/{r.prompts} | {r.same_output}/{r.prompts} | {ppl} | {ratio} |")
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
        if r.commit_histogram and r.method.startswith((JACOBI.name, MULTIBLOCK.name)):
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


def write_report(
    results: list[MethodResult],
    directory: str | Path,
    settings: dict | None = None,
    *,
    data: dict | None = None,
    stages: list[dict] | None = None,
) -> dict[str, Path]:
    """report.json (data, prompts per stage, one entry per model x method), report.md (the same as tables), plots.

    Without `stages`, the evaluation's own rows are reported (`evaluation_stages`).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stages = evaluation_stages(results) if stages is None else stages
    report = {"settings": settings or {}, "data": data or {}, "stages": stages,
              "results": [r.to_dict() for r in results]}
    (directory / "report.json").write_text(json.dumps(report, indent=2))
    (directory / "report.md").write_text(markdown_report(results, data or {}, stages))
    paths = {"json": directory / "report.json", "markdown": directory / "report.md"}
    for path in plot_report(results, directory):
        paths[path.stem] = path
    return paths
