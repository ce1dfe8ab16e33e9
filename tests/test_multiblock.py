"""Multi-block Jacobi decoding with rejection recycling must equal greedy AR decoding token for token."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, left_padded_prompts, tiny_family_model, tiny_model

from cllm.decoding.kv_cache import check_supported
from cllm.decoding.multiblock import Lane, branch_forward, branch_mask, multiblock_generate

PROMPTS = ["Hello there, how are", "x", "The quick brown fox jumps over", "Jacobi!"]
MAX_NEW = 37  # not a multiple of any block size below


def encode(tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)  # left padding
    return batch["input_ids"], batch["attention_mask"]


def greedy(model, input_ids, attention_mask, max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=0):
    return model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=eos_token_id, pad_token_id=pad_token_id)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_multiblock_equals_generate(any_tiny_model, tokenizer, batch_size):
    input_ids, mask = encode(tokenizer, PROMPTS if batch_size > 1 else PROMPTS[2:3])
    expected = greedy(any_tiny_model, input_ids, mask)
    for block_size in (4, 8, 16):
        for blocks in (1, 2, 3):
            for recycle, init in ((0, "prompt"), (2, "prompt"), (1, "ngram")):
                out = multiblock_generate(any_tiny_model, input_ids, mask, max_new_tokens=MAX_NEW,
                                          block_size=block_size, blocks=blocks, recycle=recycle, init=init,
                                          eos_token_id=None, pad_token_id=0, seed=block_size)
                case = (block_size, blocks, recycle, init)
                assert torch.equal(out.sequences, expected), case
                assert out.new_tokens == [MAX_NEW] * input_ids.shape[0], case
                assert sum(out.commit_histogram.values()) == sum(out.row_forward_passes), case
                assert (out.blocks_spawned == 0) == (blocks == 1 or block_size * 2 > MAX_NEW), case


def test_recycled_branches_commit_with_holes_in_the_cache(tokenizer):
    """A model that repeats itself: recycled n-grams win passes, in a batch whose rows keep different slots."""
    model = tiny_model("gpt2")
    input_ids, mask = encode(tokenizer, PROMPTS)
    expected = greedy(model, input_ids, mask, max_new_tokens=60)
    recycled = 0
    for block_size in (4, 8):
        out = multiblock_generate(model, input_ids, mask, max_new_tokens=60, block_size=block_size, blocks=2,
                                  recycle=2, eos_token_id=None, pad_token_id=0)
        assert torch.equal(out.sequences, expected), block_size
        recycled += out.recycled_tokens
    assert recycled > 0  # the branch path really ran, and stayed exact


def test_branches_see_the_head_and_their_own_prefix_only(llama_model, tokenizer):
    layout = check_supported(llama_model)
    lane = Lane(index=0, prompt=[5, 6, 7], budget=20, generated=[8], window=[8, 9, 10, 11],
                branches=[[12, 13], [14]])
    cache_mask = torch.tensor([[False, True, True, True]])  # one left-pad slot
    branch = torch.tensor([[0, 0, 0, 0, 1, 1, 2, -1]])
    depth = torch.tensor([[0, 1, 2, 3, 1, 2, 1, 7]])
    visible = branch_mask(layout, cache_mask, branch, depth, 3 + depth)[0, 0]
    assert not visible[:, 0].any() and visible[:7, 1:4].all()  # the pad slot is hidden, the prompt seen
    new = visible[:, 4:].int().tolist()
    assert new[:4] == [[1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0, 0, 0]]  # the window: plain causal, blind to the branches
    assert new[4:7] == [[1, 0, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0, 1, 0]]
    # and the model agrees: a branch's predictions are those of its own sequence forwarded alone
    from cllm.decoding.jacobi import prefill

    ids = torch.tensor([[5, 6, 7]])
    cache, _ = prefill(llama_model, layout, ids, torch.ones_like(ids, dtype=torch.bool))
    lane = Lane(index=0, prompt=[5, 6, 7], budget=20, generated=[8], window=[8, 9, 10], branches=[[12, 13]])
    predictions = branch_forward(llama_model, layout, cache, torch.ones(1, 3, dtype=torch.bool), [lane], 0)[0]
    alone = llama_model(torch.tensor([[5, 6, 7, 8, 12, 13]])).logits[0, 3:].argmax(-1).tolist()
    window = llama_model(torch.tensor([[5, 6, 7, 8, 9, 10]])).logits[0, 3:].argmax(-1).tolist()
    assert predictions[:3] == window and [predictions[0]] + predictions[3:] == alone


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt-neox"])
def test_sliding_and_mixed_windows_decode_exactly(family):
    """Branch masks under a sliding window (Mistral) and mixed full/sliding layers (Gemma 2), far past the
    window, with holes in the cache; and a family of its own attention code (GPT-NeoX)."""
    model = tiny_family_model(*FAMILIES[family])
    input_ids, mask = left_padded_prompts()
    expected = greedy(model, input_ids, mask, max_new_tokens=48)
    for block_size, blocks in ((16, 2), (5, 3)):
        out = multiblock_generate(model, input_ids, mask, max_new_tokens=48, block_size=block_size, blocks=blocks,
                                  recycle=2, init="ngram", eos_token_id=None, pad_token_id=0)
        assert torch.equal(out.sequences, expected), (family, block_size)


@pytest.mark.parametrize("block_size", [8, 16])
def test_eos_in_the_middle_of_a_block(any_tiny_model, tokenizer, block_size):
    input_ids, mask = encode(tokenizer, PROMPTS)
    generated = greedy(any_tiny_model, input_ids, mask)[0, input_ids.shape[1]:].tolist()
    found = [(p, t) for p, t in enumerate(generated)
             if generated.index(t) == p and p > 2 and p % block_size not in (0, block_size - 1)]
    if not found:
        pytest.skip("no token suitable as a mid-block EOS")
    position, eos = found[0]
    expected = greedy(any_tiny_model, input_ids, mask, eos_token_id=eos)
    for blocks, recycle in ((1, 0), (2, 1), (3, 2)):
        out = multiblock_generate(any_tiny_model, input_ids, mask, max_new_tokens=MAX_NEW, block_size=block_size,
                                  blocks=blocks, recycle=recycle, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(out.sequences, expected), (blocks, recycle)
        assert out.new_tokens[0] == position + 1  # row 0 stops right after its EOS


def test_per_row_budgets_streaming_and_stop(llama_model, tokenizer):
    input_ids, mask = encode(tokenizer, PROMPTS)
    budgets = [5, 37, 1, 2]
    streamed: dict[int, list[int]] = {i: [] for i in range(4)}

    def on_commit(row, tokens):
        assert tokens
        streamed[row].extend(tokens)
        return row == 1 and len(streamed[1]) >= 20

    out = multiblock_generate(llama_model, input_ids, mask, max_new_tokens=budgets, block_size=4, blocks=2,
                              eos_token_id=None, pad_token_id=0, on_commit=on_commit)
    full = greedy(llama_model, input_ids, mask)[:, input_ids.shape[1]:]
    assert out.new_tokens[0] == 5 and out.new_tokens[2:] == [1, 2]
    assert 20 <= out.new_tokens[1] < 20 + 4 * 2 + 1  # stopped within the pass that crossed 20
    for row, n in enumerate(out.new_tokens):
        assert streamed[row] == full[row, :n].tolist()


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(blocks=0), "blocks"), (dict(spawn_after=1.5), "spawn_after"), (dict(recycle=-1), "recycle"),
    (dict(block_size=0), "block_size"), (dict(init="oracle"), "init strategy"),
])
def test_bad_arguments_raise_value_error(llama_model, tokenizer, kwargs, message):
    input_ids, mask = encode(tokenizer, PROMPTS[:2])
    with pytest.raises(ValueError, match=message):
        multiblock_generate(llama_model, input_ids, mask, **{"max_new_tokens": 8, "block_size": 4, **kwargs})


def test_a_row_at_the_context_end_shares_passes_with_wider_rows(tokenizer):
    """Learned position embeddings (GPT-2) index past the table if a pad slot gets a position beyond its
    row's last one: a row whose answer ends at the context, beside a row with a wider window."""
    context = 48
    model = tiny_model("gpt2", context=context)
    input_ids, mask = encode(tokenizer, ["The quick brown fox jumps", "x"])
    budgets = [context - input_ids.shape[1], 30]  # row 0 ends exactly at the context
    out = multiblock_generate(model, input_ids, mask, max_new_tokens=budgets, block_size=8, blocks=2,
                              eos_token_id=None, pad_token_id=0)
    for row, budget in enumerate(budgets):
        expected = greedy(model, input_ids[row : row + 1], mask[row : row + 1], max_new_tokens=budget)
        width = input_ids.shape[1] + budget
        assert out.sequences[row, :width].tolist() == expected[0, :width].tolist()
