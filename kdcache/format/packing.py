"""The packed token layout: a sequence cache stores its per-token outputs for real tokens only.

Dump side: one pass over the dataset's attention masks counts each row's real tokens; each write
block's tokens then get one contiguous range of the token axis, starting at a multiple of the
token chunk (so no two blocks share a chunk, and writers never collide). The teacher's outputs
at the real positions of a batch, in order, are appended to their block's range.

Read side: a row's stored tokens go back to the positions of its batch's attention mask, in
order, whatever the padding (left, right, or none); positions without a target are zeros and
masked. A row's span ``(first, count)`` says which of its real positions have a target: all of
them for a dump, all but the last for targets imported from inference engines (the distribution
after the last token is not known).
"""

from __future__ import annotations

from typing import Any

import google_crc32c
import numpy as np
import torch

from ..data.items import fetch_batch, input_mask
from ..errors import KdcacheError, option
from ..losses.targets import map_tensors

__all__ = ["token_counts", "place_blocks", "row_token_starts", "target_mask", "token_indices", "place_tokens",
           "spans_problem", "TARGET_CHUNK_BYTES"]

TARGET_CHUNK_BYTES = 2 << 20
SLACK_FRACTION = 64  # a block's alignment slack is below 1/64 of its tokens (on average 1/128)


def token_counts(dataset: Any, mask_key: str, batch_size: int) -> np.ndarray:
    """(rows,) int64: each row's real tokens (the sum of its attention mask), read in batches."""
    counts = np.empty(len(dataset), np.int64)
    for start in range(0, len(dataset), batch_size):
        rows = range(start, min(start + batch_size, len(dataset)))
        inputs, _ = fetch_batch(dataset, rows)
        mask = input_mask(inputs, mask_key)
        if mask is None:
            raise KdcacheError(f"rows {start}.. have no inputs[{mask_key!r}]: a packed cache needs every row's "
                               f"attention mask (or dump with {option('layout', 'padded')})")
        counts[start:start + len(rows)] = mask.sum(1).numpy()
    return counts


def place_blocks(counts: np.ndarray, block_rows: int, token_bytes: int) -> tuple[int, np.ndarray, int]:
    """``(token chunk, placed, crc)``: the chunk (a power of two, ~2 MB of the widest per-token
    array, and small against a block's tokens so the slack stays small), each block's
    ``(first token, tokens)`` on the token axis (``placed``, (blocks, 2) int64), and its crc32c."""
    blocks = -(-len(counts) // block_rows)
    per_block = np.add.reduceat(counts, np.arange(0, len(counts), block_rows)) if len(counts) else np.zeros(0)
    typical = int(np.median(per_block)) if blocks else 1
    limit = max(1, min(TARGET_CHUNK_BYTES // max(token_bytes, 1), typical // SLACK_FRACTION))
    chunk = 1 << (limit.bit_length() - 1)
    placed = np.zeros((blocks, 2), np.int64)
    placed[:, 1] = per_block
    aligned = -(-per_block // chunk) * chunk
    placed[1:, 0] = np.cumsum(aligned)[:-1]
    return chunk, placed, int(google_crc32c.value(placed.tobytes()))


def row_token_starts(counts: np.ndarray, block_starts: np.ndarray, block_rows: int) -> np.ndarray:
    """(rows,) int64: where each row's stored tokens start on the token axis (its block's first
    token plus the tokens of the block's earlier rows)."""
    counts = counts.astype(np.int64)
    before = np.cumsum(counts) - counts  # tokens of all earlier rows
    first_rows = np.arange(0, len(counts), block_rows)
    block_of = np.arange(len(counts)) // block_rows
    return block_starts[block_of] + before - before[first_rows][block_of]


def spans_problem(spans: np.ndarray, tokens: int) -> str | None:
    """Why one block's stored spans ``(first, count)`` (rows, 2) cannot be its rows' (a negative
    value, or counts that do not add up to the ``tokens`` its token block holds), or None: a
    span is what a reader allocates and indexes by."""
    if spans.size and spans.min() < 0:
        return "holds a negative token span"
    total = int(spans[:, 1].sum(dtype=np.int64)) if spans.size else 0
    if total != tokens:
        return f"holds spans of {total} tokens in all, but its token block holds {tokens}"
    return None


def target_mask(mask: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the real positions (``mask``) that have a target, by each row's span
    ``(first, count)`` over its real positions."""
    rank = mask.long().cumsum(1) - 1  # index of each real position among the row's real positions
    first, count = spans[:, :1].long(), spans[:, 1:].long()
    return mask & (rank >= first) & (rank < first + count)


def token_indices(rows: np.ndarray, spans: np.ndarray, token_start: np.ndarray) -> np.ndarray:
    """Positions on the token axis of rows ``rows``' stored tokens, one row after the other."""
    counts = spans[rows, 1].astype(np.int64)
    return np.repeat(token_start[rows] - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))


def place_tokens(targets: Any, where: torch.Tensor) -> Any:
    """Decoded stored tokens (every tensor (N, ...)) placed at the True positions of ``where``
    (B, L), row by row in order: (B, L, ...) tensors with zeros elsewhere, on ``where``'s device."""
    count = int(where.sum())

    def place(flat: torch.Tensor) -> torch.Tensor:
        if len(flat) != count:
            raise KdcacheError(f"the batch has {count} positions with targets but the cache holds {len(flat)} tokens "
                               "for its rows: the dataset's attention masks changed since the dump")
        out = torch.zeros((*where.shape, *flat.shape[1:]), dtype=flat.dtype, device=where.device)
        out[where] = flat.to(where.device)
        return out
    return map_tensors(targets, place)
