"""Hidden-state terms: FitNets hints (MSE or cosine, with a learned projection between widths)
and attention transfer between conv feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .reduction import reduce

__all__ = ["HiddenStateLoss", "AttentionTransferLoss"]


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
            return reduce(per_item, mask, "batchmean")
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
