"""Where stage two's teacher outputs come from: the batch (a cache, gathered where the step runs),
a live module (online KD, for comparisons) or nowhere (plain training); and the probe that checks a
student's logits against them and sizes the hint projections."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import Hint, TrainConfig
from ..errors import KdcacheError, option
from ..losses.hints import AttentionTransferLoss, HiddenStateLoss
from ..losses.targets import TeacherTargets
from ..models.capture import HiddenCapture
from ..models.forward import autocast, call_model, move_inputs, select_output
from ..read.batch import collate
from ..read.dataset import CachedTeacherDataset
from .kdterm import check_student_logits

__all__ = ["TeacherSource", "probe", "hint_loss"]


def hint_loss(hint: Hint, student_out: torch.Tensor, teacher_out: torch.Tensor) -> nn.Module:
    if hint.kind == "attention":
        if student_out.ndim != 4 or teacher_out.ndim != 4:
            raise KdcacheError(f"{option('hints')} {hint}: attention transfer needs conv maps (B, C, H, W), got student "
                               f"{tuple(student_out.shape[1:])} and teacher {tuple(teacher_out.shape[1:])}")
        return AttentionTransferLoss()
    conv = student_out.ndim == 4
    if (student_out.ndim != teacher_out.ndim or (not conv and student_out.shape[1:-1] != teacher_out.shape[1:-1])):
        raise KdcacheError(f"{option('hints')} {hint}: student output {tuple(student_out.shape[1:])} cannot be matched to "
                           f"teacher output {tuple(teacher_out.shape[1:])}")
    axis = 1 if conv else -1
    return HiddenStateLoss(hint.kind, int(student_out.shape[axis]), int(teacher_out.shape[axis]), conv=conv)


class TeacherSource:
    """Where teacher outputs come from: the batch (cache; gathered from the arrays ``held`` in
    memory, maybe on the device already), a live module (online) or nowhere (plain)."""

    def __init__(self, module: nn.Module | None, hidden: Sequence[str], device: torch.device, amp: str,
                 mask_key: str, held: CachedTeacherDataset | None = None) -> None:
        self.module = module.to(device).eval() if module is not None else None
        self.capture = HiddenCapture(self.module, hidden) if self.module is not None else None
        self.device, self.amp, self.mask_key, self.held = device, amp, mask_key, held
        if self.capture is not None:
            self.capture.__enter__()

    def outputs(self, inputs: Any, cached: TeacherTargets | None) -> TeacherTargets | None:
        if self.module is None:
            if self.held is not None and self.held.resident is not None and self.held.resident.device == self.device:
                return cached  # gathered where the step runs
            # rows arrive in their stored width (half the bytes to move); the losses widen them
            # to float32 inside their own first op on the device
            return cached.to(self.device, non_blocking=True) if cached is not None else None
        assert self.capture is not None
        with torch.inference_mode(), autocast(self.amp, self.device):
            logits = select_output(call_model(self.module, inputs), None)
            hidden = self.capture.take()
        mask = inputs.get(self.mask_key) if isinstance(inputs, dict) else None
        return TeacherTargets(logits=logits.float(), hidden={k: v.float() for k, v in hidden.items()},
                              mask=mask.bool() if isinstance(mask, torch.Tensor) and mask.shape == logits.shape[:-1]
                              else None)

    def close(self) -> None:
        if self.capture is not None:
            self.capture.__exit__(None, None, None)


def probe(student: nn.Module, data: Dataset, source: TeacherSource, capture: HiddenCapture, cfg: TrainConfig,
          dev: torch.device, amp: str) -> list[nn.Module]:
    """Run two rows through the student (eval mode, no grad) to check its logits against the
    teacher's and size the hint projections."""
    inputs, _, cached = collate(data.__getitems__(list(range(min(2, len(data))))))  # type: ignore[attr-defined]
    inputs = move_inputs(inputs, dev)
    student.eval()
    with torch.no_grad(), autocast(amp, dev):
        logits = select_output(call_model(student, inputs), cfg.output_key, role="student")
        hidden = capture.take() if cfg.hints else {}
    student.train()
    teacher = source.outputs(inputs, cached)
    if teacher is not None:
        check_student_logits(tuple(logits.shape[1:]), teacher.logits, getattr(data, "meta", None),
                             regression=cfg.objective != "kl")
    with torch.random.fork_rng(devices=[]):  # projections from the seed alone, whatever the data drew
        torch.manual_seed(cfg.seed)
        losses = [hint_loss(h, hidden[h.student], teacher.hidden[h.teacher]) for h in cfg.hints] if teacher else []
    return [m.to(dev) for m in losses]
