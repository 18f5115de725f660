"""The distillation objective as a training loop uses it, whatever the loop: kdcache's own
:func:`~kdcache.train.train_student`, :class:`kdcache.integrations.hf.KDTrainer` or the Lightning
mix-in.

:class:`KDTerm` picks the loss that fits where the teacher's outputs come from (dense logits,
a top-k, sampled, hybrid or head cache, or a dense regression target such as an embedding) and the
objective (a divergence, or mse / cosine for a regression target), cutting a student's padded
vocabulary to the teacher's real one; :func:`check_student_logits` refuses a student whose logits
cannot be compared with the teacher's; :func:`labelled_cross_entropy` is the labels' term.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import KdcacheError, option
from ..format.codecs import Codec
from ..format.meta import CacheMeta
from ..format.sparse import HybridCodec, SampledCodec
from ..losses import (DivergenceLoss, HiddenStateLoss, HybridKLDivLoss, KLDivLoss, SampledKLDivLoss,
                      TopKKLDivLoss)
from ..losses.divergences import Divergence
from ..losses.head import HeadKDLoss
from ..losses.sparse import TargetsError
from ..losses.targets import SPARSE_TARGETS, HeadTargets, SoftTargets

__all__ = ["KDTerm", "OBJECTIVES", "REGRESSION", "check_student_logits", "labelled_cross_entropy", "parse_objective"]

REGRESSION = ("mse", "cosine")
OBJECTIVES = ("kl", "reverse_kl", "jsd", "jsd:BETA", *REGRESSION)


def parse_objective(objective: str) -> Divergence | str:
    """``"mse"``/``"cosine"`` as they are, a divergence's name (``kl``, ``reverse_kl``, ``jsd``,
    ``jsd:BETA``) as a :class:`~kdcache.losses.divergences.Divergence`; anything else is one line."""
    if objective in REGRESSION:
        return objective
    try:
        return Divergence.parse(objective)
    except ValueError as err:
        raise KdcacheError(f"{option('objective', objective)}: {err} (or mse / cosine for a regression "
                           "target)") from None


class KDTerm:
    """The KD term for where the teacher's logits come from: dense (cache or online), top-k,
    sampled, hybrid or head cache; student logits are cut to the real vocabulary when the output
    layer is padded.

    Args:
        codec: the cache's logits codec (None: dense, e.g. an online teacher).
        vocab: the teacher's real vocabulary (None: no padding to cut).
        temperature: T of the divergence (default 4; a sampled or hybrid cache's own sampling temperature).
        objective: ``"kl"`` (Hinton's ``T^2 KL``), ``"reverse_kl"`` or ``"jsd:BETA"`` (GKD's
            generalised JSD) for logits (:mod:`kdcache.losses.divergences`): exact for dense and head
            caches, on the K+1 buckets for top-k caches, and refused for sampled and hybrid caches
            (their draws estimate the KL's gradient without bias, not these); or ``"mse"``/``"cosine"``
            for a dense regression target such as an embedding (:class:`~kdcache.losses.HiddenStateLoss`).
        regression: the cache holds a regression target (``CacheMeta.regression``): a divergence
            objective is refused.
    """

    def __init__(self, codec: Codec | None, vocab: int | None, temperature: float | None,
                 objective: str = "kl", *, regression: bool = False) -> None:
        self.kind = codec.name if codec is not None else "dense"
        self.vocab = vocab
        parsed = parse_objective(objective)
        if regression and not isinstance(parsed, str):
            raise KdcacheError(f"this cache holds a regression target (an embedding or hidden state, not logits): "
                               f"distil it with {option('objective', 'mse')} or {option('objective', 'cosine')}")
        if isinstance(parsed, str) and self.kind != "dense":
            raise KdcacheError(f"a {self.kind} cache holds logits: distil it with a divergence "
                               f"({option('objective', 'kl')}, reverse_kl or jsd), not {objective}")
        self.divergence = parsed if isinstance(parsed, Divergence) else None
        if self.kind in ("sampled", "hybrid") and self.divergence is not None and self.divergence.name != "kl":
            raise KdcacheError(f"a {self.kind} cache's draws estimate the KL's gradient without bias, not the "
                               f"{self.divergence}'s (which needs the teacher's log-probability wherever the student "
                               f"puts mass): train it with {option('objective', 'kl')}, or dump dense logits, a top-k "
                               f"or a head cache ({option('head')})")
        if isinstance(codec, (SampledCodec, HybridCodec)):  # trained at the temperature it was drawn at
            sampled_at = float(codec.temperature)
            if temperature is not None and temperature != sampled_at:
                raise KdcacheError(f"this cache was sampled at temperature {sampled_at:g}: train with "
                                   f"{option('temperature', sampled_at)} (or leave it out), or dump again with "
                                   f"{option('sample_temperature', temperature)}")
            temperature = sampled_at
        self.objective = str(parsed)
        self.temperature = 4.0 if temperature is None else float(temperature)
        t, div = self.temperature, self.divergence
        self.loss: torch.nn.Module
        if div is None:
            self.loss = HiddenStateLoss(self.objective)
        elif self.kind == "head":
            self.loss = HeadKDLoss(t, div)
        elif self.kind == "topk":
            self.loss = TopKKLDivLoss(t, divergence=div)
        elif self.kind in ("sampled", "hybrid"):
            self.loss = {"sampled": SampledKLDivLoss, "hybrid": HybridKLDivLoss}[self.kind](t)
        else:
            self.loss = KLDivLoss(t) if div.name == "kl" else DivergenceLoss(div, t)

    def __call__(self, student_logits: torch.Tensor, teacher: Any, mask: torch.Tensor | None) -> torch.Tensor:
        if self.divergence is None:  # a sentence embedding (B, D) of token inputs has no per-token mask
            return self.loss(student_logits, teacher, mask if mask is not None and
                             mask.shape == student_logits.shape[:-1] else None)
        if self.vocab is not None and student_logits.shape[-1] > self.vocab:
            student_logits = student_logits[..., :self.vocab]
        if isinstance(teacher, (*SPARSE_TARGETS, HeadTargets)):  # its keys are the loss's arguments
            try:
                return self.loss(student_logits, **{k: teacher[k] for k in teacher.keys()}, mask=mask)
            except TargetsError as err:  # a cache's blocks are checked as they load; this is the last guard
                raise KdcacheError(f"{err}; run kdcache verify on the cache") from None
        if isinstance(teacher, SoftTargets):  # precomputed over the real vocabulary
            if self.divergence.name != "kl":
                raise KdcacheError(f"precomputed teacher probabilities serve the kl objective, not {self.objective}: "
                                   "read the cache without precomputing them")
            return self.loss(student_logits, teacher, mask)
        return self.loss(student_logits, teacher[..., :student_logits.shape[-1]], mask)


def check_student_logits(student: tuple[int, ...], teacher: Any, meta: CacheMeta | None, *,
                         regression: bool = False) -> None:
    """Refuse a student whose positions or vocabulary disagree with the teacher's.

    ``student`` is the per-row shape of its logits (its output, for a ``regression`` target);
    ``meta`` the cache's description (None for an online teacher, whose logits ``teacher`` are
    then compared shape for shape).
    """
    if meta is None:  # online teacher: the shapes must be equal
        expected, sizes = tuple(teacher.shape[1:]), {int(teacher.shape[-1])}
    else:
        expected, sizes = meta.logits.shape, {meta.vocab.real, meta.vocab.padded}
        if meta.packed is not None and "logits" in meta.packed.outputs:  # any length: tokens are placed by the mask
            expected = (*student[:-1], expected[-1])
    if regression and (student[:-1] != expected[:-1] or not student or student[-1] != expected[-1]):
        raise KdcacheError(f"the student's output has shape {student} but the teacher's {expected}: positions and "
                           f"dimensions must agree (choose the student's output with {option('output_key')})")
    if student[:-1] != expected[:-1] or (student and student[-1] not in sizes):
        what = " or ".join(str(v) for v in sorted(sizes))
        raise KdcacheError(f"the student's logits have shape {student} but the teacher's {expected}: positions must "
                           f"agree and the vocabulary/class count must be {what} (the teacher's real or padded size)")


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows/tokens whose label is >= 0 (0 when there are none).
    Negative labels are ignored through ``ignore_index``: no boolean indexing, so no device sync.
    Row labels ``(B,)`` of token logits ``(B, L, C)`` (e.g. -1: unlabelled rows) hold for every position."""
    classes = logits.shape[-1]
    if labels.ndim == 1 and logits.ndim == 3:
        labels = labels[:, None].expand(logits.shape[:2])
    ignored = labels.clamp_min(-1)
    total = F.cross_entropy(logits.float().reshape(-1, classes), ignored.reshape(-1), ignore_index=-1, reduction="sum")
    return total / (ignored >= 0).sum().clamp_min(1)
