"""How a prediction is scored against its reference answer, chosen per dataset.

- `numeric`: GSM8K-style, the final answer must match: the number after the last `####`, else after the last
  "answer is" (instruction-tuned models end with "The answer is: 18"), else the last number in the text;
- `exact`: the text must equal the reference, leading and trailing whitespace aside;
- `none`: no accuracy is computed (the report says n/a);
- `auto`: `numeric` for the built-in task and for answers that carry `####`, `exact` for other answers,
  `none` for a dataset without answers.

Only prompts with a reference are scored, and the count of them is reported with the accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Literal

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
ANSWER_IS = re.compile(r"answer is\s*:?\s*(?:\*\*)?\s*(-?\$?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
METRICS = ("auto", "numeric", "exact", "none")
Metric = Literal[METRICS]


def normalize_number(text: str) -> str:
    """'1,000' -> '1000', '$5.50' -> '5.5', '72.0' -> '72'; text that is no number is only stripped."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return text.strip()
    return format(value.normalize(), "f") if value != 0 else "0"


def extract_answer(text: str | None) -> str | None:
    """The final answer: what follows the last '####', else the number after the last "answer is", else the last
    number in the text, else None."""
    if text is None:
        return None
    text = str(text)
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        match = NUMBER.match(tail)
        if match:
            return normalize_number(match.group())
        return tail.splitlines()[0].strip() if tail else None
    stated = ANSWER_IS.findall(text)
    if stated:
        return normalize_number(stated[-1])
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def numeric_match(prediction: str, reference: str) -> bool:
    expected = extract_answer(reference)
    return expected is not None and extract_answer(prediction) == expected


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


MATCHERS: dict[str, Callable[[str, str], bool]] = {"numeric": numeric_match, "exact": exact_match}


def accuracy(predictions: list[str], answers: list[str | int]) -> float:
    """Numeric accuracy: the fraction of predictions whose final answer equals the reference's."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("no answers to score")
    correct, _ = score("numeric", predictions, [str(a) for a in answers])
    return correct / len(answers)


def score(metric: str, predictions: Sequence[str], references: Sequence[str | None]) -> tuple[int, int]:
    """(correct, scored): scored counts the predictions that have a reference; `none` scores nothing."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if metric == "none":
        return 0, 0
    if metric not in MATCHERS:
        raise ValueError(f"unknown metric {metric!r}: choose from {list(METRICS)}")
    pairs = [(p, r) for p, r in zip(predictions, references, strict=True) if r is not None]
    return sum(MATCHERS[metric](p, r) for p, r in pairs), len(pairs)


def choose_metric(requested: str, answers: Sequence[str | None], builtin: bool = False) -> tuple[str, str]:
    """The metric to score with and why; an explicit `numeric`/`exact` on a dataset without answers is refused."""
    if requested not in METRICS:
        raise ValueError(f"unknown metric {requested!r}: choose from {list(METRICS)}")
    given = [a for a in answers if a is not None]
    if requested == "none":
        return "none", "not scored (metric: none)"
    if requested != "auto":
        if not given:
            raise ValueError(f"metric {requested!r} needs reference answers, and no record of the dataset has one")
        return requested, f"chosen in the config ({len(given)} of {len(answers)} records have an answer)"
    if builtin:
        return "numeric", "auto: the built-in task's answers end with '#### <number>'"
    if not given:
        return "none", "auto: the dataset has no answers"
    if all("####" in a for a in given):
        return "numeric", "auto: every answer carries '####'"
    return "exact", "auto: the answers are free text (no '####'), compared whole after trimming whitespace"
