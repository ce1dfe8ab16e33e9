"""Reliability of the deployed server: real local Ray and Serve, real HTTP on 127.0.0.1, a real tiny model.

  hostile input     500 malformed or hostile requests, sent concurrently: each gets its 4xx, none a 5xx
                    or a hang, and the server answers exactly afterwards
  body limit        a body over `max_request_bytes` is a 413, one at the limit is served
  disconnect        a client that leaves a stream frees its engine row within a few steps
  context end       requests ending exactly at GPT-2's context, sharing steps with a long stream, all
                    exact (their pad slots once took positions past the context and failed the step)
  killed replica    SIGKILL of the replica's process: Serve starts a new one and requests succeed again
  autoscaling       fractional CPUs, 1 to 2 replicas: sustained load adds one, idleness removes it

Every answer is checked against greedy `generate` of the same model.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import string
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import requests
from conftest import (
    BYTE_VOCAB,
    REPLICA_PREFIX,
    SERVED_CONTEXT,
    SERVED_NAME,
    byte_level_tokenizer,
    greedy_text,
    save_model_dir,
    tiny_model,
    wait_for,
)
from ray import serve
from ray._private.state import actors as actor_table

from cllm.models.loading import load_model
from cllm.serving.api import build_app

CONTEXT, MODEL_NAME = SERVED_CONTEXT, SERVED_NAME
BODY_LIMIT = 64 * 1024  # the test server's max_request_bytes (the default is 4 MiB)
TIMEOUT = (5, 60)  # connect, read: a hang fails the test instead of stalling it
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def app_args(served_dir, **overrides) -> dict:
    return {"model": str(served_dir), "model_name": MODEL_NAME, "block_size": 4, "num_cpus": 0.25,
            "max_batch_size": 8, "max_request_bytes": BODY_LIMIT, **overrides}  # fmt: skip


@pytest.fixture(scope="module")
def server(serve_cluster, served_dir):
    serve.run(build_app(app_args(served_dir)), name="cllm", route_prefix="/")
    return serve_cluster


def complete(url: str, prompt: str, max_tokens: int, **fields) -> requests.Response:
    payload = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, **fields}
    return requests.post(url + COMPLETIONS, json=payload, timeout=TIMEOUT)


def health(url: str) -> dict:
    return requests.get(url + "/healthz", timeout=TIMEOUT).json()


def answers_exactly(url: str, served, prompt: str = "end.", max_tokens: int = 8) -> bool:
    response = complete(url, prompt, max_tokens)
    return response.status_code == 200 and response.json()["choices"][0]["text"] == greedy_text(
        served, prompt, max_tokens
    )


# ---------------------------------------------------------------------------------------------------------
# 500 hostile requests


@dataclass
class Probe:
    """One hostile request and the status it must get."""

    family: str
    method: str
    path: str
    body: bytes | None
    status: int
    chunked: bool = False  # send the body without a Content-Length (chunked transfer encoding)


def valid_body(rng: random.Random, route: str) -> dict:
    if route == COMPLETIONS:
        return {"model": MODEL_NAME, "prompt": rng.choice(["hi", "zzz", "héllo"]), "max_tokens": 4}
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def probe(family: str, rng: random.Random, body: dict, route: str = COMPLETIONS, status: int = 400) -> Probe:
    """A JSON request; a third of them ask to stream (every refusal must come before the stream starts)."""
    if rng.random() < 0.3 and "stream" not in body:
        body = {**body, "stream": True}
    return Probe(family, "POST", route, json.dumps(body).encode(), status)


def bad_json(rng):
    garbage = "{" + "".join(rng.choice(string.ascii_letters + ':,"[') for _ in range(rng.randint(1, 40)))
    raw = rng.choice([b"{not json", b"{'model': 'tiny-bytes'}", b'{"model": "tiny-bytes",}', b"{]", b"nul",
                      b'{"a" 1}', b"", b"   ", b"null", b"[]", b"42", b'"text"', b"true",
                      garbage.encode()])  # fmt: skip
    return Probe("bad_json", "POST", rng.choice([COMPLETIONS, CHAT]), raw, 400)


def truncated_json(rng):
    route = rng.choice([COMPLETIONS, CHAT])
    raw = json.dumps(valid_body(rng, route)).encode()
    return Probe("truncated_json", "POST", route, raw[: rng.randint(1, len(raw) - 1)], 400)


WRONG_TYPES = {
    "max_tokens": ["5", True, False, 2.5, [5], {"v": 5}],
    "seed": ["3", True, 1.5, [3]],
    "n": ["1", True, 1.5, [1]],
    "temperature": [True, False, [0.5], {"v": 1}, "warm"],
    "top_p": [True, [1], "all"],
    "stream": [[True], {"on": 1}, 2, "maybe"],
    "stop": [5, [1, 2], {"s": 1}, [None]],
    "model": [5, None, [MODEL_NAME], True],
    "logit_bias": ["x", [1]],
}
WRONG_PROMPTS = [42, True, None, {"text": "hi"}, [1.5], [True, 5], [[True]], ["a", 1], [[1], "a"], [5.0]]
WRONG_MESSAGES = ["hi", {"role": "user"}, [1], [{"role": "user", "content": 5}], [None],
                  [{"role": "user", "content": [{"type": "text"}]}]]  # fmt: skip


def wrong_types(rng):
    route = rng.choice([COMPLETIONS, CHAT])
    body = valid_body(rng, route)
    choice = rng.random()
    if choice < 0.25 and route == COMPLETIONS:
        body["prompt"] = rng.choice(WRONG_PROMPTS)
    elif choice < 0.25:
        body["messages"] = rng.choice(WRONG_MESSAGES)
    else:
        field = rng.choice(sorted(WRONG_TYPES))
        body[field] = rng.choice(WRONG_TYPES[field])
    return probe("wrong_types", rng, body, route)


OUT_OF_RANGE = {
    "max_tokens": [0, -1, -(10**6), CONTEXT, 10**9, 2**63, 10**30],
    "temperature": [-0.1, -1, -1e9, 1e9],
    "top_p": [-0.5, 0, 1.5, 10],
    "n": [0, -1, -100],
    "stop": [["a", "b", "c", "d", "e"], ""],
}


def out_of_range(rng):
    route = rng.choice([COMPLETIONS, CHAT])
    body = valid_body(rng, route)
    if rng.random() < 0.2:  # numbers Python's json reads but no field takes: NaN, infinities, 5000 digits
        field = rng.choice(["max_tokens", "temperature", "top_p"])
        value = rng.choice(["NaN", "Infinity", "-Infinity", "9" * 5000, "-" + "9" * 5000])
        raw = json.dumps(body)[:-1] + f', "{field}": {value}}}'
        return Probe("out_of_range", "POST", route, raw.encode(), 400)
    field = rng.choice(sorted(OUT_OF_RANGE))
    body[field] = rng.choice(OUT_OF_RANGE[field])
    if route == CHAT and rng.random() < 0.3:
        body["max_completion_tokens"] = rng.choice([0, -5, 10**9])
    return probe("out_of_range", rng, body, route)


def unknown_field(rng):
    route = rng.choice([COMPLETIONS, CHAT])
    body = valid_body(rng, route)
    where = rng.choice(["top", "top", "message", "stream_options", "wrong_route"])
    if where == "top":
        body[rng.choice(["foo", "bogus_knob", "beam_width", "x-debug"])] = rng.choice([1, "a", None, True])
    elif where == "message" and route == CHAT:
        body["messages"][0]["foo"] = 1
    elif where == "stream_options":
        body.update(stream=True, stream_options={"include_usage": True, "extra": 1})
    else:  # the other route's prompt field
        body["messages" if route == COMPLETIONS else "prompt"] = "hi"
    return probe("unknown_field", rng, body, route)


def unknown_model(rng):
    route = rng.choice([COMPLETIONS, CHAT])
    name = rng.choice(["gpt-4o", "", MODEL_NAME + " ", MODEL_NAME.upper(), f"{rng.getrandbits(128):032x}"])
    return probe("unknown_model", rng, {**valid_body(rng, route), "model": name}, route, status=404)


def unknown_route(rng):
    path = rng.choice(["/v1/nothing", "/v2/completions", "/v1/completions/x", "/v1/chat", "/v1/embeddings",
                       "/admin", "/v1/models/x/y", "/%ff"])  # fmt: skip
    return Probe("unknown_route", rng.choice(["GET", "POST"]), path, json.dumps(valid_body(rng, COMPLETIONS)).encode(),
                 404)  # fmt: skip


def wrong_method(rng):
    path, methods = rng.choice([(COMPLETIONS, ["GET", "PUT", "DELETE", "PATCH"]), (CHAT, ["GET", "PUT", "DELETE"]),
                                ("/v1/models", ["POST", "PUT", "DELETE"]), ("/healthz", ["POST", "PUT"])])  # fmt: skip
    return Probe("wrong_method", rng.choice(methods), path, json.dumps(valid_body(rng, COMPLETIONS)).encode(), 405)


def non_utf8(rng):
    route = rng.choice([COMPLETIONS, CHAT])
    text = json.dumps({**valid_body(rng, route), "user": "@@"})
    if rng.random() < 0.2:
        return Probe("non_utf8", "POST", route, text.encode(rng.choice(["utf-16", "utf-32"])), 400)
    if rng.random() < 0.2:  # valid UTF-8 whose JSON escape is a lone surrogate: not Unicode text
        return Probe("non_utf8", "POST", route, text.replace("@@", "\\ud800").encode(), 400)
    bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe9", b"\x80\x80"])
    return Probe("non_utf8", "POST", route, text.encode().replace(b"@@", bad), 400)


def deep_nesting(rng):
    depth = rng.randint(1_000, 10_000)  # the deepest stays under BODY_LIMIT
    lists, objects = "[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth
    route = rng.choice([COMPLETIONS, CHAT])
    field = "prompt" if route == COMPLETIONS else "messages"
    raw = rng.choice([lists, objects, f'{{"model": "{MODEL_NAME}", "{field}": {lists}}}',
                      f'{{"model": "{MODEL_NAME}", "stop": {objects}, "{field}": "hi"}}'])  # fmt: skip
    return Probe("deep_nesting", "POST", route, raw.encode(), 400)


def oversized(rng):
    route = rng.choice([COMPLETIONS, CHAT])
    size = rng.choice([BODY_LIMIT + 1, 2 * BODY_LIMIT, 10 * BODY_LIMIT])
    body = json.dumps({**valid_body(rng, route), "user": ""})
    raw = (body[:-2] + "u" * (size - len(body)) + '"}').encode()
    assert len(raw) == size
    return Probe("oversized", "POST", route, raw, 413, chunked=rng.random() < 0.3)


def token_ids(rng):
    bad = rng.choice([BYTE_VOCAB, BYTE_VOCAB + rng.randint(1, 10**6), -1, -rng.randint(2, 10**9), 2**31, 2**64, 10**30])
    ids = [rng.randint(4, BYTE_VOCAB - 1) for _ in range(rng.randint(0, 5))]
    ids.insert(rng.randint(0, len(ids)), bad)
    prompt = [ids] if rng.random() < 0.3 else ids
    return probe("token_ids", rng, {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 4})


def empty_prompt(rng):
    return probe("empty_prompt", rng, {"model": MODEL_NAME, "prompt": rng.choice(["", [], [[]], [""]])})


def too_long(rng):
    n = rng.randint(CONTEXT, 3 * CONTEXT)  # the byte-level tokenizer: one token per ASCII character
    kind = rng.choice(["text", "ids", "budget", "chat"])
    if kind == "text":
        body = {"model": MODEL_NAME, "prompt": "x" * n}
    elif kind == "ids":
        body = {"model": MODEL_NAME, "prompt": [rng.randint(4, BYTE_VOCAB - 1) for _ in range(n)]}
    elif kind == "budget":
        body = {"model": MODEL_NAME, "prompt": "x" * (CONTEXT - 10), "max_tokens": rng.randint(11, 100)}
    else:
        return probe("too_long", rng, {"model": MODEL_NAME, "messages": [{"role": "user", "content": "y" * n}]}, CHAT)
    return probe("too_long", rng, body)


def empty_messages(rng):
    return probe("empty_messages", rng, {"model": MODEL_NAME, "messages": [], "max_tokens": 4}, CHAT)


def bad_role(rng):
    role = rng.choice(["wizard", "", "USER", None, 5, "function", ["user"]])
    return probe("bad_role", rng, {"model": MODEL_NAME, "messages": [{"role": role, "content": "hi"}]}, CHAT)


FAMILIES = [bad_json, truncated_json, wrong_types, out_of_range, unknown_field, unknown_model, unknown_route,
            wrong_method, non_utf8, deep_nesting, oversized, token_ids, empty_prompt, too_long, empty_messages,
            bad_role]  # fmt: skip


def hostile_requests(n: int, seed: int = 18) -> list[Probe]:
    rng = random.Random(seed)
    probes = [family(rng) for family in FAMILIES]  # every family at least once
    probes += [rng.choice(FAMILIES)(rng) for _ in range(n - len(probes))]
    rng.shuffle(probes)
    return probes


def send(url: str, p: Probe) -> tuple[int, str]:
    """The status and the error message (empty when the body is not an OpenAI error)."""
    data, raw = p.body, p.body or b""
    if p.chunked:
        data = (raw[i : i + 8192] for i in range(0, len(raw), 8192))
    headers = {"Content-Type": "application/json"}
    response = requests.request(p.method, url + p.path, data=data, headers=headers, timeout=TIMEOUT)
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = ""
    return response.status_code, message


def test_hostile_requests_each_get_a_4xx_and_the_server_still_answers_exactly(server, served):
    probes = hostile_requests(500)
    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: send(server, p), probes))
    seconds = time.monotonic() - start
    by_class = Counter(f"{status // 100}xx" for status, _ in results)
    wrong = [(p.family, p.method, p.path, (p.body or b"")[:120], status, message)
             for p, (status, message) in zip(probes, results, strict=True)
             if status != p.status or not message]  # fmt: skip
    print(f"500 hostile requests in {seconds:.1f}s: {dict(by_class)}, "
          f"by family {dict(Counter(p.family for p in probes))}")  # fmt: skip
    assert by_class == {"4xx": 500}, wrong[:10]
    assert not wrong, wrong[:10]  # each got the status of its kind, with an OpenAI error message
    assert answers_exactly(server, served)
    state = health(server)
    assert state["running"] == 0 and state["waiting"] == 0


def test_the_body_limit_is_a_413_and_a_body_just_under_it_is_served(server, served):
    prompt = "x" * (CONTEXT - 10)
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 4, "user": ""}
    size = len(json.dumps(body))
    body["user"] = "u" * (BODY_LIMIT - size)
    assert len(json.dumps(body)) == BODY_LIMIT
    response = requests.post(server + COMPLETIONS, data=json.dumps(body), timeout=TIMEOUT)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == greedy_text(served, prompt, 4)
    body["user"] += "u"
    response = requests.post(server + COMPLETIONS, data=json.dumps(body), timeout=TIMEOUT)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and str(BODY_LIMIT) in error["message"]


# ---------------------------------------------------------------------------------------------------------
# A client that leaves


def test_a_client_that_leaves_mid_stream_frees_its_row_within_a_few_steps(server, served):
    """The engine steps only while it has requests, so `steps` in /healthz counts the passes a request cost."""
    payload = {"model": MODEL_NAME, "prompt": "zzz", "max_tokens": CONTEXT - 4}
    full = requests.post(server + COMPLETIONS, json=payload, timeout=TIMEOUT).json()
    full_steps = full["jacobi_stats"]["forward_passes"]
    before = health(server)["steps"]
    with requests.post(server + COMPLETIONS, json={**payload, "stream": True}, stream=True, timeout=TIMEOUT) as r:
        next(line for line in r.iter_lines() if line)
    at_close = health(server)["steps"]  # the connection is closed: the proxy cancels the request
    deadline = time.monotonic() + 30
    while (state := health(server))["running"] and time.monotonic() < deadline:
        time.sleep(0.002)
    after_close = state["steps"] - at_close
    print(f"full decode {full_steps} steps; the stream left after {at_close - before} steps, "
          f"its row freed {after_close} steps later")  # fmt: skip
    assert state["running"] == 0 and state["waiting"] == 0
    assert after_close < full_steps // 8  # the disconnect travels through the proxy while steps go on
    assert answers_exactly(server, served, "zzz", 12)


# ---------------------------------------------------------------------------------------------------------
# A request that fails in the engine: its neighbours and the loop go on
#
# A real trigger: GPT-2 has learned absolute positions (n_positions = the context). A request that ends
# at the context's last position, sharing a step with a request whose Jacobi window is wider than its own,
# gets position ids past the context for its right-padded window slots (`cllm.decoding.jacobi.jacobi_forward`), and
# the position embedding refuses them: the batched forward of that step fails.


@pytest.fixture(scope="module")
def gpt2_server(serve_cluster, tmp_path_factory):
    model = tiny_model("gpt2", vocab_size=BYTE_VOCAB, context=CONTEXT)
    path = save_model_dir(tmp_path_factory.mktemp("tiny-byte-gpt2"), model, byte_level_tokenizer())
    serve.run(build_app(app_args(path)), name="gpt2", route_prefix="/gpt2")
    yield serve_cluster + "/gpt2", load_model(str(path), device="cpu")
    serve.delete("gpt2")


def stream_text(lines) -> tuple[str, str | None]:
    """A streamed answer's text and its error message (None when it ended normally), from its SSE lines."""
    text, error = [], None
    for line in lines:
        data = line[len(b"data: ") :].decode() if line else "[DONE]"
        if data == "[DONE]":
            continue
        event = json.loads(data)
        if "error" in event:
            error = event["error"]["message"]
        else:
            text += [c["text"] for c in event["choices"]]
    return "".join(text), error


EDGE_PROMPT, EDGE_TOKENS = "e" * (CONTEXT - 4), 4  # ends exactly at the context's last position


def context_end_mix(url: str) -> tuple[tuple[str, str | None], list[requests.Response]]:
    """A long stream (window 4) and, while it runs, requests that end exactly at the context, one after
    another (whether one's window narrows while it shares a step depends on when it joins, so send many)."""
    edges: list[requests.Response] = []
    long_ended = threading.Event()

    def send_edges() -> None:
        while not long_ended.is_set() and len(edges) < 30:
            edges.append(complete(url, EDGE_PROMPT, EDGE_TOKENS))

    payload = {"model": MODEL_NAME, "prompt": "zzz", "max_tokens": CONTEXT - 3, "stream": True}
    with ThreadPoolExecutor(1) as pool, requests.post(url + COMPLETIONS, json=payload, stream=True,
                                                      timeout=TIMEOUT) as long:  # fmt: skip
        lines = long.iter_lines()
        first = next(line for line in lines if line)
        sender = pool.submit(send_edges)
        streamed = stream_text(itertools.chain([first], lines))
        long_ended.set()
        sender.result()
    assert edges, "no request reached the server while the long one ran"
    return streamed, edges


def test_a_request_at_the_context_end_fails_no_one(gpt2_server):
    url, served = gpt2_server
    (long_text, long_error), edges = context_end_mix(url)
    assert [edge.status_code for edge in edges] == [200] * len(edges), edges[0].text
    assert {edge.json()["choices"][0]["text"] for edge in edges} == {greedy_text(served, EDGE_PROMPT, EDGE_TOKENS)}
    assert long_error is None and long_text == greedy_text(served, "zzz", CONTEXT - 3)


# ---------------------------------------------------------------------------------------------------------
# A killed replica (after the tests above: it replaces the main app's replica)


def replicas(app: str) -> dict[str, int]:
    """Live replica actors of an app: name -> process id."""
    prefix = REPLICA_PREFIX.format(app=app)
    return {info["Name"]: info["Pid"] for info in actor_table().values()
            if info["Name"].startswith(prefix) and info["State"] == "ALIVE"}  # fmt: skip


@pytest.mark.slow
def test_a_killed_replica_process_is_replaced_and_requests_succeed_again(server, served):
    ((name, pid),) = replicas("cllm").items()
    expected = greedy_text(served, "hi there", 12)
    os.kill(pid, signal.SIGKILL)  # a crash, not a polite shutdown
    killed_at, first_success = time.monotonic(), None
    while first_success is None and time.monotonic() - killed_at < 240:
        try:
            response = complete(server, "hi there", 12)
            if response.status_code == 200:
                assert response.json()["choices"][0]["text"] == expected
                first_success = time.monotonic() - killed_at
        except requests.RequestException:
            pass
        time.sleep(0.5)
    assert first_success is not None, "no replica answered within 240 s of the kill"
    print(f"a new replica answered {first_success:.1f}s after the kill")
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda _: complete(server, "hi there", 12).json()["choices"][0]["text"], range(8)))
    assert texts == [expected] * 8
    ((new_name, new_pid),) = replicas("cllm").items()
    assert new_name != name and new_pid != pid


# ---------------------------------------------------------------------------------------------------------
# Autoscaling


def replica_states(app: str) -> dict[str, int]:
    """How many of the app's replicas are in each state (STARTING, RUNNING, STOPPING, ...)."""
    return dict(serve.status().applications[app].deployments["JacobiServer"].replica_states)


@pytest.mark.slow
def test_sustained_load_adds_a_replica_and_idleness_removes_it(serve_cluster, served_dir, served):
    """Replicas of a quarter CPU, 1 to 2 of them, a target of 1 ongoing request, delays of seconds, load
    averaged over 12 s (Serve wants more than its 10 s metrics interval). Four clients keep four requests
    in flight until the second replica runs, then stop. Starting a replica imports torch and loads the
    model: about a minute on a busy 2-core machine, hence the long bounds."""
    args = app_args(served_dir, min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1,
                    downscale_delay_s=3, look_back_period_s=12, max_ongoing_requests=8)  # fmt: skip
    serve.run(build_app(args), name="auto", route_prefix="/auto")
    url = serve_cluster + "/auto"
    try:
        assert replica_states("auto") == {"RUNNING": 1}
        expected = greedy_text(served, "zzz", 150)
        stop, failures = [], []

        def load() -> int:
            done = 0
            while not stop:
                response = complete(url, "zzz", 150)
                if response.status_code != 200 or response.json()["choices"][0]["text"] != expected:
                    failures.append(response.text[:200])
                done += 1
            return done

        with ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(load) for _ in range(4)]
            try:
                decided = wait_for(lambda: sum(replica_states("auto").values()) == 2, timeout=60)
                running = wait_for(lambda: replica_states("auto").get("RUNNING") == 2, timeout=240)
            finally:
                stop.append(True)
            answered = sum(w.result() for w in workers)
        assert decided is not None, "Serve did not add a replica under sustained load within 60 s"
        assert running is not None, "the second replica did not start within 240 s"
        scaled_down = wait_for(lambda: replica_states("auto") == {"RUNNING": 1}, timeout=120)
        print(f"second replica decided after {decided:.1f}s of load, running {running:.1f}s later "
              f"({answered} requests answered); back to one {scaled_down}s after the load ended")  # fmt: skip
        assert scaled_down is not None, "still two replicas 120 s after the load ended"
        assert not failures, failures[:3]
        assert complete(url, "zzz", 150).json()["choices"][0]["text"] == expected
    finally:
        serve.delete("auto")
