"""Block and chunk planning: every array is chunked along rows only, and a write block covers
whole chunks of every array, so no two writers ever touch one chunk."""

from __future__ import annotations

from ..errors import KdcacheError, option

__all__ = ["plan_blocks", "chunk_key", "TARGET_CHUNK_BYTES", "MAX_BLOCK_BYTES"]

TARGET_CHUNK_BYTES = 2 << 20
MAX_BLOCK_BYTES = 128 << 20
MAX_CHUNK_ROWS = 1 << 16
# The block is the unit of resumable work: an interrupt loses at most the blocks being filled.
# 1,024 rows is ~10 s of a teacher that manages 100 rows/s; a cache of 1M rows then has ~1,000
# blocks (a few files each), which costs the dump and the readers little (docs/benchmarks.md).
MAX_BLOCK_ROWS = 1024


def plan_blocks(row_bytes: dict[str, int], rows: int, block_rows: int | None = None) -> tuple[int, dict[str, int]]:
    """Pick the write block and each array's chunk rows (powers of two, chunks divide blocks).

    Each array aims at ~2 MB chunks (never more rows than the cache has, rounded up to a
    power of two, since zarr stores an edge chunk at full size); the block is the largest
    chunk, at most 1,024 rows (the unit of resumable work) and 128 MB of all arrays together
    (a block is held in host memory until written); chunks never span blocks.
    """
    cap = min(MAX_CHUNK_ROWS, 1 << max(0, rows - 1).bit_length())
    ideal = {p: max(1, min(cap, 1 << max(0, (TARGET_CHUNK_BYTES // max(b, 1)).bit_length() - 1)))
             for p, b in row_bytes.items()}
    total = sum(row_bytes.values()) + 8
    if block_rows is None:
        block_rows = min(max(ideal.values()), MAX_BLOCK_ROWS)
        while block_rows > 1 and block_rows * total > MAX_BLOCK_BYTES:
            block_rows //= 2
    elif block_rows < 1:
        raise KdcacheError(f"block rows must be >= 1, got {block_rows}")
    elif block_rows * total > 64 * MAX_BLOCK_BYTES:  # a block is held in host memory until written
        raise KdcacheError(f"{option('block_rows', block_rows)} would hold {block_rows * total / 1e9:.1f} GB of "
                           f"outputs in memory per block; choose at most {64 * MAX_BLOCK_BYTES // total} rows")
    else:  # a block beyond the rows would only pad its chunks (the row digests' is a whole block)
        block_rows = min(block_rows, 1 << max(0, rows - 1).bit_length())
    chunks = {}
    for p, chunk in ideal.items():
        chunk = min(chunk, block_rows)
        while block_rows % chunk:
            chunk //= 2
        chunks[p] = chunk
    return block_rows, chunks


def chunk_key(path: str, ndim: int, chunk: int) -> str:
    """Store key of row-chunk ``chunk`` of the ``ndim``-dimensional array at ``path``: zarr's
    default encoding with "/" (chunks span every other axis), which every cache array has
    (checked at open)."""
    return f"{path}/c/{chunk}" + "/0" * (ndim - 1)
