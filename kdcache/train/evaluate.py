"""The student on labelled data: accuracy and cross-entropy, and plain training rows batched the
way the cache's are."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.items import as_rows, fetch_batch
from ..models.forward import call_model, move_inputs, resolve_device, select_output
from ..read.batch import TeacherBatch

__all__ = ["evaluate", "LabelledRows"]


class LabelledRows(Dataset):
    """Plain training data: batches of ``(inputs, labels, {})`` read the same way as the cache's."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: Sequence[int]) -> TeacherBatch:
        inputs, labels = fetch_batch(self.dataset, list(indices))
        return TeacherBatch(inputs, labels, None)

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])[0]


def evaluate(student: nn.Module, dataset: Any, *, batch_size: int = 256, device: str | torch.device | None = None,
             output_key: str | None = None) -> dict[str, float]:
    """Accuracy and cross-entropy of ``student`` over the labelled rows of ``dataset``
    (``output_key`` picks the student's logits as in :func:`~kdcache.train.train_student`)."""
    dev = resolve_device(device)
    dataset = as_rows(dataset)
    was_training = student.training
    student.eval()
    correct = seen = 0
    loss_sum = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            inputs, labels = fetch_batch(dataset, range(start, min(start + batch_size, len(dataset))))
            logits = select_output(call_model(student, move_inputs(inputs, dev)), output_key, role="student").float()
            labels = labels.to(dev)
            keep = labels >= 0
            if keep.any():
                loss_sum += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
                correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
                seen += int(keep.sum())
    student.train(was_training)
    return {"eval_acc": correct / seen if seen else float("nan"), "eval_loss": loss_sum / seen if seen else float("nan"),
            "eval_rows": seen}
