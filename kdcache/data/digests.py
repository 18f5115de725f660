"""Row digests: a 64-bit digest of each row's input bytes, so stage two can tell that a row is
the input the teacher saw at dump time."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ..errors import KdcacheError

__all__ = ["row_digests"]

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
