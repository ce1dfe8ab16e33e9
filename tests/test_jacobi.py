"""Jacobi decoding must equal greedy AR decoding (transformers' own generate) token for token."""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cllm.decoding.jacobi import ar_generate, jacobi_generate, stationary_count
from cllm.models.loading import cache_keyword

PROMPTS = ["Hello there, how are", "x", "The quick brown fox jumps over", "Jacobi!"]
BLOCK_SIZES = [1, 2, 8, 16, 32]
INITS = ["prompt", "repeat", "pad", "ngram"]
MAX_NEW = 37  # not a multiple of any block size above 1


def encode(tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def greedy(model, input_ids, attention_mask, max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=0):
    return model.generate(
        input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )


@pytest.mark.parametrize("batch_size", [1, 4])
def test_jacobi_equals_generate(any_tiny_model, tokenizer, batch_size):
    input_ids, mask = encode(tokenizer, PROMPTS[:batch_size] if batch_size > 1 else PROMPTS[2:3])
    expected = greedy(any_tiny_model, input_ids, mask)
    for block_size in BLOCK_SIZES:
        for init in INITS:
            out = jacobi_generate(any_tiny_model, input_ids, mask, max_new_tokens=MAX_NEW, block_size=block_size,
                                  init=init, eos_token_id=None, pad_token_id=0, seed=block_size)
            assert out.sequences.shape == expected.shape, (block_size, init)
            assert torch.equal(out.sequences, expected), (block_size, init)
            assert out.new_tokens == [MAX_NEW] * input_ids.shape[0]


def test_the_cache_goes_by_the_installed_keyword(any_tiny_model, tokenizer):
    """transformers renames forward()'s cache keyword across 5.x; the old name warns before it goes."""
    keyword = cache_keyword(type(any_tiny_model))
    assert keyword in inspect.signature(any_tiny_model.forward).parameters
    input_ids, mask = encode(tokenizer, PROMPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = jacobi_generate(any_tiny_model, input_ids, mask, max_new_tokens=9, block_size=4, eos_token_id=None)
    assert torch.equal(out.sequences, greedy(any_tiny_model, input_ids, mask, max_new_tokens=9))


def eos_inside_a_block(model, input_ids, mask, block_size):
    """A token that greedy decoding emits at a position strictly inside a Jacobi block of row 0."""
    generated = greedy(model, input_ids, mask)[0, input_ids.shape[1]:].tolist()
    for position, token in enumerate(generated):
        first = generated.index(token)
        if first == position and position > 2 and position % block_size not in (0, block_size - 1):
            return token, position
    pytest.skip("no token suitable as a mid-block EOS")


@pytest.mark.parametrize("block_size", [8, 16])
def test_eos_in_the_middle_of_a_block(any_tiny_model, tokenizer, block_size):
    input_ids, mask = encode(tokenizer, PROMPTS)
    eos, position = eos_inside_a_block(any_tiny_model, input_ids, mask, block_size)
    expected = greedy(any_tiny_model, input_ids, mask, eos_token_id=eos, pad_token_id=0)
    for init in INITS:
        out = jacobi_generate(any_tiny_model, input_ids, mask, max_new_tokens=MAX_NEW, block_size=block_size,
                              init=init, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(out.sequences, expected), init
        assert out.new_tokens[0] == position + 1  # row 0 stops right after its EOS
    # a list of EOS ids and the default pad (the first EOS) behave as in generate
    expected = greedy(any_tiny_model, input_ids, mask, eos_token_id=[eos, 1], pad_token_id=None)
    out = jacobi_generate(any_tiny_model, input_ids, mask, max_new_tokens=MAX_NEW, block_size=block_size,
                          eos_token_id=[eos, 1])
    assert torch.equal(out.sequences, expected)


def test_ar_generate_is_greedy_with_one_token_per_forward(llama_model, tokenizer):
    input_ids, mask = encode(tokenizer, PROMPTS)
    out = ar_generate(llama_model, input_ids, mask, max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out.sequences, greedy(llama_model, input_ids, mask, max_new_tokens=20))
    assert out.tokens_per_forward == 1.0
    assert out.row_forward_passes == [19] * 4  # the first token comes from prefill
    assert out.commit_histogram == {1: 19 * 4}


def test_per_row_budgets_and_streaming(llama_model, tokenizer):
    input_ids, mask = encode(tokenizer, PROMPTS)
    budgets = [5, 37, 1, 20]
    streamed: dict[int, list[int]] = {i: [] for i in range(4)}

    def on_commit(row, tokens):
        assert tokens, "on_commit is never called with nothing"
        streamed[row].extend(tokens)

    out = jacobi_generate(llama_model, input_ids, mask, max_new_tokens=budgets, block_size=8,
                          eos_token_id=None, pad_token_id=0, on_commit=on_commit)
    full = greedy(llama_model, input_ids, mask)[:, input_ids.shape[1]:]
    assert out.new_tokens == budgets
    for row, budget in enumerate(budgets):
        assert streamed[row] == full[row, :budget].tolist()
        assert out.sequences[row, input_ids.shape[1]:].tolist() == full[row, :budget].tolist() + [0] * (37 - budget)


def test_on_commit_can_stop_a_row(llama_model, tokenizer):
    input_ids, mask = encode(tokenizer, PROMPTS[:2])
    seen: list[int] = []

    def stop_after_ten(row, tokens):
        if row == 0:
            seen.extend(tokens)
            return len(seen) >= 10

    out = jacobi_generate(llama_model, input_ids, mask, max_new_tokens=30, block_size=4,
                          eos_token_id=None, pad_token_id=0, on_commit=stop_after_ten)
    assert 10 <= out.new_tokens[0] < 10 + 4 and out.new_tokens[1] == 30
    assert seen == out.sequences[0, input_ids.shape[1]: input_ids.shape[1] + out.new_tokens[0]].tolist()


def leading_correct(state, fixed_point):
    n = 0
    while n < len(fixed_point) and state[n] == fixed_point[n]:
        n += 1
    return n


@pytest.mark.parametrize("init", INITS)
def test_trajectories_converge_to_their_fixed_points(llama_model, tokenizer, init):
    input_ids, mask = encode(tokenizer, PROMPTS)
    n = 8
    out = jacobi_generate(llama_model, input_ids, mask, max_new_tokens=MAX_NEW, block_size=n, init=init,
                          eos_token_id=None, pad_token_id=0, return_trajectories=True)
    width = input_ids.shape[1]
    for row in range(4):
        blocks = sorted((t for t in out.trajectories if t["prompt_id"] == row), key=lambda t: t["block_idx"])
        prompt = input_ids[row][mask[row].bool()].tolist()
        generated = out.sequences[row, width:].tolist()
        assert [t["block_idx"] for t in blocks] == list(range(len(blocks)))
        assert sum(len(t["fixed_point"]) for t in blocks) == len(generated)
        done = []
        for block in blocks:
            assert block["prompt_len"] == len(prompt)
            assert block["prefix_ids"] == prompt + done
            fixed_point = block["fixed_point"]
            assert fixed_point == generated[len(done): len(done) + len(fixed_point)]
            assert len(fixed_point) <= n
            states = block["states"]
            assert all(len(s) == len(fixed_point) for s in states)
            assert fixed_point not in states
            # each Jacobi iteration keeps what was correct and fixes at least one more leading token
            correct = [leading_correct(s, fixed_point) for s in states] + [len(fixed_point)]
            assert all(b > a for a, b in zip(correct, correct[1:], strict=False))
            assert block["num_iters"] >= len(states)
            assert block["eos_in_block"] is False
            done += fixed_point
        assert done == generated


def test_statistics_are_consistent(any_tiny_model, tokenizer):
    input_ids, mask = encode(tokenizer, PROMPTS)
    out = jacobi_generate(any_tiny_model, input_ids, mask, max_new_tokens=MAX_NEW, block_size=16,
                          eos_token_id=None, pad_token_id=0)
    assert sum(out.commit_histogram.values()) == sum(out.row_forward_passes)
    assert sum(k * v for k, v in out.commit_histogram.items()) >= sum(n - 1 for n in out.new_tokens)
    assert 1.0 <= out.tokens_per_forward <= 16
    assert max(out.row_forward_passes) == out.forward_passes
    assert 0 <= out.stationary_tokens <= sum(out.new_tokens)


def test_stationary_tokens_count_those_right_before_their_turn():
    # position 2 is right in the first state while position 1 is still wrong: one stationary token
    assert stationary_count([[5, 9, 7], [5, 8, 7]], [5, 8, 7]) == 1
    # position 2 is right, then wrong again, then right when committed: it did not stay, so none
    assert stationary_count([[5, 9, 7], [5, 9, 6]], [5, 8, 7]) == 0
    assert stationary_count([], [5, 8, 7]) == 0


def test_max_iters_cap_keeps_output_exact(llama_model, tokenizer):
    input_ids, mask = encode(tokenizer, PROMPTS)
    out = jacobi_generate(llama_model, input_ids, mask, max_new_tokens=MAX_NEW, block_size=16, max_iters=2,
                          eos_token_id=None, pad_token_id=0, return_trajectories=True)
    assert torch.equal(out.sequences, greedy(llama_model, input_ids, mask))
    assert all(t["num_iters"] <= 2 for t in out.trajectories)


def test_unpadded_single_prompt_without_mask(llama_model, tokenizer):
    input_ids, _ = encode(tokenizer, ["no mask given"])
    out = jacobi_generate(llama_model, input_ids, max_new_tokens=12, block_size=4, eos_token_id=None)
    expected = llama_model.generate(input_ids, do_sample=False, max_new_tokens=12, eos_token_id=None,
                                    pad_token_id=0)
    assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(block_size=0), "block_size"),
        (dict(block_size=2.5), "block_size"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=[3]), "max_new_tokens"),
        (dict(attention_mask=torch.ones(2, 3, dtype=torch.long)), "attention_mask shape"),
        (dict(init="oracle"), "init strategy"),
        (dict(max_iters=0), "max_iters"),
        (dict(max_new_tokens=600), "context"),
    ],
)
def test_bad_arguments_raise_value_error(llama_model, tokenizer, kwargs, message):
    input_ids, mask = encode(tokenizer, PROMPTS[:2])
    args = dict(attention_mask=mask, max_new_tokens=8, block_size=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        jacobi_generate(llama_model, input_ids, **args)


def test_empty_prompt_is_rejected(llama_model):
    with pytest.raises(ValueError, match="empty"):
        jacobi_generate(llama_model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ValueError, match="all zeros"):
        jacobi_generate(llama_model, torch.ones(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long),
                        max_new_tokens=4)


def pass_cost_module():
    spec = importlib.util.spec_from_file_location("pass_cost", Path(__file__).parents[1] / "benchmarks/pass_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_narrower_block_caps_the_tokens_each_pass_commits():
    predict = pass_cost_module().predicted_tokens_per_pass
    histogram = {1: 6, 2: 2, 5: 1, 16: 1}  # 10 passes, 31 tokens at block 16
    assert predict(histogram, 16) == pytest.approx(3.1)
    assert predict(histogram, 4) == pytest.approx((6 + 4 + 4 + 4) / 10)
    assert predict(histogram, 1) == 1.0 and predict({}, 4) == 0.0


def test_pass_cost_sweep_prints_one_row_per_block_size_and_predicts_from_a_report(tmp_path):
    """benchmarks/pass_cost.py --widths: a row per block size; with --report, each Jacobi histogram's predicted
    tokens per pass and speed at each width no wider than the report's block."""
    script = Path(__file__).parents[1] / "benchmarks/pass_cost.py"
    report = tmp_path / "report.json"
    results = [{"model": "m", "method": "ar", "commit_histogram": {"1": 9}},
               {"model": "m", "method": "jacobi", "commit_histogram": {"1": 2, "8": 2}}]
    report.write_text(json.dumps({"settings": {"block_size": 8}, "results": results}))
    out = subprocess.run([sys.executable, str(script), "--widths", "2,8,32", "--samples", "5", "--prefix", "20",
                          "--report", str(report)], capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(row[0]) for row in rows] == [2, 8, 32]
    for row in rows:
        jacobi_ms, jacobi_steps, multiblock_steps = float(row[1]), float(row[2]), float(row[5])
        assert jacobi_ms > 0 and jacobi_steps > 0.5 and multiblock_steps > 0.5
    predicted = next(line for line in out.splitlines() if line.startswith("| m |")).split("|")[2:-2]
    assert [cell.split("/")[0].strip() for cell in predicted] == ["1.50", "4.50"]  # block 32 is wider than 8
    assert "block 8" in out.splitlines()[-1]  # 4.5 tokens per pass outweigh any 8-token pass cost here

    refused = subprocess.run([sys.executable, str(script), "--report", str(report)], capture_output=True, text=True)
    assert refused.returncode == 2 and "--report needs --widths" in refused.stderr
