"""Augmentation views: K seeded views per sample, replayed bit for bit in stage two.

Row ``r`` of a viewed cache is view ``r % K`` of sample ``r // K``. The view's input is the
dataset's own item, produced under a seeded RNG context: torch's CPU generator, numpy's
global generator and ``random`` are forked, seeded with a value derived from
``(seed, sample, view)`` alone (never rank, worker, batch position or epoch), and restored
afterwards. Any transform that draws from those generators is thereby replayed exactly.

A dataset that prefers to record its augmentation explicitly (FKD stores crop coordinates)
implements ``sample_params(index, generator) -> 1-D tensor`` and
``apply_params(index, params) -> item``: the parameters are drawn from a generator seeded the
same way, stored with the cache (``_view_params``) and handed back to ``apply_params`` in stage
two, so replay does not even depend on the RNG's implementation.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import KdcacheError, option

__all__ = ["ViewedDataset", "view_seed", "seeded", "reseed", "preserved_rngs", "has_explicit_params"]

_MASK64 = (1 << 64) - 1


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def view_seed(seed: int, index: int, view: int) -> int:
    """The 63-bit seed of view ``view`` of sample ``index``: a function of these three only."""
    return _splitmix(_splitmix(_splitmix(seed & _MASK64) ^ index) ^ view) >> 1


def reseed(value: int) -> None:
    """Seed torch's CPU generator, numpy's global generator and ``random`` with ``value``."""
    torch.random.default_generator.manual_seed(value)
    np.random.seed(value & 0xFFFFFFFF)
    random.seed(value)


@contextmanager
def preserved_rngs() -> Iterator[None]:
    """Restore torch (CPU), numpy's global and ``random``'s generator states after the body
    (saving them costs ~0.1 ms, so a batch saves once and reseeds per row)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


@contextmanager
def seeded(value: int) -> Iterator[None]:
    """Run the body with the three generators seeded by ``value``; restore them afterwards."""
    with preserved_rngs():
        reseed(value)
        yield


def has_explicit_params(dataset: Any) -> bool:
    return callable(getattr(dataset, "sample_params", None)) and callable(getattr(dataset, "apply_params", None))


class ViewedDataset(Dataset):
    """Row ``r`` = view ``r % views`` of sample ``r // views`` of ``dataset``, seeded by ``seed``.

    With ``params`` (the cache's stored ``_view_params``), datasets with explicit parameters
    are replayed from them instead of drawing again.
    """

    def __init__(self, dataset: Any, views: int, seed: int, params: np.ndarray | None = None) -> None:
        if views < 1:
            raise KdcacheError(f"{option('views')} must be >= 1, got {views}")
        self.dataset, self.views, self.seed = dataset, int(views), int(seed)
        self.explicit = has_explicit_params(dataset)
        self.params = params

    def __len__(self) -> int:
        return len(self.dataset) * self.views

    def locate(self, row: int) -> tuple[int, int]:
        """(sample, view) of a row."""
        return row // self.views, row % self.views

    def draw_params(self, row: int) -> torch.Tensor:
        """The explicit augmentation parameters of a row, drawn from its seeded generator."""
        sample, view = self.locate(row)
        params = self.dataset.sample_params(sample, torch.Generator().manual_seed(view_seed(self.seed, sample, view)))
        params = torch.as_tensor(params, dtype=torch.float32)
        if params.ndim != 1:
            raise KdcacheError(f"sample_params must return a 1-D tensor, got shape {tuple(params.shape)}")
        return params

    def drawn_items(self, rows: Sequence[int]) -> tuple[list[Any], torch.Tensor]:
        """Explicit datasets: the items of ``rows`` and the parameters each was made with
        ``(len(rows), P)``, drawn once per row (the dump stores them)."""
        params = [self.draw_params(int(r)) for r in rows]
        with preserved_rngs():
            items = [self.dataset.apply_params(self.locate(int(r))[0], p) for r, p in zip(rows, params)]
        return items, torch.stack(params)

    def _item(self, row: int) -> Any:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} rows")
        sample, view = self.locate(row)
        if self.explicit:
            params = torch.from_numpy(self.params[row]) if self.params is not None else self.draw_params(row)
            return self.dataset.apply_params(sample, params)
        reseed(view_seed(self.seed, sample, view))
        return self.dataset[sample]

    def __getitem__(self, row: int) -> Any:
        return self.__getitems__([row])[0]

    def __getitems__(self, rows: Sequence[int]) -> list[Any]:
        with preserved_rngs():
            return [self._item(int(r)) for r in rows]
