"""A collection's output directory, Ray-free: which decode batches it already holds, and with what settings.

Every row names its decode batch, so a rerun reads which batches the output holds, deletes files an
interrupted run left half-written (no Parquet footer), and decodes only the rest. The settings that
decide the rows live in `<output>/_manifest.json` (Parquet readers skip `_` names); a rerun with
different ones is refused rather than mixed in, and a lock file refuses a second run on an output that
one is still writing.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from cllm.data.trajectories import BatchStats
from cllm.errors import ConfigError

logger = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
LOCK = "_collect.lock"


@contextmanager
def exclusive(output: Path) -> Iterator[None]:
    """Hold the output's lock: a second run would take the first one's unfinished files for debris."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; give a directory")
    output.mkdir(parents=True, exist_ok=True)
    try:
        lock = FileLock(output / LOCK, timeout=0)
        lock.acquire()
    except Timeout:
        raise ConfigError(f"another collection run is writing to {output}; wait for it or stop it") from None
    try:
        yield
    finally:
        lock.release()


def data_files(output: Path) -> list[Path]:
    return sorted(p for p in output.glob("*.parquet") if not p.name.startswith(("_", ".")))


def open_manifest(output: Path, settings: dict, absent_means: dict, plan_summary: dict) -> dict:
    """The manifest of `output`: created for a new collection, checked against a resumed one.

    A key the manifest lacks was added to the settings after that run; `absent_means` gives the value
    that run used (what the code did before the setting existed), and a key not there cannot differ.
    """
    path = output / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
        before = absent_means | manifest["settings"]
        changed = {k: (before[k], v) for k, v in settings.items() if k in before and before[k] != v}
        if changed:
            diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ConfigError(
                f"{output} holds a collection made with other settings ({diff}); "
                "rerun with the same settings to resume, or choose another --output"
            )
    elif data_files(output) if output.is_dir() else False:
        raise ConfigError(f"{output} already holds Parquet files that no collection run wrote; choose another --output")
    else:
        manifest = {"settings": settings, "prompt_id": "index of the record in the dataset split",
                    "empty_batches": [], "runs": []}
    manifest.update(plan_summary)
    write_manifest(output, manifest)
    return manifest


def write_manifest(output: Path, manifest: dict) -> None:
    output.mkdir(parents=True, exist_ok=True)
    temporary = output / f"{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, output / MANIFEST)  # readers see the old or the new manifest, never half of one


@dataclass
class OutputScan:
    batches: set[int]  # decode batches whose rows are in the output
    rows: int
    bytes: int


def scan_output(output: Path) -> OutputScan:
    """Which batches the output holds; files without a footer (a killed write) or duplicated are deleted."""
    batches, rows, size = set(), 0, 0
    for path in data_files(output):
        try:
            metadata = pq.ParquetFile(path).metadata
        except (pa.ArrowException, OSError):
            logger.warning("deleting %s: an interrupted run left it half-written", path)
            path.unlink()
            continue
        try:
            found = set(pq.read_table(path, columns=["batch_id"])["batch_id"].to_pylist())
        except (pa.ArrowException, KeyError) as err:
            raise ConfigError(f"{path} is not a trajectory file of this collection: {err}") from err
        if found <= batches:  # a write that completed after its run was killed, and was redone
            logger.warning("deleting %s: its batches are already in other files", path)
            path.unlink()
            continue
        batches |= found
        rows += metadata.num_rows
        size += path.stat().st_size
    return OutputScan(batches, rows, size)


def record_run(
    output: Path, manifest: dict, stats: list[BatchStats], seconds: float, empty: set[int], complete: bool
) -> None:
    manifest["empty_batches"] = sorted(empty)
    manifest["complete"] = complete
    manifest["runs"].append(
        {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "seconds": round(seconds, 3),
            "decode_seconds": round(sum(s.seconds for s in stats), 3),
            "batches": len(stats),
            "prompts": sum(s.prompts for s in stats),
            "blocks": sum(s.blocks for s in stats),
            "rows": sum(s.rows for s in stats),
            "generated_tokens": sum(s.generated_tokens for s in stats),
            "dropped_blocks": dict(sum((s.dropped for s in stats), Counter())),
        }
    )
    write_manifest(output, manifest)
