"""The pipeline on a 3-node Ray cluster on this machine, surviving the loss of a node (issue 19).

A head and two worker nodes, each a `ray start` of its own on 127.0.0.1 (scripts/multinode.py, which
runs the same scenarios from the command line and prints their times). `pipelines/full.py` is submitted
as a Ray job on a tiny Llama; the undisturbed run is the reference the disturbed runs must equal.

    pytest tests/test_multinode.py -m multinode            # the cluster scenarios, 18-30 minutes on 2 busy cores
    pytest tests/test_multinode.py -m "not multinode"      # the fast part: the read retry, no cluster
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import ray

from cllm.train.driver import lost_to_the_cluster, with_read_retries

REPO = Path(__file__).resolve().parents[1]


def load_harness():
    spec = importlib.util.spec_from_file_location("multinode", REPO / "scripts" / "multinode.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["multinode"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


multinode = load_harness()


# ----- the read retry of the training stage (no cluster) -----


class FlakyRead:
    """A read that fails with `errors` in turn, then returns the records."""

    def __init__(self, *errors: BaseException):
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "records"


def test_a_read_is_retried_when_the_cluster_lost_a_node_and_only_then(capsys):
    died = ray.exceptions.ActorDiedError()
    wrapped = ray.exceptions.RayTaskError("ListFiles", "traceback", died)  # as a Ray Data task reports it
    read = FlakyRead(died, wrapped)
    assert with_read_retries(read, "reading x", attempts=3) == "records" and read.calls == 3
    assert capsys.readouterr().out.count("retrying the read") == 2
    bad_data = FlakyRead(ValueError("not a Parquet file"))
    with pytest.raises(ValueError, match="not a Parquet file"):
        with_read_retries(bad_data, "reading x")
    assert bad_data.calls == 1
    lost = FlakyRead(*[ray.exceptions.NodeDiedError("gone")] * 3)
    with pytest.raises(ray.exceptions.NodeDiedError):
        with_read_retries(lost, "reading x", attempts=3)
    assert lost.calls == 3


def test_cluster_losses_are_told_apart_from_other_errors():
    try:
        try:
            raise ray.exceptions.ObjectLostError("00" * 28, "owner", "call site")
        except ray.exceptions.ObjectLostError as err:
            raise RuntimeError("dataset execution failed") from err
    except RuntimeError as chained:
        assert lost_to_the_cluster(chained)
    assert not lost_to_the_cluster(ray.exceptions.RayTaskError("f", "tb", ValueError("bad row")))
    assert not lost_to_the_cluster(OSError("disk full"))


# ----- the cluster scenarios -----


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    work = tmp_path_factory.mktemp("multinode")
    with multinode.local_cluster(keep_logs=work / "ray-logs") as cluster:
        yield multinode.Harness(cluster, work, job_timeout=900)


@pytest.fixture(scope="module")
def placement(harness):
    """The undisturbed run, the reference of the others."""
    return harness.placement()


def check(outcome) -> None:
    print(outcome)
    assert outcome.ok, "; ".join(outcome.problems)


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(1500)  # a job takes 4-12 minutes on 2 busy cores
def test_slow_placement_spreads_actors_and_workers_over_the_nodes(placement):
    check(placement)
    assert placement.facts["collector_nodes"] == 2 and placement.facts["trainer_nodes"] == 2


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(1500)  # a job takes 4-12 minutes on 2 busy cores
def test_slow_node_killed_during_collection_the_job_succeeds_with_the_same_rows(harness, placement):
    assert placement.ok, "no reference run"
    outcome = harness.collect_kill()
    check(outcome)
    assert outcome.facts["rows"] > 0 and outcome.facts["files_at_kill"] >= 1


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(1500)  # a job takes 4-12 minutes on 2 busy cores
def test_slow_node_killed_as_the_training_read_starts_the_job_succeeds_with_the_same_weights(harness, placement):
    assert placement.ok, "no reference run"
    check(harness.read_kill())


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(1500)  # a job takes 4-12 minutes on 2 busy cores
def test_slow_node_killed_during_training_resumes_to_the_same_weights(harness, placement):
    assert placement.ok, "no reference run"
    outcome = harness.train_kill()
    check(outcome)
    assert 0 < outcome.facts["start_step"] < outcome.facts["steps"] == placement.facts["steps"]


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.extended
def test_slow_serve_replica_replaced_after_its_node_is_killed_under_load(harness):
    outcome = harness.serve_kill()
    check(outcome)
    assert outcome.facts["ok"] == outcome.facts["requests"] > 0
