"""The order in which training records reach the workers: a function of the records and a seed only.

Kept apart from `cllm.train` so the Ray Data tasks that compute it import pyarrow, not torch.
"""

from __future__ import annotations

import hashlib
import math

import pyarrow as pa
import ray.data

FEED_BLOCK_ROWS = 256  # rows per block of the ordered feed, on average: the unit Ray Data hands a worker


BLOCK_BITS = 16  # a prompt's blocks keep their order in the low bits of a grouped key


def seeded_hash(value, seed: int) -> int:
    """A signed 64-bit hash of `value` under `seed`."""
    return int.from_bytes(hashlib.blake2b(repr((seed, value)).encode(), digest_size=8).digest(), "big", signed=True)


def add_order_key(table: pa.Table, seed: int, by_prompt: bool = False) -> pa.Table:
    """A seeded 64-bit hash of each whole row: a shuffle fixed by what the records are, not where they lie.

    `by_prompt` hashes the prompt instead and keeps its blocks consecutive, in block order (what the
    progressive objective packs into one sequence).
    """
    keys = []
    for row in table.to_pylist():
        if by_prompt:  # the prompt's hash in the high bits (sign included), the block index in the low ones
            key = (seeded_hash(row["prompt_id"], seed) >> BLOCK_BITS) << BLOCK_BITS
            key |= min(row.get("block_idx") or 0, 2**BLOCK_BITS - 1)
        else:
            key = seeded_hash(sorted(row.items()), seed)
        keys.append(key)
    return table.append_column("order_key", pa.array(keys, pa.int64()))


def ordered_feed(dataset: ray.data.Dataset, records: int, seed: int, by_prompt: bool = False) -> ray.data.Dataset:
    """The same rows in the same blocks whatever files a collection wrote them to (resumed runs included).

    Collection writes files in the order its actors finish, so file order, batches and the DDP split
    would change from run to run. Sorting by a content hash, cut at fixed hash values (the hash is
    uniform, so blocks come out about equal), makes the feed a function of the records and the seed;
    `preserve_order` then sends each block to the same worker every run.
    """
    # At least one boundary: given none, Ray samples its own from the input blocks, which differ by file.
    blocks = max(2, math.ceil(records / FEED_BLOCK_ROWS))
    boundaries = [-(2**63) + (i * 2**64) // blocks for i in range(1, blocks)]
    keyed = dataset.map_batches(add_order_key, fn_kwargs={"seed": seed, "by_prompt": by_prompt},
                                batch_format="pyarrow")
    # Materialized once here rather than sorted again for every epoch.
    return keyed.sort("order_key", boundaries=boundaries).drop_columns(["order_key"]).materialize()
