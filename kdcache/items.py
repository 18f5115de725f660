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
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset, default_collate

from .errors import KdcacheError, option

__all__ = ["as_rows", "split_item", "fetch_batch", "collate_items", "row_digests", "input_mask", "move_inputs",
           "resolve_device", "resolve_amp",
           "autocast", "call_model", "select_output"]

LABEL_KEYS = ("label", "labels")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


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
    torch tensors (:func:`kdcache.hfdata.prepare`); anything else is returned as it is."""
    from .hfdata import is_hf_dataset, prepare  # imports datasets only for a datasets object

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
                           f"--max-length): {err}") from None
    labels = [p[1] for p in pairs]
    if any(isinstance(y, torch.Tensor) for y in labels):
        try:
            return inputs, torch.stack([y if isinstance(y, torch.Tensor) else torch.full_like(labels[0], -1)
                                        for y in labels])
        except RuntimeError as err:
            raise KdcacheError(f"token labels of rows {indices[0]}..{indices[-1]} differ in length: {err}") from None
    return inputs, torch.tensor(labels, dtype=torch.long)


def _leaves(inputs: Any) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, dict):
        return [leaf for key in sorted(inputs) for leaf in _leaves(inputs[key])]
    if isinstance(inputs, (tuple, list)):
        return [leaf for value in inputs for leaf in _leaves(value)]
    raise KdcacheError(f"dataset inputs must be tensors, tuples or dicts of tensors, got {type(inputs).__name__}")


@lru_cache(maxsize=64)
def _multipliers(words: int) -> np.ndarray:
    rng = np.random.default_rng(0x6B64_6361_6368_65)
    return rng.integers(0, 2**64, size=words, dtype=np.uint64, endpoint=False) | np.uint64(1)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_digests(inputs: Any, mask: torch.Tensor | None = None) -> np.ndarray:
    """A 64-bit digest of each row's input bytes, shape ``(B,)`` uint64, vectorised.

    Each row's bytes are read as 64-bit words and summed with fixed odd multipliers
    (mod 2^64), then mixed: a change of any single word always changes the digest, and
    reordered rows change it wherever their inputs differ. Not a cryptographic hash: it
    detects misalignment and edits, not tampering.

    With ``mask`` (B, L) (packed caches), leaves with that (B, L) prefix are digested over
    their real positions only, in order: the digest does not depend on how much padding a row
    has, nor on which side.
    """
    digest = None
    for leaf in _leaves(inputs):
        rows = leaf.detach().cpu()
        b = rows.shape[0]
        real = None
        if mask is not None and rows.ndim >= 2 and tuple(rows.shape[:2]) == tuple(mask.shape):
            rows, real = _real_positions_first(rows, mask.cpu().bool())
        rows = rows.contiguous()
        raw = rows.reshape(b, -1).view(torch.uint8) if rows.numel() else torch.zeros((b, 0), dtype=torch.uint8)
        nbytes = raw.shape[1]
        if nbytes % 8:
            raw = torch.cat([raw, raw.new_zeros((b, 8 - nbytes % 8))], dim=1)
        words = raw.view(torch.int64)
        words = words.numpy().view(np.uint64)
        multipliers = _multipliers(words.shape[1])
        # uint64 arithmetic wraps mod 2^64; einsum streams short rows fastest, matmul long ones
        h = (np.einsum("ij,j->i", words, multipliers) if words.shape[1] < 1 << 14 else words @ multipliers)
        if real is None:
            h = h + np.uint64(nbytes)
        else:  # trailing zeros add nothing to the sum: the real bytes alone count
            position_bytes = rows[0, 0].numel() * rows.element_size() if rows.shape[1] else 0
            h = h + real.astype(np.uint64) * np.uint64(position_bytes)
        digest = _mix(h) if digest is None else _mix(digest * np.uint64(0x9E3779B97F4A7C15) + _mix(h))
    assert digest is not None
    return digest


def _real_positions_first(rows: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """``rows`` (B, L, ...) with each row's real positions moved to the front, in order, and
    zeros after them; and each row's count of real positions."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    counts = mask.sum(1)
    index = order.view(*order.shape, *([1] * (rows.ndim - 2))).expand_as(rows)
    keep = (torch.arange(mask.shape[1]).view(1, -1) < counts.view(-1, 1))
    keep = keep.view(*keep.shape, *([1] * (rows.ndim - 2))).expand_as(rows)
    moved = torch.where(keep, rows.gather(1, index), torch.zeros((), dtype=rows.dtype))
    return moved, counts.numpy()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda when present, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"{option('device', str(device))} was asked for but no CUDA device is visible; use "
                           f"{option('device', 'cpu')}")
    return dev


def input_mask(inputs: Any, mask_key: str | None) -> torch.Tensor | None:
    """The (B, L) attention mask of dict inputs, as bool, or None."""
    if not mask_key or not isinstance(inputs, dict) or mask_key not in inputs:
        return None
    mask = inputs[mask_key]
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise KdcacheError(f"inputs[{mask_key!r}] must be a (batch, length) tensor, got "
                           f"{getattr(mask, 'shape', type(mask).__name__)}")
    return mask.bool()


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``none`` elsewhere; other values as given."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    if amp not in AMP_DTYPES:
        raise KdcacheError(f"{option('amp')} must be auto, bf16, fp16 or none, got {amp!r}")
    return amp


def autocast(amp: str, device: torch.device) -> AbstractContextManager[Any]:
    """A fresh autocast context for a resolved ``amp`` (``nullcontext`` for ``none``)."""
    dtype = AMP_DTYPES[resolve_amp(amp, device)]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def move_inputs(inputs: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move a tensor / tuple / dict of tensors to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=non_blocking)
    if isinstance(inputs, dict):
        return {k: move_inputs(v, device, non_blocking) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(move_inputs(v, device, non_blocking) for v in inputs)
    return inputs


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """``model(x)``, ``model(*x)`` for a tuple, ``model(**x)`` for a dict."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def select_output(output: Any, key: str | None) -> torch.Tensor:
    """The logits tensor out of a tensor, tuple, dict or object with ``.logits``."""
    if key is not None:
        if isinstance(output, (tuple, list)):
            if not key.lstrip("-").isdigit() or not -len(output) <= int(key) < len(output):
                raise KdcacheError(f"{option('output_key', key)}: the teacher returns a tuple of {len(output)}; use an index")
            picked = output[int(key)]
        elif isinstance(output, dict) or hasattr(output, "keys"):
            if key not in output:
                raise KdcacheError(f"{option('output_key', key)} not in the teacher's output keys {list(output.keys())}")
            picked = output[key]
        elif hasattr(output, key):
            picked = getattr(output, key)
        else:
            raise KdcacheError(f"{option('output_key', key)}: the teacher returns a {type(output).__name__} without it")
    elif isinstance(output, torch.Tensor):
        picked = output
    elif hasattr(output, "logits") and isinstance(getattr(output, "logits"), torch.Tensor):
        picked = output.logits
    elif isinstance(output, dict):
        if "logits" not in output:
            raise KdcacheError(f"the teacher returns a dict without 'logits' (keys {list(output)}); choose one with {option('output_key')}")
        picked = output["logits"]
    elif isinstance(output, (tuple, list)) and output:
        picked = output[0]
    else:
        raise KdcacheError(f"the teacher returns a {type(output).__name__}; return a tensor, tuple, dict or .logits")
    if not isinstance(picked, torch.Tensor):
        raise KdcacheError(f"the selected teacher output is a {type(picked).__name__}, not a tensor; "
                           f"choose another with {option('output_key')}")
    return picked
