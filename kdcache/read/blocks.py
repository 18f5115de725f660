"""Stored rows read from disk a whole write block at a time: each block read once, checked
(:meth:`TeacherCache.load_block`), and kept in a per-process LRU of bounded bytes; the blocks a
batch lacks read in parallel, and the next shuffle window's read ahead while the current one
trains. The store is opened lazily in each process (DataLoader workers), never pickled."""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

import numpy as np

from ..format.meta import ArrayInfo
from ..format.packing import token_indices
from ..store import TeacherCache
from ..store.chunkfile import io_pool

__all__ = ["BlockReader"]


class BlockReader:
    """Rows of the arrays ``arrays`` (path -> info) of the finished cache ``cache``, read by block
    into an LRU of at most ``cache_bytes``. ``packed`` is a packed cache's ``(spans, token_start,
    token_blocks)``: where each row's stored tokens lie on the token axis."""

    def __init__(self, cache: TeacherCache, arrays: dict[str, ArrayInfo], cache_bytes: int,
                 packed: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        self.path, self.arrays, self.cache_bytes, self.packed = cache.path, arrays, cache_bytes, packed
        self.rows, self.block_rows = cache.rows, cache.block_rows
        self.held: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self.held_bytes = 0
        self.ahead: dict[tuple[str, int], Future[np.ndarray]] = {}  # blocks being read ahead
        self._handle: TeacherCache | None = cache
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_pid": -1, "held": OrderedDict(), "held_bytes": 0, "ahead": {}}

    def store(self) -> TeacherCache:
        """This process's handle on the cache (opened again in a new process)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = TeacherCache.open(self.path), os.getpid()
            self.held.clear()
            self.ahead = {}
            self.held_bytes = 0
        return self._handle

    def read(self, path: str, start: int, stop: int) -> np.ndarray:
        """Stored rows (tokens, of a packed per-token array) ``start:stop`` of array ``path``,
        through the store's checked block reads: to hold the whole array in memory, in pieces."""
        return self.store().read_array(path, start, stop)

    def _read_block(self, path: str, block: int) -> np.ndarray:
        """Block ``block`` of array ``path``, read whole and checked (never a fill value)."""
        return self.store().load_block(path, block)

    def _block(self, path: str, block: int) -> np.ndarray:
        """Block ``block`` of array ``path``, read once and kept while it fits."""
        key = (path, block)
        if key in self.held:
            self.held.move_to_end(key)
            return self.held[key]
        return self._keep(key, self._read_block(path, block))

    def _keep(self, key: tuple[str, int], data: np.ndarray) -> np.ndarray:
        self.held[key] = data
        self.held_bytes += data.nbytes
        while self.held_bytes > self.cache_bytes and len(self.held) > 1:
            _, old = self.held.popitem(last=False)
            self.held_bytes -= old.nbytes
        return data

    def placed(self, path: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(positions in array path, their blocks, each block's first position)`` of rows
        ``idx``: the rows themselves, or a packed array's stored tokens of those rows."""
        if self.arrays[path].per_token:
            assert self.packed is not None
            spans, token_start, token_blocks = self.packed
            flat = token_indices(idx, spans, token_start)
            starts = token_blocks[:, 0]
            return flat, np.searchsorted(starts, flat, side="right") - 1, starts
        return idx, idx // self.block_rows, np.arange(0, self.rows, self.block_rows)

    def read_ahead(self, idx: np.ndarray) -> None:
        """Start reading, in the background, the blocks cache rows ``idx`` need and the LRU lacks."""
        self.store()  # opened here, not by the reading threads
        for path in self.arrays:
            for b in np.unique(self.placed(path, idx)[1]).tolist():
                if (path, b) not in self.held and (path, b) not in self.ahead:
                    self.ahead[(path, b)] = io_pool().submit(self._read_block, path, b)

    def _prefetch(self, path: str, blocks: np.ndarray) -> None:
        """Read the blocks of ``path`` a batch needs and the LRU lacks, in parallel: the first
        batch of a shuffle window needs most of the window's blocks, and one read at a time
        leaves the disk idle between requests."""
        for b in blocks.tolist():
            if (path, b) in self.ahead:  # read ahead of time
                self._keep((path, b), self.ahead.pop((path, b)).result())
        missing = [int(b) for b in blocks if (path, int(b)) not in self.held]
        if len(missing) < 2:
            return
        self.store()  # opened here, not by the reading threads
        reads = [io_pool().submit(self._read_block, path, b) for b in missing]
        for b, read in zip(missing, reads):
            self._keep((path, b), read.result())

    def take(self, path: str, idx: np.ndarray) -> np.ndarray:
        """Stored rows ``idx`` of a row array; of a packed per-token array, the stored tokens of
        rows ``idx``, one row after the other."""
        spec = self.arrays[path]
        positions, block_ids, offsets = self.placed(path, idx)
        out = np.empty((len(positions), *spec.shape), spec.dtype)
        # positions grouped by block once (a shuffled batch touches most blocks of its window, a
        # few rows each): one slice of the order per block instead of a mask over the batch
        order = np.argsort(block_ids, kind="stable")
        grouped = block_ids[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]]) if len(grouped) else np.zeros(0, int)
        blocks = grouped[starts]
        self._prefetch(path, blocks)
        for b, lo, hi in zip(blocks.tolist(), starts.tolist(), [*starts[1:].tolist(), len(positions)]):
            take = order[lo:hi]
            out[take] = self._block(path, b)[positions[take] - offsets[b]]
        return out
