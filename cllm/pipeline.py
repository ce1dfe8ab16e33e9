"""The whole pipeline: teacher -> collect (Ray Data) -> train (Ray Train) -> evaluate -> serve (Ray Serve).

One `PipelineConfig` covers every stage; each stage's own config is built from it at start, so a bad
key fails before any work. Each finished stage leaves a marker in `<output_dir>/stages/`, and a rerun
with the same output directory skips it.

Prompts a stage cannot use (unreadable records, prompts longer than the model's context) are set aside
and counted, never fatal to a later stage: the report lists them per stage, and evaluation scores
only the prompts it decoded, each against its own answer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

from pydantic import Field, model_validator

from cllm.config import StageConfig
from cllm.data.collect_config import CollectConfig, CollectOptions
from cllm.decoding.core import DecodeFields
from cllm.errors import DataError
from cllm.evaluate import EvalOptions
from cllm.models.loading import BUILTIN_MODEL, check_model_path
from cllm.models.teacher import TeacherConfig
from cllm.serving.config import ServeConfig, ServeOptions
from cllm.tasks import DataFields, Task, describe_set_aside
from cllm.tasks.splits import prompt_key
from cllm.train.config import TrainConfig, TrainOptions


class PipelineConfig(StageConfig, DataFields, DecodeFields):
    """Model, data, decoding, and each stage's own options; with no arguments, the embedded default.

    The sections are the stage configs' own option classes, so a default is written once, in the stage.
    """

    model: str = Field(
        BUILTIN_MODEL,
        description="the teacher: a Hugging Face directory or hub name, a GGUF file, or builtin (the project's own)")
    output_dir: str = Field(
        "outputs/default", description="where every stage writes; a rerun skips the stages finished there")
    use_gpu: bool = Field(False, description="collect, train, evaluate and serve on GPUs")
    serve: bool = Field(False, description="deploy the CLLM on Ray Serve at the end and keep serving")
    seed: int = Field(0, description="seeds the built-in task, the initial guesses and training")
    teacher: TeacherConfig = Field(
        default_factory=TeacherConfig, description="the built-in teacher's recipe (used with --model builtin only)")
    collect: CollectOptions = Field(default_factory=CollectOptions, description="stage 2: collecting trajectories")
    train: TrainOptions = Field(default_factory=TrainOptions, description="stage 3: consistency training")
    eval: EvalOptions = Field(
        default_factory=EvalOptions, description="stage 4: the teacher and the CLLM on held-out prompts")
    serve_options: ServeOptions = Field(default_factory=ServeOptions, description="serving, with --serve")

    @model_validator(mode="after")
    def exported_model_loads(self) -> PipelineConfig:
        if self.train.lora_rank and not self.train.merge_lora:
            raise ValueError("train.merge_lora must stay on in the pipeline: its evaluate and serve stages load the "
                             "exported model as a plain Hugging Face directory (train an unmerged adapter with "
                             "pipelines/train.py)")
        return self

    @property
    def out(self) -> Path:
        return Path(self.output_dir).resolve()

    def shared(self, *bases) -> dict:
        """The top-level fields a stage config inherits from `bases` (data, decoding)."""
        return {key: getattr(self, key) for base in bases for key in base.model_fields}


# ----- stage configs, built at start so a bad value fails before any work -----


def collect_config(config: PipelineConfig, teacher: str) -> CollectConfig:
    options = config.collect.model_dump()
    if options["num_gpus_per_actor"] is None:
        options["num_gpus_per_actor"] = float(config.use_gpu)
    return CollectConfig(model=teacher, output=str(config.out / "trajectories"), seed=config.seed,
                         **config.shared(DataFields, DecodeFields), **options)


def train_config(config: PipelineConfig, teacher: str) -> TrainConfig:
    return TrainConfig(
        model=teacher, data=str(config.out / "trajectories"), output_dir=str(config.out / "cllm"),
        storage_path=str(config.out / "ray_train"), run_name="cllm", objective="consistency",
        recipe="builtin" if config.model == BUILTIN_MODEL else "model", use_gpu=config.use_gpu,
        seed=config.seed, **config.train.model_dump(exclude_unset=True),
    )


def serve_config(config: PipelineConfig, cllm_dir: str) -> ServeConfig:
    options = config.serve_options.model_dump()
    if options["num_gpus"] is None:
        options["num_gpus"] = 1.0 if config.use_gpu else 0.0
    return ServeConfig(model=cllm_dir, seed=config.seed, ray_address="auto", **config.shared(DecodeFields),
                       **options)


# ----- running -----


def banner(text: str) -> None:
    print(f"\n{'=' * 72}\n== {text}\n{'=' * 72}", flush=True)


class StageLog:
    """Markers of finished stages and their wall times."""

    def __init__(self, out: Path):
        self.directory = out / "stages"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}

    def done(self, stage: str) -> dict | None:
        path = self.directory / f"{stage}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finish(self, stage: str, started: float, **info) -> None:
        self.seconds[stage] = round(time.perf_counter() - started, 1)
        info["seconds"] = self.seconds[stage]
        (self.directory / f"{stage}.json").write_text(json.dumps(info, indent=2))


def run_stage(log: StageLog, stage: str, title: str, fn):
    """Run `fn` unless a previous run finished this stage; return its recorded info."""
    previous = log.done(stage)
    if previous is not None:
        banner(f"{title}: done in an earlier run ({previous.get('seconds', '?')} s), skipped")
        log.seconds[stage] = 0.0
        return previous
    banner(title)
    started = time.perf_counter()
    info = fn() or {}
    log.finish(stage, started, **info)
    print(f"-- {title} finished in {log.seconds[stage]:.1f} s", flush=True)
    return log.done(stage)


def run_pipeline(config: PipelineConfig) -> dict:
    """Every stage in order; returns the evaluation report (also written under output_dir/report)."""
    collect_task, eval_task = load_data(config)
    warn_shared_prompts(collect_task, eval_task)
    check_model_path(config.model)  # bad data or a missing model fails before Ray (or torch) is imported
    import ray

    if not ray.is_initialized():
        ray.init()  # no address: joins the cluster a job was submitted to, else starts a local one
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.yaml").write_text(config.to_yaml())
    log = StageLog(out)
    started = time.perf_counter()

    def teacher_stage():
        from cllm.models.teacher import resolve_model

        return {"model": resolve_model(config.model, config.teacher)}  # builtin, a GGUF file or a short name

    teacher = run_stage(log, "teacher", "1/4 teacher", teacher_stage)["model"]
    collect_cfg, train_cfg = collect_config(config, teacher), train_config(config, teacher)
    if log.done("evaluate") is None:
        check_eval_prompts(config, teacher, eval_task)
    if config.serve:
        serve_config(config, str(config.out / "cllm"))  # a bad serving option fails now, not after training

    def collect_stage():
        from cllm.data.collect import run_collection

        result = run_collection(collect_cfg)
        return {"output": collect_cfg.output, **summary(result), "set_aside": result.dropped_prompts,
                "dropped_blocks": result.dropped_blocks}

    def train_stage():
        from cllm.train.driver import run_training

        result = run_training(train_cfg)
        return {"model_dir": str(result.model_dir), "metrics": result.metrics}

    collected = run_stage(log, "collect", "2/4 collect trajectories (Ray Data)", collect_stage)
    cllm_dir = run_stage(log, "train", "3/4 consistency training (Ray Train)", train_stage)["model_dir"]
    report = run_stage(log, "evaluate", "4/4 evaluate teacher vs CLLM",
                       lambda: evaluate_stage(config, teacher, cllm_dir, collected, (collect_task, eval_task)))
    print((out / "report" / "report.md").read_text())
    times = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in log.seconds.items())
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s ({times})", flush=True)
    if config.serve:
        from cllm.serving.api import serve_until_stopped

        serve_until_stopped(serve_config(config, cllm_dir))
    return report


def summary(result) -> dict:
    """The JSON-friendly scalars of a stage result."""
    values = result.__dict__ if hasattr(result, "__dict__") else dict(result)
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool)) or v is None}


# ----- data: loaded and checked at start, described in the report -----


def load_data(config: PipelineConfig) -> tuple[Task, Task]:
    """The collection and evaluation splits, read at start so a bad data setting fails before any work."""
    collect = config.load_split(config.collect.split, config.collect.limit, config.seed)
    evaluation = config.load_split(config.eval.split, config.eval.limit, config.seed)
    evaluation.metric(config.eval.metric)  # an explicit metric on a dataset without answers fails now
    return collect, evaluation


def shared_prompts(collect: Task, evaluation: Task) -> int:
    """Evaluation prompts that collection also reads: more than 0 when train and test overlap."""
    collected = {prompt_key(prompt) for prompt in collect.prompts}
    return sum(prompt_key(prompt) in collected for prompt in evaluation.prompts)


def warn_shared_prompts(collect: Task, evaluation: Task) -> None:
    shared = shared_prompts(collect, evaluation)
    if shared:
        print(f"warning: {shared} of the {len(evaluation)} evaluation prompts are also in the collection split "
              f"({collect.source}); set --test-fraction to hold prompts out of training", flush=True)


def check_eval_prompts(config: PipelineConfig, teacher: str, evaluation: Task) -> None:
    """Fail before collection, not after training, when no evaluation prompt fits the teacher's context."""
    from cllm.evaluate import prepare_prompts
    from cllm.models.loading import causal_lm_config, context_length, load_tokenizer

    context = context_length(SimpleNamespace(config=causal_lm_config(teacher)))
    decoded, _, set_aside = prepare_prompts(load_tokenizer(teacher), evaluation.prompts, chat=config.chat,
                                            context=context)
    if not decoded:
        raise DataError(f"no prompt of the evaluation split {config.eval.split!r} can be decoded: "
                         f"{describe_set_aside(set_aside)} (the teacher's context is {context} tokens)")


def collect_row(config: PipelineConfig, collected: dict) -> dict:
    """The collection stage's line of the report, from its marker."""
    set_aside = collected.get("set_aside", {})
    planned = collected.get("prompts", 0)
    return {"stage": "collect", "split": config.collect.split, "rows": planned + sum(set_aside.values()),
            "set_aside": set_aside, "decoded": planned, "scored": None}


def training_data(collected: dict) -> str:
    dropped = collected.get("dropped_blocks") or {}
    cleaned = f"; blocks dropped by cleaning: {describe_blocks(dropped)}" if dropped else ""
    return (f"{collected.get('rows_total', '?')} trajectory rows of {collected.get('prompts', '?')} collected "
            f"prompts (training sets no prompt aside){cleaned}")


def describe_blocks(dropped: dict) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in dropped.items())


def evaluate_stage(config: PipelineConfig, teacher: str, cllm_dir: str, collected: dict | None = None,
                   tasks: tuple[Task, Task] | None = None) -> dict:
    from cllm.evaluate import data_summary, evaluate_models, evaluation_stages, markdown_table, write_report

    collect_task, task = tasks or load_data(config)  # the splits run_pipeline already read, when it passes them
    metric, reason = task.metric(config.eval.metric)
    results = evaluate_models({"teacher": teacher, "cllm": cllm_dir}, task, methods=config.eval.methods,
                              decode=config, chat=config.chat, device="cuda" if config.use_gpu else "cpu",
                              metric=metric, methods_of={"teacher": config.eval.teacher_methods}, reference="teacher",
                              batch_size=config.eval.batch_size)
    print(markdown_table(results))
    settings = {"model": config.model, "teacher": teacher, "cllm": cllm_dir, "dataset": config.dataset,
                "block_size": config.block_size, "max_new_tokens": config.max_new_tokens,
                "prompts": len(task), "split": config.eval.split, "metric": metric,
                "test_fraction": config.test_fraction, "split_seed": config.split_seed}
    data = {**data_summary(task, metric, reason), "collect_split": f"{config.collect.split}: {collect_task.source}",
            "eval_prompts_also_collected": shared_prompts(collect_task, task)}
    stages = evaluation_stages(results, task)
    if collected:
        data["training_data"] = training_data(collected)
        stages = [collect_row(config, collected), *stages]
    paths = write_report(results, config.out / "report", settings=settings, data=data, stages=stages)
    return {"report": str(paths["json"])}
