"""The OpenAI-compatible Jacobi server over HTTP: a real local Ray, real HTTP on 127.0.0.1, a real (tiny) model.

Every answer is checked against greedy `generate` on the same model. The tiny Llama reads one token per
UTF-8 byte, so multi-byte characters span several committed tokens and streaming must not split them.
The layers below the deployment are tested without Ray in test_serving.py, test_engine.py and
test_openai_api.py; the server's config and app builder in test_serve_config.py; the entry point, health
checks and stopping in test_serve_lifecycle.py.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import requests
from conftest import SERVED_CONTEXT, SERVED_NAME, greedy_text, sampled_text, sampled_tokens
from ray import serve

from cllm.models.loading import format_prompt
from cllm.serving.api import build_app

CONTEXT, MODEL_NAME = SERVED_CONTEXT, SERVED_NAME
PROMPTS = [
    "héllo wörld",
    "中文 text",
    "The answer is",
    "🎉 party",
    "a",
    "Once upon a time",
    "x = 1 + 2",
    "¿qué?",
    "zzz",
    "def f(x):",
    "naïve café",
    "0123456789",
    "日本語",
    "Ünïcödé",
    "end.",
    "hi there",
]


def chat_text(served, content: str) -> str:
    return format_prompt(served.tokenizer, [{"role": "user", "content": content}], chat=True)


# ---------------------------------------------------------------------------------------------------------
# The deployed server over real HTTP


@pytest.fixture(scope="module")
def server(serve_cluster, served_dir):
    """The app on this module's local Ray (`serve_cluster`), at the root route."""
    app = build_app(
        {
            "model": str(served_dir),
            "model_name": MODEL_NAME,
            "block_size": 4,
            "num_cpus": 0.5,
            "max_batch_size": 16,
            "batch_wait_timeout_s": 0.05,
            "max_ongoing_requests": 32,
        }
    )
    serve.run(app, name="cllm", route_prefix="/")
    return serve_cluster


def post(url: str, path: str, payload) -> requests.Response:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return requests.post(url + path, data=data, headers={"Content-Type": "application/json"}, timeout=120)


def stream_events(url: str, path: str, payload: dict) -> list:
    """The SSE payloads of a streamed answer, parsed; the final `[DONE]` is kept as the string."""
    with requests.post(url + path, json=payload, stream=True, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines(decode_unicode=False) if line]
    assert all(line.startswith(b"data: ") for line in lines)
    payloads = [line[len(b"data: ") :].decode("utf-8") for line in lines]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


def test_health_and_models(server):
    assert requests.get(server + "/healthz", timeout=30).json()["status"] == "ok"
    models = requests.get(server + "/v1/models", timeout=30).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL_NAME]


def test_completion_matches_greedy_generate(server, served):
    sent = time.perf_counter()
    response = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "héllo wörld", "max_tokens": 40})
    waited = time.perf_counter() - sent
    assert response.status_code == 200
    answer = response.json()
    assert answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == greedy_text(served, "héllo wörld", 40)
    usage = answer["usage"]
    assert usage["prompt_tokens"] == len("héllo wörld".encode())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    stats = answer["jacobi_stats"]
    assert stats["mode"] == "multiblock" and stats["block_size"] == 4
    assert 0 < stats["forward_passes"] < usage["completion_tokens"]
    assert stats["tokens_per_forward"] >= 1.0
    assert 0 < stats["first_token_seconds"] < waited  # measured in the replica, inside the client's wait
    assert 0 <= stats["queue_seconds"] < stats["first_token_seconds"]  # queued, then its prefill


def test_default_max_tokens_fills_the_context(server, served):
    prompt = "p" * (CONTEXT - 10)
    answer = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": prompt}).json()
    assert answer["usage"]["completion_tokens"] <= 10
    assert answer["choices"][0]["text"] == greedy_text(served, prompt, 10)


def test_streamed_completion_matches_greedy_generate(server, served):
    events = stream_events(
        server,
        "/v1/completions",
        {
            "model": MODEL_NAME,
            "prompt": "中文 text",
            "max_tokens": 50,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == greedy_text(served, "中文 text", 50)
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["text"]]) > 1  # really incremental
    closing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(closing) == 1 and closing[0]["jacobi_stats"]["forward_passes"] > 0
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("stream", [True, False])
def test_load_benchmark_reads_every_answer_exactly(server, served, stream):
    """benchmarks/serve_load.py's client: what it reads back is the whole answer, and its timings are sane."""
    import asyncio
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_load", Path(__file__).parents[1] / "benchmarks/serve_load.py")
    serve_load = sys.modules.setdefault("serve_load", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(serve_load)
    cfg = serve_load.LoadConfig(requests_per_client=2, max_tokens=12, stream=stream)
    with pytest.raises(ValueError, match="max_ongoing_requests"):  # refused by the server's own check
        serve_load.LoadConfig(max_ongoing_requests=4, max_batch_size=8)
    results, wall = asyncio.run(serve_load.run_load(server, cfg, MODEL_NAME, PROMPTS, 4))
    assert len(results) == 8 and [o.error for _, o in results] == [None] * 8
    for prompt, outcome in results:
        assert outcome.text == greedy_text(served, prompt, 12)
        assert 0 < outcome.replica_first_token < outcome.latency <= wall
        assert 0 <= outcome.replica_queue < outcome.replica_first_token
        if stream:
            assert outcome.replica_first_token < outcome.first_token <= outcome.latency
    assert sum(o.client_first for _, o in results) == 4
    summary = serve_load.summarize(results, wall)
    assert summary["errors"] == 0 and summary["tok_per_s"] > 0
    if stream:
        assert summary["steady_ttft_p99_s"] <= summary["ttft_p99_s"]


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_multiblock_server_answers_like_greedy_generate(server, served_dir, served, engine):
    """`mode: multiblock` on the same Serve: streamed and whole answers equal greedy generate."""
    app = build_app({"model": str(served_dir), "model_name": MODEL_NAME, "block_size": 4,
                     "mode": "multiblock", "engine": engine, "num_cpus": 0.25, "max_batch_size": 8})
    serve.run(app, name="cllm-multiblock", route_prefix="/multiblock")
    try:
        url = server + "/multiblock"
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda p: post(url, "/v1/completions", {"model": MODEL_NAME, "prompt": p,
                                                                         "max_tokens": 30}).json(), PROMPTS[:4]))
        for prompt, answer in zip(PROMPTS[:4], answers, strict=True):
            assert answer["choices"][0]["text"] == greedy_text(served, prompt, 30)
            assert answer["jacobi_stats"]["mode"] == "multiblock"
        events = stream_events(url, "/v1/completions", {"model": MODEL_NAME, "prompt": PROMPTS[5], "max_tokens": 40,
                                                         "stream": True})
        text = "".join(c["choices"][0]["text"] for c in events[:-1] if c["choices"])
        assert text == greedy_text(served, PROMPTS[5], 40)
    finally:
        serve.delete("cllm-multiblock")


def test_stream_interval_sends_fewer_larger_events(server, served_dir, served):
    """`stream_interval_s`: after the first text, one event per choice per interval, the same text."""
    app = build_app({"model": str(served_dir), "model_name": MODEL_NAME, "mode": "ar", "num_cpus": 0.25,
                     "stream_interval_s": 0.25})
    serve.run(app, name="cllm-interval", route_prefix="/interval")
    try:
        url = server + "/interval"
        payload = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 60, "stream": True}
        started = time.perf_counter()
        events = stream_events(url, "/v1/completions", payload)
        elapsed = time.perf_counter() - started
        texts = [c["choices"][0]["text"] for c in events[:-1] if c["choices"] and c["choices"][0]["text"]]
        assert "".join(texts) == greedy_text(served, PROMPTS[0], 60)
        assert len(texts) <= elapsed / 0.25 + 2 < 60  # an AR stream would send one event per token
        sampled = {**payload, "n": 2, "temperature": 0.8, "seed": 3, "prompt": PROMPTS[1]}
        chunks = stream_events(url, "/v1/completions", sampled)[:-1]
        for choice in (0, 1):
            mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice]
            text = "".join(c["text"] for c in mine)
            assert text == sampled_text(served, PROMPTS[1], 60, temperature=0.8, seed=3 + choice)
    finally:
        serve.delete("cllm-interval")


def test_chat_completion_matches_greedy_generate(server, served):
    messages = [{"role": "user", "content": "🎉 party"}]
    response = post(server, "/v1/chat/completions", {"model": MODEL_NAME, "messages": messages, "max_tokens": 30})
    assert response.status_code == 200
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["choices"][0]["message"]["content"] == greedy_text(served, chat_text(served, "🎉 party"), 30)


def test_streamed_chat_matches_greedy_generate(server, served):
    messages = [{"role": "user", "content": "naïve café"}]
    events = stream_events(
        server,
        "/v1/chat/completions",
        {"model": MODEL_NAME, "messages": messages, "max_tokens": 30, "stream": True},
    )
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == greedy_text(served, chat_text(served, "naïve café"), 30)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_the_openai_client_works_against_the_server(server, served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    completion = client.completions.create(model=MODEL_NAME, prompt="¿qué?", max_tokens=20, temperature=0)
    assert completion.choices[0].text == greedy_text(served, "¿qué?", 20)
    assert completion.usage.completion_tokens == 20
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "日本語"}], max_tokens=20, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == greedy_text(served, chat_text(served, "日本語"), 20)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=5, temperature=2.5)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="hi", max_tokens=5)


def test_the_same_seed_gives_the_same_sample_as_ar_generate(server, served):
    payload = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 30, "temperature": 0.8,
               "top_p": 0.95, "top_k": 50, "seed": 7}
    first, again = post(server, "/v1/completions", payload), post(server, "/v1/completions", payload)
    assert first.status_code == 200 and first.headers["x-cllm-seed"] == "7" and first.json()["seed"] == 7
    text = first.json()["choices"][0]["text"]
    assert again.json()["choices"][0]["text"] == text
    settings = dict(temperature=0.8, top_p=0.95, top_k=50)
    assert text == sampled_text(served, "Once upon a time", 30, seed=7, **settings)
    assert text != greedy_text(served, "Once upon a time", 30)
    two = post(server, "/v1/completions", {**payload, "n": 2}).json()  # choice i samples with seed + i
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert [c["text"] for c in two["choices"]] == [text, sampled_text(served, "Once upon a time", 30, seed=8,
                                                                      **settings)]
    unseeded = post(server, "/v1/completions", {**payload, "seed": None})
    seed = unseeded.json()["seed"]
    assert unseeded.headers["x-cllm-seed"] == str(seed)
    assert unseeded.json()["choices"][0]["text"] == sampled_text(served, "Once upon a time", 30, seed=seed,
                                                                 **settings)


def test_a_streamed_chat_with_two_samples(server, served):
    messages = [{"role": "user", "content": "naïve café"}]
    payload = {"model": MODEL_NAME, "messages": messages, "max_tokens": 25, "temperature": 1.0, "seed": 3, "n": 2,
               "stream": True, "stream_options": {"include_usage": True}}
    events = stream_events(server, "/v1/chat/completions", payload)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    texts = ["".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                     if c["choices"] and c["choices"][0]["index"] == i) for i in (0, 1)]
    prompt = chat_text(served, "naïve café")
    assert texts == [sampled_text(served, prompt, 25, temperature=1.0, seed=s) for s in (3, 4)]
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]) == 2
    completion = sum(len(sampled_tokens(served, prompt, 25, temperature=1.0, seed=s)) for s in (3, 4))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == completion
    assert all(c["seed"] == 3 for c in chunks)


def test_stop_sequence_ends_the_answer_before_it(server, served):
    full = greedy_text(served, "Once upon a time", 40)
    start = next(i for i in range(5, len(full) - 2) if "\ufffd" not in full[i : i + 2])
    stop = full[start : start + 2]
    expected = full[: full.index(stop)]
    answer = post(
        server,
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 40, "stop": [stop]},
    ).json()
    assert answer["choices"][0]["text"] == expected
    assert answer["choices"][0]["finish_reason"] == "stop"
    events = stream_events(
        server,
        "/v1/completions",
        {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 40, "stop": stop, "stream": True},
    )
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == expected


def test_sixteen_concurrent_requests_are_batched_and_all_correct(server, served):
    budgets = [20 + 3 * i for i in range(16)]

    def ask(i):
        if i % 2:
            return post(
                server,
                "/v1/completions",
                {"model": MODEL_NAME, "prompt": PROMPTS[i], "max_tokens": budgets[i]},
            )
        return stream_events(
            server,
            "/v1/completions",
            {"model": MODEL_NAME, "prompt": PROMPTS[i], "max_tokens": budgets[i], "stream": True},
        )

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(16)))
    batch_sizes = []
    for i, result in enumerate(results):
        expected = greedy_text(served, PROMPTS[i], budgets[i])
        if i % 2:
            assert result.status_code == 200
            assert result.json()["choices"][0]["text"] == expected
            batch_sizes.append(result.json()["jacobi_stats"]["batch_size"])
        else:
            assert result[-1] == "[DONE]"
            assert "".join(c["choices"][0]["text"] for c in result[:-1]) == expected
    assert max(batch_sizes) > 1  # concurrent requests really shared a batched decode


def test_a_client_that_leaves_mid_stream_does_not_disturb_its_batch_mates(server, served):
    def leave_early():
        payload = {"model": MODEL_NAME, "prompt": "zzz", "max_tokens": 140, "stream": True}
        with requests.post(server + "/v1/completions", json=payload, stream=True, timeout=120) as response:
            first = next(line for line in response.iter_lines() if line)
        return first  # the connection closes here, long before 140 tokens

    def stay():
        return post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "def f(x):", "max_tokens": 60})

    with ThreadPoolExecutor(2) as pool:
        left, stayed = pool.submit(leave_early), pool.submit(stay)
        assert left.result().startswith(b"data: ")
        assert stayed.result().json()["choices"][0]["text"] == greedy_text(served, "def f(x):", 60)
    assert post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "zzz", "max_tokens": 4}).status_code == 200


def test_the_default_engine_is_continuous(server):
    health = requests.get(server + "/healthz", timeout=30).json()
    assert health["engine"] == "continuous" and health["waiting"] >= 0 and health["running"] >= 0


def test_concurrent_streams_of_different_lengths_join_the_running_engine(server, served):
    """Streamed requests sent a little apart, of very different lengths: each equals greedy generate."""
    budgets = [90, 6, 40, 15, 70, 3]
    prompts = PROMPTS[:6]

    def ask(i):
        time.sleep(0.02 * i)
        payload = {"model": MODEL_NAME, "prompt": prompts[i], "max_tokens": budgets[i], "stream": True}
        return stream_events(server, "/v1/completions", payload)

    with ThreadPoolExecutor(len(budgets)) as pool:
        results = list(pool.map(ask, range(len(budgets))))
    shared = []
    for i, events in enumerate(results):
        assert events[-1] == "[DONE]"
        assert "".join(c["choices"][0]["text"] for c in events[:-1]) == greedy_text(served, prompts[i], budgets[i])
        closing = [c for c in events[:-1] if c["choices"] and c["choices"][0]["finish_reason"]]
        shared.append(closing[0]["jacobi_stats"]["batch_size"])
    assert max(shared) > 1  # they really shared passes


def test_a_late_request_is_answered_before_an_earlier_long_one_ends(server, served):
    """Continuous batching: a short request sent while a long one decodes does not wait for it."""
    long_prompt, long_budget = "zzz", CONTEXT - 4
    first_chunk, done = {}, {}

    def long_stream():
        payload = {"model": MODEL_NAME, "prompt": long_prompt, "max_tokens": long_budget, "stream": True}
        with requests.post(server + "/v1/completions", json=payload, stream=True, timeout=120) as response:
            text = []
            for line in response.iter_lines():
                if not line:
                    continue
                first_chunk.setdefault("t", time.monotonic())
                data = line[len(b"data: ") :].decode()
                if data != "[DONE]":
                    text += [c["text"] for c in json.loads(data)["choices"]]
        done["long"] = time.monotonic()
        return "".join(text)

    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(long_stream)
        deadline = time.monotonic() + 60
        while "t" not in first_chunk and time.monotonic() < deadline:
            time.sleep(0.002)
        short = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "hi there", "max_tokens": 3})
        done["short"] = time.monotonic()
        assert long.result() == greedy_text(served, long_prompt, long_budget)
    assert short.status_code == 200
    assert short.json()["choices"][0]["text"] == greedy_text(served, "hi there", 3)
    assert done["short"] < done["long"]
    assert short.json()["jacobi_stats"]["batch_size"] >= 2  # it joined the long request's passes


def test_a_client_that_leaves_frees_its_row_long_before_its_decode_would_end(server):
    payload = {"model": MODEL_NAME, "prompt": "zzz", "max_tokens": CONTEXT - 4}
    start = time.monotonic()
    assert post(server, "/v1/completions", payload).status_code == 200
    full_decode = time.monotonic() - start
    with requests.post(server + "/v1/completions", json={**payload, "stream": True}, stream=True, timeout=120) as r:
        next(line for line in r.iter_lines() if line)
    left = time.monotonic()
    while requests.get(server + "/healthz", timeout=30).json()["running"] and time.monotonic() - left < 60:
        time.sleep(0.005)
    assert requests.get(server + "/healthz", timeout=30).json()["running"] == 0
    assert time.monotonic() - left < 0.5 * full_decode


def test_proxy_floor_streams_like_the_server_with_no_model(server):
    """benchmarks/proxy_floor.py's deployment: the load client reads its paced answers as the server's."""
    import asyncio
    import importlib.util

    bench = Path(__file__).parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location("proxy_floor", bench / "proxy_floor.py")
    floor = sys.modules.setdefault("proxy_floor", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(floor)
    ray.cloudpickle.register_pickle_by_value(floor)  # the replica cannot import it by name
    serve.run(floor.Paced.options(ray_actor_options={"num_cpus": 0}).bind(5, 0.02), name="paced",
              route_prefix="/paced")
    try:
        load = floor.serve_load.LoadConfig(requests_per_client=2, max_tokens=5)
        results, wall = asyncio.run(floor.serve_load.run_load(server + "/paced", load, "paced", ["-"], 3))
    finally:
        serve.delete("paced")
    assert len(results) == 6 and all(o.error is None and o.text == "xxxxx" and o.tokens == 5 for _, o in results)
    for _, outcome in results:
        assert outcome.first_token < outcome.latency and outcome.latency >= 0.08  # four events 20 ms apart


# ---------------------------------------------------------------------------------------------------------
# Acceptance, per answer and in Prometheus


def scrape(endpoint: str, application: str) -> dict[tuple[str, str], float]:
    """The node's Prometheus samples of an application's replicas: (sample name, mode tag) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(requests.get(endpoint, timeout=30).text):
        for sample in family.samples:
            if sample.labels.get("application") == application and "mode" in sample.labels:
                key = (sample.name, sample.labels["mode"])
                samples[key] = samples.get(key, 0.0) + sample.value
    return samples


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_acceptance_per_answer_and_its_prometheus_counters_add_up(server, served_dir, engine):
    """Each answer's `jacobi_stats` holds its accepted-length histogram; the replica's counters of committed
    tokens and decoding passes, scraped from the node's Prometheus endpoint (Ray's metrics agent, which
    exports them with a `ray_` prefix), equal the answers' sums, so their rates' ratio is the mean acceptance
    length. An app of its own: its counters start at zero."""
    app = f"metered-{engine}"
    args = {"model": str(served_dir), "model_name": MODEL_NAME, "block_size": 4, "num_cpus": 0.5,
            "engine": engine}  # fmt: skip
    serve.run(build_app(args), name=app, route_prefix=f"/{app}")
    try:
        # the untrained model accepts one token per pass, almost always: these prompts have passes that accept two
        prompts, budgets = ["aaaaaaaa", "The answer is", "end.", "zzz", "héllo wörld"], [60, 60, 60, 25, 40]
        answers = [post(server, f"/{app}/v1/completions", {"model": MODEL_NAME, "prompt": prompt, "max_tokens": n})
                   for prompt, n in zip(prompts, budgets, strict=True)]  # fmt: skip
        committed = passes = 0
        for answer in (response.json() for response in answers):
            stats, tokens = answer["jacobi_stats"], answer["usage"]["completion_tokens"]
            histogram = stats["accepted_lengths"]  # histogram[k]: passes that made k tokens final
            assert sum(histogram) == stats["forward_passes"] > 0
            assert sum(k * n for k, n in enumerate(histogram)) == tokens - 1  # the first token is prefill's
            assert stats["tokens_per_forward"] == round((tokens - 1) / stats["forward_passes"], 4)
            committed, passes = committed + tokens - 1, passes + stats["forward_passes"]
        node = ray.nodes()[0]
        endpoint = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        assert committed > passes  # some passes accepted more than one token
        wanted = {("ray_cllm_committed_tokens_total", "multiblock"): committed,
                  ("ray_cllm_decode_passes_total", "multiblock"): passes}  # fmt: skip
        deadline, seen = time.monotonic() + 60, {}
        while time.monotonic() < deadline:  # the agent exports what replicas report every few seconds
            seen = scrape(endpoint, app)
            if all(seen.get(key) == value for key, value in wanted.items()):
                break
            time.sleep(2.0)
        assert {key: seen.get(key) for key in wanted} == wanted, sorted(seen)
        print(f"{engine}: mean acceptance length {committed / passes:.3f} ({committed} tokens / {passes} passes)")
    finally:
        serve.delete(app)


@pytest.fixture(scope="module")
def static_server(server, served_dir):
    """The same model with the static engine (`@serve.batch`, each batch decoded to its end), as a second app."""
    app = build_app({"model": str(served_dir), "model_name": MODEL_NAME, "block_size": 4, "num_cpus": 0.5,
                     "engine": "static", "max_batch_size": 8, "batch_wait_timeout_s": 0.05})  # fmt: skip
    serve.run(app, name="static", route_prefix="/static")
    yield server + "/static"
    serve.delete("static")


def test_the_static_engine_still_answers_exactly(static_server, served):
    assert requests.get(static_server + "/healthz", timeout=30).json()["engine"] == "static"
    budgets = [25, 8, 40, 12]

    def ask(i):
        payload = {"model": MODEL_NAME, "prompt": PROMPTS[i], "max_tokens": budgets[i]}
        if i % 2:
            return post(static_server, "/v1/completions", payload).json()["choices"][0]["text"]
        events = stream_events(static_server, "/v1/completions", {**payload, "stream": True})
        return "".join(c["choices"][0]["text"] for c in events[:-1])

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(ask, range(4)))
    assert texts == [greedy_text(served, PROMPTS[i], budgets[i]) for i in range(4)]
    sampled = {"model": MODEL_NAME, "prompt": "zzz", "max_tokens": 20, "temperature": 0.7, "seed": 5, "n": 2}
    answer = post(static_server, "/v1/completions", sampled).json()  # the two samples are rows of one batch
    assert [c["text"] for c in answer["choices"]] == [sampled_text(served, "zzz", 20, temperature=0.7, seed=s)
                                                      for s in (5, 6)]
    assert answer["jacobi_stats"]["batch_size"] == 2
    assert 0 <= answer["jacobi_stats"]["queue_seconds"] < answer["jacobi_stats"]["first_token_seconds"]


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400),
    ("/v1/completions", b"\xff\xfe\x00garbage", 400),
    ("/v1/completions", b'{"model": "tiny-bytes", "prompt": "\xff\xfe"}', 400),
    ("/v1/completions", b"", 400),
    ("/v1/completions", b"[1, 2, 3]", 400),
    ("/v1/completions", {"model": MODEL_NAME}, 400),
    ("/v1/completions", {"prompt": "hi"}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": 42}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": "lots"}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 0}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": -5}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": CONTEXT}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x" * (CONTEXT + 5), "max_tokens": 1}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "x" * CONTEXT}, 400),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}, 404),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": ""}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": [999999]}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "temperature": 2.5}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "n": 0}, 400),
    ("/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "top_k": -5}, 400),
    ("/v1/completions", b'{"model": "tiny-bytes", "prompt": "\\udc80"}', 400),
    ("/v1/chat/completions", {"model": MODEL_NAME}, 400),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": []}, 400),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": "hello"}, 400),
    ("/v1/chat/completions", {"model": MODEL_NAME, "messages": [{"role": "user"}], "max_tokens": 0}, 400),
    (
        "/v1/chat/completions",
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "x" * CONTEXT}]},
        400,
    ),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
    (
        "/v1/chat/completions",
        {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 1.0,
            "top_p": 0,
            "stream": True,
        },
        400,
    ),
]


@pytest.mark.parametrize("path, payload, status", BAD_REQUESTS)
def test_bad_input_gets_a_4xx_and_the_server_still_answers(server, served, path, payload, status):
    response = post(server, path, payload)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    good = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "end.", "max_tokens": 8})
    assert good.status_code == 200
    assert good.json()["choices"][0]["text"] == greedy_text(served, "end.", 8)


def test_unknown_route_and_method_get_openai_errors(server):
    assert requests.get(server + "/v1/nothing", timeout=30).json()["error"]["message"]
    response = requests.get(server + "/v1/completions", timeout=30)
    assert response.status_code == 405 and response.json()["error"]["message"]


def test_a_killed_replica_is_replaced(server, served):
    """Runs last: kills the replica actor outright; Serve must start a new one and answer again."""
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::cllm#JacobiServer#")
    ]
    assert len(names) == 1
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    expected = greedy_text(served, "hi there", 12)
    deadline, answer = time.monotonic() + 180, None
    while time.monotonic() < deadline:
        try:
            response = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "hi there", "max_tokens": 12})
            if response.status_code == 200:
                answer = response.json()
                break
        except requests.RequestException:
            pass
        time.sleep(1.0)
    assert answer is not None, "no replica answered within 180 s of the kill"
    assert answer["choices"][0]["text"] == expected
    replicas = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::cllm#JacobiServer#")
    ]
    assert len(replicas) == 1 and replicas != names
