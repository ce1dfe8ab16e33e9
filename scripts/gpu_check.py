"""The GPU paths in one short run, on a tiny random model built here (no internet), with one table at the end.

    decode-fp32   Jacobi vs `generate`, both fp32 on cuda: must be equal token for token
    decode-bf16   Jacobi vs `generate`, both bf16: rounding may flip near-tied argmaxes, so the token match
                  rate is reported, not asserted; with TPF
    collect       the collection stage (Ray Data actor pool), one actor with num_gpus=1 -> Parquet
    zero2, zero3  consistency training through the project's trainer: strategy deepspeed, use_gpu, bf16, NCCL
    serve         the Serve app, one replica with num_gpus=1, answering a completion over HTTP

Exits 2 when no GPU is visible, 1 when a check failed. Without a GPU, `--build-only` builds the model
directory and exits, and `--device cpu` rehearses the same checks with no GPU asked for (gloo instead of
NCCL): it tests this script, not the GPU paths.

    bash scripts/gpu_check.sh            # or: python scripts/gpu_check.py --output-dir /tmp/cllm-gpu-check
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CHECKS = ("decode-fp32", "decode-bf16", "collect", "zero2", "zero3", "serve")


def dry_run_module():
    """scripts/realsize_dry_run.py, for its Qwen-family model builder (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("realsize_dry_run", HERE / "realsize_dry_run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_model(directory: Path, size: str) -> Path:
    """The dry run's Qwen2.5-0.5B-shaped model (or its tiny sibling), random, with its local tokenizer."""
    if not (directory / "config.json").is_file():
        dry_run_module().build_model_dir(directory, size)
    return directory


@dataclass
class Row:
    check: str
    status: str
    seconds: float
    figure: str


# ----- decoding -----


def prompts(tokenizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    from cllm.models.loading import encode_prompts
    from cllm.tasks import load_task

    texts = load_task("builtin:arith", "test", 4, 0).prompts  # different lengths: left padding
    return encode_prompts(tokenizer, texts, device=device)


def match_rate(ours: torch.Tensor, reference: torch.Tensor) -> tuple[float, int]:
    """Share of positions where the two outputs agree, and how many rows agree entirely."""
    same = ours == reference
    return same.float().mean().item(), int(same.all(dim=1).sum())


def check_decode(model_dir: Path, dtype: str, args) -> str:
    from cllm.decoding.core import special_tokens
    from cllm.decoding.jacobi import jacobi_generate
    from cllm.models.loading import load_model

    loaded = load_model(str(model_dir), device=args.device, dtype=dtype)
    ids, mask = prompts(loaded.tokenizer, args.device)
    special = special_tokens(loaded.tokenizer, loaded.model.generation_config)
    common = dict(max_new_tokens=args.max_new_tokens, eos_token_id=list(special.eos_ids),
                  pad_token_id=special.pad_id)
    reference = loaded.model.generate(ids, attention_mask=mask, do_sample=False, **common)
    out = jacobi_generate(loaded.model, ids, mask, block_size=args.block_size, **common)
    width = ids.shape[1]
    length = min(reference.shape[1], out.sequences.shape[1])
    rate, rows = match_rate(out.sequences[:, width:length], reference[:, width:length])
    figure = f"match {rate:.1%}, {rows}/{ids.shape[0]} rows equal, TPF {out.tokens_per_forward:.2f}"
    if dtype == "float32" and not torch.equal(out.sequences, reference):
        raise AssertionError(f"fp32 Jacobi differs from generate: {figure}")
    return figure


# ----- the Ray stages -----


def check_collect(model_dir: Path, out: Path, args) -> str:
    from cllm.data.collect import CollectConfig, run_collection

    config = CollectConfig(model=str(model_dir), output=str(out), limit=16, batch_size=8, actors=1,
                           num_gpus_per_actor=gpus(args), cpus_per_actor=1, block_size=args.block_size,
                           max_new_tokens=args.max_new_tokens, max_token_run=0)
    result = run_collection(config)
    if not result.complete or result.rows_total == 0:
        raise AssertionError(f"collection incomplete: {result.summary()}")
    return f"{result.rows_total} rows, {result.tokens_per_s:.0f} tokens/s, {result.seconds:.1f} s in Ray Data"


def check_zero(model_dir: Path, data: Path, out: Path, stage: int, args) -> str:
    from cllm.models.loading import load_model
    from cllm.train.config import TrainConfig
    from cllm.train.driver import run_training

    config = TrainConfig(model=str(model_dir), data=str(data), output_dir=str(out / "model"),
                         storage_path=str(out / "ray_train"), run_name=f"zero{stage}", num_workers=1,
                         cpus_per_worker=1, use_gpu=args.device == "cuda", strategy="deepspeed", zero_stage=stage,
                         bf16=True, batch_size=2, max_steps=args.train_steps, shuffle_buffer=0, log_every=1)
    result = run_training(config)
    load_model(str(result.model_dir), device=args.device)  # the export is a loadable HF directory
    metrics = result.metrics
    return (f"{metrics['step']} steps, loss {metrics['loss']:.3f}, "
            f"{metrics['seconds'] / max(metrics['step'], 1):.2f} s/step")


def check_serve(model_dir: Path, args) -> str:
    import ray
    import requests
    from ray import serve

    from cllm.serving.api import build_app

    port = dry_run_module().free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = build_app({"model": str(model_dir), "model_name": "gpu-check", "num_gpus": gpus(args), "num_cpus": 1,
                         "block_size": args.block_size, "max_new_tokens": args.max_new_tokens})
        serve.run(app, name="cllm", route_prefix="/")
        held = ray.cluster_resources().get("GPU", 0) - ray.available_resources().get("GPU", 0)
        reply = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                              json={"model": "gpu-check", "prompt": "Question: 3 + 4 = ?\nAnswer:", "max_tokens": 16})
        reply.raise_for_status()
        stats = reply.json()["jacobi_stats"]
    finally:
        serve.shutdown()
    if held < gpus(args):
        raise AssertionError(f"the replica holds {held} GPUs, expected 1")
    return f"replica holds {held:g} GPU, {stats['forward_passes']} passes, TPF {stats['tokens_per_forward']:.2f}"


# ----- the run -----


def gpus(args) -> int:
    """GPUs each actor, worker and replica asks for: one, or none in a CPU rehearsal."""
    return 1 if args.device == "cuda" else 0


def run_check(name: str, fn: Callable[[], str], rows: list[Row]) -> None:
    print(f"--- {name}", flush=True)
    started = time.perf_counter()
    try:
        figure, status = fn(), "ok"
    except Exception as err:  # one failed check must not hide the others
        traceback.print_exc()
        figure, status = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}", "FAIL"
    rows.append(Row(name, status, time.perf_counter() - started, figure))


def table(rows: list[Row]) -> str:
    lines = ["| check | status | seconds | figure |", "| --- | --- | ---: | --- |"]
    lines += [f"| {r.check} | {r.status} | {r.seconds:.1f} | {r.figure} |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/cllm-gpu-check"))
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny",
                        help="tiny: 2 layers, width 64; real: Qwen2.5-0.5B's shapes (both vocab 151936)")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {CHECKS}")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--build-only", action="store_true", help="build the model directory and exit (no GPU)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: rehearse the checks without a GPU (tests the script, not the GPU paths)")
    args = parser.parse_args(argv)
    unknown = set(args.checks.split(",")) - set(CHECKS)
    if unknown:
        parser.error(f"unknown checks {sorted(unknown)}: choose from {CHECKS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not args.build_only and args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False): nothing checked",
              file=sys.stderr)
        return 2
    model_dir = build_model(args.output_dir / f"model-{args.size}", args.size)
    if args.build_only:
        print(f"built {model_dir}")
        return 0
    checks, rows = args.checks.split(","), []
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU rehearsal, no GPU asked for"
    print(f"{where}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    for dtype in ("float32", "bfloat16"):
        name = "decode-fp32" if dtype == "float32" else "decode-bf16"
        if name in checks:
            run_check(name, lambda dtype=dtype: check_decode(model_dir, dtype, args), rows)
    if set(checks) & {"collect", "zero2", "zero3", "serve"}:
        import ray

        ray.init(address="local", num_gpus=gpus(args), include_dashboard=False, log_to_driver=False)
        data = args.output_dir / "trajectories"
        if "collect" in checks or not data.is_dir():
            run_check("collect", lambda: check_collect(model_dir, data, args), rows)
        for stage in (2, 3):
            if f"zero{stage}" in checks:
                out = args.output_dir / f"zero{stage}"
                run_check(f"zero{stage}", lambda stage=stage, out=out: check_zero(model_dir, data, out, stage, args),
                          rows)
        if "serve" in checks:
            run_check("serve", lambda: check_serve(model_dir, args), rows)
        ray.shutdown()
    print(table(rows))
    failed = [r.check for r in rows if r.status != "ok"]
    if failed:
        print(f"gpu_check: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
