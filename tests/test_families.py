"""Every decoder-only family decodes exactly (equal to `generate(do_sample=False)` token for token), or is
refused up front. One tiny randomly initialised fp32 model per family, built from its config class.

The sliding-window cases use a window of 8 under a block of 16 and 48 new tokens, so every row runs far past
its window, and a batch of two left-padded prompts of different lengths, so the cache fills with holes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    BLOCK,
    FAMILIES,
    MAX_NEW,
    SIZES,
    WINDOW,
    left_padded_prompts,
    tiny_family_model,
)

from cllm.decoding.jacobi import ar_generate, jacobi_generate
from cllm.decoding.kv_cache import check_supported, visible_keys
from cllm.decoding.modes import MODES
from cllm.models.loading import LoadedModel
from cllm.serving.engine import Engine


def greedy(model, input_ids, mask, eos_token_id):
    return model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                          eos_token_id=eos_token_id, pad_token_id=0)


def eos_inside_a_block(generated: torch.Tensor) -> tuple[int, int]:
    """(row, token): a token that greedy decoding emits in that row past the window, strictly inside a Jacobi
    block, and that no row emits earlier (so no row stops before it has run past the window)."""
    for row, tokens in enumerate(generated.tolist()):
        for position, token in enumerate(tokens):
            early = {t for other in generated.tolist() for t in other[:position]}
            if position > WINDOW and token not in early and position % BLOCK not in (0, BLOCK - 1):
                return row, token
    pytest.fail("greedy output repeats itself too early to pick a mid-block EOS")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_decodes_exactly(family):
    model = tiny_family_model(*FAMILIES[family])
    input_ids, mask = left_padded_prompts()
    expected = greedy(model, input_ids, mask, eos_token_id=None)
    for block_size, init in ((BLOCK, "prompt"), (WINDOW - 3, "pad")):  # blocks longer and shorter than the window
        out = jacobi_generate(model, input_ids, mask, max_new_tokens=MAX_NEW, block_size=block_size, init=init,
                              eos_token_id=None, pad_token_id=0)
        assert torch.equal(out.sequences, expected), (family, block_size)
        assert out.new_tokens == [MAX_NEW, MAX_NEW]

    row, eos = eos_inside_a_block(expected[:, input_ids.shape[1]:])
    expected = greedy(model, input_ids, mask, eos_token_id=eos)
    for generate, kwargs in ((jacobi_generate, dict(block_size=BLOCK, init="ngram")), (ar_generate, {})):
        out = generate(model, input_ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=0, **kwargs)
        assert torch.equal(out.sequences, expected), (family, generate.__name__)
        assert out.new_tokens[row] < MAX_NEW  # the row stopped at its EOS


@pytest.mark.parametrize("mode", [name for name, mode in MODES.items() if not mode.one_token])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_decodes_exactly_in_the_serving_engine(family, mode):
    """The continuous engine's cache (spare rows and columns, rows joining right-aligned, leaving rows
    overwritten by the last one, columns dropped on the left) gives every family the tokens of `generate`
    for each prompt alone, sliding windows included, with requests arriving while others run."""
    from conftest import CHAR_VOCAB, char_tokenizer, engine_config, greedy_alone, new_request

    loaded = LoadedModel(tiny_family_model(*FAMILIES[family], vocab_size=CHAR_VOCAB), char_tokenizer(), family)
    engine = Engine(loaded, engine_config(block_size=BLOCK, mode=mode, max_batch_size=4))
    # a short prompt alone first, so a longer one joins a narrower cache (holes open on the old rows' left)
    prompts = ["a", "Hello there, how are you on this fine day, my friend", "x = 1 + 2", "Once upon a time", "zz top"]
    budgets = [20, MAX_NEW, MAX_NEW, 9, 30]
    jobs = [new_request(loaded.tokenizer, p, n) for p, n in zip(prompts, budgets, strict=True)]
    for arriving in (jobs[:1], jobs[1:3], jobs[3:]):
        for job in arriving:
            engine.add(job)
        for _ in range(3):
            engine.step()
    engine.run_until_idle()
    for job in jobs:
        expected = greedy_alone(loaded, job.prompt_ids, job.max_tokens)
        assert job.error is None and job.tokens == expected, (family, mode, job.prompt_ids)


def test_sliding_window_counts_positions_not_cache_slots():
    """Row 0 has a hole (slot 2) and row 1 left padding (slot 0): positions skip both, and a query at
    position q sees positions q - window + 1 .. q, itself included (transformers' convention)."""
    key_mask = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    queries = torch.tensor([[4], [4]])
    assert visible_keys(key_mask, queries, window=None)[:, 0].tolist() == [
        [True, True, False, True, True, True], [False, True, True, True, True, True]]
    assert visible_keys(key_mask, queries, window=3)[:, 0].tolist() == [
        [False, False, False, True, True, True], [False, False, False, True, True, True]]
    assert visible_keys(key_mask, torch.tensor([[2], [2]]), window=3)[:, 0].tolist() == [
        [True, True, False, True, False, False], [False, True, True, True, False, False]]


REFUSED = {
    "mamba": ("MambaConfig", dict(hidden_size=32, state_size=4, num_hidden_layers=2), "recurrent state"),
    "rwkv": ("RwkvConfig", dict(hidden_size=32, attention_hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                context_length=256), "recurrent state"),
    "mpt": ("MptConfig", dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=256), "no position_ids"),
    "gpt-neo": ("GPTNeoConfig", dict(hidden_size=32, num_layers=2, num_heads=4, window_size=WINDOW,
                                     attention_types=[[["global", "local"], 1]], max_position_embeddings=256),
                "window in cache slots"),
    "bert": ("BertConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
             "bidirectional"),
}


@pytest.mark.parametrize("family", list(REFUSED))
def test_family_that_cannot_decode_exactly_is_refused(family):
    """Recurrent state (Mamba, RWKV), positions or windows counted by cache slot (MPT's ALiBi, GPT-Neo's local
    layers), bidirectional attention (BERT without is_decoder): each is refused up front with family and reason."""
    config_class, arguments, reason = REFUSED[family]
    model = tiny_family_model(config_class, arguments)
    input_ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match=f"\\({model.config.model_type}\\).*{reason}"):
        jacobi_generate(model, input_ids, mask, max_new_tokens=4)
    with pytest.raises(ValueError, match=reason):
        ar_generate(model, input_ids, mask, max_new_tokens=4)


def test_layer_kinds_without_an_exact_mask_are_refused():
    """Chunked attention (Llama 4), bidirectional attention, and a sliding window under an attention kernel that
    takes no 4-D mask are refused by name, before any decoding."""
    model = tiny_family_model("MistralConfig", dict(SIZES, sliding_window=WINDOW))
    assert check_supported(model).sliding_window == WINDOW
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"\(mistral\).*'flash_attention_2'"):
        check_supported(model)
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = None
    model.config.attention_chunk_size = WINDOW
    with pytest.raises(ValueError, match=r"\(mistral\).*'chunked_attention'"):
        check_supported(model)
    model.config.attention_chunk_size = None
    model.config.is_causal = False
    with pytest.raises(ValueError, match="bidirectional"):
        check_supported(model)
