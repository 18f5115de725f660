"""How a KD term reduces per-row or per-token values (``batchmean`` over rows or unmasked
tokens, ``sum``, ``none``), and the checks every loss shares."""

from __future__ import annotations

import math

import torch

__all__ = ["reduce", "reduction_weights", "check_reduction", "check_temperature"]


def check_reduction(reduction: str, mask: torch.Tensor | None, shape: torch.Size) -> None:
    if reduction not in ("batchmean", "sum", "none"):
        raise ValueError(f"reduction must be 'batchmean', 'sum' or 'none', got {reduction!r}")
    if mask is not None and mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")


def check_temperature(temperature: float) -> float:
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


def reduce(per_item: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce per-row (B,) or per-token (B, L) values: mean over rows / unmasked tokens."""
    check_reduction(reduction, mask, per_item.shape)
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


def reduction_weights(shape: torch.Size, mask: torch.Tensor | None, reduction: str) -> tuple[torch.Tensor | None, float]:
    """``(per-item weights or None, scale)`` such that the reduced loss is ``scale * sum(w * per_item)``
    (``reduction`` "batchmean" or "sum")."""
    check_reduction(reduction, mask, shape)
    if mask is None:
        return None, (1.0 / max(math.prod(shape), 1) if reduction == "batchmean" else 1.0)
    weights = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    return (weights / weights.sum().clamp_min(1.0) if reduction == "batchmean" else weights), 1.0
