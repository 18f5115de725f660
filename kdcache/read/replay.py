"""Replaying a cache's rows: the seeded (sample, view) rows its dump saw, regenerated without the
teacher, and checked against the input digests the dump recorded (``kdcache verify --replay``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..data.digests import row_digests
from ..data.items import fetch_batch, input_mask
from ..data.views import ViewedDataset
from ..errors import KdcacheError
from ..format.meta import VIEW_PARAMS
from ..store import TeacherCache

__all__ = ["replay_source", "replay_mismatches"]


def replay_source(dataset: Any, opened: TeacherCache) -> Any:
    """What produces the cache's rows from ``dataset``: itself, or its seeded (sample, view)
    rows, replayed from the stored augmentation parameters when the cache has them."""
    if opened.seed is None:
        return dataset
    params = opened.read_array(VIEW_PARAMS, 0, opened.rows) if opened.view_params is not None else None
    return ViewedDataset(dataset, opened.views, opened.seed, params)


def replay_mismatches(dataset: Any, cache: TeacherCache | str | Path, n: int, *, seed: int = 0,
                      batch_size: int = 256) -> tuple[list[int], int]:
    """Regenerate ``n`` random rows' inputs (each view's transform under its recorded seed, no
    teacher) and compare their digests with those recorded at dump time.

    Returns ``(rows that differ, rows checked)``: a nondeterministic transform, an edited
    dataset or a changed RNG shows up as rows that differ.
    """
    opened = TeacherCache.open(cache.path if isinstance(cache, TeacherCache) else cache)
    source = replay_source(dataset, opened)
    if len(source) != opened.rows:
        raise KdcacheError(f"the dataset gives {len(source)} rows but cache {opened.path} has {opened.rows}: "
                           "use the dataset the cache was dumped from")
    rows = np.sort(np.random.default_rng(seed).choice(opened.rows, size=min(n, opened.rows), replace=False))
    recorded = opened.row_digests()
    bad: list[int] = []
    mask_key = opened.meta.mask_key if opened.meta.packed is not None else None
    for s in range(0, len(rows), batch_size):
        part = rows[s:s + batch_size]
        inputs, _ = fetch_batch(source, part.tolist())
        bad += part[row_digests(inputs, input_mask(inputs, mask_key)) != recorded[part]].tolist()
    return bad, len(rows)
