"""Decoded teacher outputs: what stage two hands to the KD losses.

A codec's ``decode`` gives a tensor of logits (dense), :class:`TopKTargets`,
:class:`SampledTargets`, :class:`HybridTargets` or :class:`HeadTargets`; their keys are the keyword
arguments of ``TopKKLDivLoss``, ``SampledKLDivLoss``, ``HybridKLDivLoss`` and ``HeadKDLoss``. A batch's decoded outputs travel
together as :class:`TeacherTargets`, shared by :mod:`kdcache.read.dataset` (which builds them) and
:mod:`kdcache.train` (which uses them).

:class:`SoftTargets` is the teacher side of the dense KD term computed ahead of training: a cache
knows the teacher's logits before the first step, so their softmax at the run's temperature and
the per-row ``sum p log p`` are computed once (:func:`teacher_side`) instead of on every step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Union

import torch

__all__ = ["TopKTargets", "SampledTargets", "HybridTargets", "SPARSE_TARGETS", "HeadWeights", "HeadTargets",
           "SoftTargets", "TeacherTargets", "LogitTargets", "map_tensors", "teacher_side"]


class _Named:
    """Field access by name too (``targets["values"]``), as the dicts of earlier releases."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Any:
        return iter(self.keys())

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default


@dataclass(frozen=True)
class TopKTargets(_Named):
    """A top-k cache's rows, the arguments of ``TopKKLDivLoss``: ``values`` (B, *P, K) (stored
    float16 or ``dtype``), ``indices`` int64 (B, *P, K), ``logsumexp`` float32 (B, *P)."""

    values: torch.Tensor
    indices: torch.Tensor
    logsumexp: torch.Tensor


@dataclass(frozen=True)
class SampledTargets(_Named):
    """A sampled cache's rows, the arguments of ``SampledKLDivLoss``: ``ids`` int64 (B, *P, N),
    ``counts`` float32 (B, *P, N) (count 0 marks an unused slot)."""

    ids: torch.Tensor
    counts: torch.Tensor


@dataclass(frozen=True)
class HybridTargets(_Named):
    """A hybrid cache's rows, the arguments of ``HybridKLDivLoss``: ``logprobs`` (B, *P, K) (stored
    float16 or ``dtype``) and ``indices`` int64 (B, *P, K) of the K most likely classes, ``tail``
    int64 (B, *P, N): N draws from the other classes."""

    logprobs: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor


SPARSE_TARGETS = (TopKTargets, SampledTargets, HybridTargets)


class HeadWeights:
    """The teacher's output layer: ``weight`` (V, H) and ``bias`` (V,) or None, held once.

    :meth:`on` gives them on a device, copied there once (later calls return that copy). Given a
    ``key`` (:meth:`shared`), one object per key and process: a batch that carries them from a
    DataLoader worker arrives as the object already here, device copies included, so no batch
    copies the weights again.
    """

    _shared: ClassVar["weakref.WeakValueDictionary[str, HeadWeights]"] = weakref.WeakValueDictionary()

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, key: str | None = None) -> None:
        self.weight, self.bias, self.key = weight, bias, key
        self._copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {weight.device: (weight, bias)}

    @classmethod
    def shared(cls, key: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "HeadWeights":
        """This process's weights under ``key`` (e.g. a cache's fingerprint), made from ``weight``
        and ``bias`` the first time."""
        found = cls._shared.get(key)
        if found is None:
            found = cls._shared[key] = cls(weight, bias, key)
        return found

    def on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` on ``device``."""
        device = torch.device(device)
        if device not in self._copies:
            self._copies[device] = (self.weight.to(device), None if self.bias is None else self.bias.to(device))
        return self._copies[device]

    def __reduce__(self) -> Any:
        if self.key is None:
            return HeadWeights, (self.weight, self.bias)
        return HeadWeights.shared, (self.key, self.weight, self.bias)

    def __repr__(self) -> str:
        return f"HeadWeights(weight {tuple(self.weight.shape)} {self.weight.dtype}, bias {self.bias is not None})"


@dataclass(frozen=True)
class HeadTargets(_Named):
    """A head cache's rows: ``hidden`` (B, *P, H), the input of the teacher's output layer (stored
    float16, or ``dtype``), and ``head``, that layer (:class:`HeadWeights`). Its keys ``hidden``,
    ``weight``, ``bias`` (the layer's on ``hidden``'s device) are ``HeadKDLoss``'s arguments."""

    hidden: torch.Tensor
    head: HeadWeights | None = None

    @property
    def weight(self) -> torch.Tensor:
        if self.head is None:
            raise ValueError("these head targets carry no output layer (HeadWeights)")
        return self.head.on(self.hidden.device)[0]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.head is None else self.head.on(self.hidden.device)[1]

    def keys(self) -> list[str]:
        return ["hidden", "weight", *(["bias"] if self.head is not None and self.head.bias is not None else [])]


@dataclass(frozen=True)
class SoftTargets(_Named):
    """A dense cache's rows with the teacher side of the KD term precomputed at ``temperature``:
    ``probs`` (B, *P, C) = softmax(logits / T) (float16, or float32 for a float32 cache) and
    ``neg_entropy`` float32 (B, *P) = sum_c p log p, computed in float32 from the logits.
    ``KLDivLoss(T)`` and ``SoftTargetCrossEntropy(T)`` take it in place of the teacher's logits."""

    probs: torch.Tensor
    neg_entropy: torch.Tensor
    temperature: float


def teacher_side(logits: torch.Tensor, temperature: float, dtype: torch.dtype = torch.float32,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p, p)`` of ``p = softmax(logits / temperature)`` over the last axis, computed in
    ``dtype`` (both shaped like ``logits``): the KD term's teacher side. ``SoftTargets`` holds
    ``p`` and ``(p * log p).sum(-1)``."""
    log_p = torch.log_softmax(logits.to(dtype) * (1.0 / temperature), dim=-1)
    return log_p, log_p.exp()


LogitTargets = Union[torch.Tensor, TopKTargets, SampledTargets, HybridTargets, HeadTargets, SoftTargets]


def map_tensors(value: Any, fn: Any, leaf: type = torch.Tensor) -> Any:
    """``fn`` applied to every tensor (every ``leaf``) of a tensor, dict, tuple or dataclass
    (targets) structure; other values are kept."""
    if isinstance(value, leaf):
        return fn(value)
    if is_dataclass(value) and not isinstance(value, type):
        return type(value)(**{f.name: map_tensors(getattr(value, f.name), fn, leaf) for f in fields(value)})
    if isinstance(value, dict):
        return {k: map_tensors(v, fn, leaf) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn, leaf) for v in value)
    return value


@dataclass(frozen=True)
class TeacherTargets(_Named):
    """A batch's cached teacher outputs: ``logits`` (a tensor, :class:`TopKTargets`,
    :class:`SampledTargets`, :class:`HybridTargets` or :class:`HeadTargets`), ``hidden`` (module name -> tensor) and, for
    sequence caches, ``mask`` (B, L) bool, True for real tokens. ``targets["logits"]`` works as well."""

    logits: Any
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TeacherTargets":
        return map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def as_dict(self) -> dict[str, Any]:
        """``{"logits": tensor or dict, "hidden": {...}, "mask"?: ...}``: plain containers (e.g.
        for ``default_collate``)."""
        logits = (self.logits if isinstance(self.logits, torch.Tensor) else
                  {"hidden": self.logits.hidden, "head": self.logits.head} if isinstance(self.logits, HeadTargets) else
                  {k: self.logits[k] for k in self.logits.keys()})
        return {"logits": logits, "hidden": dict(self.hidden), **({"mask": self.mask} if self.mask is not None else {})}
