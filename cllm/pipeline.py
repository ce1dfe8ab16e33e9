"""The whole pipeline: teacher -> collect (Ray Data) -> train (Ray Train) -> evaluate -> serve (Ray Serve).

One `PipelineConfig` covers every stage; each stage's own config is built from it at start, so a bad
key fails before any work. Each finished stage leaves a marker in `<output_dir>/stages/`, and a rerun
with the same output directory skips it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cllm.config import StageConfig
from cllm.evaluate import METHODS
from cllm.models import BUILTIN_MODEL
from cllm.teacher import TeacherConfig

Method = Literal["hf_greedy", "ar", "jacobi", "jacobi_ngram", "hf_prompt_lookup"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CollectSection(Section):
    split: str = "train"
    limit: int | None = Field(1500, ge=1)  # prompts to collect trajectories for; None = all
    actors: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    num_gpus_per_actor: float | None = Field(None, ge=0)  # None: 1 when use_gpu


class TrainSection(Section):
    """lr and ar_weight left unset take the recipe of the model being trained (`RECIPES`)."""

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = Field(2, ge=0, le=3)
    bf16: bool | None = None  # None: on with GPUs
    batch_size: int = Field(16, ge=1)
    lr: float | None = Field(None, gt=0)
    epochs: int = Field(2, ge=1)
    max_steps: int | None = Field(None, ge=1)
    consistency: Literal["global", "local"] = "global"
    ar_weight: float | None = Field(None, ge=0)
    ar_source: Literal["teacher", "labels"] = "labels"  # ground truth where the dataset has it, else teacher
    ordered_feed: bool = True  # reproducible feed (cllm/feed.py); off streams records as the files hold them
    length_window: int = Field(0, ge=0)  # group batches by length within windows of this many; 0: off
    checkpoint_every: int = Field(100, ge=1)


class EvalSection(Section):
    split: str = "test"
    limit: int = Field(100, ge=1)
    methods: list[Method] = Field(default_factory=lambda: list(METHODS), min_length=1)


class ServeSection(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)


class PipelineConfig(StageConfig):
    """Model, data and the knobs of every stage; with no arguments, the embedded default on one machine."""

    model: str = BUILTIN_MODEL  # a Hugging Face name or directory; "builtin" = the project's own teacher
    dataset: str = "builtin:arith"  # builtin:arith, a .jsonl/.parquet file, or a Hugging Face dataset
    output_dir: str = "outputs/default"
    block_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    use_gpu: bool = False
    prompt_field: str = "prompt"  # dataset column holding the prompt (GSM8K on the hub: "question")
    answer_field: str = "answer"
    chat: bool = False  # apply the tokenizer's chat template to prompts
    serve: bool = False  # deploy the CLLM on Ray Serve at the end and keep serving
    seed: int = 0
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)  # recipe of the built-in teacher only
    collect: CollectSection = Field(default_factory=CollectSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    serve_options: ServeSection = Field(default_factory=ServeSection)

    @property
    def out(self) -> Path:
        return Path(self.output_dir).resolve()


# ----- stage configs, built at start so a bad value fails before any work -----


def collect_config(config: PipelineConfig, teacher: str):
    from cllm.collect import CollectConfig

    section = config.collect
    gpus = section.num_gpus_per_actor if section.num_gpus_per_actor is not None else float(config.use_gpu)
    return CollectConfig(
        model=teacher, dataset=config.dataset, split=section.split, output=str(config.out / "trajectories"),
        block_size=config.block_size, max_new_tokens=config.max_new_tokens, actors=section.actors,
        batch_size=section.batch_size, num_gpus_per_actor=gpus, limit=section.limit, chat=config.chat,
        seed=config.seed, prompt_field=config.prompt_field, answer_field=config.answer_field,
    )


# Consistency-training defaults per kind of model. The built-in 1.8M-parameter teacher needs a large
# lr, and at the paper's w = 10 it lost 8 points of accuracy (81% vs 89%, TPF 2.82); w = 20 over two
# epochs of 1500 prompts gave TPF 3.06 at 90% (measured, see README). Real models get the paper's.
RECIPES = {"builtin": {"lr": 1.5e-3, "ar_weight": 20.0}, "model": {"lr": 2e-5, "ar_weight": 10.0}}


def train_config(config: PipelineConfig, teacher: str):
    from cllm.train import TrainConfig

    section = config.train
    recipe = RECIPES["builtin" if config.model == BUILTIN_MODEL else "model"]
    values = section.model_dump(exclude={"bf16"})
    values.update({key: recipe[key] for key in recipe if values[key] is None})
    return TrainConfig(
        model=teacher, data=str(config.out / "trajectories"), output_dir=str(config.out / "cllm"),
        storage_path=str(config.out / "ray_train"), run_name="cllm", objective="consistency",
        use_gpu=config.use_gpu, bf16=config.use_gpu if section.bf16 is None else section.bf16,
        seed=config.seed, **values,
    )


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
    import ray

    if not ray.is_initialized():
        ray.init()  # no address: joins the cluster a job was submitted to, else starts a local one
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.yaml").write_text(config.to_yaml())
    log = StageLog(out)
    started = time.perf_counter()

    def teacher_stage():
        if config.model != BUILTIN_MODEL:
            return {"model": config.model}
        from cllm.teacher import ensure_builtin_teacher

        return {"model": str(ensure_builtin_teacher(config=config.teacher))}

    teacher = run_stage(log, "teacher", "1/4 teacher", teacher_stage)["model"]
    collect_cfg, train_cfg = collect_config(config, teacher), train_config(config, teacher)

    def collect_stage():
        from cllm.collect import run_collection

        result = run_collection(collect_cfg)
        return {"output": collect_cfg.output, **summary(result)}

    def train_stage():
        from cllm.train import run_training

        result = run_training(train_cfg)
        return {"model_dir": str(result.model_dir), "metrics": result.metrics}

    run_stage(log, "collect", "2/4 collect trajectories (Ray Data)", collect_stage)
    cllm_dir = run_stage(log, "train", "3/4 consistency training (Ray Train)", train_stage)["model_dir"]
    report = run_stage(log, "evaluate", "4/4 evaluate teacher vs CLLM",
                       lambda: evaluate_stage(config, teacher, cllm_dir))
    print((out / "report" / "report.md").read_text())
    times = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in log.seconds.items())
    print(f"pipeline finished in {time.perf_counter() - started:.0f} s ({times})", flush=True)
    if config.serve:
        serve_model(config, cllm_dir)
    return report


def summary(result) -> dict:
    """The JSON-friendly scalars of a stage result."""
    values = result.__dict__ if hasattr(result, "__dict__") else dict(result)
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool)) or v is None}


def evaluate_stage(config: PipelineConfig, teacher: str, cllm_dir: str) -> dict:
    from cllm.evaluate import evaluate_model, markdown_table, write_report
    from cllm.models import load_model
    from cllm.tasks import load_task

    task = load_task(config.dataset, split=config.eval.split, limit=config.eval.limit, seed=config.seed,
                     prompt_field=config.prompt_field, answer_field=config.answer_field)
    answers = task.answers if task.has_answers else None
    results = []
    for label, path in (("teacher", teacher), ("cllm", cllm_dir)):
        loaded = load_model(path, device="cuda" if config.use_gpu else "cpu")
        results += evaluate_model(
            loaded, task.prompts, answers, label=label, methods=tuple(config.eval.methods),
            block_size=config.block_size, max_new_tokens=config.max_new_tokens, chat=config.chat,
            accuracy_fn=(lambda texts, _refs: task.accuracy(texts)) if answers else None,
        )
    print(markdown_table(results))
    settings = {"model": config.model, "teacher": teacher, "cllm": cllm_dir, "dataset": config.dataset,
                "block_size": config.block_size, "max_new_tokens": config.max_new_tokens,
                "prompts": len(task), "split": config.eval.split}
    paths = write_report(results, config.out / "report", settings=settings)
    return {"report": str(paths["json"])}


def serve_model(config: PipelineConfig, cllm_dir: str) -> None:
    """Deploy the CLLM and serve until interrupted."""
    from ray import serve

    from cllm.serve import ServeConfig, build_app

    options = config.serve_options
    serve_config = ServeConfig(model=cllm_dir, block_size=config.block_size, host=options.host, port=options.port,
                               min_replicas=options.min_replicas, max_replicas=options.max_replicas,
                               num_gpus=1.0 if config.use_gpu else 0.0)
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(build_app(serve_config), name=serve_config.app_name, route_prefix=serve_config.route_prefix)
    banner(f"serving {cllm_dir} at http://{options.host}:{options.port}/v1 (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
