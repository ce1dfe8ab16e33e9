"""The CLLM training objective (spec §3): consistency loss + w * AR loss.

Conventions for every function here: sequences are right-padded `[B, T]` token tensors with an
`attention_mask`; the logit at position t predicts the token at position t+1, so the logit that
predicts block token i (sitting at input position P+i, prefix length P, i from 0) is logit P+i-1.
Consistency targets come from the same model under `torch.no_grad()` (theta-, stop-gradient), so no
frozen teacher copy is kept.

The progressive objective packs many blocks into one row, where the token before a block token is not
always the one to its left: its batches carry `predictor`, the index of the logit that predicts each
token, and its targets are detached rows of the same forward.

Every forward here computes the output layer only at the positions some loss reads (`forward_logits`
with a `keep` mask, through transformers' `logits_to_keep`): with a 150k-token vocabulary, logits for
every position of a batch (and their float32 copies) would take more memory than a 0.5B model itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cllm.models.loading import forward_takes

IGNORE_INDEX = -100  # label value that `ar_loss` skips (prompt and padding)

# Segments of a packed progressive row (`cllm.train.batches.collate_progressive`), one id per token.
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


def kl_rows(target_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """mean over rows [N, vocab] of KL(softmax(target) || softmax(student)); 0 when there is no row.

    Forward KL has the gradient of the soft cross-entropy against the target but is 0 when the two
    distributions agree. The per-position mean (not the spec's sum over i) is what `w = 10` was tuned with.
    """
    target = F.log_softmax(target_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    kl = F.kl_div(student, target, log_target=True, reduction="sum")
    return kl / max(len(target_logits), 1)


def masked_kl(target_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`kl_rows` over the positions `mask` [B, T] keeps of two full logit tensors [B, T, vocab]."""
    mask = mask.bool()
    return kl_rows(target_logits[mask], student_logits[mask])


@dataclass
class KeptLogits:
    """The output layer at some positions of a batch: `logits` [B, K, vocab] at the ascending `columns` [K]."""

    logits: torch.Tensor
    columns: torch.Tensor

    def __post_init__(self) -> None:
        # position -> its index among the kept columns (-1: not kept)
        self.column_of = torch.full((int(self.columns.max()) + 1 if len(self.columns) else 1,), -1,
                                    dtype=torch.long, device=self.columns.device)
        self.column_of[self.columns] = torch.arange(len(self.columns), device=self.columns.device)

    def gather(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] at (rows[n], positions[n]); every position must be one of the kept columns."""
        return self.logits[rows, self.column_of[positions]]

    def at(self, keep: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] at the positions `keep` [B, T] marks, row by row (the order of `tensor[keep]`)."""
        return self.logits[keep[:, self.columns]]


def selects_logits(model) -> bool:
    """Whether the model (under DDP, DeepSpeed or PEFT wrappers) takes `logits_to_keep`, as transformers' do."""
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return forward_takes(type(inner), "logits_to_keep")


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   keep: torch.Tensor | None = None, **inputs) -> KeptLogits:
    """One forward; the output layer runs only at the columns where some row of `keep` [B, T] is True
    (every column without `keep`)."""
    length = input_ids.shape[1]
    columns = (torch.arange(length, device=input_ids.device) if keep is None
               else keep.any(0).nonzero().flatten().to(input_ids.device))
    if selects_logits(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=columns, **inputs).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **inputs).logits[:, columns]
    return KeptLogits(logits, columns)


def global_consistency_loss(
    model,
    state_ids: torch.Tensor,
    fixed_point_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    target_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_GC = mean_i KL( p_theta-(. | x, y*_<i) || p_theta(. | x, y_<i) ) over the kept logits i.

    `target_rows` (the logits of [prefix, y*] at the kept positions, [N, vocab]) may be passed in when an
    AR forward already computed them; they are detached either way.
    """
    loss_mask = loss_mask.bool()
    if target_rows is None:
        with torch.no_grad():
            target_rows = forward_logits(model, fixed_point_ids, attention_mask, loss_mask).at(loss_mask)
    student_rows = forward_logits(model, state_ids, attention_mask, loss_mask).at(loss_mask)
    return kl_rows(target_rows.detach(), student_rows)


def local_consistency_loss(
    model,
    state_ids: torch.Tensor,
    next_state_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
) -> torch.Tensor:
    """L_LC = mean_i KL( p_theta-(. | x, y^(j+1)_<i) || p_theta(. | x, y^(j)_<i) ) over the kept logits i."""
    loss_mask = loss_mask.bool()
    with torch.no_grad():
        target_rows = forward_logits(model, next_state_ids, attention_mask, loss_mask).at(loss_mask)
    student_rows = forward_logits(model, state_ids, attention_mask, loss_mask).at(loss_mask)
    return kl_rows(target_rows, student_rows)


def predicted_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [B, T]: the logits that predict a label, targets [N]: those labels, in the order of `.at(keep)`)."""
    following = labels[:, 1:]
    labelled = following != IGNORE_INDEX
    return F.pad(labelled, (0, 1)), following[labelled]  # logit t predicts label t+1


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """mean CE over rows [N, vocab] against `targets` [N]; 0 when there is no row."""
    total = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing, reduction="sum")
    return total / max(len(targets), 1)


def ar_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """L_AR = mean_t CE(logits_t, labels_{t+1}) over labels that are not IGNORE_INDEX (prompt, padding)."""
    keep, targets = predicted_labels(labels)
    return cross_entropy_rows(logits[keep], targets, label_smoothing)


def cllm_loss(
    model,
    batch: dict[str, torch.Tensor],
    *,
    consistency: str = "global",
    ar_weight: float = 10.0,
    label_smoothing: float = 0.0,
) -> LossParts:
    """L = L_consistency + w * L_AR on a batch from `cllm.train.batches.collate_consistency` (progressive:
    from `cllm.train.batches.collate_progressive`).

    Without `ar_input_ids` in the batch the AR example is [prefix, y*] itself (global consistency on
    the teacher's output), so one forward gives both the AR logits and the detached GC targets.
    """
    if consistency == "progressive":
        return progressive_loss(model, batch, ar_weight=ar_weight, label_smoothing=label_smoothing)
    if consistency not in ("global", "local"):
        raise ValueError(f"consistency must be 'global', 'local' or 'progressive', got {consistency!r}")
    shared = "ar_input_ids" not in batch
    ar_keep, ar_targets = predicted_labels(batch["ar_labels"])
    loss_mask = batch["loss_mask"].bool()
    if shared:
        if consistency != "global":
            raise ValueError("a batch without ar_input_ids only works with global consistency")
        ar_logits = forward_logits(model, batch["target_ids"], batch["attention_mask"], ar_keep | loss_mask)
    else:
        ar_logits = forward_logits(model, batch["ar_input_ids"], batch["ar_attention_mask"], ar_keep)
    l_ar = cross_entropy_rows(ar_logits.at(ar_keep), ar_targets, label_smoothing)
    if consistency == "global":
        l_c = global_consistency_loss(
            model,
            batch["input_ids"],
            batch["target_ids"],
            batch["attention_mask"],
            loss_mask,
            target_rows=ar_logits.at(loss_mask) if shared else None,
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


def packed_logits(model, batch: dict[str, torch.Tensor], read: torch.Tensor | None = None) -> KeptLogits:
    """One forward over packed rows (the block mask as a 4D additive float mask, explicit position ids),
    the output layer at the positions `read` [B, T] marks; by default the logits some loss reads: the
    predictors of kept noisy tokens, of their clean partners and of labelled tokens."""
    allowed = packed_attention_mask(batch["segment_ids"], batch["position_ids"])
    dtype = next(model.parameters()).dtype
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    additive = additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    if read is None:
        predictor = batch["predictor"]
        read = torch.zeros_like(batch["kl_mask"], dtype=torch.bool)
        rows, cols = batch["kl_mask"].nonzero(as_tuple=True)
        read[rows, predictor[rows, cols]] = True
        read[rows, predictor[rows, batch["partner"][rows, cols]]] = True
        rows, cols = (batch["ar_labels"] != IGNORE_INDEX).nonzero(as_tuple=True)
        read[rows, predictor[rows, cols]] = True
    return forward_logits(model, batch["input_ids"], additive, read, position_ids=batch["position_ids"])


def progressive_consistency_loss(logits: KeptLogits, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """mean over kept noisy tokens of KL( p_theta-(. | clean prefix) || p_theta(. | noisy prefix) ).

    The student logit of a noisy token is the one that predicts it (its predecessor in the noisy block);
    the target is the logit that predicts its clean partner, detached. Both are rows of the same forward.
    """
    rows, cols = batch["kl_mask"].nonzero(as_tuple=True)
    predictor = batch["predictor"]
    student = logits.gather(rows, predictor[rows, cols])
    target = logits.gather(rows, predictor[rows, batch["partner"][rows, cols]]).detach()
    return kl_rows(target, student)


def packed_ar_loss(logits: KeptLogits, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """L_AR = mean CE(logit that predicts token t, token t) over the labelled tokens (clean blocks or answer)."""
    labels = batch["ar_labels"]
    rows, cols = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    return cross_entropy_rows(logits.gather(rows, batch["predictor"][rows, cols]), labels[rows, cols], label_smoothing)


def progressive_loss(
    model, batch: dict[str, torch.Tensor], *, ar_weight: float = 10.0, label_smoothing: float = 0.0
) -> LossParts:
    """L = L_consistency + w * L_AR over every block of every packed row, from one forward."""
    logits = packed_logits(model, batch)
    l_c = progressive_consistency_loss(logits, batch)
    l_ar = packed_ar_loss(logits, batch, label_smoothing)
    return LossParts(total=l_c + ar_weight * l_ar, consistency=l_c.detach(), ar=l_ar.detach())


def ar_objective(model, batch: dict[str, torch.Tensor], *, label_smoothing: float = 0.0) -> LossParts:
    """Plain next-token training (the teacher's own pretraining) on a batch from `cllm.train.batches.collate_ar`."""
    keep, targets = predicted_labels(batch["labels"])
    rows = forward_logits(model, batch["input_ids"], batch["attention_mask"], keep).at(keep)
    l_ar = cross_entropy_rows(rows, targets, label_smoothing)
    return LossParts(total=l_ar, consistency=torch.zeros_like(l_ar), ar=l_ar.detach())
