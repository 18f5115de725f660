"""How closely the student follows the teacher, epoch by epoch, and the overfit-to-cache warning.

A cache holds one teacher output per row, so a student trained from it sees the same targets
every epoch and can fit those rows rather than the teacher: Beyer et al. ("Knowledge
distillation: a good teacher is patient and consistent", 2022) find that students distilled
from precomputed teacher outputs overfit, where fresh augmented views keep them matching the
teacher. :class:`TeacherFit` measures, after each epoch, the KD term and the top-1 agreement
between student and teacher on a fixed sample of training rows and, given an eval cache (the
teacher's outputs on held-out data), on held-out rows; :func:`growing_gap` says when the
held-out KL keeps pulling away from the training KL.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..errors import KdcacheError, KdcacheWarning, option
from ..losses.head import head_top1
from ..losses.targets import (HeadTargets, HybridTargets, LogitTargets, SampledTargets, SoftTargets, TeacherTargets,
                              TopKTargets)
from ..models.forward import autocast, call_model, move_inputs, select_output
from ..read.batch import collate
from ..read.dataset import CachedTeacherDataset
from ..store.identity import same_teacher
from .kdterm import REGRESSION

__all__ = ["TeacherFit", "OverfitToCacheWarning", "growing_gap", "teacher_fit", "top1"]

SAMPLE_ROWS = 2048  # rows measured per side and epoch: enough for a stable mean, bounded in cost


def top1(logits: LogitTargets, classes: int | None = None) -> torch.Tensor:
    """The most likely class per position, int64 (B, *P): the argmax of dense logits (over the
    first ``classes``, the real vocabulary), a top-k or hybrid row's first kept id (kept in
    descending order), a sampled row's most drawn id (an estimate), precomputed probabilities' argmax, or
    the argmax of a head cache's ``h @ W.T + b`` (computed a chunk of positions at a time)."""
    if isinstance(logits, HeadTargets):
        return head_top1(logits.hidden, logits.weight, logits.bias, classes)
    if isinstance(logits, (TopKTargets, HybridTargets)):
        return logits.indices[..., 0]
    if isinstance(logits, SampledTargets):
        return logits.ids.gather(-1, logits.counts.argmax(-1, keepdim=True)).squeeze(-1)
    if isinstance(logits, SoftTargets):  # precomputed probabilities: the same argmax as the logits
        return logits.probs.argmax(-1)
    return (logits[..., :classes] if classes is not None else logits).argmax(-1)


class OverfitToCacheWarning(KdcacheWarning):
    """The student fits the cached rows and drifts from the teacher on held-out rows."""


def growing_gap(train_kl: Sequence[float], eval_kl: Sequence[float], *, epochs: int = 3,
                ratio: float = 1.5) -> bool:
    """True when, over the last ``epochs`` epochs, ``eval_kl - train_kl`` grew every epoch while
    the held-out KL stopped improving (none of them below its value ``epochs`` epochs ago), and
    the held-out KL is now at least ``ratio`` times the training KL (a gap that matters, not
    noise around two equal values)."""
    if len(train_kl) != len(eval_kl) or len(eval_kl) < epochs + 1:
        return False
    recent_train, recent_eval = train_kl[-epochs - 1:], eval_kl[-epochs - 1:]
    if not all(math.isfinite(v) for v in (*recent_train, *recent_eval)):
        return False
    gaps = [e - t for t, e in zip(recent_train, recent_eval)]
    growing = all(b > a for a, b in zip(gaps, gaps[1:]))
    stalled = min(recent_eval[1:]) >= recent_eval[0]
    return growing and stalled and recent_eval[-1] >= ratio * max(recent_train[-1], 1e-12)


class TeacherFit:
    """After each epoch: the student's KD term and top-1 agreement with the teacher on a fixed
    sample of training rows (``train_kl``, ``agree``) and on held-out rows (``eval_kl``,
    ``eval_agree``), in eval mode, with the weights the epoch ended with.

    Args:
        train: the training rows (``__getitems__`` giving batches as the training loader does).
        teacher_of: ``(inputs on the device, cached targets or None) -> TeacherTargets``: the
            batch's teacher outputs (from the cache, or a live teacher).
        kd: ``(student logits, teacher logits, mask) -> scalar``: the run's KD term (batchmean,
            x T^2), so ``train_kl`` is on the scale of the ``kd`` column.
        held_out: a :class:`~kdcache.CachedTeacherDataset` over the eval set and its cache.
        classes: the teacher's real class count (student logits beyond it are cut).
        rows: rows measured per side (a seeded sample, the same every epoch).
        output_key: the student's output compared with the teacher's (None: its logits).
        agreement: record top-1 agreement (False for a regression target, which has no classes).
    """

    def __init__(self, train: Any, teacher_of: Callable[[Any, Any], TeacherTargets | None],
                 kd: Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor], *, held_out: Any = None,
                 classes: int | None, batch_size: int, device: torch.device, amp: str, seed: int,
                 rows: int = SAMPLE_ROWS, output_key: str | None = None, agreement: bool = True) -> None:
        self.train, self.held_out, self.teacher_of, self.kd = train, held_out, teacher_of, kd
        self.classes, self.batch_size, self.device, self.amp = classes, batch_size, device, amp
        self.output_key, self.agreement = output_key, agreement
        self.train_rows = self._sample(len(train), rows, seed)
        self.held_out_rows = self._sample(len(held_out), rows, seed) if held_out is not None else None
        self.warned = False

    @staticmethod
    def _sample(n: int, rows: int, seed: int) -> np.ndarray:
        if n <= rows:
            return np.arange(n)
        return np.sort(np.random.default_rng([seed, 0xF17]).choice(n, rows, replace=False))

    def measure(self, student: nn.Module) -> dict[str, float]:
        """``train_kl``, ``agree`` and, with held-out rows, ``eval_kl``, ``eval_agree``."""
        record = dict(zip(("train_kl", "agree"), self._fit(student, self.train, self.train_rows)))
        if self.held_out is not None:
            record.update(zip(("eval_kl", "eval_agree"), self._fit(student, self.held_out, self.held_out_rows)))
        if not self.agreement:
            record = {k: v for k, v in record.items() if k not in ("agree", "eval_agree")}
        return record

    def _fit(self, student: nn.Module, data: Any, rows: np.ndarray) -> tuple[float, float]:
        """(mean KD term per row, share of positions where student and teacher agree on top-1)."""
        was_training = student.training
        student.eval()
        kd_sum, seen, agree, positions = 0.0, 0, 0, 0
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                inputs, _, cached = collate(data.__getitems__(rows[start:start + self.batch_size].tolist()))
                inputs = move_inputs(inputs, self.device)
                teacher = self.teacher_of(inputs, cached)
                if teacher is None:
                    continue
                with autocast(self.amp, self.device):
                    logits = select_output(call_model(student, inputs), self.output_key, role="student").float()
                n = logits.shape[0]
                kd_sum += float(self.kd(logits, teacher.logits, teacher.mask)) * n
                seen += n
                if not self.agreement:
                    continue
                same = top1(logits, self.classes) == top1(teacher.logits, self.classes)
                if teacher.mask is not None:
                    same = same & teacher.mask
                agree += int(same.sum())
                positions += int(teacher.mask.sum()) if teacher.mask is not None else same.numel()
        student.train(was_training)
        return kd_sum / max(seen, 1), agree / max(positions, 1)

    def check(self, metrics: Sequence[dict[str, Any]]) -> str | None:
        """The warning, the first time the held-out KL keeps pulling away from the training KL."""
        if self.warned or self.held_out is None:
            return None
        train_kl = [m.get("train_kl", math.nan) for m in metrics]
        eval_kl = [m.get("eval_kl", math.nan) for m in metrics]
        if not growing_gap(train_kl, eval_kl):
            return None
        self.warned = True
        last = metrics[-1]
        return (f"the student is fitting the cached rows, not the teacher: for 3 epochs its KL to the teacher on "
                f"held-out rows has not improved while the one on training rows kept falling (epoch "
                f"{last.get('epoch')}: train {train_kl[-1]:.4g}, held-out {eval_kl[-1]:.4g}); dump the training set "
                f"with several augmentation views per sample ({option('views')}; Beyer et al. 2022), add data, "
                "or stop earlier")


def teacher_fit(data: Any, eval_dataset: Any, eval_cache: Any, teacher_of: Callable[[Any, Any], TeacherTargets | None],
                kd: Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor], *, live_teacher: bool,
                cfg: TrainConfig, device: torch.device, amp: str) -> TeacherFit | None:
    """The run's :class:`TeacherFit` (None in plain training, which has no teacher), on the eval
    set's rows too when ``eval_cache`` (the same teacher's cache of ``eval_dataset``) is given."""
    cached = isinstance(data, CachedTeacherDataset)
    held_out = None
    if eval_cache is not None:
        if eval_dataset is None or not cached:
            raise KdcacheError(f"{option('eval_cache')} needs {option('eval_dataset')} (the data it was dumped from) "
                               f"and {option('cache')}")
        try:
            held_out = CachedTeacherDataset(eval_dataset, eval_cache, hidden=(), dtype=None, view=cfg.view,
                                            check_inputs=not cfg.allow_input_mismatch)
        except KdcacheError as err:  # say which of the run's two caches it is
            raise KdcacheError(f"{option('eval_cache')} with {option('eval_dataset')}: {err}") from None
        # digests of two schemes (a cache of an earlier release) cannot tell: trust the user there
        if same_teacher(held_out.meta.teacher.weights_digest, data.meta.teacher.weights_digest) is False:
            raise KdcacheError(f"{option('eval_cache')} {held_out.path} holds another teacher's outputs than "
                               f"{option('cache')} {data.path}: dump the eval set with the same teacher")
        if held_out.meta.logits.codec.name != data.meta.logits.codec.name:
            raise KdcacheError(f"{option('eval_cache')} stores {held_out.meta.logits.codec.name} logits, "
                               f"{option('cache')} {data.meta.logits.codec.name}: dump both the same way")
    if not cached and not live_teacher:
        return None
    return TeacherFit(data, teacher_of, kd, held_out=held_out, classes=data.meta.vocab.real if cached else None,
                      batch_size=cfg.batch_size, device=device, amp=amp, seed=cfg.seed, output_key=cfg.output_key,
                      agreement=cfg.objective not in REGRESSION)  # classes to agree on
