"""A real-size dry run on CPU: every stage of the pipeline on a model with the shapes of Qwen2.5-0.5B.

Nothing is downloaded. The model is Qwen2.5-0.5B's architecture written out by hand (494M parameters,
151,936-row tied embedding), randomly initialised and saved as a standard Hugging Face directory with a
byte-level BPE tokenizer trained here on the built-in task's text. The tokenizer's vocabulary is padded
with unreachable filler tokens to Qwen's 151,643 regular ids, then Qwen's three ChatML specials, so
tokenizer and model agree as they do in Qwen: 151,646 ids the tokenizer knows, 151,936 embedding rows.

Then the project's own stage code runs on it, cut to a few prompts:

    collect   plan_collection + decode_batch in-process (what a TrajectoryDecoder actor runs) -> Parquet
    train     run_training on a local Ray: 1 worker, LoRA rank 8, gradient checkpointing, batch 1, 3 steps
    evaluate  evaluate_model: HF greedy vs the AR loop vs Jacobi, exactness against greedy
    serve     the Serve app on the trained model, two HTTP requests checked against greedy decoding

and one table reports each stage's wall time, step times and peak resident memory (this process, and the
largest of its child processes: Ray workers and replicas). `--stages logits` adds a probe of what the
losses cost at full vocabulary: `cllm_loss` forward + backward through the real-size tied embedding and
LM head alone, against the number of logit positions the loss actually reads. `--size tiny` runs the same
code on a 2-layer, 64-wide model of the same family and vocabulary (what tests/test_realsize.py builds).

    python scripts/realsize_dry_run.py --output-dir /tmp/cllm-realsize
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast, Qwen2Config

# Qwen2.5-0.5B's shapes, from its published config.json.
REAL_SHAPES = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    max_position_embeddings=32768,
)
TINY_SHAPES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, max_position_embeddings=32768)
MODEL_VOCAB = 151936  # embedding rows (Qwen pads its 151,665 ids to a multiple of 128)
REGULAR_IDS = 151643  # Qwen's byte-level BPE ids; the specials follow
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 151643, 151644, 151645, as in Qwen
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINED_VOCAB = 4000  # BPE ids learned from local text; the rest of the 151,643 are fillers


# ----- the model directory -----


def qwen_config(size: str = "real") -> Qwen2Config:
    """Qwen2.5-0.5B's architecture (or the same family at a tiny width): tied embeddings, rope theta 1e6."""
    shapes = REAL_SHAPES if size == "real" else TINY_SHAPES
    return Qwen2Config(
        vocab_size=MODEL_VOCAB,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        bos_token_id=REGULAR_IDS,
        eos_token_id=REGULAR_IDS + 2,
        **shapes,
    )


def corpus(problems: int = 2000) -> list[str]:
    """Local text to train the tokenizer on: the built-in task's problems and worked answers."""
    from cllm.tasks import arith

    return [f"{p.prompt} {p.answer}" for p in arith.generate(problems, "train", seed=0)]


def byte_level_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE like Qwen's, trained on `texts`, its vocabulary padded to Qwen's id layout.

    The fillers (`<x123>`) have no merge that produces them, so no text ever encodes to one; they only
    give the ids a random model may emit a printable meaning.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TRAINED_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    fillers = (f"<x{i}>" for i in range(REGULAR_IDS))
    for token in fillers:
        if len(vocab) == REGULAR_IDS:
            break
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer.from_str(json.dumps(spec))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                        model_max_length=REAL_SHAPES["max_position_embeddings"])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def build_model_dir(directory: Path, size: str = "real", seed: int = 0) -> int:
    """Random init at the given size, saved in bf16 (as Qwen ships it) with the tokenizer and a generation
    config that stops on <|im_end|> and <|endoftext|>. Returns the parameter count."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(qwen_config(size), dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(
        eos_token_id=[REGULAR_IDS + 2, REGULAR_IDS], pad_token_id=REGULAR_IDS, bos_token_id=REGULAR_IDS
    )
    model.save_pretrained(directory)
    byte_level_tokenizer(corpus()).save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


# ----- measuring -----


def rss_bytes(process) -> int:
    try:
        return process.memory_info().rss
    except Exception:  # the process ended between listing and reading
        return 0


@dataclass
class StageFigures:
    name: str
    seconds: float = 0.0
    driver_peak: int = 0  # bytes, this process
    child_peak: int = 0  # bytes, the largest single child process (Ray worker, replica)
    step_seconds: list[float] = field(default_factory=list)
    note: str = ""
    load: float = 0.0  # the machine's 1-minute load average at the end: other work shares the cores
    cpu_seconds: float = 0.0  # CPU time this process spent: what the work costs, whatever the load


class PeakMemory:
    """Samples resident memory every 0.2 s: this process, and its largest descendant (psutil if installed;
    else the kernel's high-water marks, which never go down and so only bound a stage from above)."""

    def __init__(self):
        try:
            import psutil

            self.me = psutil.Process()
        except ImportError:
            self.me = None
        self.driver = self.child = 0
        self.stopped = threading.Event()

    def sample(self) -> None:
        self.driver = max(self.driver, rss_bytes(self.me))
        children = self.me.children(recursive=True)
        self.child = max([self.child] + [rss_bytes(p) for p in children])

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            self.sample()

    @contextmanager
    def watch(self):
        if self.me is None:
            yield self
            self.driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
            return
        self.sample()
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.stopped.set()
            thread.join()
            self.sample()


@contextmanager
def stage(name: str, table: list[StageFigures]):
    figures = StageFigures(name)
    started, cpu_started = time.perf_counter(), time.process_time()
    with PeakMemory().watch() as memory:
        yield figures
    figures.seconds, figures.cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    figures.driver_peak, figures.child_peak = memory.driver, memory.child
    figures.load = os.getloadavg()[0]
    table.append(figures)
    print(f"[{name}] {figures.seconds:.1f} s, peak RSS {memory.driver / 2**30:.2f} GiB here, "
          f"{memory.child / 2**30:.2f} GiB largest child, {figures.note}", flush=True)


def figures_table(table: list[StageFigures]) -> str:
    def gib(n: int) -> str:
        return f"{n / 2**30:.2f}" if n else "-"

    lines = ["| stage | seconds | CPU seconds (driver) | step seconds | peak RSS driver (GiB) | "
             "peak RSS largest child (GiB) | load | notes |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for f in table:
        steps = ", ".join(f"{s:.2f}" for s in f.step_seconds) or "-"
        memory = f"{gib(f.driver_peak)} | {gib(f.child_peak)}"
        lines.append(f"| {f.name} | {f.seconds:.1f} | {f.cpu_seconds:.0f} | {steps} | {memory} | {f.load:.0f} | "
                     f"{f.note} |")
    return "\n".join(lines)


# ----- the stages -----


def collect(model_dir: Path, out: Path, args, figures: StageFigures) -> Path:
    """The collection stage's own planning and decode code, in-process (one actor's work, no Ray Data)."""
    import pyarrow.parquet as pq

    from cllm.data.collect import CollectConfig, plan_collection
    from cllm.data.trajectories import decode_batch, records_to_table
    from cllm.models.loading import load_model

    config = CollectConfig(model=str(model_dir), output=str(out), limit=args.prompts, batch_size=args.prompts,
                           block_size=args.block_size, max_new_tokens=args.max_new_tokens,
                           max_token_run=0)  # a random model repeats tokens: keep every block
    plan = plan_collection(config)
    model = load_model(plan.model_path, device="cpu", dtype="float32").model
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for batch in plan.batches:
        records, stats = decode_batch(model, batch, plan.settings)
        figures.step_seconds.append(stats.seconds)
        rows += records
        figures.note = (f"{stats.prompts} prompts, {stats.generated_tokens} tokens, {stats.forward_passes} passes, "
                        f"{len(rows)} blocks")
    pq.write_table(records_to_table(rows), out / "part-0.parquet")
    return out


class StepClock:
    """The training worker's step callback: when each optimizer step ended, the worker's CPU time so far, and
    its RSS high-water mark."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, step: int, rank: int) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), "cpu": time.process_time(), "maxrss": peak}) + "\n")


def train(model_dir: Path, data: Path, out: Path, args, figures: StageFigures) -> Path:
    from cllm.train.config import TrainConfig
    from cllm.train.driver import run_training

    clock = out / "steps.jsonl"
    clock.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(
        model=str(model_dir), data=str(data), output_dir=str(out / "model"), storage_path=str(out / "ray_train"),
        run_name=f"realsize-{int(time.time())}", num_workers=1, cpus_per_worker=1, threads_per_worker=args.threads,
        lora_rank=8, gradient_checkpointing=True, batch_size=1, max_steps=args.train_steps, checkpoint_every=10**6,
        shuffle_buffer=0, log_every=1,
    )
    started = time.time()
    result = run_training(config, step_callback=StepClock(str(clock)))
    steps = [json.loads(line) for line in clock.read_text().splitlines()]
    times = [started] + [s["time"] for s in steps]
    figures.step_seconds = [b - a for a, b in zip(times, times[1:], strict=False)]
    cpu = [s["cpu"] for s in steps]
    cpu_steps = ", ".join(f"{b - a:.1f}" for a, b in zip(cpu, cpu[1:], strict=False))
    figures.note = (f"{len(steps)} steps (the first includes Ray Train start-up and loading), loss "
                    f"{result.metrics.get('loss', float('nan')):.3f}, worker maxrss at last step "
                    f"{steps[-1]['maxrss'] / 2**30:.2f} GiB, worker CPU seconds of steps 2..: {cpu_steps or '-'}")
    return result.model_dir


def evaluate(model_dir: Path, args, figures: StageFigures) -> list[int]:
    from cllm.decoding.core import DecodeFields
    from cllm.evaluate import evaluate_model
    from cllm.models.loading import load_model
    from cllm.tasks import load_task

    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    task = load_task("builtin:arith", "test", args.prompts, 0)
    decode = DecodeFields(block_size=args.block_size, max_new_tokens=args.max_new_tokens)
    methods = tuple(args.eval_methods.split(","))
    results = evaluate_model(loaded, task.prompts, task.answers, methods=methods, decode=decode)
    figures.note = "; ".join(f"{r.method}: {r.exact}/{r.prompts} exact, TPF {r.tokens_per_forward:.2f}, "
                             f"{r.tokens_per_second:.1f} tok/s" for r in results)
    figures.step_seconds = [r.seconds for r in results]
    return [r.exact == r.prompts for r in results]


def greedy_text(model_dir: Path, prompt: str, max_tokens: int) -> str:
    from cllm.models.loading import encode_prompts, load_model

    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    ids, mask = encode_prompts(loaded.tokenizer, [prompt])
    out = loaded.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_tokens)
    return loaded.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def serve_requests(model_dir: Path, args, figures: StageFigures) -> bool:
    """Deploy the app on the running local Ray, send a completion and a chat request, check the first."""
    import requests
    from ray import serve

    from cllm.serving.api import build_app
    from cllm.tasks import load_task

    sock_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": sock_port})
    try:
        started = time.perf_counter()
        app = build_app({"model": str(model_dir), "model_name": "realsize", "block_size": args.block_size,
                         "num_cpus": 1, "max_new_tokens": args.max_new_tokens, "device": "cpu", "dtype": "float32"})
        serve.run(app, name="cllm", route_prefix="/")
        figures.step_seconds.append(time.perf_counter() - started)
        url = f"http://127.0.0.1:{sock_port}/v1"
        prompt = load_task("builtin:arith", "test", 1, 0).prompts[0]
        tokens = min(16, args.max_new_tokens)
        replies = []
        for path, body in (("/completions", {"prompt": prompt}),
                           ("/chat/completions", {"messages": [{"role": "user", "content": prompt}]})):
            started = time.perf_counter()
            reply = requests.post(url + path, json={"model": "realsize", "max_tokens": tokens, **body}, timeout=600)
            figures.step_seconds.append(time.perf_counter() - started)
            reply.raise_for_status()
            replies.append(reply.json())
    finally:
        serve.shutdown()
    text = replies[0]["choices"][0]["text"]
    same = text == greedy_text(model_dir, prompt, tokens)
    stats = replies[0].get("jacobi_stats", {})
    figures.note = (f"2 requests x {tokens} tokens (deploy, completion, chat); completion equals greedy generate: "
                    f"{same}; jacobi_stats {stats}")
    return same


class HeadOnly(torch.nn.Module):
    """The real-size model's tied embedding and LM head with nothing between: what the losses do with the
    logits, at full vocabulary, without paying for the 24 layers."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.embed = torch.nn.Embedding(MODEL_VOCAB, REAL_SHAPES["hidden_size"], dtype=dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, **_):
        hidden = self.embed(input_ids)
        # transformers' convention: an int keeps the last n positions (0: all), a tensor the listed ones
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return SimpleNamespace(logits=hidden[:, kept] @ self.embed.weight.T)


def probe_records(batch: int, prefix: int, block: int, seed: int = 0) -> list[dict]:
    """Trajectory records of a long response: a prompt of prefix - 4 blocks, four earlier fixed points."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(TRAINED_VOCAB) for _ in range(n)]

    fixed = tokens(block)
    return [{"prompt_id": i, "block_idx": 4, "prompt_len": prefix - 4 * block, "prefix_ids": tokens(prefix),
             "states": [tokens(block) for _ in range(3)], "fixed_point": fixed, "labels": None}
            for i in range(batch)]


def logits_probe(args, figures: StageFigures) -> None:
    """Peak memory of `cllm_loss` forward + backward on full-vocabulary logits, fp32 and bf16, against how
    many logit positions the loss reads (the rest are computed, kept for backward, and thrown away)."""
    from cllm.train.batches import collate_consistency
    from cllm.train.losses import cllm_loss

    records = probe_records(args.probe_batch, args.probe_prefix, args.block_size)
    batch = collate_consistency(records, rng=random.Random(0), pad_token_id=REGULAR_IDS, eos_token_ids=[])
    rows, length = batch["input_ids"].shape
    labelled = torch.nn.functional.pad(batch["ar_labels"][:, 1:] != -100, (0, 1))  # logit t predicts token t+1
    read = int((batch["loss_mask"] | labelled).sum(dim=1).max())
    notes = []
    for dtype in (torch.float32, torch.bfloat16):
        head = HeadOnly(dtype)
        gc.collect()
        with PeakMemory().watch() as memory:
            base = rss_bytes(memory.me) if memory.me else 0
            started = time.perf_counter()
            cllm_loss(head, batch, ar_weight=10.0).total.backward()
            figures.step_seconds.append(time.perf_counter() - started)
        weights = sum(p.numel() * p.element_size() * 2 for p in head.parameters())  # weights + their grad
        logits = rows * length * MODEL_VOCAB * dtype.itemsize
        notes.append(f"{str(dtype)[6:]}: +{(memory.driver - base - weights) / 2**30:.2f} GiB over weights "
                     f"(one logits tensor: {logits / 2**30:.2f} GiB)")
        del head
    figures.note = (f"batch {rows} x {length} positions, the loss reads {read} of them per row; "
                    + "; ".join(notes))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/cllm-realsize"))
    parser.add_argument("--size", choices=("real", "tiny"), default="real")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--eval-methods", default="ar,jacobi", help="besides hf_greedy, the exactness reference")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, here and in the training worker")
    parser.add_argument("--probe-batch", type=int, default=2, help="logits probe: rows per batch")
    parser.add_argument("--probe-prefix", type=int, default=480, help="logits probe: prompt + earlier blocks")
    parser.add_argument("--stages", default="build,collect,train,evaluate,serve",
                        help="comma-separated subset, plus `logits` (the losses' memory at full vocabulary); "
                             "later stages reuse the directories of earlier runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    stages = set(args.stages.split(","))
    out = args.output_dir
    model_dir, data, trained = out / "base", out / "trajectories", out / "train" / "model"
    table: list[StageFigures] = []
    if "build" in stages:
        with stage("build", table) as figures:
            params = build_model_dir(model_dir, args.size)
            figures.note = f"{params / 1e6:.1f}M parameters, vocab {MODEL_VOCAB}, bf16 on disk"
        gc.collect()
    if "collect" in stages:
        with stage("collect", table) as figures:
            collect(model_dir, data, args, figures)
        gc.collect()
    if stages & {"train", "serve"}:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    if "train" in stages:
        with stage("train", table) as figures:
            train(model_dir, data, out / "train", args, figures)
    if "evaluate" in stages:
        with stage("evaluate", table) as figures:
            evaluate(trained if trained.is_dir() else model_dir, args, figures)
        gc.collect()
    if "serve" in stages:
        with stage("serve", table) as figures:
            serve_requests(trained if trained.is_dir() else model_dir, args, figures)
    if "logits" in stages:
        with stage("logits", table) as figures:
            logits_probe(args, figures)
    print(figures_table(table))


if __name__ == "__main__":
    main()
