"""The built-in arithmetic task and the dataset interface: determinism, disjoint splits, correct
answers, scoring, file loading and the errors users see."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cllm.tasks import (
    DataFields,
    Task,
    accuracy,
    arith,
    choose_metric,
    describe_set_aside,
    extract_answer,
    load_task,
    score,
)
from cllm.tasks.records import BLANK_PROMPT, MISSING_PROMPT, UNREADABLE_RECORD
from cllm.tasks.scoring import numeric_match

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


# SmolLM2-135M-Instruct's own greedy answers to GSM8K training questions (its last lines, as decoded).
SMOLLM2_ENDINGS = [
    ("So, she sold 48/2 = 16 clips in April.\nIn May, she sold 16/5 = 3 clips.\n#### 3\nThe answer is: 3", "3"),
    ("So, Yesterday earned 300 * 50 = 1500 dollars.\n\nThe answer is 1500.", "1500"),
    ("The total number of pieces of pizza is 32 + 16 = 58 pieces.\nSo, Albert can eat 58 pieces of pizza.\n#### 58\n"
     "The answer is: 58", "58"),
    ("So, there are 30 purple flowers in Mark's garden.", "30"),
    ("So, the final weight of the box of goodies was 2 + 2 + 2 = 6 pounds.\n\nThe box of goodies was 2 + 2 + 2 = 6 "
     "pounds.", "6"),
]


@pytest.mark.parametrize(("text", "answer"), SMOLLM2_ENDINGS)
def test_extract_answer_reads_an_instruction_tuned_models_final_answer(text, answer):
    assert extract_answer(text) == answer
    assert numeric_match(text, f"some working\n#### {answer}")


def test_extract_answer():
    assert extract_answer("so 3 + 4 = 7 apples.\n#### 7") == "7"
    assert extract_answer("#### 1,234.") == "1234"
    assert extract_answer("#### $5.50") == "5.5"
    assert extract_answer("#### 72.0") == "72"
    assert extract_answer("#### -3") == "-3"
    assert extract_answer("so 12 - 1 = 11 apples, not 12") == "12"  # no marker: the last number
    assert extract_answer("The answer is 12, not 11") == "12"  # a stated answer wins over later numbers
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
    blank_prompt.write_text(json.dumps({"prompt": ""}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(ValueError, match=r"can be read as a prompt; record 0 has a blank .prompt. \(and 1 more"):
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


# ----- record formats: prompt/answer columns and chat conversations -----

CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris"}]},
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                       {"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4"}]},
    {"messages": [{"role": "user", "content": "Tell me a joke."}]},  # no assistant turn: no answer
    {"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "red"}],
     "answer": "blue"},  # an answer column wins over the last turn
]


def test_chat_records_split_off_the_last_assistant_turn(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in CHAT_ROWS))
    task = load_task(str(path))
    assert task.answers == ["Paris", "4", None, "blue"]
    assert task.prompts[0] == [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Capital of France?"}]
    assert task.prompts[1] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "2 + 2?"}]
    assert task.prompts[2] == [{"role": "user", "content": "Tell me a joke."}]
    assert task.formats == {"messages": 3, "conversations": 1} and task.set_aside == {}
    # turns in the prompt column are read the same way
    listed = tmp_path / "listed.jsonl"
    listed.write_text(json.dumps({"prompt": CHAT_ROWS[0]["messages"]}))
    assert load_task(str(listed)).records == [{"prompt": task.prompts[0], "answer": "Paris"}]


def test_unreadable_rows_are_set_aside_and_counted(tmp_path):
    rows = [
        {"prompt": "fine", "answer": "1"},
        {"question": "wrong column"},
        {"prompt": "   "},
        {"prompt": ["not", "turns"]},
        {"messages": [{"role": "tool", "content": "x"}, {"role": "user", "content": "q"}]},
        {"messages": [{"role": "assistant", "content": "an answer with no question"}]},
        [1, 2],
        {"prompt": None},
        {"prompt": "also fine"},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task(str(path))
    assert task.prompts == ["fine", "also fine"] and task.rows == 9
    assert task.set_aside == {MISSING_PROMPT: [1, 7], BLANK_PROMPT: [2, 5], UNREADABLE_RECORD: [3, 4, 6]}
    assert task.set_aside_counts == {MISSING_PROMPT: 2, BLANK_PROMPT: 2, UNREADABLE_RECORD: 3}
    described = describe_set_aside(task.set_aside_counts)
    assert described.startswith("2 no prompt (no such field, a null, no chat turns); 2 blank prompt; 3 unreadable")
    assert describe_set_aside({}) == "none"
    assert len(load_task(str(path), limit=3)) == 1  # the limit counts rows, set-aside ones included


# ----- one file split into train and test -----


def write_rows(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p, "answer": str(i)}) + "\n" for i, p in enumerate(prompts)))
    return str(path)


def test_test_fraction_splits_one_file_disjointly_and_stably(tmp_path):
    prompts = [f"question {i}" for i in range(200)] + ["question 7", "question 7"]  # a repeated prompt
    spec = write_rows(tmp_path / "all.jsonl", prompts)
    train = load_task(spec, "train", test_fraction=0.1)
    test = load_task(spec, "test", test_fraction=0.1)
    assert not set(train.prompts) & set(test.prompts)
    assert set(train.prompts) | set(test.prompts) == set(prompts)
    assert len(set(test.prompts)) == 20  # a tenth of the 200 distinct prompts
    assert len(train) + len(test) == len(prompts)  # every row is in one split, repeats together
    assert "split by a hash of each prompt" in test.source
    # the same on every run, and whatever the order of the rows in the file
    assert load_task(spec, "test", test_fraction=0.1).records == test.records
    shuffled = write_rows(tmp_path / "shuffled.jsonl", list(reversed(prompts)))
    assert set(load_task(shuffled, "test", test_fraction=0.1).prompts) == set(test.prompts)
    # another seed holds out other prompts; a limit takes the first rows of the split
    assert set(load_task(spec, "test", test_fraction=0.1, split_seed=1).prompts) != set(test.prompts)
    assert load_task(spec, "test", limit=5, test_fraction=0.1).records == test.records[:5]
    fields = DataFields(dataset=spec, test_fraction=0.1)
    assert fields.load_split("test").records == test.records


def test_test_fraction_is_refused_where_it_cannot_apply(tmp_path):
    spec = write_rows(tmp_path / "all.jsonl", ["a", "b", "c"])
    with pytest.raises(ValueError, match="built-in task has its own"):
        load_task("builtin:arith", "test", limit=3, test_fraction=0.1)
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(ValueError, match="a file for each split"):
        load_task(str(tmp_path / "{split}.jsonl"), "train", test_fraction=0.1)
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\], not 'validation'"):
        load_task(spec, "validation", test_fraction=0.1)
    write_rows(tmp_path / "one.jsonl", ["same", "same"])
    with pytest.raises(ValueError, match="at least 2 distinct prompts"):
        load_task(str(tmp_path / "one.jsonl"), "test", test_fraction=0.5)
    with pytest.raises(ValueError, match="test_fraction"):
        DataFields(test_fraction=1.0)
    assert "not split" in load_task(spec, "test").source  # the report says when one file serves both splits


# ----- scoring chosen per dataset -----


def test_score_counts_only_predictions_with_a_reference():
    predictions = ["#### 7", " Paris \n", "anything", "#### 3"]
    references = ["7", "Paris", None, "#### 4"]
    assert score("numeric", predictions, references) == (1, 3)
    assert score("exact", predictions, references) == (1, 3)  # whitespace-trimmed equality
    assert score("none", predictions, references) == (0, 0)
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", predictions, references)
    with pytest.raises(ValueError, match="2 predictions for 4 references"):
        score("exact", predictions[:2], references)


def test_auto_metric_follows_the_answers():
    assert choose_metric("auto", ["x"], builtin=True)[0] == "numeric"
    assert choose_metric("auto", ["step\n#### 4", None, "#### 5"])[0] == "numeric"
    assert choose_metric("auto", ["#### 4", "Paris"]) == (
        "exact", "auto: the answers are free text (no '####'), compared whole after trimming whitespace")
    assert choose_metric("auto", [None, None])[0] == "none"
    assert choose_metric("exact", ["#### 4"])[0] == "exact"
    assert choose_metric("none", ["#### 4"])[0] == "none"
    with pytest.raises(ValueError, match="metric 'numeric' needs reference answers"):
        choose_metric("numeric", [None])


def test_builtin_task_scores_as_before():
    task = load_task("builtin:arith", "test", limit=30, seed=1)
    assert task.metric() == ("numeric", "auto: the built-in task's answers end with '#### <number>'")
    predictions = [a if i % 3 else "#### -1" for i, a in enumerate(task.answers)]
    correct, scored = score("numeric", predictions, task.answers)
    assert scored == 30 and correct / scored == task.accuracy(predictions) == pytest.approx(20 / 30)
