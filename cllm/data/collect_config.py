"""The settings of a collection run (`cllm.data.collect`), apart from the Ray Data job that uses them.

`pipelines/collect.py` and the pipeline read them with a command line, `--help` and mistakes included,
which must not cost the job's imports (Ray, torch, transformers): this module imports none of them.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from cllm.config import StageConfig, fill_unset
from cllm.decoding.core import DecodeFields
from cllm.models.loading import BUILTIN_MODEL, recipe_kind
from cllm.tasks import DataFields

# Collection defaults per kind of model. The built-in teacher's CLLM trained on trajectories sampled at
# temperature 0.7 decodes with more tokens per pass, greedy decoding included (docs/results.md, "Consistency-
# training recipe"); real models keep the paper's greedy trajectories.
COLLECT_RECIPES = {"builtin": {"temperature": 0.7}, "model": {"temperature": 0.0}}


class CollectOptions(BaseModel):
    """How much to collect, how to clean it, how many replicas; shared with the pipeline's `collect` section."""

    split: str = Field("train", description="the dataset split whose prompts are decoded")
    limit: int | None = Field(1500, ge=1, description="the first N records of the split; None: all")
    batch_size: int = Field(16, ge=1, description="prompts decoded together by one actor")
    dtype: str | None = Field(
        None, description="float32, bfloat16 or float16; None: bfloat16 on GPUs that support it, float32 elsewhere")
    max_token_run: int = Field(
        10, ge=0, description="drop blocks with a run of this many identical tokens; 0: keep all")
    repeat_ngram: int = Field(
        0, ge=0, description="drop blocks that repeat an earlier n-gram of this length; 0: off")
    augment_prob: float = Field(
        0.0, ge=0, le=1, description="chance to correct each later wrong token of a recorded state")
    temperature: float | None = Field(
        None, ge=0, description="0: greedy; > 0: sampled, seeded per prompt; None: the recipe's (sampled for the "
                                "built-in teacher, greedy for other models)")
    top_k: int = Field(0, ge=0, description="sample from the k likeliest tokens only; 0: no limit")
    top_p: float = Field(
        1.0, gt=0, le=1, description="sample from the fewest likeliest tokens holding this probability; 1: no limit")
    actors: int = Field(2, ge=1, description="model replicas decoding in parallel")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs each actor reserves (and its torch threads)")
    num_gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs each actor reserves; None: 1 when the cluster has GPUs, else 0")


class CollectConfig(StageConfig, DataFields, DecodeFields, CollectOptions):
    """One collection run: the options plus which teacher, which data, and where the rows go."""

    model: str = Field(
        BUILTIN_MODEL,
        description="the teacher: a Hugging Face directory or hub name, a GGUF file, or builtin (the project's own)")
    seed: int = Field(0, description="seeds the built-in task's problems and the initial guesses")
    output: str = Field(description="directory of Parquet files, one row per block; a rerun resumes it")
    ray_address: str | None = Field(
        None, description="the Ray cluster to use; None: RAY_ADDRESS, a running cluster, or a new local one")

    @model_validator(mode="after")
    def fill_recipe(self) -> CollectConfig:
        fill_unset(self, COLLECT_RECIPES[recipe_kind(self.model)])
        return self
