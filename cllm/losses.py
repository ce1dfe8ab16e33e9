"""The CLLM training objective (spec §3): consistency loss + w * AR loss.

Conventions for every function here: sequences are right-padded `[B, T]` token tensors with an
`attention_mask`; the logit at position t predicts the token at position t+1, so the logit that
predicts block token i (sitting at input position P+i, prefix length P, i from 0) is logit P+i-1.
Consistency targets come from the same model under `torch.no_grad()` (theta-, stop-gradient), so no
frozen teacher copy is kept.

The progressive objective packs many blocks into one row, where the token before a block token is not
always the one to its left: its batches carry `predictor`, the index of the logit that predicts each
token, and its targets are detached rows of the same forward.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value that `ar_loss` skips (prompt and padding)

# Segments of a packed progressive row (`cllm.data.collate_progressive`), one id per token.
PAD_SEGMENT = -1
PROMPT_SEGMENT = 0
ANSWER_SEGMENT = 1  # the ground-truth answer: sees the prompt only
RESPONSE_SEGMENT = 2  # earlier fixed points in the context of a run that starts mid-response


def noisy_segment(k: int) -> int:
    """Block k's scheduled state: 3, 5, 7, ..."""
    return 3 + 2 * k


def clean_segment(k: int) -> int:
    """Block k's fixed point y*: 4, 6, 8, ..."""
    return 4 + 2 * k


@dataclass
class LossParts:
    """The total loss (for backward) and its two terms (for logging)."""

    total: torch.Tensor
    consistency: torch.Tensor
    ar: torch.Tensor


def consistency_loss_mask(
    state_ids: torch.Tensor,
    fixed_point_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    block_start: torch.Tensor,
    eos_token_ids: Iterable[int] = (),
) -> torch.Tensor:
    """Bool `[B, T]` over logit positions: which logits carry consistency loss.

    Kept: the logit that predicts the first wrong token of the state y (first block position where
    y != y*) and every later logit that predicts a real block token, up to and including the one that
    predicts the first EOS of y*. Masked: every logit before it (their inputs y_<i equal y*_<i, so the
    KL is zero anyway), logits after EOS, and padding. A state equal to its fixed point keeps nothing.
    """
    batch, length = state_ids.shape
    positions = torch.arange(length, device=state_ids.device)
    real = attention_mask.bool()
    in_block = real & (positions >= block_start.to(state_ids.device)[:, None])
    wrong = in_block & (state_ids != fixed_point_ids)
    first_wrong = torch.where(wrong.any(dim=1), wrong.int().argmax(dim=1), length)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=fixed_point_ids.dtype, device=state_ids.device)
    is_eos = in_block & torch.isin(fixed_point_ids, eos)
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), length)
    # Logit t predicts token t+1: keep t when token t+1 is real and first_wrong <= t+1 <= first_eos.
    predicted = positions + 1
    predicts_real = torch.cat([real[:, 1:], real.new_zeros(batch, 1)], dim=1)
    return predicts_real & (predicted >= first_wrong[:, None]) & (predicted <= first_eos[:, None])


def masked_kl(target_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over kept positions of KL(softmax(target) || softmax(student)); 0 when nothing is kept.

    Forward KL has the gradient of the soft cross-entropy against the target but is 0 when the two
    distributions agree. The per-position mean (not the spec's sum over i) is what `w = 10` was tuned with.
    """
    mask = mask.bool()
    target = F.log_softmax(target_logits[mask].float(), dim=-1)
    student = F.log_softmax(student_logits[mask].float(), dim=-1)
    kl = F.kl_div(student, target, log_target=True, reduction="sum")
    return kl / mask.sum().clamp(min=1)


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


def global_consistency_loss(
    model,
    state_ids: torch.Tensor,
    fixed_point_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    target_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_GC = mean_i KL( p_theta-(. | x, y*_<i) || p_theta(. | x, y_<i) ) over the kept logits i.

    `target_logits` (logits of [prefix, y*]) may be passed in when an AR forward already computed them;
    they are detached either way.
    """
    if target_logits is None:
        with torch.no_grad():
            target_logits = forward_logits(model, fixed_point_ids, attention_mask)
    student_logits = forward_logits(model, state_ids, attention_mask)
    return masked_kl(target_logits.detach(), student_logits, loss_mask)


def local_consistency_loss(
    model,
    state_ids: torch.Tensor,
    next_state_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
) -> torch.Tensor:
    """L_LC = mean_i KL( p_theta-(. | x, y^(j+1)_<i) || p_theta(. | x, y^(j)_<i) ) over the kept logits i."""
    with torch.no_grad():
        target_logits = forward_logits(model, next_state_ids, attention_mask)
    student_logits = forward_logits(model, state_ids, attention_mask)
    return masked_kl(target_logits, student_logits, loss_mask)


def ar_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """L_AR = mean_t CE(logits_t, labels_{t+1}) over labels that are not IGNORE_INDEX (prompt, padding)."""
    shifted_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shifted_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(
        shifted_logits,
        shifted_labels,
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return total / (shifted_labels != IGNORE_INDEX).sum().clamp(min=1)


def cllm_loss(
    model,
    batch: dict[str, torch.Tensor],
    *,
    consistency: str = "global",
    ar_weight: float = 10.0,
    label_smoothing: float = 0.0,
) -> LossParts:
    """L = L_consistency + w * L_AR on a batch from `cllm.data.collate_consistency` (progressive:
    from `cllm.data.collate_progressive`).

    Without `ar_input_ids` in the batch the AR example is [prefix, y*] itself (global consistency on
    the teacher's output), so one forward gives both the AR logits and the detached GC targets.
    """
    if consistency == "progressive":
        return progressive_loss(model, batch, ar_weight=ar_weight, label_smoothing=label_smoothing)
    if consistency not in ("global", "local"):
        raise ValueError(f"consistency must be 'global', 'local' or 'progressive', got {consistency!r}")
    shared = "ar_input_ids" not in batch
    if shared:
        if consistency != "global":
            raise ValueError("a batch without ar_input_ids only works with global consistency")
        ar_logits = forward_logits(model, batch["target_ids"], batch["attention_mask"])
    else:
        ar_logits = forward_logits(model, batch["ar_input_ids"], batch["ar_attention_mask"])
    l_ar = ar_loss(ar_logits, batch["ar_labels"], label_smoothing)
    if consistency == "global":
        l_c = global_consistency_loss(
            model,
            batch["input_ids"],
            batch["target_ids"],
            batch["attention_mask"],
            batch["loss_mask"],
            target_logits=ar_logits if shared else None,
        )
    else:
        l_c = local_consistency_loss(
            model, batch["input_ids"], batch["target_ids"], batch["attention_mask"], batch["loss_mask"]
        )
    return LossParts(total=l_c + ar_weight * l_ar, consistency=l_c.detach(), ar=l_ar.detach())


# ----- progressive objective: every block of a run in one forward -----


def packed_attention_mask(segment_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Bool `[B, T, T]`, True where query token q may attend to key token k.

    Within a segment, causal by position. Across segments: everything but padding sees the prompt; blocks
    see the earlier response of the context; noisy_k and clean_k see clean_m for m < k, the prefix block k
    has at decode time, and never another noisy block or their own block's partner. Padding sees itself
    (a row with no key would be NaN).
    """
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    real_q = q != PAD_SEGMENT
    is_block_q, is_block_k = q >= noisy_segment(0), k >= noisy_segment(0)
    block_q, block_k = (q - noisy_segment(0)) // 2, (k - noisy_segment(0)) // 2  # k of noisy_k / clean_k
    clean_k = is_block_k & ((k - noisy_segment(0)) % 2 == 1)
    causal = (q == k) & real_q & (position_ids[:, None, :] <= position_ids[:, :, None])
    sees_prompt = (k == PROMPT_SEGMENT) & (q != PROMPT_SEGMENT) & real_q
    sees_response = (k == RESPONSE_SEGMENT) & is_block_q
    sees_earlier_clean = clean_k & is_block_q & (block_k < block_q)
    length = segment_ids.shape[1]
    pad_self = ~real_q & torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    return causal | sees_prompt | sees_response | sees_earlier_clean | pad_self


def packed_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One forward over packed rows: the block mask as a 4D additive float mask, explicit position ids."""
    allowed = packed_attention_mask(batch["segment_ids"], batch["position_ids"])
    dtype = next(model.parameters()).dtype
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    additive = additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    return model(input_ids=batch["input_ids"], attention_mask=additive, position_ids=batch["position_ids"]).logits


def progressive_consistency_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """mean over kept noisy tokens of KL( p_theta-(. | clean prefix) || p_theta(. | noisy prefix) ).

    The student logit of a noisy token is the one that predicts it (its predecessor in the noisy block);
    the target is the logit that predicts its clean partner, detached. Both are rows of the same forward.
    """
    rows, cols = batch["kl_mask"].nonzero(as_tuple=True)
    predictor = batch["predictor"]
    student = logits[rows, predictor[rows, cols]]
    target = logits.detach()[rows, predictor[rows, batch["partner"][rows, cols]]]
    return masked_kl(target, student, torch.ones(len(rows), dtype=torch.bool, device=logits.device))


def packed_ar_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """L_AR = mean CE(logit that predicts token t, token t) over the labelled tokens (clean blocks or answer)."""
    labels = batch["ar_labels"]
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    predicted = logits[rows, batch["predictor"][rows, cols]].float()
    total = F.cross_entropy(predicted, labels[rows, cols], label_smoothing=label_smoothing, reduction="sum")
    return total / max(len(rows), 1)


def progressive_loss(
    model, batch: dict[str, torch.Tensor], *, ar_weight: float = 10.0, label_smoothing: float = 0.0
) -> LossParts:
    """L = L_consistency + w * L_AR over every block of every packed row, from one forward."""
    logits = packed_logits(model, batch)
    l_c = progressive_consistency_loss(logits, batch)
    l_ar = packed_ar_loss(logits, batch, label_smoothing)
    return LossParts(total=l_c + ar_weight * l_ar, consistency=l_c.detach(), ar=l_ar.detach())


def ar_objective(model, batch: dict[str, torch.Tensor], *, label_smoothing: float = 0.0) -> LossParts:
    """Plain next-token training (the teacher's own pretraining) on a batch from `cllm.data.collate_ar`."""
    l_ar = ar_loss(forward_logits(model, batch["input_ids"], batch["attention_mask"]), batch["labels"], label_smoothing)
    return LossParts(total=l_ar, consistency=torch.zeros_like(l_ar), ar=l_ar.detach())
