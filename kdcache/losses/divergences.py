"""The divergences a KD term can minimise between the teacher's softened distribution ``p`` and the
student's ``q = softmax(s / T)``: Hinton's forward KL ``KL(p || q)``, the reverse (mode-seeking) KL
``KL(q || p)`` of MiniLLM (Gu et al., 2024), and the generalised Jensen-Shannon divergence
``JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``, of GKD
(Agarwal et al., 2024): ``jsd:0.5`` is the symmetric JSD, and ``JSD(beta) / beta`` tends to the
forward KL as beta goes to 0.

:class:`Divergence` gives each one's value per position and its gradient with respect to the
student's logits in closed form; the dense losses here, the top-k loss and the fused head loss
(:mod:`.head`) share it. Every loss is ``T^2 * divergence``, so gradients keep their size as T
changes, as Hinton's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .reduction import check_temperature, reduce, reduction_weights

__all__ = ["Divergence", "DIVERGENCES", "DivergenceLoss", "ReverseKLDivLoss", "JSDivLoss"]

DIVERGENCES = ("kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class Divergence:
    """One of :data:`DIVERGENCES`; ``beta`` (0 < beta < 1) is the generalised JSD's mixing weight
    (the teacher's share of the mixture ``m``)."""

    name: str = "kl"
    beta: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in DIVERGENCES:
            raise ValueError(f"the divergence must be one of kl, reverse_kl, jsd or jsd:BETA, got {self.name!r:.40}")
        if self.name == "jsd" and not 0 < self.beta < 1:
            raise ValueError(f"jsd's beta must be within (0, 1), got {self.beta}")

    @classmethod
    def parse(cls, text: "str | Divergence") -> "Divergence":
        """``kl``, ``reverse_kl``, ``jsd`` (beta 0.5) or ``jsd:BETA``."""
        if isinstance(text, Divergence):
            return text
        name, colon, beta = str(text).partition(":")
        if colon and name != "jsd":
            raise ValueError(f"only jsd takes a parameter (jsd:BETA), got {text!r:.40}")
        try:
            value = float(beta) if colon else 0.5
        except ValueError:
            raise ValueError(f"jsd:BETA needs a number within (0, 1), got {text!r:.40}") from None
        return cls(name, value)

    def __str__(self) -> str:
        return f"jsd:{self.beta:g}" if self.name == "jsd" else self.name

    def _log_mixture(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        return torch.logaddexp(log_p + math.log(self.beta), log_q + math.log1p(-self.beta))

    def value(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """(..., C) log-probabilities of teacher and student -> (...,) the divergence, summed over
        the last axis (classes where the weighting distribution is 0 count 0)."""
        p, q = log_p.exp(), log_q.exp()
        if self.name == "kl":
            return _weighted(p, log_p - log_q)
        if self.name == "reverse_kl":
            return _weighted(q, log_q - log_p)
        log_m = self._log_mixture(log_p, log_q)
        return self.beta * _weighted(p, log_p - log_m) + (1 - self.beta) * _weighted(q, log_q - log_m)

    def grad(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """(..., C): the gradient of :meth:`value` with respect to ``s / T``, the student's logits
        over the temperature (the loss's gradient with respect to ``s`` is ``T`` times it, for
        ``T^2 * value``). With ``g = d value / d q``, it is ``q * (g - sum q g)``: ``q - p`` for
        the forward KL, ``g = log q - log p`` for the reverse KL, ``g = (1 - beta) log(q / m)``
        for the JSD."""
        q = log_q.exp()
        if self.name == "kl":
            return q - log_p.exp()
        g = log_q - log_p if self.name == "reverse_kl" else (1 - self.beta) * (log_q - self._log_mixture(log_p, log_q))
        g = torch.where(q > 0, g, 0.0)  # a class the student gives no mass adds nothing (and no inf - inf)
        return q * (g - (q * g).sum(-1, keepdim=True))


def _weighted(weight: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """``sum weight * log_ratio`` over the last axis, 0 where ``weight`` is 0 (not 0 * inf)."""
    return torch.where(weight > 0, weight * log_ratio, 0.0).sum(-1)


class _DenseDivergence(torch.autograd.Function):
    """``T^2 * divergence(softmax(t/T), softmax(s/T))`` per row, reduced, with the closed-form
    gradient: one graph node, as Hinton's KL in :mod:`.dense`."""

    @staticmethod
    def forward(ctx: Any, student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float, div: Divergence,
                weights: torch.Tensor | None, scale: float, reduce_: bool) -> torch.Tensor:
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        log_q = torch.log_softmax(student_logits.to(dtype) / t, dim=-1)
        log_p = torch.log_softmax(teacher_logits.to(dtype) / t, dim=-1)
        per_item = div.value(log_p, log_q) * (t * t)
        ctx.save_for_backward(log_p, log_q, weights)
        ctx.t, ctx.div, ctx.scale, ctx.reduce, ctx.dtype = t, div, scale, reduce_, student_logits.dtype
        if not reduce_:
            return per_item
        return (per_item if weights is None else per_item * weights).sum() * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        log_p, log_q, weights = ctx.saved_tensors
        if ctx.reduce:
            g = grad * (ctx.scale * ctx.t)
            g = g if weights is None else (weights * g).unsqueeze(-1)
        else:
            g = (grad * ctx.t).unsqueeze(-1)
        return (ctx.div.grad(log_p, log_q) * g).to(ctx.dtype), None, None, None, None, None, None


class DivergenceLoss(nn.Module):
    """``T^2 * D(softmax(t/T), softmax(s/T))`` between dense student and teacher logits, for any
    :class:`Divergence` ``D`` (its gradient in closed form).

    Args:
        divergence: ``"kl"``, ``"reverse_kl"``, ``"jsd"`` / ``"jsd:BETA"`` or a :class:`Divergence`.
        temperature: T > 0 softens both distributions; the loss is scaled by T^2.
        reduction: ``"batchmean"`` (sum over classes, mean over rows or unmasked tokens), ``"sum"``
            or ``"none"`` (per row / token), as :class:`~kdcache.losses.KLDivLoss`.

    Shapes: logits ``(B, C)`` or ``(B, L, C)``, any float dtype (computed in float32); ``mask``
    ``(B,)`` or ``(B, L)``. The teacher's logits are a constant target. Zero when the student's
    distribution equals the teacher's; ``"kl"`` equals ``KLDivLoss``.
    """

    def __init__(self, divergence: "str | Divergence" = "kl", temperature: float = 1.0,
                 reduction: str = "batchmean") -> None:
        super().__init__()
        self.divergence = Divergence.parse(divergence)
        self.temperature, self.reduction = check_temperature(temperature), reduction

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} differ in shape (vocabulary/class count?)")
        teacher_logits, t = teacher_logits.detach(), self.temperature
        if self.reduction == "none":
            per_item = _DenseDivergence.apply(student_logits, teacher_logits, t, self.divergence, None, 1.0, False)
            return reduce(per_item, mask, "none")
        weights, scale = reduction_weights(student_logits.shape[:-1], mask, self.reduction)
        return _DenseDivergence.apply(student_logits, teacher_logits, t, self.divergence, weights, scale, True)


class ReverseKLDivLoss(DivergenceLoss):
    """``T^2 * KL(softmax(s/T) || softmax(t/T))``: the reverse, mode-seeking KL (MiniLLM). Shapes
    and reduction as :class:`DivergenceLoss`."""

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__("reverse_kl", temperature, reduction)


class JSDivLoss(DivergenceLoss):
    """``T^2 * JSD(beta)``: the generalised Jensen-Shannon divergence of GKD between teacher ``p``
    and student ``q``, ``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``
    (beta = 0.5: the symmetric JSD). Shapes and reduction as :class:`DivergenceLoss`."""

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__(Divergence("jsd", beta), temperature, reduction)
