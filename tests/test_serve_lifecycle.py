"""A replica's life, over real HTTP: a real local Ray and Serve on 127.0.0.1, the real (tiny) served model.

  defaults      16 streams at once all begin before any ends (the default running-rows cap)
  dead engine   a replica whose engine thread has stopped answers 503 (/healthz and requests, OpenAI
                error bodies) and fails Serve's health check; Serve replaces it within seconds, and
                the new replica answers exactly
  drain         stopping the app (`stop_serving`) lets a stream in flight finish; a request sent
                meanwhile gets a 503; once stopped, no replica is left and the port is closed
  SIGTERM       `python pipelines/serve.py` on SIGTERM: the same drain, exit code 0, and none of
                the processes it started (Ray's included) is left running

The server decodes in `ar` mode (one pass per token) a tiny model with a context of 1,024 tokens: a stream of
a thousand tokens lasts seconds, so it is surely still in flight when the stop begins. Answers are checked
against greedy `generate` of the same model.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import requests
from conftest import REPLICA_PREFIX, SERVED_NAME, byte_llama_dir, free_port, greedy_text, wait_for
from ray import serve

from cllm.models.loading import load_model
from cllm.serving.api import build_app, stop_serving
from cllm.serving.config import ServeConfig

MODEL_NAME, CONTEXT = SERVED_NAME, 1024
LONG_PROMPT, LONG_TOKENS = "end.", 1000  # the tiny model's greedy answer runs the whole length: 1,000 passes
TIMEOUT = (5, 120)  # connect, read


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    return byte_llama_dir(tmp_path_factory, CONTEXT)


@pytest.fixture(scope="module")
def long_served(long_dir):
    """The served model, loaded here: the reference answers."""
    return load_model(str(long_dir), device="cpu")


def app_args(model_dir) -> dict:
    return {"model": str(model_dir), "model_name": MODEL_NAME, "mode": "ar", "num_cpus": 0.5}


@pytest.fixture(scope="module")
def server(serve_cluster, long_dir):
    serve.run(build_app(app_args(long_dir)), name="cllm", route_prefix="/")
    return serve_cluster


def completion(prompt: str, max_tokens: int, stream: bool = False) -> dict:
    """A completion request's body."""
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "stream": stream}


def complete(url: str, prompt: str, max_tokens: int) -> requests.Response:
    return requests.post(url + "/v1/completions", json=completion(prompt, max_tokens), timeout=TIMEOUT)


def assert_openai_error(response: requests.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["code"]) == ("server_error", code)


class Stream:
    """A streamed completion read in a thread of its own: its text, whether it reached `[DONE]`, and an
    event set once its first text arrived (the request is then surely in flight)."""

    def __init__(self, url: str, prompt: str, max_tokens: int):
        self.text, self.done, self.error = "", False, None
        self.first_at = self.ended_at = 0.0
        self.started = threading.Event()
        self.thread = threading.Thread(target=self.read, args=(url, completion(prompt, max_tokens, stream=True)),
                                       daemon=True)
        self.thread.start()

    def read(self, url: str, payload: dict) -> None:
        try:
            with requests.post(url + "/v1/completions", json=payload, stream=True, timeout=TIMEOUT) as response:
                assert response.status_code == 200, response.text[:300]
                for line in response.iter_lines():
                    if not line:
                        continue
                    data = line.decode()[len("data: "):]
                    if data == "[DONE]":
                        self.done = True
                    elif "error" in (event := json.loads(data)):
                        self.error = event["error"]
                    else:
                        self.text += event["choices"][0]["text"]
                        self.first_at = self.first_at or time.monotonic()
                        self.started.set()
        except Exception as err:  # recorded, checked by the test
            self.error = repr(err)
        finally:
            self.ended_at = time.monotonic()
            self.started.set()

    def result(self, timeout: float = 180) -> tuple[str, bool, object]:
        self.thread.join(timeout)
        return self.text, self.done, self.error


def abandon_stream(url: str, prompt: str, max_tokens: int) -> None:
    """Send a streamed completion and hang up at once, before any of the answer could be read."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(completion(prompt, max_tokens, stream=True)).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(head + body)


def refused_while_streaming(url: str, stream: Stream, stopping) -> requests.Response:
    """Send requests while a stop is under way until one is refused, which must happen before `stream` ends:
    the proof that the drain refused newcomers while the request in flight went on."""
    while stopping() and not stream.done:
        try:
            response = complete(url, "hi there", 4)
        except requests.ConnectionError:  # past the drain already
            break
        if response.status_code != 200:
            assert not stream.done, "refused only after the stream had ended"
            refused_at = time.monotonic() - stream.first_at
            stream.result()
            print(f"refused {refused_at:.2f}s into a stream of {stream.ended_at - stream.first_at:.2f}s")
            return response
    raise AssertionError("no request was refused while the stream was in flight")


def replica_names() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(REPLICA_PREFIX.format(app="cllm")))  # fmt: skip


def healthz_status(url: str) -> int | None:
    try:
        return requests.get(url + "/healthz", timeout=TIMEOUT).status_code
    except requests.RequestException:
        return None


# ---------------------------------------------------------------------------------------------------------
# The default running-rows cap


def test_with_the_defaults_sixteen_streams_all_start_before_any_ends(server, long_served):
    """The server runs on its default `max_batch_size`: 16 clients streaming at once all get their first
    text before the first of them is answered whole, so none waits for another's request to finish."""
    expected = greedy_text(long_served, LONG_PROMPT, 200)
    streams = [Stream(server, LONG_PROMPT, 200) for _ in range(16)]
    results = [stream.result() for stream in streams]
    assert all(error is None and done and text == expected for text, done, error in results), results[0]
    last_start = max(stream.first_at for stream in streams)
    first_end = min(stream.ended_at for stream in streams)
    assert last_start < first_end, f"a stream began {last_start - first_end:.2f}s after the first had ended"


# ---------------------------------------------------------------------------------------------------------
# A dead engine thread


def test_a_replica_whose_engine_thread_stopped_answers_503_and_serve_replaces_it(server, long_served):
    """The engine thread cannot be made to fail from outside without a fault hook the product does not
    need. The replica's own teardown, `__del__` (what Serve calls when it stops a replica), stops exactly
    that thread and leaves the replica's routes serving: the state a crashed engine thread leaves. It is
    called through a Serve deployment handle, as any client of the deployment could."""
    (old,) = replica_names()
    expected = greedy_text(long_served, "hi there", 12)
    assert complete(server, "hi there", 12).json()["choices"][0]["text"] == expected
    serve.get_deployment_handle("JacobiServer", "cllm").broadcast("__del__").results(timeout_s=60)
    stopped_at = time.monotonic()

    health = requests.get(server + "/healthz", timeout=TIMEOUT)
    assert_openai_error(health, 503, "engine_stopped")
    assert_openai_error(complete(server, "hi there", 12), 503, "engine_stopped")  # at once, not a hang

    healthy_again = wait_for(lambda: healthz_status(server) == 200, timeout=240)
    assert healthy_again is not None, "no healthy replica 240 s after the engine stopped"
    replaced = wait_for(lambda: replica_names() not in ([], [old]), timeout=30)
    assert replaced is not None and len(replica_names()) == 1
    print(f"the engine stopped; a new replica answered /healthz {time.monotonic() - stopped_at:.1f}s later")
    assert complete(server, "hi there", 12).json()["choices"][0]["text"] == expected


# ---------------------------------------------------------------------------------------------------------
# Stopping: the drain (last: it shuts Serve down)


def test_stopping_lets_a_stream_in_flight_finish_and_refuses_new_requests(server, long_served, long_dir):
    """Streams whose clients hung up at once count as in flight no longer: the drain ends with the one stream
    still read, not at its timeout."""
    expected = greedy_text(long_served, LONG_PROMPT, LONG_TOKENS)
    for _ in range(4):
        abandon_stream(server, LONG_PROMPT, LONG_TOKENS)
    stream = Stream(server, LONG_PROMPT, LONG_TOKENS)
    assert stream.started.wait(120) and stream.error is None
    config = ServeConfig(**app_args(long_dir))
    stopper = threading.Thread(target=stop_serving, args=(config,))
    stopper.start()
    refusal = refused_while_streaming(server, stream, stopper.is_alive)
    text, done, error = stream.result()
    stopper.join(120)
    stopped_after = time.monotonic() - stream.ended_at
    assert error is None and done and text == expected  # the stream in flight finished, whole
    assert stopped_after < config.drain_timeout_s / 2, stopped_after
    assert_openai_error(refusal, 503, "shutting_down")
    assert not stopper.is_alive() and replica_names() == []
    with pytest.raises(requests.ConnectionError):  # Serve is gone: its proxy no longer listens
        complete(server, "hi there", 4)


# ---------------------------------------------------------------------------------------------------------
# SIGTERM to the entry point


@pytest.mark.slow
def test_sigterm_drains_and_exits_cleanly_leaving_no_process(long_dir, long_served, tmp_path):
    """`python pipelines/serve.py` answers over HTTP; on SIGTERM with a stream in flight the stream ends
    whole, the process exits with code 0, and every process it started (Ray's GCS, raylet, workers, the
    replica, the proxy) has gone."""
    port, root, log = free_port(), Path(__file__).resolve().parents[1], tmp_path / "serve.log"
    command = [sys.executable, str(root / "pipelines" / "serve.py"), "--model", str(long_dir),
               "--port", str(port), "--model-name", MODEL_NAME, "--num-cpus", "0.5", "--mode", "ar"]  # fmt: skip
    url, expected = f"http://127.0.0.1:{port}", greedy_text(long_served, LONG_PROMPT, LONG_TOKENS)
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=root, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while f"{url}/v1" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(2.0)
        assert f"{url}/v1" in log.read_text(), log.read_text()[-3000:]
        assert complete(url, "hi there", 12).json()["choices"][0]["text"] == greedy_text(long_served, "hi there", 12)
        stream = Stream(url, LONG_PROMPT, LONG_TOKENS)
        assert stream.started.wait(120) and stream.error is None
        started = descendants(process.pid)
        assert len(started) >= 3  # Ray's processes, the replica's among them
        process.send_signal(signal.SIGTERM)
        refusal = refused_while_streaming(url, stream, lambda: process.poll() is None)
        text, done, error = stream.result()
        assert error is None and done and text == expected, log.read_text()[-3000:]
        assert_openai_error(refusal, 503, "shutting_down")
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
        gone = wait_for(lambda: not started & running().keys(), timeout=30)
        assert gone is not None, {pid: args for pid, args in running().items() if pid in started}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def processes() -> list[tuple[int, int, str, str]]:
    """Every process on the machine: pid, parent pid, state, command line."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 3) for line in ps.splitlines()]
    return [(int(row[0]), int(row[1]), row[2], row[3] if len(row) > 3 else "") for row in rows]


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for child, parent, _, _ in processes():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def running() -> dict[int, str]:
    """Processes that have not exited (a zombie has), by pid: their command lines."""
    return {pid: args for pid, _, state, args in processes() if not state.startswith("Z")}
