"""A collection's output directory without Ray: manifest, lock, and which batches a folder holds."""

from __future__ import annotations

import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cllm.data.store import MANIFEST, data_files, exclusive, open_manifest, record_run, scan_output
from cllm.data.trajectories import BatchStats

SETTINGS = {"model_path": "m", "block_size": 8}
PLAN = {"records": 4, "prompts": 4, "batches": 2, "dropped_prompts": {}}


def write_batch(path, batch_id: int, rows: int = 2) -> None:
    pq.write_table(pa.table({"batch_id": [batch_id] * rows, "prompt_id": list(range(rows))}), path)


def test_new_manifest_then_resume_with_same_settings(tmp_path):
    manifest = open_manifest(tmp_path, SETTINGS, {}, PLAN)
    assert manifest["settings"] == SETTINGS and manifest["runs"] == [] and manifest["batches"] == 2
    record_run(tmp_path, manifest, [BatchStats(batch_id=0, prompts=2, blocks=3, rows=3)], 1.5, set(), False)
    again = open_manifest(tmp_path, SETTINGS, {}, PLAN)
    assert len(again["runs"]) == 1 and again["runs"][0]["rows"] == 3 and again["complete"] is False


def test_other_settings_are_refused_naming_the_change(tmp_path):
    open_manifest(tmp_path, SETTINGS, {}, PLAN)
    with pytest.raises(ValueError, match=r"block_size: 8 -> 16"):
        open_manifest(tmp_path, {**SETTINGS, "block_size": 16}, {}, PLAN)


def test_a_setting_newer_than_the_manifest_compares_with_what_that_run_did(tmp_path):
    open_manifest(tmp_path, SETTINGS, {}, PLAN)  # written before `temperature` existed
    again = open_manifest(tmp_path, {**SETTINGS, "temperature": 0.0}, {"temperature": 0.0}, PLAN)
    assert again["settings"] == SETTINGS
    with pytest.raises(ValueError, match=r"temperature: 0.0 -> 0.7"):
        open_manifest(tmp_path, {**SETTINGS, "temperature": 0.7}, {"temperature": 0.0}, PLAN)
    open_manifest(tmp_path, {**SETTINGS, "top_k": 5}, {}, PLAN)  # unknown to the old run and to absent_means


def test_foreign_parquet_files_are_refused(tmp_path):
    write_batch(tmp_path / "theirs.parquet", 0)
    with pytest.raises(ValueError, match="no collection run wrote"):
        open_manifest(tmp_path, SETTINGS, {}, PLAN)


def test_scan_finds_batches_and_deletes_debris(tmp_path):
    write_batch(tmp_path / "a.parquet", 0)
    write_batch(tmp_path / "b.parquet", 1, rows=3)
    write_batch(tmp_path / "c.parquet", 1)  # a redone write of batch 1: already held by b
    (tmp_path / "d.parquet").write_bytes((tmp_path / "a.parquet").read_bytes()[:20])  # no footer
    (tmp_path / "_manifest.json").write_text("{}")  # not a data file
    scan = scan_output(tmp_path)
    assert scan.batches == {0, 1} and scan.rows == 5
    assert [p.name for p in data_files(tmp_path)] == ["a.parquet", "b.parquet"]


def test_a_file_without_batch_ids_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"x": [1]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="not a trajectory file"):
        scan_output(tmp_path)


def test_the_lock_refuses_a_second_writer_and_is_released(tmp_path):
    output = tmp_path / "out"
    errors = []
    with exclusive(output):
        thread = threading.Thread(target=lambda: errors.append(_try_lock(output)))
        thread.start()
        thread.join()
    assert errors and "another collection run" in errors[0]
    with exclusive(output):  # released: a later run gets it
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"), exclusive(tmp_path / "file"):
        pass


def _try_lock(output) -> str:
    try:
        with exclusive(output):
            return ""
    except ValueError as err:
        return str(err)


def test_the_manifest_is_replaced_whole(tmp_path):
    manifest = open_manifest(tmp_path, SETTINGS, {}, PLAN)
    record_run(tmp_path, manifest, [], 0.0, {1}, True)
    written = json.loads((tmp_path / MANIFEST).read_text())
    assert written["empty_batches"] == [1] and written["complete"] is True
    assert not list(tmp_path.glob("*.tmp"))
