"""The CLLM losses against direct per-position computations on a tiny real model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from cllm.losses import (
    IGNORE_INDEX,
    ar_loss,
    cllm_loss,
    consistency_loss_mask,
    global_consistency_loss,
    local_consistency_loss,
    masked_kl,
)

VOCAB, EOS, PAD = 48, 2, 0


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=VOCAB, context=256, width=32)


def kl_direct(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(softmax(p) || softmax(q)) for one position, written out."""
    p = torch.softmax(p_logits.double(), -1)
    q = torch.softmax(q_logits.double(), -1)
    return sum(p[v].item() * (math.log(p[v].item()) - math.log(q[v].item())) for v in range(len(p)))


def logits_unpadded(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def pad(rows: list[list[int]], value: int = PAD) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def mask_of(rows: list[list[int]]) -> torch.Tensor:
    return pad([[1] * len(r) for r in rows], 0)


# Two records: prefix lengths 3 and 2, blocks of 4 and 3 (the second is shorter, so it is padded).
PREFIXES = [[1, 5, 6], [1, 7]]
FIXED = [[10, 11, 12, 13], [20, 21, EOS]]
STATES = [[10, 11, 30, 31], [40, 21, 22]]


def sequences(blocks):
    return [p + b for p, b in zip(PREFIXES, blocks, strict=True)]


def test_mask_starts_at_the_logit_predicting_the_first_wrong_token():
    states, fixed = sequences(STATES), sequences(FIXED)
    mask = consistency_loss_mask(pad(states), pad(fixed), mask_of(states), torch.tensor([3, 2]), eos_token_ids=[EOS])
    # Row 0: block tokens at positions 3..6, first wrong at block index 2 = position 5 -> logits 4 and 5
    # (logit 6 would predict past the block). Row 1: first wrong at position 2 -> logits 1..3, the last
    # one predicting the EOS; logits over padding stay out.
    expected = torch.zeros(2, 7, dtype=torch.bool)
    expected[0, [4, 5]] = True
    expected[1, [1, 2, 3]] = True
    assert torch.equal(mask, expected)


def test_mask_drops_logits_after_eos_and_states_at_the_fixed_point():
    prefix, fixed_block = [1, 5], [10, EOS, 12, 13]  # EOS inside the block: predictions after it are out
    state = prefix + [30, 31, 32, 33]
    fixed = prefix + fixed_block
    mask = consistency_loss_mask(
        pad([state, fixed]), pad([fixed, fixed]), mask_of([state, fixed]), torch.tensor([2, 2]), [EOS]
    )
    assert mask[0].nonzero().flatten().tolist() == [1, 2]  # logits predicting block tokens 0 and 1 (EOS)
    assert not mask[1].any()  # the state equals its fixed point: nothing to learn


def test_mask_without_eos_ids_keeps_the_whole_tail():
    prefix = [1, 5]
    state, fixed = prefix + [30, 31, 32], prefix + [10, EOS, 12]
    mask = consistency_loss_mask(pad([state]), pad([fixed]), mask_of([state]), torch.tensor([2]))
    assert mask[0].nonzero().flatten().tolist() == [1, 2, 3]


def test_masked_kl_matches_direct_sum():
    torch.manual_seed(1)
    target, student = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    kept = mask.nonzero().tolist()
    direct = sum(kl_direct(target[b, t], student[b, t]) for b, t in kept) / len(kept)
    assert masked_kl(target, student, mask).item() == pytest.approx(direct, rel=1e-5)
    assert masked_kl(target, student, torch.zeros_like(mask)).item() == 0.0


def test_global_consistency_matches_per_record_forwards(model):
    states, fixed = sequences(STATES), sequences(FIXED)
    mask = consistency_loss_mask(pad(states), pad(fixed), mask_of(states), torch.tensor([3, 2]), [EOS])
    loss = global_consistency_loss(model, pad(states), pad(fixed), mask_of(states), mask)
    # Direct: unpadded forward per record, KL at the kept logits, mean over all kept positions.
    terms = []
    for b in range(2):
        target, student = logits_unpadded(model, fixed[b]), logits_unpadded(model, states[b])
        terms += [kl_direct(target[t], student[t]) for t in mask[b].nonzero().flatten().tolist()]
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-4)
    assert loss.item() > 0


def test_global_consistency_is_zero_at_the_fixed_point(model):
    fixed = sequences(FIXED)
    everything = mask_of(fixed).bool()  # even with every position kept, identical inputs give KL 0
    loss = global_consistency_loss(model, pad(fixed), pad(fixed), mask_of(fixed), everything)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_global_consistency_gradient_reaches_only_the_student(model):
    states, fixed = sequences(STATES), sequences(FIXED)
    mask = consistency_loss_mask(pad(states), pad(fixed), mask_of(states), torch.tensor([3, 2]), [EOS])
    target_logits = model(input_ids=pad(fixed), attention_mask=mask_of(fixed)).logits  # has a graph
    model.zero_grad()
    loss = global_consistency_loss(model, pad(states), pad(fixed), mask_of(states), mask, target_logits)
    loss.backward()
    grad = model.lm_head.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # The target side was detached: the same loss with an explicitly detached target has the same grad.
    model.zero_grad()
    global_consistency_loss(model, pad(states), pad(fixed), mask_of(states), mask, target_logits.detach()).backward()
    assert torch.allclose(model.lm_head.weight.grad, grad)
    model.zero_grad()


def test_local_consistency_uses_the_next_state(model):
    prefix = [1, 5, 6]
    y0, y1, fixed = [30, 31, 32, 33], [10, 31, 34, 13], [10, 11, 12, 13]
    state, nxt, fp = prefix + y0, prefix + y1, prefix + fixed
    mask = consistency_loss_mask(pad([state]), pad([fp]), mask_of([state]), torch.tensor([3]), [EOS])
    assert mask[0].nonzero().flatten().tolist() == [2, 3, 4, 5]
    loss = local_consistency_loss(model, pad([state]), pad([nxt]), mask_of([state]), mask)
    target, student = logits_unpadded(model, nxt), logits_unpadded(model, state)
    direct = sum(kl_direct(target[t], student[t]) for t in [2, 3, 4, 5]) / 4
    assert loss.item() == pytest.approx(direct, rel=1e-4)
    same = local_consistency_loss(model, pad([state]), pad([state]), mask_of([state]), mask)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_ar_loss_matches_direct_cross_entropy():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 9)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX]])
    pairs = [(b, t) for b in range(2) for t in range(4) if labels[b, t + 1] != IGNORE_INDEX]
    logp = torch.log_softmax(logits.double(), -1)
    nll = [-logp[b, t, labels[b, t + 1]].item() for b, t in pairs]
    assert ar_loss(logits, labels).item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    # Label smoothing eps: (1 - eps) * NLL + eps * mean over the vocabulary of -log p.
    eps = 0.1
    smooth = [(1 - eps) * n + eps * -logp[b, t].mean().item() for n, (b, t) in zip(nll, pairs, strict=True)]
    assert ar_loss(logits, labels, label_smoothing=eps).item() == pytest.approx(sum(smooth) / len(smooth), rel=1e-5)


def test_cllm_loss_is_consistency_plus_weighted_ar(model):
    states, fixed = sequences(STATES), sequences(FIXED)
    mask = consistency_loss_mask(pad(states), pad(fixed), mask_of(states), torch.tensor([3, 2]), [EOS])
    labels = pad([[IGNORE_INDEX] * 3 + FIXED[0], [IGNORE_INDEX] * 2 + FIXED[1]], IGNORE_INDEX)
    batch = {
        "input_ids": pad(states),
        "target_ids": pad(fixed),
        "attention_mask": mask_of(states),
        "loss_mask": mask,
        "ar_labels": labels,
    }
    with torch.no_grad():
        shared = cllm_loss(model, batch, consistency="global", ar_weight=10.0)
        # The same AR example passed explicitly takes a separate forward and must give the same numbers.
        separate = cllm_loss(
            model, batch | {"ar_input_ids": pad(fixed), "ar_attention_mask": mask_of(fixed)}, ar_weight=10.0
        )
        gc = global_consistency_loss(model, pad(states), pad(fixed), mask_of(states), mask)
        ar = ar_loss(model(input_ids=pad(fixed), attention_mask=mask_of(fixed)).logits, labels)
    for parts in (shared, separate):
        assert parts.consistency.item() == pytest.approx(gc.item(), rel=1e-5)
        assert parts.ar.item() == pytest.approx(ar.item(), rel=1e-5)
        assert parts.total.item() == pytest.approx(gc.item() + 10.0 * ar.item(), rel=1e-5)
    with pytest.raises(ValueError, match="consistency"):
        cllm_loss(model, batch, consistency="nonsense")


def test_ar_loss_with_no_labels_is_zero_not_nan():
    logits = torch.randn(1, 4, 5)
    labels = torch.full((1, 4), IGNORE_INDEX)
    assert ar_loss(logits, labels).item() == 0.0
