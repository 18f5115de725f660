"""Hinton's soft-target losses on dense teacher logits (or their precomputed softmax), with the
closed-form gradient in one autograd node."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .reduction import check_temperature, reduce, reduction_weights
from .targets import SoftTargets, teacher_side

__all__ = ["KLDivLoss", "SoftTargetCrossEntropy"]


class _SoftTargetKL(torch.autograd.Function):
    """``T^2 * sum_c p_t (log p_t - log p_s)`` (or without ``log p_t``: soft-target CE) with
    its closed-form gradient ``T (p_s - p_t)``: one graph node instead of a dozen, which is
    most of the KD term's cost when the student is small.

    The teacher is its logits (its side computed here, every step) or :class:`SoftTargets`
    (computed once, ahead of training): then a step costs the student's log-softmax and one
    product with ``p_t``."""

    @staticmethod
    def forward(ctx: Any, student_logits: torch.Tensor, teacher: torch.Tensor | SoftTargets, t: float,
                weights: torch.Tensor | None, scale: float, reduce: bool, entropy: bool) -> torch.Tensor:
        inv_t = 1.0 / t  # half-precision logits are computed in float32, float64 stays float64
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        log_ps = torch.log_softmax(student_logits.to(dtype) * inv_t, dim=-1)
        if isinstance(teacher, SoftTargets):
            p_t = teacher.probs.to(dtype)
            neg_entropy = teacher.neg_entropy.to(dtype) if entropy else None
            if reduce and weights is None:  # one dot product over the whole batch
                total = -torch.dot(p_t.reshape(-1), log_ps.reshape(-1))
                per_item = None
                if neg_entropy is not None:
                    total = total + neg_entropy.sum()
            else:
                per_item = -(p_t * log_ps).sum(-1)
                if neg_entropy is not None:
                    per_item = per_item + neg_entropy
        else:
            log_pt, p_t = teacher_side(teacher, t, dtype)
            per_item = (p_t * (log_pt - log_ps) if entropy else p_t * log_ps.neg()).sum(-1)
        ctx.save_for_backward(log_ps, p_t, weights)
        ctx.t, ctx.scale, ctx.reduce, ctx.dtype = t, scale, reduce, student_logits.dtype
        if per_item is None:
            return total * (scale * t * t)
        if not reduce:
            return per_item * (t * t)
        if weights is not None:
            per_item = per_item * weights
        return per_item.sum() * (scale * t * t)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        log_ps, p_t, weights = ctx.saved_tensors
        if ctx.reduce:  # d/ds of T^2 KL(p_t || softmax(s/T)) is T (p_s - p_t)
            g = grad * (ctx.scale * ctx.t)
            g = g if weights is None else (weights * g).unsqueeze(-1)
        else:
            g = (grad * ctx.t).unsqueeze(-1)
        return ((log_ps.exp() - p_t) * g).to(ctx.dtype), None, None, None, None, None, None


def _soft_target_loss(student_logits: torch.Tensor, teacher: torch.Tensor | SoftTargets, t: float,
                      mask: torch.Tensor | None, reduction: str, entropy: bool) -> torch.Tensor:
    if isinstance(teacher, SoftTargets):
        if teacher.temperature != t:
            raise ValueError(f"the teacher's probabilities were computed at temperature {teacher.temperature:g}, "
                             f"this loss is at {t:g}")
        _check_logits(student_logits, teacher.probs)
    else:
        _check_logits(student_logits, teacher)
        teacher = teacher.detach()  # a constant target
    if reduction == "none":
        per_item = _SoftTargetKL.apply(student_logits, teacher, t, None, 1.0, False, entropy)
        return reduce(per_item, mask, "none")
    weights, scale = reduction_weights(student_logits.shape[:-1], mask, reduction)
    return _SoftTargetKL.apply(student_logits, teacher, t, weights, scale, True, entropy)


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape (vocabulary/class count?)")


class KLDivLoss(nn.Module):
    """Hinton's soft-target loss: ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    Args:
        temperature: T > 0; both distributions are softened by it, and the loss is scaled by
            T^2 so gradients keep their magnitude as T changes (Hinton et al., 2015).
        reduction: ``"batchmean"`` (default) sums KL over classes and averages over rows —
            over ``B`` rows for ``(B, C)`` logits, over the unmasked tokens for ``(B, L, C)`` —
            matching ``torch.nn.KLDivLoss(reduction="batchmean")`` on ``(B, C)``;
            ``"sum"`` sums; ``"none"`` returns per-row (``(B,)``) or per-token (``(B, L)``) values.

    Shapes: ``student_logits`` and ``teacher_logits`` ``(B, C)`` or ``(B, L, C)``, any float dtype
    (computed in float32); ``mask`` ``(B,)`` or ``(B, L)``, 1 for rows/tokens that count.
    The teacher's logits are a constant target: no gradient flows into them. In their place the
    loss takes :class:`~kdcache.losses.targets.SoftTargets` computed at the same temperature (the
    teacher's side precomputed once, e.g. by ``CachedTeacherDataset.precompute``): same value
    and gradient within the precision ``probs`` are held in.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__()
        self.temperature, self.reduction = check_temperature(temperature), reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | SoftTargets,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return _soft_target_loss(student_logits, teacher_logits, self.temperature, mask, self.reduction, entropy=True)


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against the teacher's softened distribution: ``-T^2 * sum p_t^T log p_s^T``.

    Equals :class:`KLDivLoss` plus the teacher's entropy (a constant for the student), so
    its gradients are the same; its value is not zero at a perfect match. Shapes, reduction
    and T^2 scaling as in :class:`KLDivLoss`.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__()
        self.temperature, self.reduction = check_temperature(temperature), reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | SoftTargets,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return _soft_target_loss(student_logits, teacher_logits, self.temperature, mask, self.reduction, entropy=False)


