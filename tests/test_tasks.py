"""The built-in arithmetic task and the dataset interface: determinism, disjoint splits, correct
answers, scoring, file loading and the errors users see."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cllm.tasks import Task, accuracy, arith, extract_answer, load_task

EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def test_generator_is_deterministic_by_seed():
    assert arith.generate(50, "train", seed=3) == arith.generate(50, "train", seed=3)
    assert arith.generate(50, "train", seed=3) != arith.generate(50, "train", seed=4)
    # a longer run starts with the shorter one
    assert arith.generate(80, "test", seed=1)[:30] == arith.generate(30, "test", seed=1)


def test_splits_are_disjoint_and_keep_their_hash_bucket():
    train = {p.prompt for p in arith.generate(3000, "train")}
    test = {p.prompt for p in arith.generate(300, "test")}
    assert not train & test
    assert all(arith.split_of(p) == "test" for p in test)
    assert all(arith.split_of(p) == "train" for p in train)


def recompute(problem: arith.Problem) -> int:
    """Replay the question's events independently of the generator's own arithmetic."""
    question = problem.prompt.split("Question: ", 1)[1].split("\nAnswer:")[0]
    sentences = question.split(". ")
    count = int(re.search(r"has (\d+) ", sentences[0]).group(1))
    for sentence in sentences[1:]:
        if m := re.search(r"buys (\d+) \w+ with (\d+) ", sentence):
            count += int(m.group(1)) * int(m.group(2))
        elif m := re.search(r"gives (\d+) \w+ to ", sentence):
            count -= int(m.group(1))
        elif m := re.search(r"finds (\d+) more|gives \w+ (\d+) ", sentence):
            count += int(m.group(1) or m.group(2))
    return count


def test_answers_reason_step_by_step_and_end_with_the_correct_number():
    for problem in arith.generate(500, "train", seed=7) + arith.generate(100, "test", seed=7):
        final = problem.answer.rsplit("\n", 1)[1]
        assert final == f"#### {problem.result}"
        assert problem.result == recompute(problem), problem.prompt
        equations = EQUATION.findall(problem.answer)
        assert len(equations) >= 2  # multi-step
        for a, op, b, result in equations:
            assert OPS[op](int(a), int(b)) == int(result), problem.answer
        assert int(equations[-1][3]) == problem.result
        assert 0 <= problem.result <= arith.MAX_COUNT


def test_unknown_split_and_bad_counts_are_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        arith.generate(3, "validation")
    with pytest.raises(ValueError, match=">= 0"):
        arith.generate(-1)


def test_extract_answer():
    assert extract_answer("so 3 + 4 = 7 apples.\n#### 7") == "7"
    assert extract_answer("#### 1,234.") == "1234"
    assert extract_answer("#### $5.50") == "5.5"
    assert extract_answer("#### 72.0") == "72"
    assert extract_answer("#### -3") == "-3"
    assert extract_answer("The answer is 12, not 11") == "11"  # no marker: the last number
    assert extract_answer("42") == "42"
    assert extract_answer("no number here") is None
    assert extract_answer("#### ") is None
    assert extract_answer(None) is None


def test_accuracy_scores_final_answers():
    answers = ["step 1 = 7\n#### 7", "#### 10", "3"]
    assert accuracy(["blah\n#### 7", "#### 10", "#### 3"], answers) == 1.0
    assert accuracy(["#### 8", "#### 10", "the result is 4"], answers) == pytest.approx(1 / 3)
    assert accuracy(["", "no", "####"], answers) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 3 answers"):
        accuracy(["#### 7", "#### 10"], answers)
    with pytest.raises(ValueError, match="no answers"):
        accuracy([], [])


def test_builtin_task():
    task = load_task("builtin:arith", "test", limit=20, seed=2)
    assert isinstance(task, Task) and len(task) == 20 and task.has_answers
    assert task.prompts[0].startswith("Question: ") and task.prompts[0].endswith("\nAnswer:")
    assert task.accuracy(task.answers) == 1.0  # the references score themselves perfectly
    assert task.records == load_task("builtin:arith", "test", limit=20, seed=2).records
    assert len(load_task("builtin:arith", "test")) == 500
    with pytest.raises(ValueError, match="unknown built-in task"):
        load_task("builtin:chess", "test")
    with pytest.raises(ValueError, match="unknown split"):
        load_task("builtin:arith", "dev")
    with pytest.raises(ValueError, match="limit"):
        load_task("builtin:arith", "test", limit=0)


ROWS = [
    {"prompt": "What is 2 + 3?", "answer": "#### 5"},
    {"prompt": "What is 10 - 4?", "answer": 6},
    {"prompt": "Say hi."},
]


def test_jsonl_and_json_and_parquet_load_the_same_records(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    as_list = tmp_path / "data.json"
    as_list.write_text(json.dumps(ROWS))
    expected = [
        {"prompt": "What is 2 + 3?", "answer": "#### 5"},
        {"prompt": "What is 10 - 4?", "answer": "6"},  # a number becomes text
        {"prompt": "Say hi.", "answer": None},
    ]
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(expected), parquet)
    for path in (jsonl, as_list, parquet):
        task = load_task(str(path), "test")
        assert task.records == expected
        assert not task.has_answers
    assert load_task(str(jsonl), limit=2).accuracy(["#### 5", "it is 7"]) == 0.5
    with pytest.raises(ValueError, match="without an answer"):
        load_task(str(jsonl)).accuracy(["5", "6", "hi"])


def test_split_placeholder_and_custom_fields(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "q-train", "solution": "#### 1"}))
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q-test", "solution": "#### 2"}))
    spec = str(tmp_path / "{split}.jsonl")
    task = load_task(spec, "train", prompt_field="question", answer_field="solution")
    assert task.records == [{"prompt": "q-train", "answer": "#### 1"}]
    assert load_task(spec, "test", prompt_field="question", answer_field="solution").answers == ["#### 2"]


def test_file_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_task(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load_task(str(empty))
    no_prompt = tmp_path / "no_prompt.jsonl"
    no_prompt.write_text(json.dumps({"question": "x", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match=r"record 0 has no 'prompt' field \(fields: \['answer', 'question'\]\)"):
        load_task(str(no_prompt))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps({"prompt": "a"}) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_task(str(bad_json))
    blank_prompt = tmp_path / "blank.jsonl"
    blank_prompt.write_text(json.dumps({"prompt": ""}) + "\n")
    with pytest.raises(ValueError, match="empty or non-text 'prompt'"):
        load_task(str(blank_prompt))
    parquet = tmp_path / "no_prompt.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), parquet)
    with pytest.raises(ValueError, match="no 'prompt' field"):
        load_task(str(parquet))
    not_parquet = tmp_path / "broken.parquet"
    not_parquet.write_text("this is not parquet")
    with pytest.raises(ValueError, match="cannot read Parquet"):
        load_task(str(not_parquet))
    empty_parquet = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty_parquet)
    with pytest.raises(ValueError, match="no records"):
        load_task(str(empty_parquet))


def test_hub_names_fail_clearly_without_a_hub():
    # No network here: either `datasets` is missing or the hub is unreachable; both are ValueErrors.
    with pytest.raises(ValueError, match="datasets|cannot load Hugging Face dataset"):
        load_task("no-such-org/no-such-dataset", "test")
