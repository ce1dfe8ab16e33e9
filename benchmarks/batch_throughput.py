"""Batched Jacobi decoding throughput vs batch size 1, side by side in one run.

    python benchmarks/batch_throughput.py --model builtin --batch-sizes 1 4 16 --block-size 16

Prints, per batch size, generated tokens/s for Jacobi and for the project's AR loop on the same prompts.
"""

from __future__ import annotations

import argparse
import time

import torch

from cllm.decoding.core import DecodeFields
from cllm.decoding.modes import AR, JACOBI
from cllm.models.loading import encode_prompts, load_model
from cllm.tasks import load_task


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--dataset", default="builtin:arith")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    prompts = load_task(args.dataset, split="test", limit=args.prompts).prompts
    eos = loaded.tokenizer.eos_token_id
    decode = DecodeFields(block_size=args.block_size)
    print(f"{'batch':>5} | {'jacobi tok/s':>12} | {'jacobi TPF':>10} | {'AR tok/s':>9} | jacobi/AR")
    for batch_size in args.batch_sizes:
        totals = {mode.name: [0, 0.0, 0, 0] for mode in (JACOBI, AR)}
        for start in range(0, len(prompts), batch_size):
            ids, mask = encode_prompts(loaded.tokenizer, prompts[start:start + batch_size], device=loaded.device)
            for mode in (JACOBI, AR):
                out, seconds = timed(mode.generate, loaded.model, ids, mask, max_new_tokens=args.max_new_tokens,
                                     eos_token_id=eos, **mode.options(decode))
                t = totals[mode.name]
                t[0] += sum(out.new_tokens)
                t[1] += seconds
                t[2] += sum(max(n - 1, 0) for n in out.new_tokens)
                t[3] += sum(out.row_forward_passes)
        jac, ar = totals[JACOBI.name], totals[AR.name]
        print(f"{batch_size:>5} | {jac[0] / jac[1]:>12.1f} | {jac[2] / max(jac[3], 1):>10.2f} | "
              f"{ar[0] / ar[1]:>9.1f} | {(jac[0] / jac[1]) / (ar[0] / ar[1]):.2f}x")


if __name__ == "__main__":
    main()
