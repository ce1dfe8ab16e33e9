"""The whole pipeline: in-process on the embedded default (tiny recipe), and as a real `ray job submit`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml
from conftest import ray_cluster
from ray.job_submission import JobStatus, JobSubmissionClient

from cllm.config import ConfigError, load_config
from cllm.evaluate import BASELINE, EvalOptions
from cllm.pipeline import PipelineConfig, run_pipeline

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY_TEACHER = dict(n_problems=300, tokenizer_problems=200, vocab_size=128, hidden_size=32, num_layers=1,
                    num_heads=2, intermediate_size=64, batch_size=8, max_steps=6, eval_problems=4,
                    eval_batch_size=4)
SMALL_STAGES = dict(
    block_size=8, max_new_tokens=24,
    collect=dict(limit=6, actors=2, batch_size=3),
    train=dict(num_workers=2, batch_size=2, max_steps=3, checkpoint_every=2),
    eval=dict(limit=2),
)


def check_report(report_path: Path) -> dict:
    report = json.loads(report_path.read_text())
    entries = {(r["model"], r["method"]): r for r in report["results"]}
    options = EvalOptions()  # the teacher gets the baseline and its own short list, the CLLM every default
    assert set(entries) == ({("teacher", method) for method in (BASELINE, *options.teacher_methods)}
                            | {("cllm", method) for method in options.methods})
    for entry in entries.values():
        assert entry["prompts"] >= 1 and entry["new_tokens"] >= entry["prompts"]
        assert entry["tokens_per_second"] > 0 and entry["speedup"] > 0
        assert 1.0 <= entry["tokens_per_forward"] <= report["settings"]["block_size"] or entry["decode_forwards"] == 0
        assert 0.0 <= entry["accuracy"] <= 1.0
        assert entry["exact"] == entry["prompts"], "every method must reproduce greedy AR exactly"
    for name in ("report.md", "tpf.png", "speedup.png", "commit_histogram.png"):
        assert (report_path.parent / name).stat().st_size > 0
    return entries


def test_embedded_default_stages_in_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLLM_HOME", str(tmp_path / "home"))
    config = load_config(PipelineConfig, [], output_dir=str(tmp_path / "run"), teacher=TINY_TEACHER, **SMALL_STAGES)
    assert config.model == "builtin" and config.dataset == "builtin:arith"
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        run_pipeline(config)
        out = capsys.readouterr().out
        assert "1/4 teacher" in out and "4/4 evaluate" in out and "| cllm | jacobi |" in out
        check_report(tmp_path / "run" / "report" / "report.json")
        assert (tmp_path / "run" / "cllm" / "config.json").is_file()
        assert list((tmp_path / "run" / "trajectories").rglob("*.parquet"))
        assert list((tmp_path / "home").glob("builtin-teacher-*/teacher.json"))
        # a rerun with the same output directory skips every finished stage
        run_pipeline(config)
        out = capsys.readouterr().out
        assert out.count("done in an earlier run") == 4
    finally:
        ray.shutdown()


def test_bad_config_fails_at_start_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"lr": -1}}))
    with pytest.raises(ValueError, match=r"train\.lr"):
        load_config(PipelineConfig, ["--config", str(bad)])
    with pytest.raises(ConfigError, match="block-sizes"):
        load_config(PipelineConfig, ["--block-sizes", "3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(PipelineConfig, ["--config", str(tmp_path / "missing.yaml")])


def test_training_recipe_follows_the_model(tmp_path):
    """Unset lr / ar_weight take the built-in teacher's recipe or the paper's; a value given is kept."""
    from cllm.pipeline import train_config
    from cllm.train.config import RECIPES

    builtin = train_config(load_config(PipelineConfig, [], output_dir=str(tmp_path)), "teacher-dir")
    assert (builtin.lr, builtin.ar_weight) == (RECIPES["builtin"]["lr"], RECIPES["builtin"]["ar_weight"])
    real = load_config(PipelineConfig, ["--model", "Qwen/Qwen2.5-0.5B", "--train.ar-weight", "3"],
                       output_dir=str(tmp_path))
    real = train_config(real, "Qwen/Qwen2.5-0.5B")
    assert (real.lr, real.ar_weight) == (RECIPES["model"]["lr"], 3.0)
    assert RECIPES["model"] != RECIPES["builtin"]
    assert builtin.ordered_feed and real.ordered_feed  # on unless the command line turns it off
    streamed = load_config(PipelineConfig, ["--no-train.ordered-feed", "--train.length-window", "8"],
                           output_dir=str(tmp_path))
    assert not train_config(streamed, "teacher-dir").ordered_feed
    assert (builtin.length_window, train_config(streamed, "teacher-dir").length_window) == (0, 8)


def test_ray_job_submit_runs_the_pipeline(tmp_path, tiny_model_dir):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Add {i} and {i + 1}.", "answer": f"#### {2 * i + 1}"}) + "\n"
                            for i in range(8)))
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "dataset": str(data),
                                      "output_dir": str(tmp_path / "run"), **SMALL_STAGES}))
    # Ray 2.60 enables token auth by default; this private test cluster turns it off, as the README says.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    with ray_cluster(env=env) as cluster:
        submit = [ray_bin, "job", "submit", f"--address={cluster.dashboard}", "--working-dir", str(REPO),
                  "--", "python", "pipelines/full.py", "--config", str(config)]
        started = time.time()
        for _attempt in range(6):  # the head's job agent may need a few seconds after `ray start`
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in job.stderr:
                break
            time.sleep(5)
        print(job.stdout[-4000:], job.stderr[-2000:])
        assert job.returncode == 0, job.stderr[-2000:]
        job_id = re.search(r"raysubmit_\w+", job.stdout + job.stderr).group()
        client = JobSubmissionClient(cluster.dashboard)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
        assert "4/4 evaluate" in client.get_job_logs(job_id)
        check_report(tmp_path / "run" / "report" / "report.json")
        print(f"job took {time.time() - started:.0f} s")
