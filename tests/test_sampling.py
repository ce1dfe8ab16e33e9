"""Seeded sampling: Jacobi decoding returns exactly what AR sampling returns for the same seed, and AR
sampling with the per-position Gumbel noise draws from the model's filtered distribution."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import char_tokenizer, engine_config, new_request, tiny_model

from cllm.decoding.jacobi import ar_generate, jacobi_generate
from cllm.decoding.modes import MODES
from cllm.decoding.multiblock import multiblock_generate
from cllm.decoding.sampling import (
    GOLDEN,
    SamplingParams,
    as_int64,
    choose_tokens,
    filter_logits,
    gumbel_noise,
    mix64,
    mix64_tensor,
    uniform_noise,
)
from cllm.models.loading import LoadedModel
from cllm.serving.engine import Engine

PROMPTS = ["Hello there, how are", "x", "The quick brown fox jumps over", "Jacobi!"]
INITS = ["prompt", "repeat", "pad", "ngram"]
SETTINGS = [  # temperature x filter
    dict(temperature=t, **f) for t in (0.3, 0.7, 1.0) for f in ({}, {"top_k": 8}, {"top_p": 0.9})
]
MAX_NEW = 37


def encode(tokenizer, prompts):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    return batch["input_ids"], batch["attention_mask"]


def per_row(settings: dict, seed: int, rows: int) -> list[SamplingParams]:
    return [SamplingParams(seed=seed + i, **settings) for i in range(rows)]


# --- the noise and the filter -----------------------------------------------------------------------------


def test_tensor_hash_equals_the_python_reference():
    """int64 tensor arithmetic must wrap exactly like unsigned 64-bit ints, on every platform."""
    values = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, GOLDEN, 123456789123456789]
    mixed = mix64_tensor(torch.tensor([as_int64(v) for v in values]))
    assert mixed.tolist() == [as_int64(mix64(v)) for v in values]
    u = uniform_noise(7, torch.tensor([0, 5]), 4)
    key = mix64(7 + GOLDEN)
    for i, position in enumerate([0, 5]):
        stream = mix64(key + position * GOLDEN)
        expected = [((mix64(stream + (v + 1) * GOLDEN) >> 11) + 0.5) * 2.0**-53 for v in range(4)]
        assert u[i].tolist() == expected


def test_noise_is_a_function_of_seed_and_position_alone():
    positions = torch.arange(40)
    noise = gumbel_noise(3, positions, 50)
    assert torch.equal(gumbel_noise(3, torch.tensor([17, 4]), 50), noise[[17, 4]])  # any subset, any order
    assert not torch.equal(gumbel_noise(4, positions, 50), noise)
    assert len({tuple(row.tolist()) for row in noise}) == 40  # every position draws its own
    u = uniform_noise(3, torch.arange(2000), 50)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def test_filter_keeps_the_top_k_and_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    kept = lambda scores: torch.isfinite(scores)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2, top_p=1.0)) == [True, False, False, False, True]
    assert kept(filter_logits(logits, top_k=0, top_p=1.0)) == [True] * 5
    probs = logits.softmax(-1)[0]  # 0.245, 0.090, 0.033, 0.012, 0.665 (descending: 4, 0, 1, 2, 3)
    assert kept(filter_logits(logits, top_k=0, top_p=0.5)) == [False, False, False, False, True]
    assert kept(filter_logits(logits, top_k=0, top_p=0.9)) == [True, True, False, False, True]
    top3 = (probs[4] + probs[0] + probs[1]).item()
    assert kept(filter_logits(logits, top_k=0, top_p=top3 - 1e-4)) == [True, True, False, False, True]
    assert kept(filter_logits(logits, top_k=0, top_p=top3 + 1e-4)) == [True, True, True, False, True]
    assert kept(filter_logits(logits, top_k=2, top_p=0.9)) == [True, False, False, False, True]


def test_temperature_zero_is_argmax_and_settings_are_checked():
    logits = torch.randn(3, 5, 11)
    greedy = logits.argmax(-1)
    assert torch.equal(choose_tokens(logits), greedy)
    zero = SamplingParams(temperature=0, top_k=2, top_p=0.5, seed=9)
    assert torch.equal(choose_tokens(logits, [zero, None, zero], [0, 3, 7]), greedy)
    sampled = choose_tokens(logits, [None, SamplingParams(temperature=1.0), None], [0, 0, 0])
    assert torch.equal(sampled[[0, 2]], greedy[[0, 2]])
    for bad in (dict(temperature=-0.1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5), dict(temp=1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# --- Jacobi equals AR, token for token --------------------------------------------------------------------


@torch.inference_mode()
def sample_without_cache(model, prompt_ids: list[int], params: SamplingParams, n: int) -> list[int]:
    """The reference AR sampler: a full forward per token, output position i gets the noise of position i."""
    ids = list(prompt_ids)
    for position in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[:, -1:]
        ids.append(choose_tokens(logits, [params], [position]).item())
    return ids[len(prompt_ids) :]


def test_ar_sampling_equals_a_plain_sampling_loop(llama_model, tokenizer):
    input_ids, mask = encode(tokenizer, PROMPTS)
    params = per_row(dict(temperature=0.8, top_p=0.95), 11, len(PROMPTS))
    out = ar_generate(llama_model, input_ids, mask, max_new_tokens=20, sampling=params)
    for row in range(len(PROMPTS)):
        prompt = input_ids[row][mask[row].bool()].tolist()
        assert out.sequences[row, input_ids.shape[1] :].tolist() == sample_without_cache(
            llama_model, prompt, params[row], 20
        )


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_jacobi_equals_ar_sampling(llama_model, tokenizer, settings):
    input_ids, mask = encode(tokenizer, PROMPTS)
    params = per_row(settings, 100, len(PROMPTS))
    expected = ar_generate(llama_model, input_ids, mask, max_new_tokens=MAX_NEW, sampling=params).sequences
    for block_size in (4, 16):
        for init in INITS:
            out = jacobi_generate(llama_model, input_ids, mask, max_new_tokens=MAX_NEW, block_size=block_size,
                                  init=init, sampling=params, seed=block_size)
            assert torch.equal(out.sequences, expected), (block_size, init)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_jacobi_equals_ar_sampling_on_other_architectures(tokenizer, arch):
    model = tiny_model(arch)
    input_ids, mask = encode(tokenizer, PROMPTS)
    params = per_row(dict(temperature=0.7, top_k=20, top_p=0.95), 5, len(PROMPTS))
    expected = ar_generate(model, input_ids, mask, max_new_tokens=MAX_NEW, sampling=params).sequences
    for init in ("prompt", "ngram"):
        out = jacobi_generate(model, input_ids, mask, max_new_tokens=MAX_NEW, block_size=8, init=init,
                              sampling=params)
        assert torch.equal(out.sequences, expected), init


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_multiblock_equals_ar_sampling(tokenizer, arch):
    """Several blocks in flight and recycled branches: each slot draws the noise of the position it predicts.

    The tiny GPT-2 repeats itself at a low temperature, so recycled branches win passes there.
    """
    model = tiny_model(arch)
    input_ids, mask = encode(tokenizer, PROMPTS)
    recycled = 0
    for settings in (dict(temperature=0.3), dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_k=8)):
        params = per_row(settings, 40, len(PROMPTS))
        params[1] = None  # a greedy row in the same batch
        expected = ar_generate(model, input_ids, mask, max_new_tokens=60, sampling=params).sequences
        for block_size, blocks, recycle in ((4, 2, 2), (8, 3, 1), (16, 2, 0)):
            out = multiblock_generate(model, input_ids, mask, max_new_tokens=60, block_size=block_size,
                                      blocks=blocks, recycle=recycle, eos_token_id=None, pad_token_id=0,
                                      sampling=params)
            assert torch.equal(out.sequences, expected), (settings, block_size, blocks, recycle)
            recycled += out.recycled_tokens
    if arch == "gpt2":
        assert recycled > 0


def test_a_row_depends_on_its_prompt_and_settings_alone(llama_model, tokenizer):
    """Greedy and sampled rows share a batch; each equals its own decoding alone (greedy: `generate`)."""
    input_ids, mask = encode(tokenizer, PROMPTS)
    params = [None, SamplingParams(temperature=1.0, seed=1), SamplingParams(), SamplingParams(temperature=0.5)]
    out = jacobi_generate(llama_model, input_ids, mask, max_new_tokens=MAX_NEW, block_size=8, sampling=params)
    greedy = llama_model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                                  pad_token_id=0, eos_token_id=None)
    assert torch.equal(out.sequences[[0, 2]], greedy[[0, 2]])
    for row in (1, 3):
        prompt = input_ids[row : row + 1][:, mask[row].bool()]
        alone = ar_generate(llama_model, prompt, max_new_tokens=MAX_NEW, sampling=params[row])
        assert out.sequences[row, input_ids.shape[1] :].tolist() == alone.sequences[0, prompt.shape[1] :].tolist()
    with pytest.raises(ValueError, match="entries for a batch"):
        jacobi_generate(llama_model, input_ids, mask, max_new_tokens=4, sampling=params[:2])


@pytest.mark.parametrize("block_size", [8, 16])
def test_eos_in_the_middle_of_a_block(llama_model, tokenizer, block_size):
    input_ids, mask = encode(tokenizer, PROMPTS)
    params = per_row(dict(temperature=1.0, top_p=0.9), 42, len(PROMPTS))
    free = ar_generate(llama_model, input_ids, mask, max_new_tokens=MAX_NEW, sampling=params)
    generated = free.sequences[0, input_ids.shape[1] :].tolist()
    position = next(
        (i for i, t in enumerate(generated) if generated.index(t) == i and i > 2 and i % block_size not in (0, 1)),
        None,
    )
    if position is None:
        pytest.skip("no token suitable as a mid-block EOS")
    eos = generated[position]
    expected = ar_generate(llama_model, input_ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=0,
                           sampling=params)
    assert expected.new_tokens[0] == position + 1
    for init in INITS:
        out = jacobi_generate(llama_model, input_ids, mask, max_new_tokens=MAX_NEW, block_size=block_size,
                              init=init, eos_token_id=eos, pad_token_id=0, sampling=params)
        assert torch.equal(out.sequences, expected.sequences), init
        assert out.new_tokens == expected.new_tokens


def test_restarted_blocks_and_trajectories_keep_the_sampled_output(llama_model, tokenizer):
    input_ids, mask = encode(tokenizer, PROMPTS)
    params = per_row(dict(temperature=0.7), 3, len(PROMPTS))
    expected = ar_generate(llama_model, input_ids, mask, max_new_tokens=MAX_NEW, sampling=params)
    capped = jacobi_generate(llama_model, input_ids, mask, max_new_tokens=MAX_NEW, block_size=16, max_iters=2,
                             sampling=params, return_trajectories=True)
    assert torch.equal(capped.sequences, expected.sequences)
    for row in range(len(PROMPTS)):  # the fixed points, in order, are the row's sampled output
        points = [t["fixed_point"] for t in capped.trajectories if t["prompt_id"] == row]
        assert sum(points, []) == expected.sequences[row, input_ids.shape[1] :].tolist()


def test_same_seed_same_text_other_seeds_differ(llama_model, tokenizer):
    input_ids, mask = encode(tokenizer, [PROMPTS[0]] * 6)
    params = [SamplingParams(temperature=1.0, seed=s) for s in (5, 5, 6, 7, 8, 9)]
    out = jacobi_generate(llama_model, input_ids, mask, max_new_tokens=24, block_size=8, sampling=params)
    texts = tokenizer.batch_decode(out.sequences[:, input_ids.shape[1] :])
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) == 5
    again = jacobi_generate(llama_model, input_ids[:1], mask[:1], max_new_tokens=24, block_size=4, init="ngram",
                            sampling=params[0])
    assert tokenizer.decode(again.sequences[0, input_ids.shape[1] :]) == texts[0]


@pytest.mark.parametrize("mode", list(MODES))
def test_engine_with_staggered_arrivals_equals_ar_sampling(mode):
    loaded = LoadedModel(tiny_model("llama"), char_tokenizer(), "llama")
    eng = Engine(loaded, engine_config(block_size=4, init="ngram", mode=mode, max_batch_size=8))
    prompts = PROMPTS + ["zz", "Once upon a time"]
    budgets = [30, 7, 25, 16, 40, 12]
    settings = [SamplingParams(temperature=[0.3, 0.7, 1.0][i % 3], top_p=0.9 if i % 2 else 1.0, seed=i)
                for i in range(len(prompts))]
    settings[4] = None  # a greedy request among sampled ones
    jobs = [new_request(loaded.tokenizer, p, n, sampling=s) for p, n, s in zip(prompts, budgets, settings, strict=True)]
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 7: [5]}
    step = 0
    while step <= max(arrivals) or eng.has_work():
        for i in arrivals.get(step, []):
            eng.add(jobs[i])
        eng.step()
        step += 1
    for j in jobs:
        ids = torch.tensor([j.prompt_ids])
        alone = ar_generate(loaded.model, ids, max_new_tokens=j.max_tokens, eos_token_id=sorted(eng.eos_ids),
                            sampling=j.sampling)
        assert j.error is None
        assert j.tokens == alone.sequences[0, ids.shape[1] :].tolist()[: alone.new_tokens[0]]
    assert max(j.batch_size for j in jobs) > 1


# --- the noise samples the filtered distribution ----------------------------------------------------------

DRAWS = 4000


def chi2_critical(df: int) -> float:
    """Upper 0.1% point of chi-square with `df` degrees of freedom (Wilson-Hilferty: within 1% for df >= 5,
    slightly above the exact value; z = 3.0902 is the standard normal's upper 0.1% point)."""
    z = 3.0902
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def expected_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The target, computed here independently of `cllm.decoding.sampling`: softmax(logits / T) restricted to the
    top-k tokens and then to the smallest most-likely set with mass >= top_p, renormalised."""
    probs = (logits.double() / temperature).softmax(-1)
    order = probs.argsort(descending=True).tolist()
    allowed = order[:top_k] if top_k else order
    allowed_mass = probs[allowed] / probs[allowed].sum()
    keep, mass = [], 0.0
    for token, p in zip(allowed, allowed_mass.tolist(), strict=True):
        keep.append(token)
        mass += p
        if mass >= top_p:
            break
    target = torch.zeros_like(probs)
    target[keep] = probs[keep] / probs[keep].sum()
    return target


def chi_square(counts: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the tokens expected at least 5 times, the others pooled into one bin."""
    expected = target * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big].double(), counts[~big].sum(0, keepdim=True).double()])
    expected = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    if expected[-1] < 5:  # too small a pool: fold it into the least likely kept bin
        observed, expected = observed[:-1], expected[:-1]
        observed[-1] += counts[~big].sum()
        expected[-1] += target[~big].sum() * counts.sum()
    statistic = ((observed - expected) ** 2 / expected).sum().item()
    return statistic, len(expected) - 1


@pytest.fixture(scope="module")
def next_token_logits():
    model, tokenizer = tiny_model("llama"), char_tokenizer()
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model, ids, model(input_ids=ids).logits[0, -1]


@pytest.mark.parametrize(
    "settings",
    [dict(temperature=0.7), dict(temperature=1.0), dict(temperature=1.5), dict(temperature=1.0, top_p=0.9),
     dict(temperature=0.7, top_k=10)],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()),
)
def test_ar_sampling_draws_from_the_filtered_distribution(next_token_logits, settings):
    """4000 requests with seeds 0..3999 through `ar_generate`: their first tokens follow the target."""
    model, ids, logits = next_token_logits
    params = [SamplingParams(seed=s, **settings) for s in range(DRAWS)]
    out = ar_generate(model, ids.expand(DRAWS, -1), max_new_tokens=1, sampling=params)
    counts = torch.bincount(out.sequences[:, -1], minlength=logits.shape[-1])
    target = expected_distribution(logits, settings["temperature"], settings.get("top_k", 0),
                                   settings.get("top_p", 1.0))
    assert counts[target == 0].sum() == 0, "a token outside the top-k/top-p set was sampled"
    statistic, df = chi_square(counts, target)
    assert df >= 4
    assert statistic < chi2_critical(df), (statistic, df)
    # the test has power: the same draws are far from the distribution of a neighbouring temperature
    wrong = expected_distribution(logits, settings["temperature"] * 1.3, settings.get("top_k", 0), 1.0)
    assert chi_square(counts, wrong)[0] > 3 * chi2_critical(chi_square(counts, wrong)[1])


def test_positions_of_one_seed_draw_independently(next_token_logits):
    """One request, the same logits at 4000 output positions: also distributed as the target."""
    _, _, logits = next_token_logits
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=2024)
    tokens = choose_tokens(logits.expand(1, DRAWS, -1), [params], [0])[0]
    counts = torch.bincount(tokens, minlength=logits.shape[-1])
    target = expected_distribution(logits, 1.0, 0, 0.95)
    assert counts[target == 0].sum() == 0
    statistic, df = chi_square(counts, target)
    assert statistic < chi2_critical(df), (statistic, df)
