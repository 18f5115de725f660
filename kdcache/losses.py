"""Distillation losses: plain ``nn.Module``s, argument order always ``(student, teacher)``.

Each is usable in any training loop, with cached teacher outputs or live ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .targets import SoftTargets, teacher_side

__all__ = ["KLDivLoss", "SoftTargetCrossEntropy", "TopKKLDivLoss", "SampledKLDivLoss", "HybridKLDivLoss",
           "HiddenStateLoss", "AttentionTransferLoss"]


def _check_reduction(reduction: str, mask: torch.Tensor | None, shape: torch.Size) -> None:
    if reduction not in ("batchmean", "sum", "none"):
        raise ValueError(f"reduction must be 'batchmean', 'sum' or 'none', got {reduction!r}")
    if mask is not None and mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")


def _check_temperature(temperature: float) -> float:
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def _reduce(per_item: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce per-row (B,) or per-token (B, L) values: mean over rows / unmasked tokens."""
    _check_reduction(reduction, mask, per_item.shape)
    if mask is not None:
        weights = mask.to(per_item.dtype)
        per_item = per_item * weights
        if reduction == "batchmean":
            return per_item.sum() / weights.sum().clamp_min(1.0)
    if reduction == "none":
        return per_item
    if reduction == "sum":
        return per_item.sum()
    return per_item.sum() / max(per_item.numel(), 1)


def _weights(shape: torch.Size, mask: torch.Tensor | None, reduction: str) -> tuple[torch.Tensor | None, float]:
    """``(per-item weights or None, scale)`` such that the reduced loss is ``scale * sum(w * per_item)``
    (``reduction`` "batchmean" or "sum")."""
    _check_reduction(reduction, mask, shape)
    if mask is None:
        return None, (1.0 / max(math.prod(shape), 1) if reduction == "batchmean" else 1.0)
    weights = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    return (weights / weights.sum().clamp_min(1.0) if reduction == "batchmean" else weights), 1.0


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
        return _reduce(per_item, mask, "none")
    weights, scale = _weights(student_logits.shape[:-1], mask, reduction)
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
    loss takes :class:`~kdcache.targets.SoftTargets` computed at the same temperature (the
    teacher's side precomputed once, e.g. by ``CachedTeacherDataset.precompute``): same value
    and gradient within the precision ``probs`` are held in.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__()
        self.temperature, self.reduction = _check_temperature(temperature), reduction

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
        self.temperature, self.reduction = _check_temperature(temperature), reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | SoftTargets,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return _soft_target_loss(student_logits, teacher_logits, self.temperature, mask, self.reduction, entropy=False)


class TopKKLDivLoss(nn.Module):
    """KL from a top-k cache: the teacher's K kept classes plus one tail bucket holding the rest.

    The teacher side comes from a ``topk`` cache: ``values`` (its K largest logits),
    ``indices`` (their class ids) and ``logsumexp`` (of the full row), so at T=1 the kept
    classes' probabilities ``exp(v - logsumexp)`` and the tail mass ``1 - sum`` are exact. The
    student's distribution is folded the same way (kept classes + the mass of all others), and
    the loss is ``T^2 * KL`` between the two (K+1)-bucket distributions.

    At T=1 this is exact; with K = V it equals :class:`KLDivLoss`. At T != 1 the teacher's
    tempered tail is not recoverable from the cache: it is modelled as V-K classes of equal
    logit (the value that gives the exact T=1 tail mass), which is exact whenever the tail is
    flat and otherwise slightly overstates the tail's share as T grows.

    Shapes: ``student_logits`` ``(B, *P, V)``; ``values``/``indices`` ``(B, *P, K)``;
    ``logsumexp`` ``(B, *P)``; ``mask`` ``(B, *P)``. Reduction as in :class:`KLDivLoss`.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__()
        self.temperature, self.reduction = _check_temperature(temperature), reduction

    def forward(self, student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                logsumexp: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        t, vocab, k = self.temperature, student_logits.shape[-1], values.shape[-1]
        if values.shape != indices.shape or values.shape[:-1] != student_logits.shape[:-1] \
                or logsumexp.shape != values.shape[:-1]:
            raise ValueError(f"top-k shapes do not fit: student {tuple(student_logits.shape)}, values "
                             f"{tuple(values.shape)}, indices {tuple(indices.shape)}, logsumexp {tuple(logsumexp.shape)}")
        indices = indices.long()
        tail_classes = vocab - k
        with torch.no_grad():
            z, lse = values.float(), logsumexp.float()
            kept_mass = (z - lse.unsqueeze(-1)).exp().sum(-1)
            tail_mass = (1 - kept_mass).clamp_min(0)
            logits = z / t
            if tail_classes > 0:  # the tail as V-K equal logits with the exact T=1 mass
                bucket = (lse + tail_mass.log() - math.log(tail_classes)) / t + math.log(tail_classes)
                logits = torch.cat([logits, bucket.unsqueeze(-1)], dim=-1)
            q = torch.softmax(logits, dim=-1)
        s = student_logits.float() / t
        lse_s = s.logsumexp(-1, keepdim=True)
        log_ps = s.gather(-1, indices) - lse_s
        if tail_classes > 0:
            tail = s.scatter(-1, indices, float("-inf")).logsumexp(-1, keepdim=True) - lse_s
            log_ps = torch.cat([log_ps, tail], dim=-1)
        per_item = (torch.xlogy(q, q) - q * log_ps).sum(-1)
        return _reduce(per_item, mask, self.reduction) * (t * t)


class SampledKLDivLoss(nn.Module):
    """KL from a sampled cache (Random-Sampling KD): the teacher is the empirical distribution
    of N ids drawn from ``softmax(teacher_logits / T)``, ``counts / N`` over the stored ``ids``.

    Its gradient is an unbiased estimate of the dense KD gradient at temperature T (Anshumann
    et al., 2025); use the temperature the cache was sampled at (``train_student`` does).
    The value is ``T^2 * KL(counts/N || softmax(s/T))`` over the sampled ids.

    Shapes: ``student_logits`` ``(B, *P, V)``; ``ids``/``counts`` ``(B, *P, N)`` (count 0 marks an
    unused slot); ``mask`` ``(B, *P)``. Reduction as in :class:`KLDivLoss`.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__()
        self.temperature, self.reduction = _check_temperature(temperature), reduction

    def forward(self, student_logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.shape != counts.shape or ids.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(f"sampled shapes do not fit: student {tuple(student_logits.shape)}, ids "
                             f"{tuple(ids.shape)}, counts {tuple(counts.shape)}")
        t = self.temperature
        with torch.no_grad():
            c = counts.float()
            q = c / c.sum(-1, keepdim=True).clamp_min(1)
        log_ps = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, ids.long())
        per_item = (torch.xlogy(q, q) - q * log_ps).sum(-1)
        return _reduce(per_item, mask, self.reduction) * (t * t)


class HybridKLDivLoss(nn.Module):
    """KL from a hybrid cache: the teacher's K most likely classes exactly, the rest estimated
    from N draws.

    The teacher side is ``q``: ``exp(logprobs)`` on the head ``indices``, and ``tail mass / N``
    on each of the N ``tail`` draws (ids from the other classes; a class drawn c times gets c
    shares), where ``tail mass = 1 - sum exp(logprobs)``. ``q`` is exact on the head and, over
    the draws, an unbiased estimate of the teacher's distribution elsewhere, so the loss's
    gradient is an unbiased estimate of the dense KD gradient at temperature T, with variance
    only from the tail's mass. The value is ``T^2 * KL(q || softmax(s/T))``: when the head holds
    all the mass (K = V), exactly :class:`KLDivLoss`. Use the temperature the cache was drawn at
    (``train_student`` does): its log-probabilities are of ``softmax(logits / T)``.

    Shapes: ``student_logits`` ``(B, *P, V)``; ``logprobs``/``indices`` ``(B, *P, K)``; ``tail``
    ``(B, *P, N)``; ``mask`` ``(B, *P)``. Reduction as in :class:`KLDivLoss`.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__()
        self.temperature, self.reduction = _check_temperature(temperature), reduction

    def forward(self, student_logits: torch.Tensor, logprobs: torch.Tensor, indices: torch.Tensor,
                tail: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        prefix = student_logits.shape[:-1]
        if logprobs.shape != indices.shape or logprobs.shape[:-1] != prefix or tail.shape[:-1] != prefix:
            raise ValueError(f"hybrid shapes do not fit: student {tuple(student_logits.shape)}, logprobs "
                             f"{tuple(logprobs.shape)}, indices {tuple(indices.shape)}, tail {tuple(tail.shape)}")
        t, n = self.temperature, tail.shape[-1]
        with torch.no_grad():
            head = logprobs.float().exp()
            share = ((1 - head.sum(-1, keepdim=True)).clamp_min(0) / n).expand(*prefix, n)
            q = torch.cat([head, share], dim=-1)
            # (…, N): how often each draw's id was drawn, counted on the sorted draws (O(N log N) memory-light)
            draws = tail.contiguous()
            ordered = draws.sort(-1).values
            drawn = torch.searchsorted(ordered, draws, right=True) - torch.searchsorted(ordered, draws)
            neg_entropy = torch.xlogy(head, head).sum(-1) + torch.xlogy(share, share * drawn).sum(-1)
        log_ps = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, torch.cat([indices, tail], -1).long())
        per_item = neg_entropy - (q * log_ps).sum(-1)
        return _reduce(per_item, mask, self.reduction) * (t * t)


class HiddenStateLoss(nn.Module):
    """FitNets-style hint loss between a student and a teacher hidden state.

    Args:
        kind: ``"mse"`` (mean over all elements) or ``"cosine"`` (mean of ``1 - cos`` over
            rows/positions, along the feature axis).
        student_dim, teacher_dim: feature sizes. When they differ, a learned projection maps
            the student's features to the teacher's: ``nn.Linear`` over the last axis for
            ``(B, D)``/``(B, L, D)``, a 1x1 ``nn.Conv2d`` over channels for conv maps.
        conv: True for ``(B, C, H, W)`` maps (features on axis 1); spatial sizes that differ
            are resized to the teacher's with bilinear interpolation.

    The projection's parameters belong to this module: train them with the student (pass
    ``loss.parameters()`` to the optimizer) and save them apart from it.
    """

    def __init__(self, kind: str = "mse", student_dim: int | None = None, teacher_dim: int | None = None,
                 conv: bool = False) -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")
        self.kind, self.conv = kind, conv
        self.projection: nn.Module = nn.Identity()
        if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
            self.projection = (nn.Conv2d(student_dim, teacher_dim, kernel_size=1, bias=False) if conv
                               else nn.Linear(student_dim, teacher_dim, bias=False))

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        s = self.projection(student_hidden.float())
        t = teacher_hidden.float()
        if self.conv and s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        if s.shape != t.shape:
            raise ValueError(f"hint shapes differ after projection: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        feature_axis = 1 if self.conv else -1
        if self.kind == "cosine":
            per_item = 1 - F.cosine_similarity(s, t, dim=feature_axis)
        else:
            per_item = (s - t).pow(2).mean(dim=feature_axis)
        if mask is not None:
            return _reduce(per_item, mask, "batchmean")
        return per_item.mean()


class AttentionTransferLoss(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, 2017) between conv feature maps.

    The attention map of ``(B, C, H, W)`` features is ``normalize(mean_c |x|^p)`` flattened
    to ``(B, H*W)`` (unit L2 norm per row); the loss is the mean squared difference of the
    student's and teacher's maps over ``B*H*W`` (the paper's ``(at(s) - at(t)).pow(2).mean()``;
    its beta, 1e3/2 there, is the hint weight here). Channel counts may differ; a student map
    of another spatial size is resized to the teacher's.
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = p

    def attention(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 4:
            raise ValueError(f"attention transfer needs (B, C, H, W) maps, got {tuple(features.shape)}")
        return F.normalize(features.float().abs().pow(self.p).mean(dim=1).flatten(1), dim=1)

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
        s = student_hidden
        if s.ndim == 4 and teacher_hidden.ndim == 4 and s.shape[-2:] != teacher_hidden.shape[-2:]:
            s = F.interpolate(s.float(), size=teacher_hidden.shape[-2:], mode="bilinear", align_corners=False)
        return (self.attention(s) - self.attention(teacher_hidden)).pow(2).mean()
