"""Load test of the OpenAI server: N concurrent clients over loopback, Jacobi vs AR and continuous vs static
batching side by side.

    python benchmarks/serve_load.py --model outputs/default/cllm            # starts both servers itself
    python benchmarks/serve_load.py --model DIR --concurrency 1,16 --requests-per-client 4 --max-tokens 64
    python benchmarks/serve_load.py --model DIR --engines continuous --modes jacobi  # one variant only
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model-name cllm   # a server already running
    python benchmarks/serve_load.py --model DIR --concurrency 1,4,16,64 --arrival-rates 6  # + open loop

It starts a local Ray with the same application once per variant (`/jacobi-continuous`, `/ar-static`, ...:
same model, same replica resources, only `mode` and `engine` differ), warms each up, then for each
concurrency level drives each variant in turn with a bounded number of requests (closed loop: each client
sends its next request when the last one is answered), then, for each `--arrival-rates` value, sends
requests at Poisson-distributed times whatever the server's pace (open loop). It prints requests/s,
tokens/s, p50/p99 latency, p50/p99 time to first token (streaming; p99 also without each client's first
request, which all clients send at once), the replica's own first-token time (`jacobi_stats`: what the
client waits beyond it is the proxy and the network) and the part of that spent queued before the
request's prefill began, tokens per forward and errors. The clients are
coroutines on one event loop, so the load generator takes little of the server's CPU. Every
variant decodes greedily, so all must answer identically, and equal to `generate` run here on the same
model (`--check`); it checks both.
Prompts are the test split of `--dataset` (default: the built-in task); with `--chat` each is sent to
`/v1/chat/completions` as one user message, so the server applies the model's chat template:

    python benchmarks/serve_load.py --model smollm2-cllm --dataset 'path/to/gsm8k/{split}.jsonl' \
        --prompt-field question --chat --modes multiblock,jacobi,ar --engines continuous --concurrency 1,4,16
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import aiohttp  # noqa: E402
from pydantic import Field, model_validator  # noqa: E402

from cllm.config import StageConfig, load_config  # noqa: E402
from cllm.decoding.core import DecodeFields  # noqa: E402
from cllm.decoding.modes import BASELINE, JACOBI, MODES, ModeName  # noqa: E402
from cllm.serving.config import ServeOptions  # noqa: E402
from cllm.tasks import DataFields  # noqa: E402

EngineKind = ServeOptions.model_fields["engine"].annotation


class LoadConfig(StageConfig, DataFields, DecodeFields, ServeOptions):
    """The load, and the servers to put it on: their settings are the server's own (`ServeOptions`,
    `DecodeFields`: the same names, bounds, defaults and checks), each variant with its `mode` and `engine`
    taken from `modes` x `engines`; the prompts are the test split of the dataset (`DataFields`)."""

    model: str | None = Field(
        None, description="the model to serve (default: the server's own, the last default pipeline run's CLLM)")
    model_name: str = Field("cllm-bench", description="the name the servers answer to")
    url: str | None = Field(None, description="drive this running server instead of starting servers (its own mode)")
    modes: list[ModeName] = Field([JACOBI.name, BASELINE], description="one server per mode x engine")
    engines: list[EngineKind] = Field(list(get_args(EngineKind)), description="one server per mode x engine")
    concurrency: list[int] = Field([1, 16], description="closed loops of this many clients, one after another")
    requests_per_client: int = Field(4, ge=1, description="closed loop: requests each client sends in turn")
    arrival_rates: list[float] = Field(
        [], description="open loops: requests per second, at Poisson-distributed times")
    open_loop_requests: int = Field(64, ge=1, description="open loop: requests sent at each arrival rate")
    check: bool = Field(
        True, description="compare every answer with greedy `generate` on the same model, in this process")
    max_tokens: int = Field(64, ge=1, description="tokens each request asks for")
    stream: bool = Field(True, description="stream answers, which also measures time to first token")
    seed: int = Field(0, description="seed of the servers and of the prompts' order")
    request_timeout_s: float = Field(300.0, gt=0, description="a request not answered by then counts as an error")

    @model_validator(mode="after")
    def _variants_name_mode_and_engine(self):
        if {"mode", "engine"} & self.model_fields_set:
            raise ValueError("name the servers' modes and engines with --modes and --engines")
        return self

    def server_args(self, mode: str, engine: str) -> dict:
        """One variant's ServeConfig fields: these server options, its mode and engine, the model."""
        options = self.model_dump(include=set(ServeOptions.model_fields) | set(DecodeFields.model_fields))
        args = {**options, "mode": mode, "engine": engine, "model_name": self.model_name, "seed": self.seed}
        return args if self.model is None else {**args, "model": self.model}


@dataclass
class Outcome:
    latency: float
    first_token: float | None
    tokens: int
    forward_passes: int
    text: str
    error: str | None = None
    replica_first_token: float | None = None  # the replica's own first-token time (`jacobi_stats`)
    replica_queue: float | None = None  # the part of it spent queued before the request's prefill
    client_first: bool = False  # a closed-loop client's first request: all clients send theirs at once


def request_body(cfg: LoadConfig, model_name: str, prompt: str, max_tokens: int) -> tuple[str, dict]:
    """The route and body of one request: a completion, or with `chat` a chat completion of one user turn."""
    if cfg.chat:
        return "/v1/chat/completions", {"model": model_name, "max_tokens": max_tokens,
                                        "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {"model": model_name, "prompt": prompt, "max_tokens": max_tokens}


def choice_text(choice: dict) -> str:
    """The text of a (streamed) choice of either route."""
    if "text" in choice:
        return choice["text"]
    return (choice.get("delta") or choice.get("message") or {}).get("content") or ""


async def attempt(session: aiohttp.ClientSession, base: str, request: tuple[str, dict], stream: bool,
                  timeout: float) -> Outcome:
    """`complete`, with a failure counted as an outcome instead of ending the run."""
    start = time.perf_counter()
    try:
        return await complete(session, base, request, stream, timeout)
    except (OSError, aiohttp.ClientError, asyncio.TimeoutError, RuntimeError, ValueError) as err:
        return Outcome(time.perf_counter() - start, None, 0, 0, "", error=f"{type(err).__name__}: {err}")


async def complete(session: aiohttp.ClientSession, base: str, request: tuple[str, dict], stream: bool,
                   timeout: float) -> Outcome:
    """One request; with streaming, read the SSE events and note when the first text arrived."""
    start = time.perf_counter()
    route, payload = request
    payload = {**payload, "stream": stream}
    if stream:
        payload["stream_options"] = {"include_usage": True}
    async with session.post(
        base + route, json=payload, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        if not stream:
            answer = await response.json()
            stats = answer["jacobi_stats"]
            return Outcome(
                time.perf_counter() - start,
                None,
                answer["usage"]["completion_tokens"],
                stats["forward_passes"],
                choice_text(answer["choices"][0]),
                replica_first_token=stats.get("first_token_seconds"),
                replica_queue=stats.get("queue_seconds"),
            )
        first, text, tokens, stats = None, [], 0, {}
        async for raw in response.content:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            for choice in event.get("choices", []):
                piece = choice_text(choice)
                if piece and first is None:
                    first = time.perf_counter() - start
                text.append(piece)
            stats = event.get("jacobi_stats") or stats
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return Outcome(time.perf_counter() - start, first, tokens, stats.get("forward_passes", 0), "".join(text),
                   replica_first_token=stats.get("first_token_seconds"), replica_queue=stats.get("queue_seconds"))


def client_session() -> aiohttp.ClientSession:
    """One session for all clients of a load level: no connection limit, so concurrency is the clients'."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def run_load(base: str, cfg: LoadConfig, model_name: str, prompts: list[str], concurrency: int):
    """`concurrency` clients, each sending `requests_per_client` requests back to back.

    The clients are coroutines on one event loop, not threads: on a machine that also runs the server, a
    thread per client would spend the server's cores on the client's lock contention."""

    async def client(session: aiohttp.ClientSession, c: int) -> list[tuple[str, Outcome]]:
        results = []
        for r in range(cfg.requests_per_client):
            prompt = prompts[(c * cfg.requests_per_client + r) % len(prompts)]
            request = request_body(cfg, model_name, prompt, cfg.max_tokens)
            outcome = await attempt(session, base, request, cfg.stream, cfg.request_timeout_s)
            outcome.client_first = r == 0
            results.append((prompt, outcome))
        return results

    async with client_session() as session:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client(session, c) for c in range(concurrency)))
        wall = time.perf_counter() - start
    return [item for results in per_client for item in results], wall


async def run_open_loop(base: str, cfg: LoadConfig, model_name: str, prompts: list[str], rate: float):
    """Requests sent at Poisson-distributed times (`rate` per second), whatever the server's pace."""
    arrivals = random.Random(cfg.seed)
    schedule, at = [], 0.0
    for _ in range(cfg.open_loop_requests):
        at += arrivals.expovariate(rate)
        schedule.append(at)

    async def request(session: aiohttp.ClientSession, index: int) -> tuple[str, Outcome]:
        await asyncio.sleep(max(0.0, start + schedule[index] - time.perf_counter()))
        prompt = prompts[index % len(prompts)]
        request = request_body(cfg, model_name, prompt, cfg.max_tokens)
        return prompt, await attempt(session, base, request, cfg.stream, cfg.request_timeout_s)

    async with client_session() as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(request(session, i) for i in range(cfg.open_loop_requests)))
        wall = time.perf_counter() - start
    return results, wall


async def warm_up(base: str, cfg: LoadConfig, model_name: str, prompt: str) -> None:
    """One short request: first-call overheads are not the steady state. A refusal ends the run."""
    async with client_session() as session:
        await complete(session, base, request_body(cfg, model_name, prompt, 8), cfg.stream, cfg.request_timeout_s)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(results: list[tuple[str, Outcome]], wall: float) -> dict:
    outcomes = [o for _, o in results if o.error is None]
    latencies = [o.latency for o in outcomes]
    firsts = [o.first_token for o in outcomes if o.first_token is not None]
    replica = [o.replica_first_token for o in outcomes if o.replica_first_token is not None]
    queued = [o.replica_queue for o in outcomes if o.replica_queue is not None]
    # without the burst of the clients' simultaneous first requests (closed loop; open loop: all)
    steady = [o.first_token for o in outcomes if o.first_token is not None and not o.client_first]
    return {
        "requests": len(results),
        "errors": len(results) - len(outcomes),
        "req_per_s": len(outcomes) / wall,
        "tok_per_s": sum(o.tokens for o in outcomes) / wall,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "ttft_p50_s": percentile(firsts, 50),
        "ttft_p99_s": percentile(firsts, 99),
        "steady_ttft_p99_s": percentile(steady, 99),
        "replica_ttft_p50_s": percentile(replica, 50),
        "replica_ttft_p99_s": percentile(replica, 99),
        "queue_p50_s": percentile(queued, 50),
        "queue_p99_s": percentile(queued, 99),
        # each request's first token comes from prefill, as in JacobiOutput.tokens_per_forward
        "tpf": sum(o.tokens - 1 for o in outcomes) / max(1, sum(o.forward_passes for o in outcomes)),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_servers(cfg: LoadConfig) -> dict[str, str]:
    """The same application once per (mode, engine) on a local Ray, each under its own route prefix."""
    import ray
    from ray import serve

    from cllm.serving.api import build_app

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    variants = [(m, e) for m in cfg.modes for e in cfg.engines]
    cpus = ray.cluster_resources().get("CPU", 0)
    if len(variants) * cfg.num_cpus > cpus:
        ray.shutdown()
        sys.exit(f"error: {len(variants)} variants x --num-cpus {cfg.num_cpus} exceed this machine's {cpus:g} CPUs "
                 f"(a replica that does not fit would never start); lower --num-cpus or run fewer variants")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {}
    for mode, engine in variants:
        variant = f"{mode}-{engine}"
        serve.run(build_app(cfg.server_args(mode, engine)), name=f"cllm-{variant}", route_prefix=f"/{variant}")
        urls[variant] = f"http://127.0.0.1:{port}/{variant}"
    return urls


def stop_servers() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = load_config(LoadConfig, sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        sys.exit(f"error: {err}")
    prompts = eval_prompts(cfg)
    if cfg.url is not None:
        with urllib.request.urlopen(cfg.url.rstrip("/") + "/v1/models", timeout=30) as response:
            name = json.loads(response.read())["data"][0]["id"]
        with urllib.request.urlopen(cfg.url.rstrip("/") + "/healthz", timeout=30) as response:
            health = json.loads(response.read())
        variant = f"{health['mode']}-{health.get('engine', 'static')}"
        urls, names = {variant: cfg.url.rstrip("/")}, name
    else:
        urls, names = start_servers(cfg), cfg.model_name
    try:
        rows, texts = [], {}
        for base in urls.values():
            asyncio.run(warm_up(base, cfg, names, prompts[0]))
        loads = [(str(c), lambda base, c=c: run_load(base, cfg, names, prompts, c)) for c in cfg.concurrency]
        loads += [(f"{rate:g}/s", lambda base, rate=rate: run_open_loop(base, cfg, names, prompts, rate))
                  for rate in cfg.arrival_rates]
        for level, load in loads:
            for mode, base in urls.items():
                results, wall = asyncio.run(load(base))
                texts.setdefault(mode, {}).update((p, o.text) for p, o in results if o.error is None)
                rows.append({"concurrency": level, "mode": mode, **summarize(results, wall)})
                print(f"  done: load {level}, {mode}", file=sys.stderr, flush=True)
        print_table(rows)
        if len(texts) > 1:
            first, *others = texts.values()
            common = set(first).intersection(*others)
            same = all(other[p] == first[p] for other in others for p in common)
            print(f"all {len(texts)} variants' answers identical on {len(common)} prompts: {same}")
        if cfg.check and cfg.model is not None:
            answered = {p: t for variant in texts.values() for p, t in variant.items()}
            wrong = sum(any(v.get(p, t) != t for v in texts.values()) for p, t in greedy_texts(cfg, answered).items())
            print(f"answers equal to generate(do_sample=False) run here: {len(answered) - wrong}/{len(answered)}")
    except (urllib.error.HTTPError, RuntimeError) as err:
        sys.exit(f"server refused a request: {err}")
    finally:
        if cfg.url is None:
            stop_servers()


def eval_prompts(cfg: LoadConfig, count: int = 64) -> list[str]:
    """The first `count` prompts of the dataset's test split, as text."""
    records = cfg.load_split("test", limit=count, seed=cfg.seed).records
    if not all(isinstance(record["prompt"], str) for record in records):
        sys.exit("error: the load test sends text prompts (with --chat, each as one user message); this dataset "
                 "holds chat turns")
    return [record["prompt"] for record in records]


def greedy_texts(cfg: LoadConfig, answered: dict[str, str]) -> dict[str, str]:
    """What `generate(do_sample=False)` answers to each prompt, decoded alone on this process's CPU."""
    import torch

    from cllm.models.loading import format_prompt, load_model
    from cllm.models.teacher import resolve_model

    loaded = load_model(resolve_model(cfg.model), device="cpu", dtype="float32")
    tokenizer, expected = loaded.tokenizer, {}
    for prompt in answered:
        ids = tokenizer(format_prompt(tokenizer, prompt, chat=cfg.chat), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        max_new_tokens=cfg.max_tokens, pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=tokenizer.eos_token_id)
        expected[prompt] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return expected


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'load':>6} {'variant':>21} {'reqs':>5} {'errs':>4} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} "
        f"{'ttft50 s':>8} {'ttft99 s':>8} {'steady99':>8} {'replica50':>9} {'replica99':>9} "
        f"{'queue50':>7} {'queue99':>7} {'tok/fwd':>7}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['concurrency']:>6} {r['mode']:>21} {r['requests']:>5} {r['errors']:>4} {r['req_per_s']:>7.2f} "
            f"{r['tok_per_s']:>8.1f} {r['p50_s']:>7.3f} {r['p99_s']:>7.3f} {r['ttft_p50_s']:>8.3f} "
            f"{r['ttft_p99_s']:>8.3f} {r['steady_ttft_p99_s']:>8.3f} {r['replica_ttft_p50_s']:>9.3f} "
            f"{r['replica_ttft_p99_s']:>9.3f} {r['queue_p50_s']:>7.3f} {r['queue_p99_s']:>7.3f} {r['tpf']:>7.2f}"
        )
    print(
        "(ttft: first text at the client; steady99: the same without each client's first request, which all\n"
        " clients send at once; replica: the replica's own first-token time, without proxy and network;\n"
        " queue: the part of it before the request's prefill began, waiting for the engine's step or batch)"
    )
    for r in rows:
        print(
            f"load {r['concurrency']}, {r['mode']}: ttft p99 / latency p50 {r['ttft_p99_s'] / r['p50_s']:.2f}x "
            f"(steady {r['steady_ttft_p99_s'] / r['p50_s']:.2f}x)"
        )
    by_level = {}
    for r in rows:
        by_level.setdefault(r["concurrency"], {})[r["mode"]] = r
    faster = [mode for mode in MODES if mode != BASELINE]
    for level, variants in by_level.items():
        for engine in get_args(EngineKind):
            for mode in faster:
                fast, base = variants.get(f"{mode}-{engine}"), variants.get(f"{BASELINE}-{engine}")
                if fast and base:
                    speedup = fast["tok_per_s"] / base["tok_per_s"]
                    print(f"concurrency {level}, {engine}: {mode}/{BASELINE} throughput {speedup:.2f}x")
        for mode in [*faster, BASELINE]:
            continuous, static = variants.get(f"{mode}-continuous"), variants.get(f"{mode}-static")
            if continuous and static:
                ratio = continuous["tok_per_s"] / static["tok_per_s"]
                print(
                    f"concurrency {level}, {mode}: continuous/static throughput {ratio:.2f}x, p50 latency "
                    f"{continuous['p50_s']:.3f}s vs {static['p50_s']:.3f}s"
                )


if __name__ == "__main__":
    main()
