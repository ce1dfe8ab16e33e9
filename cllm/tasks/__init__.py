"""Prompt/answer datasets behind one interface: the built-in arithmetic task, local files, hub datasets.

`load_task(spec, split)` reads:
- `builtin:arith`: the project's own GSM8K-style task (`cllm.tasks.arith`), generated from `seed`;
- a `.jsonl` / `.json` / `.parquet` path with a `prompt` column and an optional `answer` column
  (a `{split}` in the path is replaced by the split name, e.g. `data/{split}.jsonl`);
- any other name: a Hugging Face dataset (needs the `datasets` package and a reachable hub).

Answers are scored GSM8K-style by the number after the last `####` (`extract_answer`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from cllm.tasks import arith

BUILTIN_PREFIX = "builtin:"
BUILTIN_TASKS = ("arith",)
BUILTIN_SIZES = {"train": 20000, "test": 500}  # problems in a split when no limit is given
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


@dataclass
class Task:
    """The records of one split: each has a `prompt` and (possibly None) an `answer`."""

    name: str
    split: str
    records: list[dict] = field(repr=False)

    def __len__(self) -> int:
        return len(self.records)

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
        if not self.has_answers:
            raise ValueError(f"task {self.name} ({self.split}) has records without an answer to score")
        return accuracy(predictions, self.answers)


# ----- scoring -----


def normalize_number(text: str) -> str:
    """'1,000' -> '1000', '$5.50' -> '5.5', '72.0' -> '72'; text that is no number is only stripped."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return text.strip()
    return format(value.normalize(), "f") if value != 0 else "0"


def extract_answer(text: str | None) -> str | None:
    """The final answer: what follows the last '####', else the last number in the text, else None."""
    if text is None:
        return None
    text = str(text)
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        match = NUMBER.match(tail)
        if match:
            return normalize_number(match.group())
        return tail.splitlines()[0].strip() if tail else None
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def accuracy(predictions: list[str], answers: list[str | int]) -> float:
    """Exact-answer accuracy: the fraction of predictions whose final answer equals the reference's."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("no answers to score")
    correct = 0
    for prediction, answer in zip(predictions, answers, strict=True):
        expected = extract_answer(str(answer))
        correct += expected is not None and extract_answer(prediction) == expected
    return correct / len(answers)


# ----- loading -----


def load_task(
    spec: str,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
) -> Task:
    """Load `split` of the dataset named by `spec` (see the module docstring); `limit` keeps the first N."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if spec.startswith(BUILTIN_PREFIX):
        records = builtin_records(spec[len(BUILTIN_PREFIX):], split, limit, seed)
    elif spec.endswith(FILE_SUFFIXES) or Path(spec.replace("{split}", split)).exists():
        records = file_records(Path(spec.replace("{split}", split)), prompt_field, answer_field)
    else:
        records = hub_records(spec, split, prompt_field, answer_field)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"dataset {spec!r} (split {split!r}) has no records")
    return Task(name=spec, split=split, records=records)


def builtin_records(name: str, split: str, limit: int | None, seed: int) -> list[dict]:
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown built-in task {name!r}: choose from {list(BUILTIN_TASKS)}")
    if split not in BUILTIN_SIZES:
        raise ValueError(f"unknown split {split!r} for the built-in task: use one of {list(BUILTIN_SIZES)}")
    n = BUILTIN_SIZES[split] if limit is None else limit
    return [{"prompt": p.prompt, "answer": p.answer} for p in arith.generate(n, split, seed)]


def file_records(path: Path, prompt_field: str, answer_field: str) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"dataset file not found: {path}")
    rows = read_parquet(path) if path.suffix == ".parquet" else read_json_lines(path)
    return to_records(rows, str(path), prompt_field, answer_field)


def read_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"cannot read Parquet file {path}: {err}") from err


def read_json_lines(path: Path) -> list[dict]:
    """JSON Lines (one object per line); a .json file may also hold one list of objects."""
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not valid JSON: {err}") from err
    return rows


def hub_records(name: str, split: str, prompt_field: str, answer_field: str) -> list[dict]:
    """A Hugging Face dataset `name` or `name:config` (needs `datasets` and network access)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{name!r} is neither a built-in task nor a .jsonl/.json/.parquet file; loading it as a "
            "Hugging Face dataset needs the `datasets` package (pip install datasets)"
        ) from None
    repo, _, config = name.partition(":")
    try:
        dataset = datasets.load_dataset(repo, config or None, split=split)
    except Exception as err:  # offline, unknown name, unknown split: all reported the same way
        raise ValueError(f"cannot load Hugging Face dataset {name!r} split {split!r}: {err}") from err
    return to_records(list(dataset), name, prompt_field, answer_field)


def to_records(rows: list, source: str, prompt_field: str, answer_field: str) -> list[dict]:
    """Keep `prompt` (text or chat messages) and `answer` (text or None), checking each row."""
    records = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: record {index} is a {type(row).__name__}, not an object")
        if prompt_field not in row:
            raise ValueError(
                f"{source}: record {index} has no {prompt_field!r} field (fields: {sorted(row)})"
            )
        prompt = row[prompt_field]
        if not isinstance(prompt, (str, list)) or not prompt:
            raise ValueError(f"{source}: record {index} has an empty or non-text {prompt_field!r}")
        answer = row.get(answer_field)
        records.append({"prompt": prompt, "answer": None if answer is None else str(answer)})
    return records
