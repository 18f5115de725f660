"""Dataset items: split into inputs and label, fetch whole batches, digest each row's input.

A dataset item is ``(inputs, target)``, a dict with a ``label``/``labels`` key (the rest are
the inputs, HF style), or the inputs alone (an unlabelled transfer-set row, label -1).
Inputs may be a tensor, a tuple of tensors or a dict of tensors.

A 2-tuple is always ``(inputs, target)``, as in torch and torchvision: the target is an integer
class id (-1 = unlabelled) or per-position token labels ``(L,)`` (negative = ignored). A model
with two inputs takes them as a dict or a nested tuple, ``((a, b), target)``.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset, default_collate

from ..errors import KdcacheError, option

__all__ = ["as_rows", "split_item", "fetch_batch", "collate_items", "input_mask"]

LABEL_KEYS = ("label", "labels")


def _as_label(value: Any) -> int | None:
    """An integer class id, or None when ``value`` is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        return int(value.item())
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.integer):
        return int(value.item())
    return None


def _token_labels(value: Any) -> torch.Tensor | None:
    """Per-position integer labels (L,) of a sequence item (negative = ignored), or None."""
    if isinstance(value, np.ndarray) and value.ndim >= 1 and np.issubdtype(value.dtype, np.integer):
        value = torch.from_numpy(value)
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        return value.long()
    return None


def split_item(item: Any) -> tuple[Any, int | torch.Tensor]:
    """Return ``(inputs, label)``; the label is -1 for an unlabelled row, or a (L,) tensor of
    token labels for a sequence (negative entries are ignored)."""
    if isinstance(item, dict):
        for key in LABEL_KEYS:
            if key in item:
                label = _as_label(item[key])
                if label is None:
                    label = _token_labels(item[key])
                if label is None:
                    raise KdcacheError(f"dataset item's {key!r} must be an integer class id or a tensor of "
                                       f"token ids, got {item[key]!r}")
                return {k: v for k, v in item.items() if k != key}, label
        return item, -1
    if isinstance(item, (tuple, list)) and len(item) == 2:
        label = _as_label(item[1])
        if label is None:
            label = _token_labels(item[1])
        if label is None:
            raise KdcacheError(f"a 2-tuple dataset item is (inputs, target): its target must be an integer class id "
                               f"or a tensor of token labels, got {_describe(item[1])}; give two model inputs as a "
                               "dict or a nested tuple ((a, b), target)")
        return item[0], label
    return item, -1


def _describe(value: Any) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__}"


def as_rows(dataset: Any) -> Any:
    """The dataset as kdcache reads it: a 🤗 ``datasets.Dataset`` gives its numeric columns as
    torch tensors (:func:`kdcache.data.hf.prepare`); anything else is returned as it is."""
    from .hf import is_hf_dataset, prepare  # imports datasets only for a datasets object

    return prepare(dataset) if is_hf_dataset(dataset) else dataset


def fetch_batch(dataset: Any, indices: Sequence[int]) -> tuple[Any, torch.Tensor]:
    """Read rows ``indices`` and collate them: ``(batched inputs, int64 labels (B,))``.

    A ``TensorDataset`` is indexed once for the whole batch; a dataset with ``__getitems__``
    is asked for the batch; any other is read item by item.
    """
    # exactly TensorDataset: a subclass may transform in __getitem__; index_select is ~4x faster
    # than t[index] for a batch of rows
    if type(dataset) is TensorDataset:
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        tensors = [torch.index_select(t, 0, index) for t in dataset.tensors]
        if len(tensors) != 2:
            return (tensors[0] if len(tensors) == 1 else tuple(tensors)), torch.full((len(indices),), -1)
        target = tensors[1]  # a pair is (inputs, target), as every 2-tuple item
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            split_item((tensors[0][0], target[0]))  # the one-line refusal
        return tensors[0], target.long()
    if isinstance(indices, np.ndarray):
        indices = indices.tolist()  # datasets expect Python ints
    getitems = getattr(dataset, "__getitems__", None)
    items = getitems(list(indices)) if getitems is not None else [dataset[i] for i in indices]
    return collate_items(items, indices)


def collate_items(items: Sequence[Any], indices: Sequence[int]) -> tuple[Any, torch.Tensor]:
    """Dataset items of rows ``indices`` -> ``(batched inputs, int64 labels (B,) or (B, L))``."""
    pairs = [split_item(item) for item in items]
    try:
        inputs = default_collate([p[0] for p in pairs])
    except (RuntimeError, TypeError) as err:
        raise KdcacheError(f"dataset items of rows {indices[0]}..{indices[-1]} cannot be batched (do all inputs have "
                           "the same shape and type? token rows of different lengths need padding to one length: "
                           f"{option('max_length')}): {err}") from None
    labels = [p[1] for p in pairs]
    if any(isinstance(y, torch.Tensor) for y in labels):
        try:
            return inputs, torch.stack([y if isinstance(y, torch.Tensor) else torch.full_like(labels[0], -1)
                                        for y in labels])
        except RuntimeError as err:
            raise KdcacheError(f"token labels of rows {indices[0]}..{indices[-1]} differ in length: {err}") from None
    return inputs, torch.tensor(labels, dtype=torch.long)


def input_mask(inputs: Any, mask_key: str | None) -> torch.Tensor | None:
    """The (B, L) attention mask of dict inputs, as bool, or None."""
    if not mask_key or not isinstance(inputs, dict) or mask_key not in inputs:
        return None
    mask = inputs[mask_key]
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise KdcacheError(f"inputs[{mask_key!r}] must be a (batch, length) tensor, got "
                           f"{getattr(mask, 'shape', type(mask).__name__)}")
    return mask.bool()


