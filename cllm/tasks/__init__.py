"""Prompt/answer datasets behind one interface: the built-in arithmetic task, local files, hub datasets.

`load_task(spec, split)` reads:
- `builtin:arith`: the project's own GSM8K-style task (`cllm.tasks.arith`), generated from `seed`;
- a `.jsonl` / `.json` / `.parquet` path (a `{split}` in the path is replaced by the split name, e.g.
  `data/{split}.jsonl`); a single file serves every split unless `test_fraction` splits it (`cllm.tasks.splits`);
- any other name: a Hugging Face dataset (needs the `datasets` package and a reachable hub).

Rows are prompt/answer columns or chat conversations (`cllm.tasks.records`). A row that cannot be a
prompt is set aside and counted by reason (`Task.set_aside`), never silently dropped. How answers are
scored is chosen per dataset (`cllm.tasks.scoring`).

What this layer may import: the standard library, pydantic, PyArrow (Parquet files), `datasets` for hub
names, `cllm.errors`; no torch and no model, so every stage and the command line read prompts without
loading one.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from cllm.errors import ConfigError, DataError
from cllm.tasks import arith
from cllm.tasks.records import BLANK_PROMPT, MISSING_PROMPT, TEXT_FORMAT, UNREADABLE_RECORD, Unreadable, read_row
from cllm.tasks.scoring import (  # noqa: F401  (the scoring interface, re-exported)
    METRICS,
    Metric,
    accuracy,
    choose_metric,
    extract_answer,
    normalize_number,
    score,
)
from cllm.tasks.splits import prompt_key, split_indices

BUILTIN_PREFIX = "builtin:"
BUILTIN_TASKS = ("arith",)
BUILTIN_SIZES = {"train": 20000, "test": 500}  # problems in a split when no limit is given
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

READ_REASONS = (MISSING_PROMPT, BLANK_PROMPT, UNREADABLE_RECORD)  # set aside when the dataset is read
# set aside once formatted and tokenized for a model (`cllm.data.trajectories`, `cllm.evaluate`)
PROMPT_TOO_LONG = "prompt_too_long"
EMPTY_PROMPT = "empty_prompt"
# Every reason a prompt is set aside, in any stage, as the reports word it.
SET_ASIDE_REASONS = {
    MISSING_PROMPT: "no prompt (no such field, a null, no chat turns)",
    BLANK_PROMPT: "blank prompt",
    UNREADABLE_RECORD: "unreadable (not text, or malformed chat turns)",
    PROMPT_TOO_LONG: "longer than the model's context",
    EMPTY_PROMPT: "no tokens once formatted",
}


def describe_set_aside(counts: dict[str, int]) -> str:
    """'21 longer than the model's context; 1 blank prompt', or 'none'."""
    parts = [f"{n} {SET_ASIDE_REASONS.get(reason, reason)}" for reason, n in counts.items() if n]
    return "; ".join(parts) or "none"


class DataFields(BaseModel):
    """Where prompts come from and how they are read; declared once, inherited by the stage configs."""

    dataset: str = Field(
        "builtin:arith",
        description="builtin:arith, a .jsonl/.json/.parquet file ({split} in its path: one file per split), or the "
                    "name of a Hugging Face dataset")
    prompt_field: str = Field("prompt", description="the field holding the prompt (GSM8K on the hub: question)")
    answer_field: str = Field("answer", description="the field holding the reference answer, if any")
    chat: bool = Field(
        False, description="apply the tokenizer's chat template to text prompts (chat turns always get it)")
    test_fraction: float | None = Field(
        None, gt=0, lt=1, description="split one file: this share of its prompts is the test split; None: not split")
    split_seed: int = Field(0, description="which prompts a test_fraction split holds out")

    def load_split(self, split: str, limit: int | None = None, seed: int = 0) -> Task:
        """`load_task` with these fields."""
        return load_task(self.dataset, split, limit, seed, prompt_field=self.prompt_field,
                         answer_field=self.answer_field, test_fraction=self.test_fraction,
                         split_seed=self.split_seed)


@dataclass
class Task:
    """The records of one split: each has a `prompt` (text or chat turns) and (possibly None) an `answer`."""

    name: str
    split: str
    records: list[dict] = field(repr=False)
    set_aside: dict[str, list[int]] = field(default_factory=dict)  # reason -> rows of the source, numbered from 0
    formats: dict[str, int] = field(default_factory=dict)  # record format -> records read in it
    source: str = ""  # where the split comes from and how it was made
    builtin: bool = False

    def __len__(self) -> int:
        return len(self.records)

    @property
    def rows(self) -> int:
        """Rows of the split, set-aside ones included."""
        return len(self.records) + sum(len(ids) for ids in self.set_aside.values())

    @property
    def set_aside_counts(self) -> dict[str, int]:
        return {reason: len(ids) for reason, ids in self.set_aside.items()}

    @property
    def prompts(self) -> list:
        return [r["prompt"] for r in self.records]

    @property
    def answers(self) -> list[str | None]:
        return [r.get("answer") for r in self.records]

    @property
    def has_answers(self) -> bool:
        return all(a is not None for a in self.answers)

    def accuracy(self, predictions: list[str]) -> float:
        """Numeric accuracy over every record (see `score` for other metrics and partial answers)."""
        if not self.has_answers:
            raise ValueError(f"task {self.name} ({self.split}) has records without an answer to score")
        return accuracy(predictions, self.answers)

    def metric(self, requested: str = "auto") -> tuple[str, str]:
        """The metric this dataset is scored with, and why (`choose_metric`); a DataError for one it cannot be
        scored with."""
        try:
            return choose_metric(requested, self.answers, builtin=self.builtin)
        except ValueError as err:
            raise DataError(f"{self.name}: {err}") from err


# ----- loading -----


def load_task(
    spec: str,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    test_fraction: float | None = None,
    split_seed: int = 0,
) -> Task:
    """Load `split` of the dataset named by `spec` (see the module docstring); `limit` keeps its first N rows."""
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    if spec.startswith(BUILTIN_PREFIX):
        refuse_fraction(test_fraction, spec, "the built-in task has its own disjoint train and test splits")
        return builtin_task(spec, split, limit, seed)
    path = Path(spec.replace("{split}", split))
    if spec.endswith(FILE_SUFFIXES) or path.exists():
        rows = file_rows(path)
        if "{split}" in spec:
            refuse_fraction(test_fraction, spec, "it has a file for each split already ({split} in the path)")
            how = f"{path}, the file of split {split!r}"
        elif test_fraction is None:
            how = f"{path}, not split: every split reads the whole file"
        else:
            how = (f"{path}, split by a hash of each prompt (test_fraction {test_fraction}, split_seed "
                   f"{split_seed}): train and test hold no prompt in common")
    else:
        refuse_fraction(test_fraction, spec, "a Hugging Face dataset has its own splits")
        rows, how = hub_rows(spec, split), f"Hugging Face dataset {spec}, split {split!r}"
    return rows_to_task(rows, spec, split, limit, prompt_field=prompt_field, answer_field=answer_field,
                        test_fraction=test_fraction, split_seed=split_seed, source=how)


def refuse_fraction(test_fraction: float | None, spec: str, why: str) -> None:
    if test_fraction is not None:
        raise ConfigError(f"test_fraction splits a single data file; {spec!r} cannot be split that way: {why}")


def builtin_task(spec: str, split: str, limit: int | None, seed: int) -> Task:
    name = spec[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_TASKS:
        raise DataError(f"unknown built-in task {name!r}: choose from {list(BUILTIN_TASKS)}")
    if split not in BUILTIN_SIZES:
        raise ConfigError(f"unknown split {split!r} for the built-in task: use one of {list(BUILTIN_SIZES)}")
    n = BUILTIN_SIZES[split] if limit is None else limit
    records = [{"prompt": p.prompt, "answer": p.answer} for p in arith.generate(n, split, seed)]
    source = f"built-in task generated from seed {seed}; a problem's split is fixed by a hash of its prompt"
    return Task(name=spec, split=split, records=records, formats={TEXT_FORMAT: len(records)}, source=source,
                builtin=True)


def rows_to_task(rows: list, name: str, split: str, limit: int | None, *, prompt_field: str, answer_field: str,
                 test_fraction: float | None, split_seed: int, source: str) -> Task:
    """Read every row, keep `split`'s share when a fraction splits the file, then the first `limit` rows."""
    read = [read_or_set_aside(row, prompt_field, answer_field) for row in rows]
    numbers = list(range(len(rows)))
    if test_fraction is not None:
        keys = [prompt_key(record["prompt"] if fmt else rows[i]) for i, (record, fmt) in enumerate(read)]
        numbers = split_indices(keys, split, test_fraction, split_seed)
    numbers = numbers[:limit] if limit is not None else numbers
    if not numbers:
        raise DataError(f"dataset {name!r} (split {split!r}) has no records")
    records, set_aside, formats = [], {}, Counter()
    for number in numbers:
        record, fmt = read[number]
        if fmt:
            records.append(record)
            formats[fmt] += 1
        else:
            set_aside.setdefault(record.reason, []).append(number)
    if not records:
        first = min(numbers)
        more = f" (and {len(numbers) - 1} more)" if len(numbers) > 1 else ""
        raise DataError(f"{name}: no record of split {split!r} can be read as a prompt; record {first} "
                        f"{read[first][0]}{more}; --prompt-field names the field that holds the prompt")
    return Task(name=name, split=split, records=records, set_aside=set_aside, formats=dict(formats), source=source)


def read_or_set_aside(row, prompt_field: str, answer_field: str) -> tuple[dict | Unreadable, str | None]:
    """(record, format) for a readable row, (the `Unreadable` error, None) for one to set aside."""
    try:
        return read_row(row, prompt_field, answer_field)
    except Unreadable as err:
        return err, None


def file_rows(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"dataset file not found: {path} (a dataset is builtin:arith, a .jsonl/.json/.parquet file, "
                        "or the name of a Hugging Face dataset)")
    return read_parquet(path) if path.suffix == ".parquet" else read_json_lines(path)


def read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cannot read Parquet file {path}: {err}") from err


def read_json_lines(path: Path) -> list:
    """JSON Lines (one object per line); a .json file may also hold one list of objects.

    A line that is not JSON fails the load: it means a broken file, not one odd record.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read dataset file {path}: {err}") from err
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON: {err}") from err
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number} is not valid JSON: {err}") from err
    return rows


def hub_rows(name: str, split: str) -> list:
    """A Hugging Face dataset `name` or `name:config` (needs `datasets` and network access)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name!r} is neither a built-in task nor a .jsonl/.json/.parquet file; loading it as a "
            "Hugging Face dataset needs the `datasets` package (pip install datasets)"
        ) from None
    repo, _, config = name.partition(":")
    try:
        dataset = datasets.load_dataset(repo, config or None, split=split)
    except Exception as err:  # offline, unknown name, unknown split: all reported the same way
        raise DataError(f"cannot load Hugging Face dataset {name!r} split {split!r}: {err}") from err
    return list(dataset)
