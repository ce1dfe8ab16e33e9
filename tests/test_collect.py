"""The collection stage on a local Ray: 2 actors, a tiny model, the built-in task.

The Parquet rows must be exactly what `jacobi_generate(..., return_trajectories=True)` gives for the
planned batches, every fixed point must be greedy AR decoding of its prefix, and a run killed halfway
then rerun must leave exactly the rows of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import ray_cluster
from filelock import FileLock
from transformers import AutoModelForCausalLM

from cllm.config import load_config
from cllm.data.collect import CollectConfig, plan_collection, run_collection
from cllm.data.store import LOCK, MANIFEST, data_files
from cllm.data.trajectories import (
    PROMPT_TOO_LONG,
    TRAJECTORY_FIELDS,
    batch_seed,
    clean_blocks,
    read_trajectories,
)
from cllm.decoding.core import response_budget
from cllm.decoding.jacobi import jacobi_generate
from cllm.models.loading import ModelLoadError, encode_prompts, format_prompt, load_tokenizer
from cllm.tasks import load_task

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(dataset="builtin:arith", limit=16, batch_size=2, block_size=8, max_new_tokens=40, actors=2)


def collect_config(model_dir, output, **overrides) -> CollectConfig:
    return CollectConfig(**{**SETTINGS, "model": str(model_dir), "output": str(output), **overrides})


@pytest.fixture(scope="module")
def collected(local_ray, tiny_model_dir, tmp_path_factory):
    """One uninterrupted run: its config, result and rows."""
    config = collect_config(tiny_model_dir, tmp_path_factory.mktemp("collect") / "trajectories")
    result = run_collection(config)
    return config, result, read_trajectories(config.output)


def test_rows_are_the_trajectories_jacobi_generate_returns(collected, tiny_model_dir):
    config, _, rows = collected
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    task = load_task(config.dataset, split=config.split, limit=config.limit, seed=config.seed)
    plan = plan_collection(config)
    expected = []
    for batch in plan.batches:
        ids = [p["prompt_id"] for p in batch["prompts"]]
        texts = [format_prompt(tokenizer, task.records[i]["prompt"]) for i in ids]
        input_ids, mask = encode_prompts(tokenizer, texts)
        out = jacobi_generate(
            model, input_ids, mask,
            max_new_tokens=response_budget(config.max_new_tokens, 512, [int(m.sum()) for m in mask]),
            block_size=config.block_size, eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
            return_trajectories=True, seed=batch_seed(config.seed, batch["batch_id"]),
        )
        for t in out.trajectories:
            answer = task.records[ids[t["prompt_id"]]]["answer"]
            labels = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            expected.append({**t, "prompt_id": ids[t["prompt_id"]], "labels": labels, "batch_id": batch["batch_id"]})
    expected, _ = clean_blocks(expected, max_token_run=config.max_token_run)
    expected = [{k: r[k] for k in TRAJECTORY_FIELDS} for r in expected]
    assert rows == sorted(expected, key=lambda r: (r["prompt_id"], r["block_idx"]))
    assert {r["prompt_id"] for r in rows} == set(range(config.limit))


def test_every_fixed_point_is_greedy_ar_decoding_of_its_prefix(collected, tiny_model_dir):
    _, _, rows = collected
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for row in rows:
        prefix = torch.tensor([row["prefix_ids"]])
        greedy = model.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=False,
                                max_new_tokens=len(row["fixed_point"]), eos_token_id=2, pad_token_id=0)
        assert greedy[0, prefix.shape[1]:].tolist() == row["fixed_point"], (row["prompt_id"], row["block_idx"])
        assert row["eos_in_block"] == (2 in row["fixed_point"])
        assert all(len(state) == len(row["fixed_point"]) for state in row["states"])


def test_result_manifest_and_throughput(collected):
    config, result, rows = collected
    assert result.complete and result.prompts == result.prompts_decoded == config.limit
    assert result.rows_written == result.rows_total == len(rows)
    assert result.blocks == len(rows) + sum(result.dropped_blocks.values())
    if not result.dropped_blocks:
        assert result.generated_tokens == sum(len(r["fixed_point"]) for r in rows)
    assert result.prompts_per_s > 0 and result.blocks_per_s > 0 and result.tokens_per_s > 0
    assert result.bytes_total == sum(p.stat().st_size for p in data_files(Path(config.output)))
    manifest = json.loads((Path(config.output) / MANIFEST).read_text())
    assert manifest["complete"] and manifest["settings"]["block_size"] == config.block_size
    assert manifest["runs"][0]["rows"] == len(rows)


def test_rerunning_a_finished_collection_writes_nothing(collected):
    config, _, rows = collected
    files = data_files(Path(config.output))
    result = run_collection(config)
    assert result.prompts_decoded == 0 and result.prompts_skipped == config.limit
    assert data_files(Path(config.output)) == files
    assert read_trajectories(config.output) == rows


def test_resuming_with_other_settings_is_refused(collected):
    config, _, _ = collected
    with pytest.raises(ValueError, match=r"other settings \(block_size: 8 -> 16\)"):
        run_collection(config.model_copy(update={"block_size": 16}))


def cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "pipelines/collect.py", *args], cwd=REPO, text=True, **kwargs)


def wait_until_quiet(output: Path, seconds: float = 3.0) -> None:
    """Let writes of the killed driver's workers land (or be cancelled) before resuming."""
    before = None
    while (now := sorted((p.name, p.stat().st_size) for p in output.glob("*.parquet"))) != before:
        before = now
        time.sleep(seconds)


def finished_files(output: Path) -> list[Path]:
    """Data files whose write finished (they have a Parquet footer); one being written has none yet."""
    finished = []
    for path in data_files(output):
        try:
            pq.ParquetFile(path)
        except (pa.ArrowException, OSError):
            continue
        finished.append(path)
    return finished


@pytest.mark.extended
def test_killed_run_resumes_to_exactly_the_rows_of_an_uninterrupted_run(collected, local_ray, tmp_path):
    reference, _, rows = collected
    output = tmp_path / "trajectories"
    config = reference.model_copy(update={"output": str(output)})
    args = [f"--{key.replace('_', '-')}={value}" for key, value in SETTINGS.items()]
    # The killed driver gets a cluster of its own: killing it cannot take down this process's Ray.
    with ray_cluster() as cluster, open(tmp_path / "log.txt", "w") as log:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": cluster.address}
        proc = cli(*args, f"--model={config.model}", f"--output={output}", f"--ray-address={cluster.address}",
                   stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 240
        # kill once a batch is durably written: a kill during the first write leaves nothing to resume from
        while proc.poll() is None and not finished_files(output) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        wait_until_quiet(output)
    wait_until_quiet(output)
    files = data_files(output)
    batches = len({r["batch_id"] for r in rows})
    killed_midway = len(files) < batches and not json.loads((output / MANIFEST).read_text()).get("complete")
    print(f"killed {'midway' if killed_midway else 'after the end'}: {len(files)} of {batches} files written")
    if not killed_midway:  # the run won the race: lose its later shards by hand instead
        for path in files[len(files) // 2 :]:
            path.unlink()
        files = data_files(output)
    assert files, (tmp_path / "log.txt").read_text()[-3000:]
    # A write cut off mid-file: no Parquet footer.
    (output / "zz-interrupted.parquet").write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 2])

    result = run_collection(config)
    assert read_trajectories(output) == rows
    assert not (output / "zz-interrupted.parquet").exists()
    assert 0 < result.prompts_skipped < config.limit and result.prompts_decoded == config.limit - result.prompts_skipped
    assert result.complete and result.rows_total == len(rows)


# ----- bad input fails in the driver, with a message -----


def test_missing_file_empty_dataset_and_bad_model_are_clear_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="dataset file not found"):
        plan_collection(collect_config(tiny_model_dir, tmp_path / "o", dataset=str(tmp_path / "missing.jsonl")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="has no records"):
        plan_collection(collect_config(tiny_model_dir, tmp_path / "o", dataset=str(tmp_path / "empty.jsonl")))
    with pytest.raises(ModelLoadError):
        plan_collection(collect_config(tmp_path / "no-model", tmp_path / "o"))


def test_prompts_longer_than_the_context_are_set_aside_or_refused(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in ["2 + 2 =", "x" * 600, "3 + 4 ="]))
    plan = plan_collection(collect_config(tiny_model_dir, tmp_path / "o", dataset=str(data)))
    assert plan.dropped_prompts == {PROMPT_TOO_LONG: [1]}
    assert sorted(p["prompt_id"] for b in plan.batches for p in b["prompts"]) == [0, 2]
    assert all(p["labels"] is None for b in plan.batches for p in b["prompts"])
    data.write_text(json.dumps({"prompt": "x" * 600}))
    with pytest.raises(ValueError, match=r"1 prompt\(s\) longer than the model's context of 512 tokens \(prompt ids 0"):
        plan_collection(collect_config(tiny_model_dir, tmp_path / "o", dataset=str(data)))


def test_output_with_foreign_parquet_files_is_refused(tmp_path, tiny_model_dir):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "other.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="no collection run wrote"):
        run_collection(collect_config(tiny_model_dir, tmp_path / "o"))


def test_a_second_run_on_the_same_output_is_refused(tmp_path, tiny_model_dir):
    (tmp_path / "o").mkdir()
    with FileLock(tmp_path / "o" / LOCK), pytest.raises(ValueError, match="another collection run"):
        run_collection(collect_config(tiny_model_dir, tmp_path / "o"))


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    proc = cli("--dataset", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o"),
               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "RAY_ADDRESS": ""})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().startswith(f"error: dataset file not found: {tmp_path / 'missing.jsonl'}")
    assert "Traceback" not in err


def test_trajectories_are_sampled_for_the_builtin_teacher_and_greedy_for_other_models(tmp_path, tiny_model_dir):
    assert CollectConfig(output="o").temperature == 0.7  # builtin: the recipe measured in docs/results.md
    assert collect_config(tiny_model_dir, tmp_path / "o").temperature == 0.0
    assert collect_config(tiny_model_dir, tmp_path / "o", temperature=0.5).temperature == 0.5
    assert CollectConfig(output="o", temperature=0.0).temperature == 0.0


def test_settings_load_from_yaml_with_cli_overrides(tmp_path):
    path = tmp_path / "collect.yaml"
    path.write_text(yaml.safe_dump({"output": "out", "dataset": "data.jsonl", "block_size": 32, "actors": 4}))
    config = load_config(CollectConfig, ["--config", str(path), "--actors", "1", "--num-gpus-per-actor", "1"])
    assert (config.output, config.dataset, config.block_size, config.actors) == ("out", "data.jsonl", 32, 1)
    assert config.num_gpus_per_actor == 1 and config.model == "builtin" and config.max_new_tokens == 256
    with pytest.raises(ValueError, match="block-size"):
        load_config(CollectConfig, ["--output", "o", "--block-size", "0"])
