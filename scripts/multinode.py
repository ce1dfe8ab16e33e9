"""Scale-out proof on one machine: a head and two worker nodes, each a `ray start` of its own on 127.0.0.1.

    python scripts/multinode.py                          # every scenario, then a table of outcomes and times
    python scripts/multinode.py placement collect-kill   # some of them

Scenarios (issue 19), each a `ray job submit` of `pipelines/full.py` on a tiny Llama and a small dataset:

    placement     collection actors on both worker nodes, the two training workers on different nodes, and
                  every stage's files under the one output directory
    collect-kill  a worker node SIGKILLed while collection runs: the job succeeds with the rows of an
                  undisturbed run
    read-kill     a worker node SIGKILLed as collection ends, so the training stage's read starts while the
                  GCS still counts it alive: a read that fails is retried, and the job ends with the same weights
    train-kill    a worker node SIGKILLed during consistency training: the worker group resumes from the
                  last checkpoint and ends with the undisturbed run's step count and weights
    serve-kill    two Serve replicas on two nodes, one node SIGKILLed under a steady request stream

A killed node is replaced by a fresh one, as KubeRay replaces a lost pod. Nodes get 2 logical CPUs each
(more than the machine has: placement is steered by the counts, not by real cores), and every stage asks
1.5 CPUs per actor, worker or replica, so no node can hold two. Ray is stopped by PID, never `ray stop`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
HEAD_CPUS, WORKER_CPUS, CPUS_EACH = 1, 2, 1.5  # 1.5 of a worker's 2: one actor / worker / replica per node
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
COLLECTOR, TRAIN_WORKER = "MapWorker(MapBatches(TrajectoryDecoder))", "RayTrainWorker"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log(text: str) -> None:
    print(f"[multinode {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# The cluster: one `ray start` per node, each with its own ports and temp dir, so its processes are its own


def node_pids(temp_dir: Path) -> list[int]:
    """Every process of a node: those started with its temp dir, and their descendants (its workers)."""
    marker = str(temp_dir) + "/"
    table = [line.split(None, 2) for line in subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout.splitlines()]
    children: dict[int, list[int]] = {}
    for pid, ppid, *_ in table:
        children.setdefault(int(ppid), []).append(int(pid))
    found = [int(row[0]) for row in table if len(row) == 3 and (marker in row[2] or row[2].endswith(marker[:-1]))]
    found = [pid for pid in found if pid != os.getpid()]
    todo = list(found)
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return sorted(set(found))


@dataclass
class Node:
    name: str  # also a custom resource of the node (1 unit), so it can be found in the GCS's node table
    temp_dir: Path
    node_id: str = ""


@dataclass
class LocalCluster:
    """A head and worker nodes on 127.0.0.1; a node is killed, and the cluster stopped, by PID."""

    root: Path
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    nodes: dict[str, Node] = field(default_factory=dict)
    workers_started: int = 0
    keep_logs: Path | None = None  # copy the nodes' Ray logs here when stopping

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict:
        # RAY_ADDRESS: Ray's own helpers that call `ray.init()` (Ray Train's placement group cleaner) would
        # otherwise find several clusters on this machine and fail
        return {**os.environ, **ENV, "RAY_ADDRESS": self.address}

    def start_node(self, name: str, num_cpus: int, head: bool = False) -> Node:
        temp_dir = self.root / name  # short: Ray's socket paths under it must stay below ~107 characters
        ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
        if head:
            where = ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"]
        else:
            where = [f"--address={self.address}"]
        command = [RAY, "start", *where, *ports, "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                   f"--resources={json.dumps({name: 1})}", "--object-store-memory=200000000",
                   f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        started = subprocess.run(command, env=self.env(), capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            raise RuntimeError(f"ray start of {name} failed:\n{started.stdout[-2000:]}{started.stderr[-2000:]}")
        node = Node(name, temp_dir)
        self.nodes[name] = node
        self.workers_started += not head
        node.node_id = self.wait_for_node(name)
        return node

    def wait_for_node(self, name: str, timeout: float = 120) -> str:
        """The node id the GCS gave the node holding resource `name`, once it is alive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.alive_nodes():
                if name in node.resources_total:
                    return node.node_id
            time.sleep(1)
        raise TimeoutError(f"node {name} did not join the cluster in {timeout:.0f} s")

    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        with contextlib.suppress(Exception):  # the dashboard may be starting
            return [n for n in list_nodes(address=self.dashboard, detail=True) if n.state == "ALIVE"]
        return []

    def pids(self, name: str) -> list[int]:
        return node_pids(self.nodes[name].temp_dir)

    def kill(self, name: str) -> float:
        """SIGKILL every process of a worker node (a node lost, not drained); seconds until the GCS sees it dead."""
        node = self.nodes.pop(name)
        started = time.monotonic()
        for pid in node_pids(node.temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while any(n.node_id == node.node_id for n in self.alive_nodes()):
            time.sleep(0.5)
        return time.monotonic() - started

    def stop(self) -> None:
        """Stop this cluster's processes only (`ray stop` would stop every Ray on the machine)."""
        for attempt in range(20):
            pids = [pid for name in self.nodes for pid in self.pids(name)]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM if attempt < 5 else signal.SIGKILL)
            time.sleep(1)
        if self.keep_logs is not None:  # every node's Ray logs, for a post-mortem
            for session in self.root.glob("*/session_*"):
                shutil.copytree(session / "logs", self.keep_logs / session.parent.name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.sock"))
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def local_cluster(workers: int = 2, keep_logs: Path | None = None) -> Iterator[LocalCluster]:
    """A head (1 CPU: the job driver and Ray Data's light tasks) and `workers` nodes of 2 CPUs each."""
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="cllm-mn-")), keep_logs=keep_logs)
    try:
        started = time.monotonic()
        cluster.start_node("head", HEAD_CPUS, head=True)
        for i in range(1, workers + 1):
            cluster.start_node(f"worker{i}", WORKER_CPUS)
        log(f"cluster of {len(cluster.nodes)} nodes up in {time.monotonic() - started:.0f} s at {cluster.dashboard}")
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------------------------------------
# The workload: a tiny Llama, a small dataset and a small pipeline config


def tiny_model_dir(path: Path) -> str:
    """The tests' tiny Llama (tests/conftest.py) and its character tokenizer, saved as a model directory."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import char_tokenizer, save_model_dir, tiny_model

    if not (path / "config.json").is_file():
        save_model_dir(path, tiny_model("llama", width=128), char_tokenizer())
    return str(path)


def dataset_file(path: Path, prompts: int) -> str:
    path.write_text("".join(json.dumps({"prompt": f"Add {i} and {i + 3}.", "answer": f"#### {2 * i + 3}"}) + "\n"
                            for i in range(prompts)))
    return str(path)


@dataclass
class Workload:
    """Small enough for minutes on 2 cores, large enough that a node can be killed mid-stage."""

    prompts: int = 48
    block_size: int = 8
    max_new_tokens: int = 48
    batch_size: int = 2  # prompts per decode batch: many batches, so collection is still running at the kill
    train_batch: int = 2
    epochs: int = 3

    def config(self, model: str, data: str, output_dir: Path, steps_per_epoch: int | None = None) -> dict:
        """The pipeline config; checkpoints fall on epoch boundaries when `steps_per_epoch` is known."""
        train = dict(num_workers=2, cpus_per_worker=CPUS_EACH, threads_per_worker=1, batch_size=self.train_batch,
                     epochs=self.epochs, checkpoint_every=steps_per_epoch or 10_000, keep_checkpoints=3, max_failures=2,
                     log_every=1)
        return {"model": model, "dataset": data, "output_dir": str(output_dir), "block_size": self.block_size,
                "max_new_tokens": self.max_new_tokens,
                "collect": dict(limit=self.prompts, actors=2, batch_size=self.batch_size, cpus_per_actor=CPUS_EACH),
                "train": train, "eval": dict(limit=2, methods=["ar", "jacobi"])}


# ---------------------------------------------------------------------------------------------------------
# Jobs and what they leave behind


def submit(cluster: LocalCluster, config: dict, path: Path) -> str:
    from ray.job_submission import JobSubmissionClient

    path.write_text(yaml.safe_dump(config))
    client = JobSubmissionClient(cluster.dashboard)
    entrypoint = f"{sys.executable} pipelines/full.py --config {path}"
    for _attempt in range(12):  # the head's job agent may need a few seconds after `ray start`
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(REPO)})
        except RuntimeError as err:
            if "No available agent" not in str(err):
                raise
            time.sleep(5)
    raise RuntimeError("the head's job agent never became available")


def wait_for_job(cluster: LocalCluster, job: str, timeout: float, during: Callable[[], None] | None = None) -> str:
    """Poll until the job ends; `during()` runs at each poll (a scenario's trigger). Returns the status."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        if during is not None:
            during()
        time.sleep(0.2)
    client.stop_job(job)
    return "TIMEOUT"


def job_logs(cluster: LocalCluster, job: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard).get_job_logs(job)


def job_actors(cluster: LocalCluster, job: str, class_name: str) -> list:
    """The actors of a job whose class (or repr) names `class_name`, dead ones included, with their node ids."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    driver_job = JobSubmissionClient(cluster.dashboard).get_job_info(job).driver_info.id
    actors = list_actors(address=cluster.dashboard, filters=[("job_id", "=", driver_job)], detail=True, limit=10_000)
    return [a for a in actors if class_name in (a.class_name, a.repr_name) or class_name in (a.repr_name or "")]


def trajectory_rows(output_dir: Path) -> list[dict]:
    from cllm.data.trajectories import read_trajectories

    return read_trajectories(output_dir / "trajectories")


def weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(output_dir / "cllm" / "model.safetensors"))


def train_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "stages" / "train.json").read_text())["metrics"]


def registered_checkpoint_step(output_dir: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered (not one still being written)."""
    snapshot = output_dir / "ray_train" / "cllm" / "checkpoint_manager_snapshot.json"
    with contextlib.suppress(OSError, ValueError, TypeError):
        return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"]
    return None


def checkpoints(output_dir: Path) -> list[Path]:
    return sorted(p for p in (output_dir / "ray_train" / "cllm").glob("checkpoint_*") if p.is_dir())


# ---------------------------------------------------------------------------------------------------------
# Scenarios: each returns its facts (asserted by the tests, printed by main)


@dataclass
class Outcome:
    scenario: str
    ok: bool
    seconds: float
    facts: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def check(self, condition: bool, problem: str) -> None:
        if not condition:
            self.ok = False
            self.problems.append(problem)


@dataclass
class Harness:
    """One cluster and workload shared by the scenarios; the placement run is the undisturbed reference."""

    cluster: LocalCluster
    work: Path
    workload: Workload = field(default_factory=Workload)
    job_timeout: float = 900
    reference: Path | None = None
    steps_per_epoch: int | None = None

    def __post_init__(self):
        self.model = tiny_model_dir(self.work / "model")
        self.data = dataset_file(self.work / "prompts.jsonl", self.workload.prompts)

    def run_job(self, name: str, during: Callable[[Path], None] | None = None) -> tuple[str, str, Path, float]:
        out = self.work / name
        config = self.workload.config(self.model, self.data, out, self.steps_per_epoch)
        started = time.monotonic()
        job = submit(self.cluster, config, self.work / f"{name}.yaml")
        status = wait_for_job(self.cluster, job, self.job_timeout, (lambda: during(out)) if during else None)
        seconds = time.monotonic() - started
        log(f"job {name}: {status} in {seconds:.0f} s")
        (self.work / f"{name}.log").write_text(job_logs(self.cluster, job))
        return job, status, out, seconds

    def replace(self, name: str) -> dict:
        """Kill worker node `name`, then start a fresh node in its place; what happened, and how long it took."""
        dead_after = self.cluster.kill(name)
        started = time.monotonic()
        fresh = f"worker{self.cluster.workers_started + 1}"
        self.cluster.start_node(fresh, WORKER_CPUS)
        joined_after = time.monotonic() - started
        log(f"killed {name} (dead to the GCS after {dead_after:.1f} s), {fresh} joined in {joined_after:.0f} s")
        return {"killed": name, "dead_after_s": round(dead_after, 1), "replacement": fresh,
                "joined_after_s": round(joined_after, 1)}

    def worker_ids(self) -> set[str]:
        return {node.node_id for name, node in self.cluster.nodes.items() if name != "head"}

    def placement(self) -> Outcome:
        workers = self.worker_ids()
        job, status, out, seconds = self.run_job("reference")
        outcome = Outcome("placement", status == "SUCCEEDED", seconds, {"job": status})
        outcome.check(status == "SUCCEEDED", f"job {status}: see {self.work / 'reference.log'}")
        if status != "SUCCEEDED":
            return outcome
        self.reference = out
        collectors = {a.node_id for a in job_actors(self.cluster, job, COLLECTOR)}
        trainers = [a.node_id for a in job_actors(self.cluster, job, TRAIN_WORKER)]
        metrics = train_metrics(out)
        self.steps_per_epoch = metrics["step"] // self.workload.epochs
        outcome.facts.update(collector_nodes=len(collectors), trainer_nodes=len(set(trainers)),
                             steps=metrics["step"], checkpoints=len(checkpoints(out)))
        outcome.check(collectors == workers, f"collection actors ran on {collectors}, not on both workers {workers}")
        outcome.check(len(trainers) == 2 and set(trainers) == workers,
                      f"training workers ran on {trainers}, not one on each worker node {workers}")
        stored = {"trajectories": list((out / "trajectories").glob("*.parquet")), "checkpoints": checkpoints(out),
                  "model": list((out / "cllm").glob("*.safetensors")), "report": [out / "report" / "report.json"]}
        for what, paths in stored.items():
            outcome.check(bool(paths) and all(p.exists() and p.is_relative_to(out) for p in paths),
                          f"no {what} under the shared output directory {out}")
        return outcome

    def collect_kill(self) -> Outcome:
        """Kill a worker node as soon as the first trajectory file is written (collection mid-way)."""
        killed: dict = {}

        def trigger(out: Path) -> None:
            if not killed and list((out / "trajectories").glob("*.parquet")):
                killed["files_at_kill"] = len(list((out / "trajectories").glob("*.parquet")))
                killed["collection_done"] = (out / "stages" / "collect.json").exists()
                killed.update(self.replace(self.victim()))

        job, status, out, seconds = self.run_job("collect-kill", trigger)
        outcome = Outcome("collect-kill", status == "SUCCEEDED", seconds, {"job": status, **killed})
        outcome.check(status == "SUCCEEDED", f"job {status}: see {self.work / 'collect-kill.log'}")
        outcome.check(bool(killed) and not killed.get("collection_done"), "the node was not killed during collection")
        if status == "SUCCEEDED" and self.reference is not None:
            rows, expected = trajectory_rows(out), trajectory_rows(self.reference)
            outcome.facts["rows"] = len(rows)
            outcome.check(rows == expected, f"{len(rows)} trajectory rows differ from the reference's {len(expected)}")
        collectors = job_actors(self.cluster, job, COLLECTOR)
        outcome.facts["collector_restarts"] = sum(int(a.num_restarts or 0) for a in collectors)
        outcome.facts["read_retries"] = job_logs(self.cluster, job).count("retrying the read")
        return outcome

    def read_kill(self) -> Outcome:
        """Kill a worker node the moment collection ends: the training stage's read starts while the GCS
        still counts the node alive (for ~15 s), the failure issue 19 reported."""
        killed: dict = {}

        def trigger(out: Path) -> None:
            if not killed and (out / "stages" / "collect.json").exists():
                killed.update(self.replace(self.victim()))

        job, status, out, seconds = self.run_job("read-kill", trigger)
        outcome = Outcome("read-kill", status == "SUCCEEDED", seconds, {"job": status, **killed})
        outcome.check(status == "SUCCEEDED", f"job {status}: see {self.work / 'read-kill.log'}")
        outcome.check(bool(killed), "no node was killed")
        outcome.facts["read_retries"] = job_logs(self.cluster, job).count("retrying the read")
        if status == "SUCCEEDED" and self.reference is not None:
            trained, reference = weights(out), weights(self.reference)
            outcome.check(all(trained[k].equal(reference[k]) for k in reference), "the weights differ from the "
                                                                                  "undisturbed run's")
        return outcome

    def victim(self) -> str:
        return sorted(name for name in self.cluster.nodes if name != "head")[0]

    def train_kill(self) -> Outcome:
        """Kill a worker node once the first checkpoint (an epoch boundary) is stored."""
        killed: dict = {}

        def trigger(out: Path) -> None:
            if not killed and (step := registered_checkpoint_step(out)):
                killed["checkpoint_step_at_kill"] = step
                killed["training_done"] = (out / "stages" / "train.json").exists()
                killed.update(self.replace(self.victim()))

        job, status, out, seconds = self.run_job("train-kill", trigger)
        outcome = Outcome("train-kill", status == "SUCCEEDED", seconds, {"job": status, **killed})
        outcome.check(status == "SUCCEEDED", f"job {status}: see {self.work / 'train-kill.log'}")
        outcome.check(bool(killed) and not killed.get("training_done"), "the node was not killed during training")
        if status != "SUCCEEDED" or self.reference is None:
            return outcome
        metrics, expected = train_metrics(out), train_metrics(self.reference)
        trained, reference = weights(out), weights(self.reference)
        differing = [k for k in reference if not trained[k].equal(reference[k])]
        largest = max(((trained[k] - reference[k]).abs().max().item() for k in reference), default=0.0)
        outcome.facts.update(steps=metrics["step"], start_step=metrics["start_step"],
                             train_workers_started=len(job_actors(self.cluster, job, TRAIN_WORKER)),
                             differing_tensors=len(differing), max_abs_diff=largest)
        outcome.check(metrics["step"] == expected["step"], f"{metrics['step']} steps, the reference took "
                                                           f"{expected['step']}")
        outcome.check(metrics["start_step"] > 0, "the final worker group did not resume from a checkpoint")
        outcome.check(not differing, f"{len(differing)} weight tensors differ (max |diff| {largest:.3g})")
        return outcome

    def serve_kill(self, requests_per_s: float = 4, before_s: float = 10, after_s: float = 10,
                   replace_timeout_s: float = 240) -> Outcome:
        """Two replicas on two nodes under a steady stream; one node killed and replaced; count the failures.

        The stream runs `before_s` before the kill and `after_s` after a replacement replica is running.
        """
        started = time.monotonic()
        facts, stream = serve_under_node_loss(self, requests_per_s, before_s, after_s, replace_timeout_s)
        outcome = Outcome("serve-kill", True, time.monotonic() - started, facts)
        outcome.check(facts["replica_nodes_before"] == 2, "the two replicas did not start on two nodes")
        outcome.check(stream.failed == 0, f"{stream.failed} requests failed even after a retry")
        outcome.check(facts["replacement_replica_s"] is not None, "no replacement replica started")
        return outcome


# ---------------------------------------------------------------------------------------------------------
# Serve under node loss


@dataclass
class RequestStream:
    """A client sending one completion request every 1/rate seconds; one retry on a dropped connection."""

    url: str
    rate: float
    sent: int = 0
    ok: int = 0
    retried: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def request(self) -> bool:
        import requests

        body = {"model": "model", "prompt": "Add 2 and 5.", "max_tokens": 8}
        response = requests.post(f"{self.url}/v1/completions", json=body, timeout=30)
        return response.status_code == 200 and bool(response.json()["choices"])

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            self.sent += 1
            try:
                good = self.request()
            except Exception:  # a connection dropped with the replica's node
                good = False
            if not good:
                self.retried += 1
                try:
                    good = self.request()
                except Exception:
                    good = False
            self.ok += good
            self.failed += not good
            self.latencies.append(time.monotonic() - started)
            self.stop.wait(max(0.0, 1 / self.rate - (time.monotonic() - started)))


def replica_nodes(cluster: LocalCluster, app: str = "cllm") -> dict[str, str]:
    """Replica id -> node id of the running replicas of the app's deployment."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard, filters=[("state", "=", "ALIVE")], detail=True, limit=10_000)
    return {a.actor_id: a.node_id for a in actors if a.class_name.startswith("ServeReplica:" + app)}


def running_replicas(app: str = "cllm") -> int:
    from ray import serve

    deployments = serve.status().applications[app].deployments.values()
    return sum(d.replica_states.get("RUNNING", 0) for d in deployments)


def serve_under_node_loss(harness: Harness, rate: float, before_s: float, after_s: float,
                          replace_timeout_s: float) -> tuple[dict, RequestStream]:
    import ray
    from ray import serve

    from cllm.serving.api import build_app
    from cllm.serving.config import ServeConfig

    cluster, port = harness.cluster, free_port()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(model=harness.model, model_name="model", min_replicas=2, max_replicas=2,
                             num_cpus=CPUS_EACH, num_gpus=0, max_new_tokens=8, block_size=8, ray_address="auto")
        started = time.monotonic()
        serve.run(build_app(config), name="cllm", route_prefix="/")
        before = replica_nodes(cluster)
        facts: dict = {"deploy_s": round(time.monotonic() - started, 1),
                       "replica_nodes_before": len(set(before.values()))}
        stream = RequestStream(f"http://127.0.0.1:{port}", rate)
        thread = threading.Thread(target=stream.run, daemon=True)
        thread.start()
        time.sleep(before_s)
        victim = next(name for name, node in cluster.nodes.items() if node.node_id in before.values()
                      and name != "head")
        killed_at = time.monotonic()
        facts.update(harness.replace(victim))
        facts["replacement_replica_s"] = None
        while time.monotonic() - killed_at < replace_timeout_s:
            now = replica_nodes(cluster)
            if set(now) - set(before) and len(now) == 2 and running_replicas() == 2:
                facts["replacement_replica_s"] = round(time.monotonic() - killed_at, 1)
                facts["replica_nodes_after"] = len(set(now.values()))
                break
            time.sleep(1)
        time.sleep(after_s)  # the stream goes on with the replacement serving
        stream.stop.set()
        thread.join(timeout=60)
        facts.update(requests=stream.sent, ok=stream.ok, retried=stream.retried, failed=stream.failed,
                     p50_s=round(sorted(stream.latencies)[len(stream.latencies) // 2], 2) if stream.latencies else None,
                     max_s=round(max(stream.latencies), 2) if stream.latencies else None)
        return facts, stream
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


# ---------------------------------------------------------------------------------------------------------


SCENARIOS = ("placement", "collect-kill", "read-kill", "train-kill", "serve-kill")


def print_table(outcomes: list[Outcome]) -> None:
    print("\n| scenario | outcome | seconds | facts |\n| --- | --- | ---: | --- |")
    for o in outcomes:
        facts = ", ".join(f"{k}={v}" for k, v in o.facts.items())
        print(f"| {o.scenario} | {'PASS' if o.ok else 'FAIL: ' + '; '.join(o.problems)} | {o.seconds:.0f} | {facts} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", help=f"any of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--work-dir", help="where models, data, outputs and job logs go (default: a temp dir)")
    args = parser.parse_args(argv)
    args.scenarios = args.scenarios or list(SCENARIOS)
    if unknown := set(args.scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenario(s) {sorted(unknown)}: choose from {', '.join(SCENARIOS)}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="cllm-multinode-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    outcomes, started = [], time.monotonic()
    with local_cluster(keep_logs=work / "ray-logs") as cluster:
        harness = Harness(cluster, work)
        if set(args.scenarios) - {"placement", "serve-kill"} and "placement" not in args.scenarios:
            args.scenarios.insert(0, "placement")  # the undisturbed run the others are compared with
        for name in SCENARIOS:
            if name in args.scenarios:
                outcome = getattr(harness, name.replace("-", "_"))()
                log(f"{name}: {'PASS' if outcome.ok else 'FAIL'} {outcome.facts} {outcome.problems}")
                outcomes.append(outcome)
    print_table(outcomes)
    print(f"\nall in {time.monotonic() - started:.0f} s; job configs and logs in {work}")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
