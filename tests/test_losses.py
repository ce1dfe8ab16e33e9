"""The CLLM losses against direct per-position computations on a tiny real model."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from cllm.train.batches import block_chains, collate_progressive, noise_target, scheduled_state
from cllm.train.losses import (
    ANSWER_SEGMENT,
    IGNORE_INDEX,
    PAD_SEGMENT,
    PROMPT_SEGMENT,
    ar_loss,
    clean_segment,
    cllm_loss,
    consistency_loss_mask,
    global_consistency_loss,
    local_consistency_loss,
    masked_kl,
    noisy_segment,
    packed_attention_mask,
    packed_logits,
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
    loss = global_consistency_loss(model, pad(states), pad(fixed), mask_of(states), mask, target_logits[mask])
    loss.backward()
    grad = model.lm_head.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # The target side was detached: the same loss with an explicitly detached target has the same grad.
    model.zero_grad()
    detached = target_logits[mask].detach()
    global_consistency_loss(model, pad(states), pad(fixed), mask_of(states), mask, detached).backward()
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


class AllLogits(torch.nn.Module):
    """The same model behind a forward that cannot select logits: the losses must slice them themselves."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def output_layer_widths(model, batch: dict, consistency: str) -> tuple[object, list[int]]:
    """`cllm_loss` and the number of positions the output layer saw in each of its forwards."""
    widths = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: widths.append(args[0].shape[1]))
    try:
        return cllm_loss(model, batch, consistency=consistency), widths
    finally:
        hook.remove()


def test_the_output_layer_runs_only_where_a_loss_reads(model):
    """A 150k vocabulary makes logits at every position the largest tensor of a step: each forward of each
    objective computes them only at the columns its losses read, with the same loss as full logits."""
    states, fixed = sequences(STATES), sequences(FIXED)
    mask = consistency_loss_mask(pad(states), pad(fixed), mask_of(states), torch.tensor([3, 2]), [EOS])
    labels = pad([[IGNORE_INDEX] * 3 + FIXED[0], [IGNORE_INDEX] * 2 + FIXED[1]], IGNORE_INDEX)
    batch = {"input_ids": pad(states), "target_ids": pad(fixed), "attention_mask": mask_of(states),
             "loss_mask": mask, "ar_labels": labels}
    separate = batch | {"ar_input_ids": pad(fixed), "ar_attention_mask": mask_of(fixed)}
    packed = collate_progressive(progressive_records(labels=True), pad_token_id=PAD, eos_token_ids=[EOS],
                                 ar_source="labels")
    cases = [(batch, "global"), (separate, "global"), (separate, "local"), (packed, "progressive")]
    for case, consistency in cases:
        with torch.no_grad():
            parts, widths = output_layer_widths(model, case, consistency)
            reference = cllm_loss(AllLogits(model), case, consistency=consistency)
        length = case["input_ids"].shape[1]
        assert widths and all(width < length for width in widths), (consistency, widths, length)
        assert parts.consistency.item() > 0 and parts.ar.item() > 0
        assert parts.total.item() == pytest.approx(reference.total.item(), rel=1e-6), consistency
        assert parts.consistency.item() == pytest.approx(reference.consistency.item(), rel=1e-6), consistency


# ----- progressive objective: every block of a run in one packed forward -----


def response_blocks(prompt_id: int, prompt: list[int], blocks: list[list[int]], seed: int,
                    window: int | None = None, labels: list[int] | None = None) -> list[dict]:
    """Block records of one response: per block, states that fix one more leading token per step and
    stop two tokens short of the fixed point (so every state has a wrong token that later ones read).

    `window` > len(block) mimics a last block cut at EOS whose states still hold the whole window.
    """
    rng = random.Random(seed)
    records, prefix = [], list(prompt)
    for block_idx, fixed in enumerate(blocks):
        n = window or len(fixed)
        guess = [fixed[0]] + [rng.randrange(4, 44) for _ in range(n - 1)]
        states = [fixed[:k] + guess[k:] for k in range(1, max(2, len(fixed) - 1))]
        records.append({"prompt_id": prompt_id, "block_idx": block_idx, "prompt_len": len(prompt),
                        "prefix_ids": list(prefix), "states": states, "fixed_point": fixed, "labels": labels})
        prefix += fixed
    return records


def progressive_records(labels: bool = False) -> list[dict]:
    """Two responses of different lengths: 3 blocks of 4 ending at EOS (window 4), and 2 blocks of 4."""
    first = response_blocks(0, [1, 5, 6], [[10, 11, 12, 13], [14, 15, 16, 17], [18, EOS]], seed=0, window=4,
                            labels=[10, 11, 12, EOS] if labels else None)
    second = response_blocks(1, [1, 7, 8, 9, 40], [[20, 21, 22, 23], [24, 25, 26, 27]], seed=1,
                             labels=[20, 21] if labels else None)
    return second[1:] + first + second[:1]  # any order: the collator sorts the blocks of each prompt


def blockwise_loss(model, records, *, ar_source="teacher", ar_weight=10.0):
    """The progressive loss the long way: per block two ordinary forwards, [prefix, state] (student) and
    [prefix, y*] (no-grad target), kept positions by `consistency_loss_mask`; AR on y* up to EOS (or on
    [prompt, answer] once per response); one mean over all kept positions and one over all labels."""
    students, targets, ar_logits, ar_targets = [], [], [], []
    for chain in block_chains(records):
        for record in chain:
            prefix, fixed = list(record["prefix_ids"]), list(record["fixed_point"])
            state = scheduled_state(record, noise_target(record["block_idx"], (0.0, 1.0), 4))
            student = model(input_ids=torch.tensor([prefix + state])).logits[0]
            target_graph = model(input_ids=torch.tensor([prefix + fixed])).logits[0]
            kept = consistency_loss_mask(torch.tensor([prefix + state]), torch.tensor([prefix + fixed]),
                                         torch.ones(1, len(prefix) + len(fixed)), torch.tensor([len(prefix)]),
                                         [EOS])[0]
            students.append(student[kept])
            targets.append(target_graph.detach()[kept])
            if ar_source == "teacher":
                n_ar = fixed.index(EOS) + 1 if EOS in fixed else len(fixed)
                ar_logits.append(target_graph[len(prefix) - 1 : len(prefix) - 1 + n_ar])
                ar_targets += fixed[:n_ar]
        if ar_source == "labels":
            prompt = list(chain[0]["prefix_ids"][: chain[0]["prompt_len"]])
            answer = list(chain[0]["labels"]) + ([] if chain[0]["labels"][-1] == EOS else [EOS])
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
            ar_logits.append(logits[len(prompt) - 1 : -1])
            ar_targets += answer
    student, target = torch.cat(students), torch.cat(targets)
    l_c = masked_kl(target, student, torch.ones(len(student), dtype=torch.bool))
    l_ar = F.cross_entropy(torch.cat(ar_logits), torch.tensor(ar_targets))
    return l_c + ar_weight * l_ar, l_c, l_ar


@pytest.mark.parametrize("ar_source", ["teacher", "labels"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_progressive_loss_equals_blockwise_forwards(model, ar_source, attention):
    model.set_attn_implementation(attention)
    try:
        records = progressive_records(labels=ar_source == "labels")
        batch = collate_progressive(records, pad_token_id=PAD, eos_token_ids=[EOS], ar_source=ar_source)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        assert lengths[0] < lengths[1]  # prompt 1 is seen first, and its row is padded
        model.zero_grad()
        parts = cllm_loss(model, batch, consistency="progressive", ar_weight=10.0)
        parts.total.backward()
        packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        total, l_c, l_ar = blockwise_loss(model, records, ar_source=ar_source)
        total.backward()
        assert l_c.item() > 0 and l_ar.item() > 0
        assert parts.consistency.item() == pytest.approx(l_c.item(), abs=1e-5)
        assert parts.ar.item() == pytest.approx(l_ar.item(), abs=1e-5)
        assert parts.total.item() == pytest.approx(total.item(), abs=1e-5)
        # Same gradients too: the clean blocks feed the noisy ones as the student's prefix does, and the
        # targets are detached in both.
        for name, p in model.named_parameters():
            assert torch.allclose(packed_grads[name], p.grad, atol=1e-5), name
    finally:
        model.zero_grad()
        model.set_attn_implementation("sdpa")


def test_packed_mask_lets_a_noisy_block_see_only_prompt_earlier_clean_blocks_and_its_own_prefix():
    records = progressive_records(labels=True)
    batch = collate_progressive(records, pad_token_id=PAD, eos_token_ids=[EOS], ar_source="labels")
    allowed = packed_attention_mask(batch["segment_ids"], batch["position_ids"])
    for b in range(2):
        seg, pos = batch["segment_ids"][b].tolist(), batch["position_ids"][b].tolist()
        for q, sq in enumerate(seg):
            if sq < noisy_segment(0) or (sq - noisy_segment(0)) % 2:
                continue  # not a noisy token
            k_q = (sq - noisy_segment(0)) // 2
            expected = [
                sk == PROMPT_SEGMENT
                or (sk == sq and pos[k] <= pos[q])
                or any(sk == clean_segment(m) for m in range(k_q))
                for k, sk in enumerate(seg)
            ]
            assert allowed[b, q].tolist() == expected, (b, q)
    # Padding sees only itself; the answer only the prompt and its own past.
    pad_rows = batch["segment_ids"] == PAD_SEGMENT
    assert pad_rows.any() and torch.equal(allowed[pad_rows], torch.eye(allowed.shape[1], dtype=torch.bool)[
        pad_rows.nonzero()[:, 1]])
    answer = (batch["segment_ids"][0] == ANSWER_SEGMENT).nonzero().flatten()
    sees = allowed[0, answer[-1]].nonzero().flatten()
    assert set(batch["segment_ids"][0, sees].tolist()) == {PROMPT_SEGMENT, ANSWER_SEGMENT}


def test_student_logits_ignore_every_token_a_noisy_block_must_not_see(model):
    batch = collate_progressive(progressive_records(labels=True), pad_token_id=PAD, eos_token_ids=[EOS],
                                ar_source="labels")
    everywhere = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    with torch.no_grad():
        base = packed_logits(model, batch, everywhere).logits
    seg, pos = batch["segment_ids"][0], batch["position_ids"][0]
    noisy_1 = (seg == noisy_segment(1)).nonzero().flatten()
    q = noisy_1[1]  # a noisy token of block 1 with a later token of its block
    forbidden = ((seg == noisy_segment(1)) & (pos > pos[q])) | (seg == clean_segment(1)) | (seg == noisy_segment(0))
    forbidden |= (seg >= noisy_segment(2)) | (seg == ANSWER_SEGMENT)
    for k in forbidden.nonzero().flatten().tolist():
        changed = {key: value.clone() for key, value in batch.items()}
        changed["input_ids"][0, k] = 43 if batch["input_ids"][0, k] != 43 else 42
        with torch.no_grad():
            logits = packed_logits(model, changed, everywhere).logits
        assert torch.equal(logits[0, q], base[0, q]), k
        assert torch.equal(logits[1], base[1])  # rows never mix
    # A token it may see (block 0's fixed point) does change it.
    visible = (seg == clean_segment(0)).nonzero().flatten()[-1]
    changed = {key: value.clone() for key, value in batch.items()}
    changed["input_ids"][0, visible] = 43
    with torch.no_grad():
        assert not torch.allclose(packed_logits(model, changed, everywhere).logits[0, q], base[0, q])


def test_progressive_loss_is_zero_consistency_when_states_are_fixed_points(model):
    records = [r | {"states": []} for r in progressive_records()]
    batch = collate_progressive(records, pad_token_id=PAD, eos_token_ids=[EOS])
    assert not batch["kl_mask"].any()
    with torch.no_grad():
        parts = cllm_loss(model, batch, consistency="progressive", ar_weight=10.0)
    assert parts.consistency.item() == 0.0 and parts.ar.item() > 0
