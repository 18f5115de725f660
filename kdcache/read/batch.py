"""A batch of stage two as its DataLoader hands it over: ``(inputs, labels, teacher)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from ..losses.targets import TeacherTargets

__all__ = ["TeacherBatch", "collate"]


class TeacherBatch(Sequence):
    """A batch as :func:`collate` returns it, also usable as a list of per-row items.

    ``collated`` is ``(inputs, labels, teacher)`` with batched tensors (``teacher`` a
    :class:`TeacherTargets`, or None for plain training); indexing gives row ``i`` as
    ``(inputs_i, label_i, teacher_i)`` with plain dicts, so torch's ``default_collate`` works too.
    """

    def __init__(self, inputs: Any, labels: torch.Tensor, teacher: TeacherTargets | None) -> None:
        self.collated = (inputs, labels, teacher)

    def __len__(self) -> int:
        return len(self.collated[1])

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        inputs, labels, teacher = self.collated
        return (_row(inputs, i), (int(labels[i]) if labels.ndim == 1 else labels[i]),
                _row(teacher.as_dict(), i) if teacher is not None else {})


def _row(value: Any, i: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[i]
    if isinstance(value, dict):
        return {k: _row(v, i) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_row(v, i) for v in value)
    return value  # shared by every row: the temperature of precomputed targets, a head's weights


def collate(batch: Any) -> tuple[Any, torch.Tensor, Any]:
    """DataLoader ``collate_fn``: ``(inputs, labels, teacher)`` without per-row work (``teacher``
    a :class:`TeacherTargets`; batches of single rows are collated by ``default_collate``)."""
    if isinstance(batch, TeacherBatch):
        return batch.collated
    return tuple(default_collate(list(batch)))  # type: ignore[return-value]
