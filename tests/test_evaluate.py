"""Side-by-side evaluation and the report files; `cllm bench` on a saved model."""

from __future__ import annotations

import json

import pytest
import torch

from cllm.cli import main as cli_main
from cllm.data.trajectories import PROMPT_TOO_LONG
from cllm.decoding.core import DecodeFields
from cllm.evaluate import METHODS, count_forwards, evaluate_model, write_report
from cllm.models.loading import LoadedModel

PROMPTS = ["abc abc abc", "Hello there", "1 + 2 = "]


@pytest.fixture(scope="module")
def results(llama_model, tokenizer):
    loaded = LoadedModel(llama_model, tokenizer, "tiny")
    return evaluate_model(loaded, PROMPTS, ["#### 1", "#### 2", "#### 3"],
                          decode=DecodeFields(block_size=8, max_new_tokens=20), metric="exact")


def test_every_method_is_measured_and_exact(results):
    by_method = {r.method: r for r in results}
    assert list(by_method) == list(METHODS)
    for r in results:
        assert r.prompts == 3 and r.exact == 3, r.method  # all methods reproduce greedy decoding
        assert r.new_tokens == by_method["hf_greedy"].new_tokens
        assert r.seconds > 0 and r.accuracy == 0.0 and (r.metric, r.scored) == ("exact", 3)
    assert by_method["hf_greedy"].tokens_per_forward == 1.0
    assert by_method["ar"].tokens_per_forward == 1.0
    assert by_method["hf_greedy"].speedup == 1.0 and by_method["ar"].speedup_vs_ar == 1.0
    for r in results:  # both ratios come from the same measured tokens/s
        assert r.speedup_vs_ar == pytest.approx(r.tokens_per_second / by_method["ar"].tokens_per_second)
    # our counters and the forward hook agree: the Jacobi histogram covers every decoding pass
    jacobi = by_method["jacobi"]
    assert sum(jacobi.commit_histogram.values()) == jacobi.decode_forwards
    assert 1.0 <= jacobi.tokens_per_forward <= 8


def test_forward_counter_counts_model_calls(llama_model, tokenizer):
    ids = tokenizer(["abc"], return_tensors="pt")["input_ids"]
    with count_forwards(llama_model) as calls:
        llama_model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert calls[0] == 5  # prefill + 4 decoding steps


def test_report_files(results, tmp_path):
    paths = write_report(results, tmp_path, settings={"block_size": 8})
    report = json.loads(paths["json"].read_text())
    assert report["settings"] == {"block_size": 8}
    assert [r["method"] for r in report["results"]] == list(METHODS)
    markdown = paths["markdown"].read_text()
    assert "| tiny | jacobi |" in markdown and "| 0.0% (0/3) | 3/3 |" in markdown
    assert report["stages"] == [{"stage": "evaluate tiny", "split": None, "rows": 3, "set_aside": {}, "decoded": 3,
                                 "scored": 3, "metric": "exact"}]
    assert "| evaluate tiny |  | 3 | none | 3 | 3 (exact) |" in markdown
    for name in ("tpf", "speedup", "commit_histogram"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"


def test_budget_is_cut_to_the_context(llama_model, tokenizer, monkeypatch):
    """A prompt near the end of the context gets the room left; one that fills it is counted, not decoded."""
    loaded = LoadedModel(llama_model, tokenizer, "tiny")
    short, long = "abc", "x" * 40
    room = 6
    monkeypatch.setattr(llama_model.config, "max_position_embeddings", len(tokenizer(short)["input_ids"]) + room)
    results = evaluate_model(loaded, [short, long], methods=("ar", "jacobi"),
                             decode=DecodeFields(block_size=4, max_new_tokens=20))
    for r in results:
        assert r.prompts == 1 and r.set_aside == {PROMPT_TOO_LONG: 1} and r.exact == 1, r.method
        assert r.new_tokens <= room
        assert r.metric == "none" and r.accuracy is None  # no answers: not scored
    with pytest.raises(ValueError, match=r"no prompt can be decoded: 1 longer than the model's context \(the model's "
                                         r"context is \d+ tokens\)"):
        evaluate_model(loaded, [long], methods=("ar",), decode=DecodeFields(max_new_tokens=20))


def greedy_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_each_decoded_prompt_is_scored_against_its_own_answer(llama_model, tokenizer, monkeypatch):
    """Prompts set aside for length take their answers with them: the rest keep theirs (issue 22)."""
    loaded = LoadedModel(llama_model, tokenizer, "tiny")
    decode = DecodeFields(block_size=4, max_new_tokens=8)
    prompts = ["abc", "x" * 40, "Hello", "y" * 50, "1 + 2 = "]
    short = [prompts[0], prompts[2], prompts[4]]
    outputs = [greedy_text(llama_model, tokenizer, p, 8) for p in short]
    answers = [outputs[0], "no", outputs[1], "no", "wrong"]  # the last short prompt's answer is wrong on purpose
    monkeypatch.setattr(llama_model.config, "max_position_embeddings", 30)
    results = evaluate_model(loaded, prompts, answers, methods=("ar", "jacobi"), decode=decode, metric="exact")
    for r in results:
        assert (r.prompts, r.set_aside, r.scored, r.correct) == (3, {PROMPT_TOO_LONG: 2}, 3, 2), r.method
        assert r.accuracy == pytest.approx(2 / 3)
    none = evaluate_model(loaded, prompts, answers, methods=("ar",), decode=decode, metric="none")
    assert all(r.accuracy is None and r.scored == 0 and r.exact == 3 for r in none)  # exactness whatever the metric
    partial = evaluate_model(loaded, prompts, [outputs[0], None, None, None, None], methods=("ar",), decode=decode)
    assert all((r.metric, r.scored, r.correct) == ("exact", 1, 1) for r in partial)  # only prompts with an answer


def test_the_installed_cllm_command_exits_0_after_a_bench(tiny_model_dir, tmp_path):
    """The console script, as a user runs it: status 0, the table on stdout, nothing else on stderr."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "2 + 2 =", "answer": "#### 4"}\n')
    script = shutil.which("cllm") or str(Path(sys.executable).parent / "cllm")
    done = subprocess.run([script, "bench", "--models", str(tiny_model_dir), "--dataset", str(data), "--limit", "1",
                           "--max-new-tokens", "6", "--methods", "ar"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| ar |" in done.stdout and "MethodResult" not in done.stderr


def test_a_batch_decodes_what_one_prompt_at_a_time_does(llama_model, tokenizer, results):
    """batch_size 2 over three prompts of different lengths (a padded batch of two, then one): every method's
    outputs are greedy AR's, the one-at-a-time run's; tokens per pass are each row's own passes."""
    loaded = LoadedModel(llama_model, tokenizer, "tiny")
    methods = ("ar", "jacobi", "jacobi_ngram", "multiblock")
    batched = evaluate_model(loaded, PROMPTS, ["#### 1", "#### 2", "#### 3"], methods=methods, metric="exact",
                             decode=DecodeFields(block_size=8, max_new_tokens=20), batch_size=2)
    single = {r.method: r for r in results}
    for r in batched:
        assert r.prompts == 3 and r.exact == 3, r.method
        assert r.outputs == single[r.method].outputs, r.method
        assert r.new_tokens == single[r.method].new_tokens and r.scored == 3
    by_method = {r.method: r for r in batched}
    assert by_method["ar"].tokens_per_forward == by_method["hf_greedy"].tokens_per_forward == 1.0
    for name in ("jacobi", "jacobi_ngram"):
        jacobi = by_method[name]  # one histogram entry per row pass: the counts agree
        assert sum(jacobi.commit_histogram.values()) == jacobi.decode_forwards
        assert jacobi.decode_forwards <= by_method["ar"].decode_forwards


def test_assisted_generation_is_refused_in_a_batch(llama_model, tokenizer, tiny_model_dir, tmp_path, capsys):
    from pydantic import ValidationError

    from cllm.evaluate import EvalOptions

    with pytest.raises(ValueError, match="hf_prompt_lookup decodes one prompt at a time"):
        evaluate_model(LoadedModel(llama_model, tokenizer, "tiny"), PROMPTS, methods=("hf_prompt_lookup",),
                       batch_size=2)
    with pytest.raises(ValidationError, match="hf_prompt_lookup decodes one prompt at a time"):
        EvalOptions(batch_size=4)  # the default methods include it
    assert EvalOptions(batch_size=4, methods=["ar", "jacobi"]).batch_size == 4
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "2 + 2 =", "answer": "#### 4"}\n')
    with pytest.raises(SystemExit):
        cli_main(["bench", "--models", str(tiny_model_dir), "--dataset", str(data), "--batch-size", "2"])
    assert "hf_prompt_lookup decodes one prompt at a time" in capsys.readouterr().err


def test_unknown_method_is_rejected(llama_model, tokenizer):
    with pytest.raises(ValueError, match="unknown evaluation methods"):
        evaluate_model(LoadedModel(llama_model, tokenizer, "tiny"), PROMPTS, methods=("beam",))


def test_cllm_bench_cli(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "2 + 2 =", "answer": "#### 4"}\n{"prompt": "hello", "answer": "#### 1"}\n')
    cli_main(["bench", "--models", str(tiny_model_dir), "--dataset", str(data), "--limit", "2",
              "--max-new-tokens", "12", "--block-size", "4", "--methods", "ar", "--methods", "jacobi",
              "--output-dir", str(tmp_path / "bench")])
    table = capsys.readouterr().out
    assert "| jacobi |" in table and "| ar |" in table and "| hf_greedy |" in table
    report = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert (report["data"]["dataset"], report["data"]["metric"]) == (str(data), "numeric")  # answers carry ####
    assert [s["decoded"] for s in report["stages"]] == [2]


def test_a_model_can_have_its_own_methods(tiny_model_dir, tmp_path):
    from cllm.evaluate import evaluate_models
    from cllm.tasks import load_task

    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "2 + 2 =", "answer": "#### 4"}\n')
    task = load_task(str(data), limit=1)
    results = evaluate_models({"teacher": str(tiny_model_dir), "cllm": str(tiny_model_dir)}, task,
                              methods=("ar", "jacobi", "jacobi_ngram"), decode=DecodeFields(max_new_tokens=8),
                              methods_of={"teacher": ("jacobi",)})
    assert [(r.model, r.method) for r in results] == [
        ("teacher", "hf_greedy"), ("teacher", "jacobi"),
        ("cllm", "hf_greedy"), ("cllm", "ar"), ("cllm", "jacobi"), ("cllm", "jacobi_ngram"),
    ]


def test_models_are_compared_with_the_reference_models_greedy_outputs(tmp_path, capsys):
    from conftest import char_tokenizer, save_model_dir, tiny_model

    from cllm.evaluate import evaluate_models, perplexity, reference_table
    from cllm.tasks import Task

    teacher = save_model_dir(tmp_path / "teacher", tiny_model("llama", seed=0), char_tokenizer())
    other = save_model_dir(tmp_path / "other", tiny_model("llama", seed=1), char_tokenizer())
    task = Task("t", "test", [{"prompt": p, "answer": None} for p in PROMPTS])
    results = evaluate_models({"teacher": teacher, "copy": teacher, "other": other}, task, methods=["ar"],
                              decode=DecodeFields(block_size=8, max_new_tokens=12), reference="teacher")
    rows = {(r.model, r.method): r for r in results}
    assert rows["teacher", "hf_greedy"].perplexity_ratio == 1.0
    copy = rows["copy", "hf_greedy"]
    assert (copy.same_output, copy.same_answer, copy.perplexity_ratio) == (3, 3, 1.0)
    changed = rows["other", "hf_greedy"]
    assert changed.same_output < 3 and changed.perplexity_ratio > 1.0  # another model's text is less likely
    assert rows["other", "ar"].same_output == changed.same_output and rows["other", "ar"].reference_perplexity is None
    # the reference's perplexity, recomputed by hand from its logits over each prompt + output
    loaded = LoadedModel(tiny_model("llama", seed=0), char_tokenizer(), "teacher")
    nll, count = 0.0, 0
    for prompt, tokens in zip(PROMPTS, changed.outputs, strict=True):
        ids = loaded.tokenizer(prompt)["input_ids"]
        logits = loaded.model(torch.tensor([ids + tokens])).logits[0]
        logp = torch.log_softmax(logits, dim=-1)
        nll -= sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(tokens))
        count += len(tokens)
    assert changed.reference_perplexity == pytest.approx(float(torch.tensor(nll / count).exp()), rel=1e-4)
    encoded = [torch.tensor([loaded.tokenizer(p)["input_ids"]]) for p in PROMPTS]
    assert perplexity(loaded.model, encoded, [[] for _ in PROMPTS]) is None
    assert "| other | " in reference_table(results)
    assert "evaluate other: 3/3 prompts" in capsys.readouterr().err  # progress, with the rate
