"""The training feed's order depends on the records and the seed, never on how files hold them."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from cllm.train.feed import FEED_BLOCK_ROWS, ordered_feed


def records(n: int) -> list[dict]:
    rng = random.Random(0)
    return [
        {"prompt_id": i // 3, "block_idx": i % 3, "fixed_point": [rng.randrange(100) for _ in range(4)]}
        for i in range(n)
    ]


def write_files(directory: Path, rows: list[dict], per_file: int) -> str:
    directory.mkdir()
    for i, start in enumerate(range(0, len(rows), per_file)):
        pq.write_table(pa.Table.from_pylist(rows[start : start + per_file]), directory / f"part-{i:03}.parquet")
    return str(directory)


def blocks(dataset: ray.data.Dataset) -> list[list[tuple[int, int]]]:
    """The feed as Ray Data hands it out: block by block, rows in order."""
    return [
        [(row["prompt_id"], row["block_idx"]) for row in ray.get(ref).to_pylist()]
        for bundle in dataset.iter_internal_ref_bundles()
        for ref in bundle.block_refs
    ]


def test_same_blocks_whatever_the_files(local_ray, tmp_path):
    rows = records(3 * FEED_BLOCK_ROWS)
    shuffled = random.Random(1).sample(rows, len(rows))
    one_file = ray.data.read_parquet(write_files(tmp_path / "one", rows, per_file=len(rows)))
    many_files = ray.data.read_parquet(write_files(tmp_path / "many", shuffled, per_file=50))

    fed = blocks(ordered_feed(one_file, len(rows), seed=0))
    assert fed == blocks(ordered_feed(many_files, len(rows), seed=0))
    assert len(fed) == 3 and all(FEED_BLOCK_ROWS / 2 < len(block) < FEED_BLOCK_ROWS * 2 for block in fed)
    flat = [key for block in fed for key in block]
    assert sorted(flat) == sorted((r["prompt_id"], r["block_idx"]) for r in rows)  # nothing lost or doubled
    assert flat != [(r["prompt_id"], r["block_idx"]) for r in rows]  # shuffled, not file order

    few = records(FEED_BLOCK_ROWS // 4)  # fewer rows than a block: still cut at fixed keys, not sampled ones
    few_files = ray.data.read_parquet(write_files(tmp_path / "few", few[::-1], per_file=7))
    assert blocks(ordered_feed(few_files, len(few), seed=0)) == blocks(
        ordered_feed(ray.data.from_items(few), len(few), seed=0)
    )

    reseeded = [key for block in blocks(ordered_feed(one_file, len(rows), seed=1)) for key in block]
    assert reseeded != flat and sorted(reseeded) == sorted(flat)


def test_by_prompt_keeps_each_prompts_blocks_together_and_in_order(local_ray, tmp_path):
    rows = records(3 * FEED_BLOCK_ROWS)
    shuffled = random.Random(2).sample(rows, len(rows))
    dataset = ray.data.read_parquet(write_files(tmp_path / "files", shuffled, per_file=100))
    flat = [key for block in blocks(ordered_feed(dataset, len(rows), seed=0, by_prompt=True)) for key in block]
    assert sorted(flat) == sorted((r["prompt_id"], r["block_idx"]) for r in rows)
    prompts = list(dict.fromkeys(prompt for prompt, _ in flat))
    assert flat == [(prompt, block) for prompt in prompts for block in range(3)]  # consecutive, in block order
    assert prompts != sorted(prompts)  # the prompts themselves are shuffled
    again = ray.data.read_parquet(write_files(tmp_path / "again", rows, per_file=len(rows)))
    assert flat == [key for block in blocks(ordered_feed(again, len(rows), seed=0, by_prompt=True)) for key in block]
