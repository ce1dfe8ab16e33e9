"""A user's own data through every stage (issue 22): free text longer than the context, chat records, a
file split into train and test, and a report that counts what each stage set aside and how it scored."""

from __future__ import annotations

import json
import random

import pytest
import ray
from conftest import char_tokenizer, save_model_dir, tiny_model

from cllm.config import load_config
from cllm.data.trajectories import PROMPT_TOO_LONG
from cllm.evaluate import BASELINE, EvalOptions
from cllm.pipeline import PipelineConfig, check_eval_prompts, load_data, run_pipeline, shared_prompts
from cllm.tasks import load_task

CONTEXT = 96  # tokens: the char tokenizer makes one per character, so a 100-character prompt cannot fit
WORDS = ["apple", "river", "stone", "cloud", "maple", "ember", "quartz", "willow", "harbor", "meadow"]
STAGES = dict(
    block_size=8, max_new_tokens=12,
    collect=dict(actors=2, batch_size=4),
    train=dict(num_workers=2, batch_size=2, max_steps=3, checkpoint_every=2),
)


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """The tiny Llama of conftest with a 96-token context, so ordinary prompts can be too long."""
    model = tiny_model("llama", context=CONTEXT)
    return str(save_model_dir(tmp_path_factory.mktemp("context-96"), model, char_tokenizer()))


def free_text_file(path, n: int = 36) -> str:
    """Prompts of 1, 4 or 25 words (the last never fit), one-word answers, and one blank prompt."""
    rng = random.Random(0)
    rows = [{"prompt": f"Item {i}: " + " ".join(rng.choice(WORDS) for _ in range((1, 4, 25)[i % 3])),
             "answer": rng.choice(WORDS)} for i in range(n)]
    rows.insert(5, {"prompt": "  ", "answer": "blank"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def too_long(prompts: list) -> int:
    tokenizer = char_tokenizer()
    return sum(len(tokenizer(p)["input_ids"]) >= CONTEXT for p in prompts)


def chat_files(directory) -> str:
    """`{split}` files of chat records: OpenAI `messages` and ShareGPT `conversations`, some too long."""
    def messages(question, answer=None):
        turns = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": question}]
        return {"messages": turns + ([{"role": "assistant", "content": answer}] if answer else [])}

    def sharegpt(question, answer):
        return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}

    long_question = "Describe " + " and ".join(WORDS)  # over 96 tokens once the chat template wraps it
    splits = {
        "train": [messages(f"Pick a word {i}", WORDS[i]) for i in range(6)]
        + [sharegpt(f"Name {i}", WORDS[-i]) for i in range(1, 4)] + [messages(long_question, "all")],
        "test": [messages("Pick a word", "apple"), sharegpt("Name one", "river"), messages("Any word?"),
                 sharegpt(long_question, "all"), messages(long_question, "all")],
    }
    for split, rows in splits.items():
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(directory / "{split}.jsonl")


def run_in_process(config) -> dict:
    run_pipeline(config)
    return json.loads((config.out / "report" / "report.json").read_text())


def check_results(report: dict, metric: str) -> None:
    """Each model's methods, each over the prompts it decoded, exact against greedy AR."""
    entries = {(r["model"], r["method"]): r for r in report["results"]}
    options = EvalOptions()
    assert set(entries) == ({("teacher", method) for method in (BASELINE, *options.teacher_methods)}
                            | {("cllm", method) for method in options.methods})
    for entry in entries.values():
        assert entry["metric"] == metric and entry["prompts"] >= 1
        assert entry["exact"] == entry["prompts"], "every method must reproduce greedy AR exactly"
        assert 0.0 <= entry["accuracy"] <= 1.0


# ----- the data is read and checked at start -----


def test_the_pipeline_reads_and_checks_its_data_before_any_work(tmp_path, short_context_model):
    spec = free_text_file(tmp_path / "data.jsonl")
    unsplit = load_config(PipelineConfig, ["--dataset", spec, "--eval.limit", "5"], output_dir=str(tmp_path / "o"))
    collect, evaluation = load_data(unsplit)
    assert shared_prompts(collect, evaluation) == 5  # one file, not split: evaluation reads training prompts
    split = load_config(PipelineConfig, ["--dataset", spec, "--test-fraction", "0.25"], output_dir=str(tmp_path))
    assert shared_prompts(*load_data(split)) == 0
    no_answers = tmp_path / "no_answers.jsonl"
    no_answers.write_text(json.dumps({"prompt": "hello"}) + "\n")
    with pytest.raises(ValueError, match="metric 'exact' needs reference answers"):
        load_data(load_config(PipelineConfig, ["--dataset", str(no_answers), "--eval.metric", "exact"]))
    with pytest.raises(ValueError, match="eval.metric"):
        load_config(PipelineConfig, ["--eval.metric", "bleu"])
    chat = chat_files(tmp_path)
    collect, evaluation = load_data(load_config(PipelineConfig, ["--dataset", chat]))  # the built-in has a template
    assert len(collect) == 10 and len(evaluation) == 5
    long_only = tmp_path / "long.jsonl"
    long_only.write_text(json.dumps({"prompt": "x" * 200, "answer": "y"}) + "\n")
    config = load_config(PipelineConfig, ["--dataset", str(long_only)])
    with pytest.raises(ValueError, match=r"no prompt of the evaluation split 'test' can be decoded: 1 longer than "
                                         r"the model's context \(the teacher's context is 96 tokens\)"):
        check_eval_prompts(config, short_context_model, load_data(config)[1])


# ----- end to end -----


@pytest.fixture(scope="module")
def pipeline_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.extended
def test_free_text_longer_than_the_context_goes_through_every_stage(tmp_path, short_context_model, pipeline_ray):
    spec = free_text_file(tmp_path / "code.jsonl")
    argv = ["--model", short_context_model, "--dataset", spec, "--test-fraction", "0.3", "--split-seed", "1",
            "--eval.metric", "auto"]
    config = load_config(PipelineConfig, argv, output_dir=str(tmp_path / "run"), **STAGES)
    train, test = (load_task(spec, split, test_fraction=0.3, split_seed=1) for split in ("train", "test"))
    assert too_long(train.prompts) and too_long(test.prompts)  # the data tests what it should
    report = run_in_process(config)

    collect, teacher, cllm = report["stages"]
    blank = {"blank_prompt": 1} if train.set_aside else {}
    assert collect == {"stage": "collect", "split": "train", "rows": train.rows, "decoded": len(train) - too_long(
        train.prompts), "set_aside": {**blank, PROMPT_TOO_LONG: too_long(train.prompts)}, "scored": None}
    blank = {"blank_prompt": 1} if test.set_aside else {}
    decoded = len(test) - too_long(test.prompts)
    for stage, model in ((teacher, "teacher"), (cllm, "cllm")):
        assert stage == {"stage": f"evaluate {model}", "split": "test", "rows": test.rows, "decoded": decoded,
                         "set_aside": {**blank, PROMPT_TOO_LONG: too_long(test.prompts)}, "scored": decoded,
                         "metric": "exact"}
    assert train.set_aside or test.set_aside  # the blank row is counted in the split it fell in
    check_results(report, "exact")
    assert all(r["scored"] == decoded for r in report["results"])
    data = report["data"]
    assert data["metric"] == "exact" and "free text" in data["metric_reason"]
    assert data["eval_prompts_also_collected"] == 0 and "split by a hash of each prompt" in data["eval_split"]
    markdown = (config.out / "report" / "report.md").read_text()
    assert f"| evaluate cllm | test | {test.rows} | " in markdown and "longer than the model's context" in markdown
    assert f"/{decoded}) | {decoded}/{decoded} |" in markdown  # accuracy and exactness, each with its denominator


@pytest.mark.slow
def test_chat_records_go_through_every_stage(tmp_path, short_context_model, pipeline_ray):
    spec = chat_files(tmp_path)
    config = load_config(PipelineConfig, ["--model", short_context_model, "--dataset", spec],
                         output_dir=str(tmp_path / "run"), **STAGES)
    report = run_in_process(config)

    collect, teacher, cllm = report["stages"]
    assert (collect["rows"], collect["decoded"], collect["set_aside"]) == (10, 9, {PROMPT_TOO_LONG: 1})
    for stage in (teacher, cllm):
        assert (stage["rows"], stage["decoded"], stage["set_aside"]) == (5, 3, {PROMPT_TOO_LONG: 2})
        assert stage["scored"] == 2  # "Any word?" has no assistant turn: decoded, not scored
    check_results(report, "exact")
    assert report["data"]["record_formats"] == {"messages": 3, "conversations": 2}
    assert report["data"]["eval_prompts_also_collected"] == 1  # the long question is in both files, and is found
    assert "the file of split 'test'" in report["data"]["eval_split"]
