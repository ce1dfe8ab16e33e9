"""One file split into train and test, the same way on every run: by a seeded hash of each prompt.

Rows are grouped by prompt, so a prompt that appears twice in the file (with the same or another
answer) lands in one split only: the test set never holds a prompt the model was trained on. The
distinct prompts are ranked by hash and the first `test_fraction` of them are the test split (at least
one, never all); within a split the rows keep their order in the file, so a `limit` takes the first N.
The ranking depends only on the prompts and the seed, not on the rows' order or on the split asked for.
"""

from __future__ import annotations

import hashlib
import json

from cllm.errors import ConfigError, DataError

SPLITS = ("train", "test")


def prompt_key(prompt) -> str:
    """A prompt (text or chat turns; a whole row when it has no readable prompt) as one comparable string."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)


def rank(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def test_keys(keys: list[str], fraction: float, seed: int) -> set[str]:
    """The distinct keys that form the test split."""
    distinct = sorted(set(keys), key=lambda key: rank(key, seed))
    if len(distinct) < 2:
        raise DataError(f"splitting by test_fraction needs at least 2 distinct prompts, found {len(distinct)}")
    size = min(max(1, round(fraction * len(distinct))), len(distinct) - 1)
    return set(distinct[:size])


def split_indices(keys: list[str], split: str, fraction: float, seed: int) -> list[int]:
    """Indices (in file order) of the rows in `split`, given each row's prompt key."""
    if split not in SPLITS:
        raise ConfigError(f"a file split by test_fraction has the splits {list(SPLITS)}, not {split!r}")
    held_out = test_keys(keys, fraction, seed)
    return [i for i, key in enumerate(keys) if (key in held_out) == (split == "test")]
