"""The built-in teacher: a small Llama trained from scratch on the built-in arithmetic task, on CPU.

`ensure_builtin_teacher()` returns a standard Hugging Face model directory (config, safetensors
weights, generation config, tokenizer files), training it the first time:

1. generate the training problems (`cllm.tasks.arith`) and train a tokenizer on them;
2. save a randomly initialised Llama next to the tokenizer;
3. write the problems as AR records (prompt_ids, target_ids + EOS) to Parquet;
4. train with the project's trainer (`cllm.train.run_training`, objective "ar");
5. score greedy decoding on held-out problems and record the result in `teacher.json`;
6. move the directory into the cache in one rename, so readers never see half a model.

The cache key is a hash of the recipe, so a changed recipe trains a new teacher instead of reusing
a stale one. A file lock makes concurrent callers wait for one training run.

The package ships the default recipe's teacher (`cllm/assets/builtin-teacher`, 7 MB, with its recipe,
accuracy and weights checksum in `teacher.json`), standing in for the pretrained model a real user
downloads: a first run starts from it instead of training for 20 minutes. `python -m cllm.models.teacher
--retrain` trains the recipe again and says whether the weights came out identical; `--ship` puts a
trained teacher in the package.

torch, transformers and Ray are imported by the steps that train and score, not by this module: `TeacherConfig`
is a section of the pipeline's config, read along with any command line, `--help` included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock
from pydantic import Field

from cllm.config import ArgumentParser, StageConfig, load_config
from cllm.decoding.core import response_budget
from cllm.errors import run_main
from cllm.models.loading import (
    BUILTIN_MODEL,
    CACHE_ENV,
    TEACHER_METADATA,
    default_cache_dir,
    encode_prompts,
    is_builtin_teacher,
    load_model,
)
from cllm.tasks import accuracy, arith

log = logging.getLogger(__name__)

METADATA_FILE = TEACHER_METADATA
RECIPE_VERSION = 4  # bump when the task, the tokenizer or the training code changes the weights
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a tokenizer's chat template
MAX_ANSWER_TOKENS = 160  # built-in answers are at most about 100 tokens
SHIPPED_DIR = Path(__file__).parents[1] / "assets" / "builtin-teacher"
WEIGHTS_FILE = "model.safetensors"


class TeacherConfig(StageConfig):
    """The recipe. Defaults: 90% held-out accuracy after 1,200 steps (11 to 42 minutes on 2 CPU cores, measured)."""

    seed: int = Field(0, description="seeds the problems, the initial weights and the training order")
    n_problems: int = Field(
        38400, ge=1, description="training problems; an epoch is n_problems / (batch_size x num_workers) steps")
    tokenizer_problems: int = Field(5000, ge=1, description="problems the tokenizer is trained on")
    vocab_size: int = Field(512, ge=64, description="the tokenizer's vocabulary size")
    hidden_size: int = Field(192, ge=8, description="the model's width")
    num_layers: int = Field(4, ge=1, description="transformer layers")
    num_heads: int = Field(4, ge=1, description="attention heads per layer")
    intermediate_size: int = Field(512, ge=8, description="the width of each layer's MLP")
    max_position_embeddings: int = Field(256, ge=64, description="the model's context, in tokens")
    lr: float = Field(2e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="share of the steps spent warming the learning rate up")
    batch_size: int = Field(32, ge=1, description="problems per optimizer step, per worker")
    # One worker reading the one records file in order makes the run repeat exactly: with two, Ray Data
    # splits the blocks by timing, so the same recipe trains a different teacher on a busy machine.
    num_workers: int = Field(1, ge=1, description="Ray Train workers; 1 makes a run repeat exactly")
    threads: int = Field(
        2, ge=1, description="torch threads of each worker (fixed: the thread count can change sums)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; None: one epoch over n_problems")
    # The teacher's records are one file written in a fixed order, so the plain feed already repeats; the
    # hash-ordered feed (cllm/train/feed.py) trains a far weaker teacher on them (docs/results.md: "The
    # teacher depends on data order").
    ordered_feed: bool = Field(
        False, description="feed the records in cllm.train.feed's hashed order instead of file order")
    eval_problems: int = Field(200, ge=1, description="held-out problems scored after training")
    eval_batch_size: int = Field(100, ge=1, description="problems decoded together when scoring")

    def cache_key(self) -> str:
        """Names the cached teacher: everything that changes the weights (not the eval settings)."""
        recipe = self.model_dump(exclude={"eval_problems", "eval_batch_size"}) | {"version": RECIPE_VERSION}
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
        return f"builtin-teacher-{digest}"


def weights_digest(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / WEIGHTS_FILE).read_bytes()).hexdigest()


def shipped_teacher(config: TeacherConfig, shipped: Path = SHIPPED_DIR) -> Path | None:
    """The packaged teacher if it was trained with exactly this recipe and its weights are intact."""
    if not is_complete(shipped):
        return None
    metadata = json.loads((shipped / METADATA_FILE).read_text())
    if metadata.get("cache_key") != config.cache_key():
        return None
    if metadata.get("weights_sha256") != weights_digest(shipped):  # e.g. a Git LFS pointer, a bad copy
        log.warning("the packaged teacher in %s fails its checksum: training one instead", shipped)
        return None
    return shipped


def ensure_builtin_teacher(
    cache_dir: str | Path | None = None, config: TeacherConfig | None = None, retrain: bool = False
) -> Path:
    """The teacher directory for `config` (default recipe): packaged, cached, or trained here once.

    `retrain` skips the packaged and cached copies and trains the recipe into the cache again.
    """
    config = config or TeacherConfig()
    if not retrain and (shipped := shipped_teacher(config)) is not None:
        return shipped
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir = cache_dir.resolve()  # Ray's workers run in another directory
    target = cache_dir / config.cache_key()
    if retrain:
        shutil.rmtree(target, ignore_errors=True)
    if is_complete(target) and has_chat_template(target):
        return target  # cached and current: no lock, so a read-only cache works
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_complete(target):  # cached before the chat template existed, or trained while we waited
            add_chat_template(target)
            return target
        log.warning("training the built-in teacher into %s (once; 1,200 steps, 10-45 minutes on 2 CPU cores)", target)
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".training-") as work:
            model_dir = train_teacher(config, Path(work))
            shutil.rmtree(target, ignore_errors=True)  # a leftover without teacher.json
            os.replace(model_dir, target)
    return target


def resolve_model(name_or_path: str, config: TeacherConfig | None = None) -> str:
    """`builtin` -> the built-in teacher's directory (trained on first use); a GGUF file or a short name such as
    `smollm2` -> its plain directory (`cllm.models.gguf`, converted on first use); any other reference as it is.

    Only entry points and the pipeline's teacher stage call this: loading a model never trains or converts one.
    """
    if name_or_path == BUILTIN_MODEL:
        return str(ensure_builtin_teacher(config=config))
    from cllm.models.gguf import resolve_reference

    return resolve_reference(name_or_path) or name_or_path


def is_complete(path: Path) -> bool:
    return is_builtin_teacher(path)


def train_teacher(config: TeacherConfig, work: Path) -> Path:
    """Steps 1-5 of the module docstring, inside `work`; returns the finished model directory."""
    started = time.perf_counter()
    problems = arith.generate(config.n_problems, "train", config.seed)
    tokenizer = build_tokenizer(problems, config, work / "init")
    model = init_model(config, tokenizer)
    model.save_pretrained(work / "init")
    data = write_ar_records(problems, tokenizer, work / "train.parquet")
    result = run_ar_training(config, work / "init", data, work)
    train_seconds = time.perf_counter() - started
    test = arith.generate(config.eval_problems, "test", config.seed)
    score = evaluate(result, test, config.eval_batch_size)
    metadata = {
        "recipe": config.model_dump(),
        "cache_key": config.cache_key(),
        "weights_sha256": weights_digest(result),
        "heldout_accuracy": score,
        "heldout_problems": len(test),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - started - train_seconds, 1),
        "parameters": model.num_parameters(),
    }
    (result / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
    log.warning("built-in teacher: held-out accuracy %.3f after %.0f s of training", score, train_seconds)
    return result


def build_tokenizer(problems: list[arith.Problem], config: TeacherConfig, directory: Path):
    from cllm.models.tokenizer import train_tokenizer

    texts = (p.prompt + p.answer for p in problems[: config.tokenizer_problems])
    tokenizer = train_tokenizer(
        texts, directory, vocab_size=config.vocab_size, model_max_length=config.max_position_embeddings
    )
    tokenizer.chat_template = arith.CHAT_TEMPLATE  # chat clients get the task's own prompt format
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def has_chat_template(model_dir: Path) -> bool:
    return (model_dir / CHAT_TEMPLATE_FILE).is_file()


def add_chat_template(model_dir: Path) -> None:
    """Give a teacher cached before the chat template existed one (the weights do not change)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = arith.CHAT_TEMPLATE
        tokenizer.save_pretrained(str(model_dir))


def init_model(config: TeacherConfig, tokenizer):
    """A randomly initialised Llama (seeded) whose generation config stops at EOS."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def write_ar_records(problems: list[arith.Problem], tokenizer, path: Path) -> Path:
    """AR records: the prompt (with <s>) and the worked answer followed by EOS."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompt_ids = tokenizer([p.prompt for p in problems])["input_ids"]
    answer_ids = tokenizer([p.answer for p in problems], add_special_tokens=False)["input_ids"]
    target_ids = [ids + [tokenizer.eos_token_id] for ids in answer_ids]
    pq.write_table(pa.table({"prompt_ids": prompt_ids, "target_ids": target_ids}), path)
    return path


def run_ar_training(config: TeacherConfig, init_dir: Path, data: Path, work: Path) -> Path:
    """Next-token training with the project's trainer (no consistency term) on a local Ray."""
    import ray

    from cllm.train.config import TrainConfig
    from cllm.train.driver import run_training

    train_config = TrainConfig(
        model=str(init_dir),
        data=str(data),
        output_dir=str(work / "model"),
        storage_path=str(work / "ray_train"),
        run_name="builtin-teacher",
        objective="ar",
        num_workers=config.num_workers,
        # one worker takes a whole CPU; several take half each: Ray Data's read needs a CPU left over
        cpus_per_worker=1 if config.num_workers == 1 else 0.5,
        threads_per_worker=config.threads,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio,
        max_steps=config.max_steps,
        epochs=1,
        checkpoint_every=10**6,  # only the final checkpoint: a retry retrains (minutes)
        log_every=100,
        seed=config.seed,
        ordered_feed=config.ordered_feed,
    )
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        return Path(run_training(train_config).model_dir)
    finally:
        if started_ray:
            ray.shutdown()
        shutil.rmtree(work / "ray_train", ignore_errors=True)


def generate_answers(model_dir: Path, prompts: list[str], batch_size: int) -> list[str]:
    """Greedy decoding of left-padded batches; returns the decoded continuations."""
    import torch

    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    tokenizer, texts = loaded.tokenizer, []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask = encode_prompts(tokenizer, prompts[start : start + batch_size])
        with torch.no_grad():
            output = loaded.model.generate(
                input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                max_new_tokens=response_budget(MAX_ANSWER_TOKENS, loaded.context_length, [input_ids.shape[1]]),
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts += tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    return texts


def evaluate(model_dir: Path, problems: list[arith.Problem], batch_size: int) -> float:
    """Exact-answer accuracy of greedy decoding on `problems`."""
    predictions = generate_answers(model_dir, [p.prompt for p in problems], batch_size)
    return accuracy(predictions, [p.answer for p in problems])


def ship(model_dir: Path, shipped: Path = SHIPPED_DIR) -> Path:
    """Copy a trained teacher into the package (what `--ship` does before a release)."""
    if not is_complete(model_dir):
        raise ValueError(f"{model_dir} is not a trained built-in teacher (no {METADATA_FILE})")
    shutil.rmtree(shipped, ignore_errors=True)
    shutil.copytree(model_dir, shipped)
    return shipped


def main(argv: list[str]) -> None:
    """`python -m cllm.models.teacher [--cache-dir DIR] [--retrain] [--ship] [--config FILE] [--hidden-size N ...]`."""
    parser = ArgumentParser(add_help=False)
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help=f"where teachers are cached (default: ${CACHE_ENV}, else ~/.cache/cllm)")
    parser.add_argument("--retrain", action="store_true", help="train the recipe again, ignoring every copy")
    parser.add_argument("--ship", action="store_true", help="copy the result into the package")
    known, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO)
    config = load_config(TeacherConfig, rest, parents=[parser])
    path = ensure_builtin_teacher(known.cache_dir, config, retrain=known.retrain)
    print(path)
    print((path / METADATA_FILE).read_text())
    packaged = shipped_teacher(config)
    if known.retrain and packaged is not None:
        same = weights_digest(path) == weights_digest(packaged)
        print(f"weights {'identical to' if same else 'differ from'} the packaged teacher's")
    if known.ship:
        print(f"shipped into {ship(path)}")


if __name__ == "__main__":
    run_main(main)
