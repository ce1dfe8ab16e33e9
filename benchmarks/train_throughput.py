"""Consistency-training throughput per objective on the same records, side by side in one run.

    python benchmarks/train_throughput.py                      # random-init Llama of the built-in size
    python benchmarks/train_throughput.py --model builtin      # the built-in teacher (trained on first use)

Collects Jacobi trajectories in process (no Ray), then trains each objective for the same steps on the
same batches of blocks (file order: a prompt's blocks sit together, so the progressive objective packs
them) through the trainer's own `make_batch` and `compute_loss`, with AdamW steps. Prints per objective:
wall and process CPU seconds per step (CPU time is the steadier figure on a shared machine), the part of
the wall time spent collating, blocks/s, block tokens/s (fixed-point tokens trained on, wall clock),
forwards per step, packed rows per step and the sequence positions a step runs through the model.
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cllm.data.trajectories import DecodeSettings, decode_batch
from cllm.train.config import TrainConfig
from cllm.train.loop import compute_loss, make_batch

EOS, PAD = 2, 0
FORWARD_INPUTS = ("input_ids", "target_ids", "ar_input_ids")  # one model forward each, where present


def random_llama(context: int) -> LlamaForCausalLM:
    """The built-in teacher's shape (width 192, 4 layers, 4 heads, vocabulary 512), random weights."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=context,
                         bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    return LlamaForCausalLM(config).float().eval()


def random_prompts(n: int, rng: random.Random) -> list[dict]:
    """Prompts of 40-80 tokens with answers of 60-120 tokens (for ar_source labels)."""
    return [
        {"prompt_id": i, "input_ids": [1] + [rng.randrange(4, 512) for _ in range(rng.randrange(40, 80))],
         "labels": [rng.randrange(4, 512) for _ in range(rng.randrange(60, 120))] + [EOS]}
        for i in range(n)
    ]


def task_prompts(loaded, n: int) -> list[dict]:
    from cllm.data.trajectories import answer_labels
    from cllm.models.loading import format_prompt
    from cllm.tasks import load_task

    task = load_task("builtin:arith", split="train", limit=n)
    out = []
    for i, (prompt, answer) in enumerate(zip(task.prompts, task.answers, strict=True)):
        ids = loaded.tokenizer(format_prompt(loaded.tokenizer, prompt, chat=False))["input_ids"]
        out.append({"prompt_id": i, "input_ids": ids,
                    "labels": answer_labels(loaded.tokenizer, answer, loaded.tokenizer.eos_token_id)})
    return out


def collect(model, prompts: list[dict], settings: DecodeSettings, batch_size: int = 8) -> list[dict]:
    """Block records in prompt order, as `cllm.data.trajectories` writes them."""
    records = []
    for batch_id, start in enumerate(range(0, len(prompts), batch_size)):
        kept, _ = decode_batch(model, {"batch_id": batch_id, "prompts": prompts[start:start + batch_size]}, settings)
        records += kept
    return sorted(records, key=lambda r: (r["prompt_id"], r["block_idx"]))


class Trainer:
    """One objective on its own copy of the model, stepping through consecutive batches of the records."""

    def __init__(self, model, records: list[dict], config: TrainConfig, tokens: dict):
        self.model, self.config, self.tokens = copy.deepcopy(model).train(), config, tokens
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.rng = random.Random(0)
        size = config.batch_size
        self.batches = [records[i:i + size] for i in range(0, len(records) - size + 1, size)]
        self.steps = 0
        self.totals = {"seconds": 0.0, "cpu": 0.0, "collate": 0.0, "blocks": 0, "tokens": 0, "positions": 0,
                       "rows": 0, "forwards": 0}

    def step(self, timed: bool) -> None:
        chunk = self.batches[self.steps % len(self.batches)]
        self.steps += 1
        started, cpu = time.perf_counter(), time.process_time()
        batch = make_batch(chunk, self.config, self.tokens, self.rng, torch.device("cpu"))
        collated = time.perf_counter()
        compute_loss(self.model, batch, self.config).total.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if timed:
            t = self.totals
            t["seconds"] += time.perf_counter() - started
            t["cpu"] += time.process_time() - cpu
            t["collate"] += collated - started
            t["blocks"] += len(chunk)
            t["tokens"] += sum(len(r["fixed_point"]) for r in chunk)
            t["positions"] += sum(batch[k].numel() for k in FORWARD_INPUTS if k in batch)
            t["rows"] += batch["input_ids"].shape[0]
            t["forwards"] += sum(k in batch for k in FORWARD_INPUTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random", help="'random' (built-in size, random init) or a model")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="blocks per step, for every objective")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    if args.model == "random":
        model, eos, pad = random_llama(context=512), EOS, PAD
        prompts = random_prompts(args.prompts, rng)
    else:
        from cllm.models.loading import load_model
        from cllm.models.teacher import resolve_model

        loaded = load_model(resolve_model(args.model), device="cpu", dtype="float32")
        model, eos, pad = loaded.model, loaded.tokenizer.eos_token_id, loaded.tokenizer.pad_token_id
        prompts = task_prompts(loaded, args.prompts)
    settings = DecodeSettings(block_size=args.block_size, max_new_tokens=args.max_new_tokens, eos_token_ids=(eos,),
                              pad_token_id=pad, max_token_run=0)
    started = time.perf_counter()
    records = collect(model, prompts, settings)
    print(f"collected {len(records)} blocks of {len(prompts)} prompts in {time.perf_counter() - started:.1f} s; "
          f"torch threads {torch.get_num_threads()}, batch {args.batch_size} blocks, {args.steps} timed steps")
    tokens = {"pad": pad, "eos": [eos], "max_len": 512}
    print(f"{'objective':>11} | {'AR on':>7} | {'s/step':>6} | {'cpu s/step':>10} | {'collate s':>9} | "
          f"{'blocks/s':>8} | {'block tok/s':>11} | {'fwd/step':>8} | {'rows/step':>9} | {'positions/step':>14}")
    trainers = {
        (consistency, ar_source): Trainer(model, records, TrainConfig(
            data="-", output_dir="/tmp/unused", consistency=consistency, ar_source=ar_source,
            batch_size=args.batch_size, ar_weight=10.0, lr=1e-4), tokens)
        for consistency in ("global", "progressive") for ar_source in ("teacher", "labels")
    }
    # Round robin, one step of each objective per round: load on a shared machine hits them all alike.
    for round_ in range(args.warmup + args.steps):
        for trainer in trainers.values():
            trainer.step(timed=round_ >= args.warmup)
    for (consistency, ar_source), trainer in trainers.items():
        t, n = trainer.totals, args.steps
        print(f"{consistency:>11} | {ar_source:>7} | {t['seconds'] / n:>6.3f} | {t['cpu'] / n:>10.3f} | "
              f"{t['collate'] / n:>9.3f} | {t['blocks'] / t['seconds']:>8.1f} | {t['tokens'] / t['seconds']:>11.1f} | "
              f"{t['forwards'] / n:>8.0f} | {t['rows'] / n:>9.1f} | {t['positions'] / n:>14.0f}")

if __name__ == "__main__":
    main()
