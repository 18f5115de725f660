"""A regression target's report: an embedding or hidden state has dimensions, not classes, so its
cache is drawn as vector lengths and directions, not probabilities.

:func:`embedding_stats` reads a bounded, seeded sample of whole chunks (as
:func:`~kdcache.report.stats.cache_stats` does for logits) and measures each position's vector:
its L2 norm, its cosine similarity to another position drawn at random (how spread the
directions are: near 1 when every position points the same way) and to the sample's mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import KdcacheError
from ..store import TeacherCache
from .canvas import new_figure, save
from .stats import row_bytes_of, sampled_batches

__all__ = ["EmbeddingStats", "embedding_stats", "embedding_figure"]


@dataclass(frozen=True)
class EmbeddingStats:
    """Per-position measures of a sample of a regression cache's primary output.

    Attributes:
        output: the teacher output the cache holds (its ``output_key``).
        dims: the vector's length (the output's last axis).
        total: the cache's positions (rows x tokens, real tokens only when packed); ``positions``:
            vectors measured (padding excluded).
        norms: (positions,) float32, L2 norm of each vector.
        pair_cosine: (positions,) float32, cosine similarity of each vector with another one of
            the sample (a seeded random pairing).
        mean_cosine: (positions,) float32, cosine similarity of each vector with the sample's mean.
        row_bytes: bytes one row takes in each stored array.
    """

    output: str
    dims: int
    total: int
    norms: np.ndarray
    pair_cosine: np.ndarray
    mean_cosine: np.ndarray
    row_bytes: dict[str, int]
    notes: list[str] = field(default_factory=list)

    @property
    def positions(self) -> int:
        return len(self.norms)


def embedding_stats(cache: TeacherCache, *, max_positions: int = 200_000, seed: int = 0) -> EmbeddingStats:
    """Measure about ``max_positions`` vectors of ``cache``'s primary output (whole chunks, in a
    seeded random order)."""
    meta = cache.meta
    if not meta.regression:
        raise KdcacheError(f"cache {cache.path} holds logits, not a regression target")
    dims = meta.logits.shape[-1] if meta.logits.shape else 1
    per_row = int(np.prod(meta.logits.shape[:-1], dtype=np.int64))
    budget = max(1, min(max_positions // per_row, (1 << 27) // max(per_row * dims, 1)))
    parts = []
    for vectors, _, mask in sampled_batches(cache, None, budget, seed):
        flat = vectors.reshape(-1, dims).float()
        parts.append(flat[mask.reshape(-1)] if mask is not None else flat)
    vectors = torch.cat(parts) if parts else torch.zeros(0, dims)
    pairs = vectors[torch.from_numpy(np.random.default_rng(seed).permutation(len(vectors)))]
    cosine = torch.nn.functional.cosine_similarity
    total = meta.tokens if meta.tokens else meta.rows * per_row
    notes = [f"summarised {len(vectors):,} of {total:,} positions (whole chunks chosen at random, seed {seed})"] \
        if len(vectors) < total else []
    return EmbeddingStats(output=str(meta.output_key), dims=dims, total=total, norms=vectors.norm(dim=-1).numpy(),
                          pair_cosine=cosine(vectors, pairs, dim=-1).numpy(),
                          mean_cosine=cosine(vectors, vectors.mean(0, keepdim=True), dim=-1).numpy(),
                          row_bytes=row_bytes_of(meta), notes=notes)


def embedding_figure(stats: EmbeddingStats, path: Path) -> list[str]:
    """``norms.png``: the vectors' norms, and their cosine similarities to each other and to the mean."""
    figure, (norms, cosines) = new_figure(1, 2)
    norms.hist(stats.norms, bins=40, color="C0")
    norms.set_title(f"teacher output norms ({stats.dims} dims)")
    norms.set(xlabel="L2 norm", ylabel="positions")
    norms.ticklabel_format(axis="x", useOffset=False)  # norms near one value: show them, not an offset
    cosines.hist(stats.pair_cosine, bins=40, range=(-1, 1), alpha=0.7, color="C1", label="to another position")
    cosines.hist(stats.mean_cosine, bins=40, range=(-1, 1), alpha=0.7, color="C2", label="to the mean")
    cosines.set_title("cosine similarity of the outputs")
    cosines.set(xlabel="cosine similarity", ylabel="positions")
    cosines.legend(loc="upper left", fontsize="small")
    return save(figure, path)
