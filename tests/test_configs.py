"""Every example config the docs name ships in configs/, loads, and builds the stage configs it feeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cllm.cli import BenchConfig
from cllm.config import load_config
from cllm.data.collect_config import CollectConfig, CollectOptions
from cllm.decoding.core import DecodeFields
from cllm.decoding.guesses import GUESS_STRATEGIES
from cllm.evaluate import DEFAULT_METHODS, METHODS, EvalOptions
from cllm.pipeline import PipelineConfig, collect_config, serve_config, train_config
from cllm.serving.config import ServeConfig, ServeOptions, serve_file_values
from cllm.train.config import TrainConfig, TrainOptions

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_pipeline(path: Path) -> PipelineConfig:
    config = load_config(PipelineConfig, ["--config", str(path)])
    collect_config(config, "teacher-dir"), train_config(config, "teacher-dir"), serve_config(config, "cllm-dir")
    return config


LOADERS = {
    "pipeline.yaml": load_pipeline,
    "qwen-gpu.yaml": load_pipeline,
    "smollm2-gsm8k.yaml": load_pipeline,
    "collect.yaml": lambda path: load_config(CollectConfig, ["--config", str(path)]),
    "train.yaml": lambda path: load_config(TrainConfig, ["--config", str(path)]),
    "bench.yaml": lambda path: load_config(BenchConfig, ["--config", str(path)]),
    "serve.yaml": lambda path: ServeConfig.model_validate(serve_file_values(path)),
}


def test_every_shipped_config_has_a_loader():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(LOADERS)


@pytest.mark.parametrize("name", sorted(LOADERS))
def test_config_loads(name):
    assert LOADERS[name](CONFIGS / name) is not None


def test_pipeline_yaml_lists_every_key_with_its_default():
    written = yaml.safe_load((CONFIGS / "pipeline.yaml").read_text())
    assert written == PipelineConfig().model_dump(mode="json")


def test_qwen_config_reaches_every_stage():
    config = load_pipeline(CONFIGS / "qwen-gpu.yaml")
    collect, train = collect_config(config, "teacher"), train_config(config, "teacher")
    serve = serve_config(config, "cllm")
    assert (collect.prompt_field, collect.chat, collect.num_gpus_per_actor) == ("question", True, 1.0)
    assert (train.strategy, train.bf16, train.lr, train.recipe) == ("deepspeed", True, 2e-5, "model")
    assert (serve.max_new_tokens, serve.num_gpus, serve.max_replicas) == (256, 1.0, 4)


def test_smollm2_recipe_trains_a_lora_adapter_on_the_progressive_objective():
    config = load_pipeline(CONFIGS / "smollm2-gsm8k.yaml")
    train = train_config(config, "teacher")
    assert (train.consistency, train.ar_source, train.lora_rank) == ("progressive", "teacher", 32)
    assert train.recipe == "model"
    assert (config.chat, config.prompt_field, collect_config(config, "teacher").temperature) == (True, "question", 0.0)


def test_the_pipeline_sections_are_the_stage_options():
    """One home per setting: the pipeline's sections are the stages' option classes, not copies."""
    fields = PipelineConfig.model_fields
    assert fields["collect"].annotation is CollectOptions and fields["train"].annotation is TrainOptions
    assert fields["eval"].annotation is EvalOptions and fields["serve_options"].annotation is ServeOptions
    for stage in (CollectConfig, ServeConfig, BenchConfig, PipelineConfig):
        assert issubclass(stage, DecodeFields)
    config = PipelineConfig()
    assert collect_config(config, "t").block_size == serve_config(config, "c").block_size == config.block_size
    assert serve_config(config.model_copy(update={"max_new_tokens": 77}), "c").max_new_tokens == 77


def test_allowed_values_come_from_the_code():
    with pytest.raises(ValueError, match="init"):
        DecodeFields(init="nope")
    for strategy in GUESS_STRATEGIES:
        assert DecodeFields(init=strategy).init == strategy
    assert EvalOptions().methods == list(DEFAULT_METHODS) and set(DEFAULT_METHODS) <= set(METHODS)
    for method in METHODS:  # every method the code has is accepted by name
        assert EvalOptions(methods=[method], teacher_methods=[method]).methods == [method]
    with pytest.raises(ValueError, match="methods"):
        EvalOptions(methods=["beam"])


def test_the_pipeline_refuses_an_unmerged_adapter_it_could_not_evaluate():
    with pytest.raises(ValueError, match="merge_lora"):
        load_config(PipelineConfig, ["--train.lora-rank", "8", "--no-train.merge-lora"])
    assert load_config(PipelineConfig, ["--train.lora-rank", "8"]).train.merge_lora


SERVE_YAML_CHOICES = {"model": "builtin"}  # what configs/serve.yaml sets on purpose; every other key is a default


def test_serve_yaml_spells_out_the_servers_defaults():
    """configs/serve.yaml names the server's settings with their values in the code: a default changed in the
    code fails here instead of leaving the file to disagree with it."""
    values = serve_file_values(CONFIGS / "serve.yaml")
    assert {key: values.get(key) for key in SERVE_YAML_CHOICES} == SERVE_YAML_CHOICES
    defaults = ServeConfig(model="unused").model_dump()
    differ = {key: (value, defaults[key]) for key, value in values.items()
              if key not in SERVE_YAML_CHOICES and value != defaults[key]}
    assert not differ, f"configs/serve.yaml (written, code default): {differ}"


@pytest.mark.parametrize("name", [name for name, loader in LOADERS.items()
                                  if loader is load_pipeline and name != "pipeline.yaml"])
def test_pipeline_configs_carry_only_the_serve_options_they_change(name):
    """pipeline.yaml lists every key at its default (checked above); the other pipeline configs name only
    the serving options they change, so no copy of a default can go stale."""
    written = yaml.safe_load((CONFIGS / name).read_text()).get("serve_options") or {}
    defaults = ServeOptions().model_dump()
    assert {key: value for key, value in written.items() if value == defaults[key]} == {}
