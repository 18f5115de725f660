"""The batch order of stage two: shuffled batches that read few chunks of a disk-backed cache."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler

from ..errors import KdcacheError

__all__ = ["ChunkShuffleBatchSampler"]


class ChunkShuffleBatchSampler(Sampler[list[int]]):
    """Shuffled batches that read few chunks: blocks of ``unit_rows`` rows are shuffled, then
    rows are shuffled within windows of ``window_units`` blocks and cut into batches.

    With ``unit_rows=None`` it is a plain shuffle of all rows. ``set_epoch(e)`` reseeds it as
    ``DistributedSampler`` does; the order depends on (seed, epoch) only. With ``world`` > 1,
    rank ``rank`` takes batches ``rank, rank + world, ...`` (the last ``< world`` are dropped).
    """

    def __init__(self, rows: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 unit_rows: int | None = None, window_units: int = 1, drop_last: bool = False,
                 on_epoch: Callable[[int], None] | None = None, rank: int = 0, world: int = 1,
                 on_window: Callable[[np.ndarray], None] | None = None) -> None:
        if batch_size < 1:
            raise KdcacheError(f"batch size must be >= 1, got {batch_size}")
        self.rows, self.batch_size, self.shuffle, self.seed = rows, batch_size, shuffle, seed
        self.unit_rows, self.window_units, self.drop_last = unit_rows, max(1, window_units), drop_last
        self.epoch, self.on_epoch, self.rank, self.world = 0, on_epoch, rank, world
        self.on_window = on_window  # told the rows of the window after the one batches now come from

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.on_epoch is not None:  # e.g. the dataset's augmentation view
            self.on_epoch(epoch)

    def windows(self) -> list[np.ndarray]:
        """The epoch's rows, window by window (one window without ``unit_rows``)."""
        if not self.shuffle:
            return [np.arange(self.rows)]
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.unit_rows is None or self.unit_rows >= self.rows:
            return [rng.permutation(self.rows)]
        starts = rng.permutation(np.arange(0, self.rows, self.unit_rows))
        parts = []
        for w in range(0, len(starts), self.window_units):
            window = np.concatenate([np.arange(s, min(s + self.unit_rows, self.rows)) for s in starts[w:w + self.window_units]])
            parts.append(rng.permutation(window))
        return parts

    def order(self) -> np.ndarray:
        return np.concatenate(self.windows())

    def __iter__(self) -> Iterator[list[int]]:
        windows = self.windows()
        order = np.concatenate(windows)
        ends = np.cumsum([len(w) for w in windows])
        starts = range(0, len(order), self.batch_size)
        told = 0  # windows whose successor the reader was told about
        if self.on_window is not None:
            self.on_window(windows[0])
        # under DDP every rank takes every world-th batch (whole batches keep chunk locality),
        # and all ranks take the same number of steps
        for start in list(starts)[self.rank:len(self) * self.world:self.world]:
            now = int(np.searchsorted(ends, start, side="right"))
            if self.on_window is not None and now + 1 < len(windows) and told <= now:
                self.on_window(windows[now + 1])  # read while this window's batches train
                told = now + 1
            yield order[start:start + self.batch_size].tolist()

    def __len__(self) -> int:
        batches = self.rows // self.batch_size if self.drop_last else -(-self.rows // self.batch_size)
        return batches // self.world
