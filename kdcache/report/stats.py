"""What a cache's stored teacher outputs say, as numbers: the input of ``kdcache report``.

:func:`cache_stats` reads a bounded sample of a cache's logits (whole chunks, chosen at random
with a seed, until ``max_positions`` positions or ``max_values`` stored values are read) and
summarises each position: the teacher's confidence, its entropy, its predicted class and,
depending on how the logits are stored, how much probability the top-k classes keep. With the
dataset the cache was dumped from it also takes each row's label (through
:class:`~kdcache.CachedTeacherDataset`, so the rows are checked against the cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import KdcacheError
from ..format.meta import ROW_DIGEST, VIEW_PARAMS
from ..losses.head import head_logits
from ..losses.targets import HeadTargets, HeadWeights, HybridTargets, SampledTargets, TopKTargets
from ..read.batch import collate
from ..read.dataset import CachedTeacherDataset
from ..read.head import output_layer
from ..store import TeacherCache

__all__ = ["CacheStats", "cache_stats", "sampled_batches", "row_bytes_of"]

CURVE_POSITIONS = 20_000  # positions the dense top-k mass curve is computed over
TEMPERATURES = (1.0, 4.0)  # the stored distribution, and the one KD at the default T = 4 matches


@dataclass(frozen=True)
class CacheStats:
    """Per-position summaries of a sample of a cache's teacher outputs (T = 1).

    Attributes:
        codec: ``dense``, ``topk``, ``sampled``, ``hybrid`` or ``head`` (summarised as the dense logits it gives).
        classes: the real vocabulary (class count).
        rows, positions: rows read, and positions summarised (rows x tokens, padding excluded).
        confidence: (positions,) float32, the teacher's largest probability (sampled: the most
            drawn id's share of the draws).
        entropy: (positions,) float32, nats; top-k: of the kept classes plus the tail as one
            class (a lower bound); sampled: of the drawn ids' shares (a plug-in estimate).
        predicted: (positions,) int64, the teacher's top-1 class.
        labels: (positions,) int64 labels (negative = none), when the dataset was given.
        mass_k: dense only: the k of the top-k mass curve, 1 .. classes.
        mass: dense only: temperature -> (curve positions, len(mass_k)) float32, the probability
            the k most likely classes hold in ``softmax(logits / T)``.
        kept_mass: top-k and hybrid: (positions,) float32, the probability the stored K head classes hold.
        distinct: sampled only: (positions,) int64, distinct ids among the N draws.
        row_bytes: bytes one row takes in each stored array (no chunk padding).
    """

    codec: str
    classes: int
    rows: int
    confidence: np.ndarray
    entropy: np.ndarray
    predicted: np.ndarray
    row_bytes: dict[str, int]
    labels: np.ndarray | None = None
    mass_k: np.ndarray | None = None
    mass: dict[float, np.ndarray] | None = None
    kept_mass: np.ndarray | None = None
    distinct: np.ndarray | None = None
    stored_k: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def positions(self) -> int:
        return len(self.confidence)

    def labelled(self) -> np.ndarray:
        """(positions,) bool: positions with a label."""
        return self.labels >= 0 if self.labels is not None else np.zeros(self.positions, bool)

    def _right(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(confidence, label, teacher right) at the labelled positions."""
        keep = self.labelled()
        labels = self.labels[keep] if self.labels is not None else np.zeros(0, np.int64)
        return self.confidence[keep], labels, self.predicted[keep] == labels

    def reliability(self, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Over labelled positions, per confidence bin of width 1/``bins``: (mean confidence,
        accuracy, count); empty bins hold NaN."""
        conf, _, right = self._right()
        which = np.minimum((conf * bins).astype(int), bins - 1)
        count = np.bincount(which, minlength=bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_conf = np.bincount(which, weights=conf, minlength=bins) / count
            accuracy = np.bincount(which, weights=right.astype(float), minlength=bins) / count
        return mean_conf, accuracy, count

    def calibration_error(self, bins: int = 10) -> float:
        """Expected calibration error: sum over bins of count/N * |accuracy - confidence|."""
        conf, acc, count = self.reliability(bins)
        seen = count > 0
        return float((count[seen] * np.abs(acc[seen] - conf[seen])).sum() / max(count.sum(), 1))

    def class_accuracy(self, most: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(class ids, teacher accuracy, labelled count) of the ``most`` most frequent labels,
        in class order."""
        _, labels, right = self._right()
        ids, count = np.unique(labels, return_counts=True)
        top = np.sort(ids[np.argsort(-count, kind="stable")[:most]])
        return top, np.array([right[labels == c].mean() for c in top]), np.array([(labels == c).sum() for c in top])


def cache_stats(cache: TeacherCache | str | Path, dataset: Any = None, *, max_positions: int = 200_000,
                max_values: int = 1 << 27, seed: int = 0, temperatures: tuple[float, ...] = TEMPERATURES
                ) -> CacheStats:
    """Summarise a sample of ``cache``'s logits; with ``dataset`` (the one it was dumped from,
    checked) also their labels. Reads at most about ``max_positions`` positions and
    ``max_values`` stored logit values, whole chunks at a time; a dense cache's top-k mass is
    given at each of ``temperatures``."""
    if max_positions < 1 or max_values < 1:
        raise KdcacheError(f"max_positions must be >= 1 and max_values >= 1, got {max_positions} and {max_values}")
    opened = cache if isinstance(cache, TeacherCache) else TeacherCache.open(cache)
    if not opened.complete:
        raise KdcacheError(f"cache {opened.path} is incomplete: finish its dump before reporting on it")
    meta = opened.meta
    logits = meta.logits
    if not logits.shape:
        raise KdcacheError(f"cache {opened.path} stores one value per row, not logits over classes: nothing to report")
    classes = meta.vocab.real
    per_row = int(np.prod(logits.shape[:-1], dtype=np.int64))
    params = logits.codec.params()
    width = {"dense": classes, "head": classes, "topk": params.get("k", 0), "sampled": params.get("n", 0),
             "hybrid": params.get("k", 0) + params.get("n", 0)}[logits.codec.name]
    budget = max(1, min(max_positions // per_row, max_values // max(per_row * width, 1)))
    mass_k = np.unique(np.round(np.geomspace(1, classes, num=min(classes, 40))).astype(np.int64))
    parts: dict[str, list[np.ndarray]] = {}
    rows = curve = 0
    layer = output_layer(opened)  # a head cache's logits are computed from its stored layer: read as dense
    for targets, labels, mask in sampled_batches(opened, dataset, budget, seed):
        targets = _as_logits(targets, layer) if layer is not None else targets
        rows += _length(targets)
        summary = _summarise(targets, classes, mask, mass_k if curve < CURVE_POSITIONS else None, temperatures)
        curve += len(summary.get(f"mass@{temperatures[0]}", ()))
        if labels is not None:
            summary["labels"] = labels.reshape(-1)[mask.reshape(-1)].numpy() if mask is not None else \
                labels.reshape(-1).numpy()
        for key, value in summary.items():
            parts.setdefault(key, []).append(value)
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    row_bytes = row_bytes_of(meta)
    notes = [] if dataset is not None else ["no dataset given: no labels, so no calibration or per-class accuracy"]
    if rows < meta.rows:
        notes.append(f"summarised {rows} of {meta.rows} rows (whole chunks chosen at random, seed {seed})")
    labels_ok = dataset is not None and "labels" in arrays and arrays["labels"].shape == arrays["confidence"].shape
    if dataset is not None and not labels_ok:
        notes.append("the dataset's labels do not match the teacher's positions: no calibration")
    dense = f"mass@{temperatures[0]}" in arrays
    return CacheStats(codec=logits.codec.name, classes=classes, rows=rows, confidence=arrays["confidence"],
                      entropy=arrays["entropy"], predicted=arrays["predicted"], row_bytes=row_bytes,
                      labels=arrays["labels"] if labels_ok else None, mass_k=mass_k if dense else None,
                      mass={t: arrays[f"mass@{t}"][:CURVE_POSITIONS] for t in temperatures} if dense else None,
                      kept_mass=arrays.get("kept_mass"), distinct=arrays.get("distinct"),
                      stored_k=params.get("k", params.get("n")) if logits.codec.name != "dense" else None, notes=notes)


def _as_logits(targets: HeadTargets, layer: HeadWeights) -> torch.Tensor:
    """A head cache's decoded rows as the teacher's dense logits ``h @ W.T + b`` (B, *P, V)."""
    weight, bias = layer.on(targets.hidden.device)
    flat = targets.hidden.reshape(-1, targets.hidden.shape[-1])
    return head_logits(flat, weight, bias).reshape(*targets.hidden.shape[:-1], weight.shape[0])


def row_bytes_of(meta: Any) -> dict[str, int]:
    """Bytes one row takes in each stored array (no chunk padding), by array path."""
    row_bytes = {a.path: a.row_bytes for o in meta.outputs.values() for a in o.arrays.values()}
    row_bytes[ROW_DIGEST] = 8
    if meta.view_params is not None:
        row_bytes[VIEW_PARAMS] = meta.view_params.row_bytes
    return row_bytes


def _length(targets: Any) -> int:
    return len(targets.values if isinstance(targets, TopKTargets) else
               targets.ids if isinstance(targets, SampledTargets) else
               targets.logprobs if isinstance(targets, HybridTargets) else
               targets.hidden if isinstance(targets, HeadTargets) else targets)


def sampled_batches(cache: TeacherCache, dataset: Any, budget: int, seed: int
                    ) -> Iterator[tuple[Any, torch.Tensor | None, torch.Tensor | None]]:
    """``(decoded logits, labels or None, mask or None)`` for whole chunks of rows in a seeded
    random order, until ``budget`` rows; with a dataset, through a checked reader (view 0)."""
    meta = cache.meta
    if dataset is None and meta.packed is not None and "logits" in meta.packed.outputs:
        yield from _packed_tokens(cache, budget, seed)
        return
    chunk = max(a.chunk_rows for a in meta.logits.arrays.values())
    order = np.random.default_rng(seed).permutation(-(-meta.rows // chunk))
    reader = None
    if dataset is not None:
        reader = CachedTeacherDataset(dataset, cache, hidden=(), in_memory=False, dtype=torch.float32)
    taken = 0
    for c in order:
        if taken >= budget:
            return
        start, stop = c * chunk, min((c + 1) * chunk, meta.rows, c * chunk + budget - taken)
        if reader is not None:  # sample rows (view 0 of each sample in these rows)
            samples = list(range(-(-start // meta.views), -(-stop // meta.views)))
            if not samples:
                continue
            _, labels, targets = collate(reader.__getitems__(samples))
            taken += len(samples)
            yield targets.logits, labels, targets.mask
        else:
            decoded = meta.logits.codec.decode(cache.read_output("logits", start, stop), dtype=torch.float32)
            taken += stop - start
            yield decoded, None, _stored_padding(decoded) if meta.mask_key else None


def _packed_tokens(cache: TeacherCache, budget: int, seed: int
                   ) -> Iterator[tuple[Any, torch.Tensor | None, torch.Tensor | None]]:
    """A packed cache's stored tokens (real ones only), whole blocks in a seeded order, until
    ``budget`` tokens: ``(decoded (tokens, ...), None, None)``."""
    arrays = cache.meta.logits.arrays
    taken = 0
    for block in np.random.default_rng(seed).permutation(cache.n_blocks):
        if taken >= budget:
            return
        stored = {key: cache.load_block(a.path, int(block))[:budget - taken] for key, a in arrays.items()}
        if not len(next(iter(stored.values()))):
            continue
        decoded = cache.meta.logits.codec.decode(stored, dtype=torch.float32)
        taken += _length(decoded)
        yield decoded, None, None


def _stored_padding(targets: Any) -> torch.Tensor:
    """(B, L) bool, True for real tokens: padding positions are stored as zeros (docs/format.md)."""
    if isinstance(targets, TopKTargets):
        return (targets.values != 0).any(-1) | (targets.logsumexp != 0)
    if isinstance(targets, SampledTargets):
        return targets.counts.sum(-1) > 0
    if isinstance(targets, HybridTargets):
        return (targets.logprobs != 0).any(-1) | (targets.tail != 0).any(-1)
    return (targets != 0).any(-1)


def _summarise(targets: Any, classes: int, mask: torch.Tensor | None, mass_k: np.ndarray | None,
               temperatures: tuple[float, ...] = TEMPERATURES) -> dict[str, np.ndarray]:
    """Per real position: confidence, entropy, predicted class and the codec's own measure
    (dense: the top-k mass at each of ``mass_k`` and ``temperatures``, when ``mass_k`` is given)."""
    real = mask.reshape(-1) if mask is not None else None

    def positions(t: torch.Tensor, per_class: bool = True) -> torch.Tensor:
        """(B, *P[, X]) -> (positions[, X]), padding dropped."""
        t = t.reshape(-1, t.shape[-1]) if per_class else t.reshape(-1)
        return t[real] if real is not None else t

    if isinstance(targets, (TopKTargets, HybridTargets)):  # the head exactly, the rest as one tail bucket
        ids = positions(targets.indices)
        if isinstance(targets, TopKTargets):
            p = torch.exp(positions(targets.values.float()) - positions(targets.logsumexp, per_class=False).unsqueeze(-1))
        else:
            p = torch.exp(positions(targets.logprobs.float()))
        kept = p.sum(-1).clamp(max=1.0)
        tail = (1 - kept).clamp_min(0)
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1) - tail * torch.log(tail.clamp_min(1e-30))
        return {"confidence": p[:, 0].numpy(), "entropy": entropy.numpy(), "predicted": ids[:, 0].numpy(),
                "kept_mass": kept.numpy()}
    if isinstance(targets, SampledTargets):
        counts, ids = positions(targets.counts), positions(targets.ids)
        share = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        top = share.argmax(-1, keepdim=True)
        entropy = -(share * torch.log(share.clamp_min(1e-30))).sum(-1)
        return {"confidence": share.gather(-1, top).squeeze(-1).numpy(), "entropy": entropy.numpy(),
                "predicted": ids.gather(-1, top).squeeze(-1).numpy(), "distinct": (counts > 0).sum(-1).numpy()}
    logits = positions(targets)[:, :classes]
    p = torch.softmax(logits, -1)
    entropy = -(p * torch.log_softmax(logits, -1)).sum(-1)
    confidence, predicted = p.max(-1)
    out = {"confidence": confidence.numpy(), "entropy": entropy.numpy(), "predicted": predicted.numpy()}
    if mass_k is not None:
        for t in temperatures:
            p_t = torch.softmax(logits[:CURVE_POSITIONS] / t, -1)
            mass = p_t.sort(-1, descending=True).values.cumsum(-1)
            out[f"mass@{t}"] = mass[:, torch.from_numpy(mass_k - 1)].numpy()
    return out
