"""KD losses from sparse teacher targets (large vocabularies): a top-k head with its tail bucket,
N sampled ids, or an exact head plus sampled tail draws; the decoded targets of
:mod:`kdcache.format.sparse` are their keyword arguments."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .divergences import Divergence
from .reduction import check_temperature, reduce

__all__ = ["TopKKLDivLoss", "SampledKLDivLoss", "HybridKLDivLoss", "TargetsError", "kept_mass_excess"]


class TargetsError(ValueError):
    """Teacher targets that are not a distribution: kept probabilities summing to more than 1,
    or no draws at a position that counts (a damaged or forged cache, or a bad import)."""


def kept_mass_excess(values: torch.Tensor, logsumexp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(excess, tolerance)`` per position (float32, shaped like ``logsumexp``): ``log sum
    exp(values - logsumexp)`` over the last axis, which is <= 0 for a distribution, and what
    float16 rounding of ``values`` can add to it (each value is off by at most ``|v| 2^-11``;
    the sum by their softmax-weighted mean; doubled, plus 1e-4)."""
    v = values.float()
    lp = v - logsumexp.float().unsqueeze(-1)
    return lp.logsumexp(-1), (torch.softmax(lp, -1) * v.abs()).sum(-1) * 2 ** -10 + 1e-4


def _refuse_excess(values: torch.Tensor, logsumexp: torch.Tensor, mask: torch.Tensor | None, what: str) -> None:
    excess, tolerance = kept_mass_excess(values, logsumexp)
    bad = excess > tolerance
    if mask is not None:
        bad &= mask.bool()
    if bool(bad.any()):
        mass = float(excess[bad].max().exp())
        raise TargetsError(f"the teacher's {what} probabilities sum to {mass:.4g} > 1 at {int(bad.sum())} positions: "
                           "not a distribution (a damaged or forged cache, or a bad import)")


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

    ``divergence`` (``"kl"``, ``"reverse_kl"``, ``"jsd:BETA"``; :mod:`.divergences`) is taken between
    the same two (K+1)-bucket distributions: as exact as the KL (both sides are known on the
    buckets), and like it a lower bound of the divergence over the whole vocabulary.

    Shapes: ``student_logits`` ``(B, *P, V)``; ``values``/``indices`` ``(B, *P, K)``;
    ``logsumexp`` ``(B, *P)``; ``mask`` ``(B, *P)``. Reduction as in :class:`KLDivLoss`. Kept
    probabilities summing to more than 1 beyond float16 rounding (a negative tail) at a position
    that counts raise :class:`TargetsError` rather than being clamped.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean",
                 divergence: str | Divergence = "kl") -> None:
        super().__init__()
        self.temperature, self.reduction = check_temperature(temperature), reduction
        self.divergence = Divergence.parse(divergence)

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
            _refuse_excess(z, lse, mask, "top-k")  # a tail below 0 beyond rounding is refused, not clamped
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
        if self.divergence.name == "kl":
            per_item = (torch.xlogy(q, q) - q * log_ps).sum(-1)
        else:  # the teacher's buckets floored at float32's tiny: an empty tail is not an infinite reverse KL
            per_item = self.divergence.value(q.clamp_min(torch.finfo(torch.float32).tiny).log(), log_ps)
        return reduce(per_item, mask, self.reduction) * (t * t)


class SampledKLDivLoss(nn.Module):
    """KL from a sampled cache (Random-Sampling KD): the teacher is the empirical distribution
    of N ids drawn from ``softmax(teacher_logits / T)``, ``counts / N`` over the stored ``ids``.

    Its gradient is an unbiased estimate of the dense KD gradient at temperature T (Anshumann
    et al., 2025); use the temperature the cache was sampled at (``train_student`` does).
    The value is ``T^2 * KL(counts/N || softmax(s/T))`` over the sampled ids.

    Shapes: ``student_logits`` ``(B, *P, V)``; ``ids``/``counts`` ``(B, *P, N)`` (count 0 marks an
    unused slot); ``mask`` ``(B, *P)``. Reduction as in :class:`KLDivLoss`. A position that counts
    with no draws at all (every count 0) raises :class:`TargetsError`.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__()
        self.temperature, self.reduction = check_temperature(temperature), reduction

    def forward(self, student_logits: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.shape != counts.shape or ids.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(f"sampled shapes do not fit: student {tuple(student_logits.shape)}, ids "
                             f"{tuple(ids.shape)}, counts {tuple(counts.shape)}")
        t = self.temperature
        with torch.no_grad():
            c = counts.float()
            empty = c.sum(-1) == 0  # no draws: only a position that does not count (masked padding) may have none
            if mask is not None:
                empty &= mask.bool()
            if bool(empty.any()):
                raise TargetsError(f"{int(empty.sum())} positions that count have no draws (all counts 0): not a "
                                   "distribution (a damaged or forged cache); masked positions may have none")
            q = c / c.sum(-1, keepdim=True).clamp_min(1)
        log_ps = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, ids.long())
        per_item = (torch.xlogy(q, q) - q * log_ps).sum(-1)
        return reduce(per_item, mask, self.reduction) * (t * t)


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
    ``(B, *P, N)``; ``mask`` ``(B, *P)``. Reduction as in :class:`KLDivLoss`. Head probabilities
    summing to more than 1 beyond float16 rounding raise :class:`TargetsError`.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__()
        self.temperature, self.reduction = check_temperature(temperature), reduction

    def forward(self, student_logits: torch.Tensor, logprobs: torch.Tensor, indices: torch.Tensor,
                tail: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        prefix = student_logits.shape[:-1]
        if logprobs.shape != indices.shape or logprobs.shape[:-1] != prefix or tail.shape[:-1] != prefix:
            raise ValueError(f"hybrid shapes do not fit: student {tuple(student_logits.shape)}, logprobs "
                             f"{tuple(logprobs.shape)}, indices {tuple(indices.shape)}, tail {tuple(tail.shape)}")
        t, n = self.temperature, tail.shape[-1]
        with torch.no_grad():
            _refuse_excess(logprobs, torch.zeros_like(logprobs[..., 0], dtype=torch.float32), mask, "head")
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
        return reduce(per_item, mask, self.reduction) * (t * t)
