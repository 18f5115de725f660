"""``kdcache report``: a cache as pictures (PNG files) and one self-contained HTML page.

Figures, from :func:`~kdcache.report.stats.cache_stats`:

- ``confidence.png``  the teacher's confidence and entropy per position (histograms);
- ``calibration.png`` with labels: a reliability diagram (with each bin's count) and the teacher's
  accuracy per class, on held-out rows when a held-out cache is given (on its own training rows a
  teacher is right nearly always);
- ``topk_mass.png``   dense caches: the probability the k most likely classes hold, against k,
  at T = 1 and 4 (to choose ``--topk`` before dumping a large-vocabulary cache); top-k caches: the mass the
  stored K classes hold (hybrid: its K head classes, at the temperature it was drawn at);
  sampled caches: distinct ids among the N draws;
- ``bytes.png``       bytes one row takes in each stored array.

A regression target (an embedding or hidden state, ``CacheMeta.regression``) has no classes:
``norms.png`` shows its vectors' norms and cosine similarities instead (:mod:`.embeddings`),
beside ``bytes.png``.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import KdcacheError, option
from ..store import TeacherCache
from ..store.identity import same_teacher
from ..store.location import staged
from .canvas import new_figure, plain, save
from .embeddings import EmbeddingStats, embedding_figure, embedding_stats
from .stats import CacheStats, cache_stats

__all__ = ["ReportFigure", "CacheReport", "write_report"]


@dataclass(frozen=True)
class ReportFigure:
    """One PNG written: its name, path and the titles of its panels."""

    name: str
    path: Path
    panels: list[str]


@dataclass(frozen=True)
class CacheReport:
    """What :func:`write_report` wrote: the numbers, the figures and the HTML page."""

    stats: CacheStats | EmbeddingStats
    figures: list[ReportFigure]
    page: Path
    held_out: CacheStats | None = None  # the held-out cache's numbers, which the calibration figure shows


def write_report(cache: TeacherCache | str | Path, out: str | Path, dataset: Any = None, *,
                 eval_cache: TeacherCache | str | Path | None = None, eval_dataset: Any = None,
                 **budget: Any) -> CacheReport:
    """Write the figures of ``cache`` and ``report.html`` (figures inlined) into ``out``.

    ``dataset`` (the one the cache was dumped from) adds calibration and per-class accuracy;
    ``eval_cache`` (the same teacher's cache of held-out ``eval_dataset``) draws them on held-out
    rows instead. ``budget`` goes to :func:`~kdcache.report.stats.cache_stats`
    (``max_positions``, ...).
    """
    opened = cache if isinstance(cache, TeacherCache) else TeacherCache.open(cache)
    out = Path(out)
    if out.is_dir() and not out.is_symlink():  # a report written before: its files are replaced
        return _write(opened, out, out, dataset, eval_cache, eval_dataset, budget)
    with staged(out, "report", directory=True) as work:  # a failure half-way leaves nothing at out
        return _write(opened, work, out, dataset, eval_cache, eval_dataset, budget)


def _write(cache: TeacherCache, work: Path, out: Path, dataset: Any, eval_cache: Any, eval_dataset: Any,
           budget: dict[str, Any]) -> CacheReport:
    """The figures and page written into ``work``, named as they will be once it is ``out``."""
    if cache.meta.regression:
        vectors = embedding_stats(cache, **budget)
        figures = [ReportFigure("norms", work / "norms.png", embedding_figure(vectors, work / "norms.png")),
                   _bytes(vectors.row_bytes, work)]
        (work / "report.html").write_text(_page(cache, _embedding_facts(vectors), vectors.notes, figures))
        return CacheReport(vectors, _renamed(figures, out), out / "report.html")
    stats = cache_stats(cache, dataset, **budget)
    held_out = _held_out(cache, eval_cache, eval_dataset, budget)
    labelled = held_out if held_out is not None else stats
    figures = [_confidence(stats, work)]
    if labelled.labels is not None and labelled.labelled().any():
        figures.append(_calibration(labelled, work, held_out is not None))
    figures += [_mass(stats, work), _bytes(stats.row_bytes, work)]
    notes = stats.notes + ([] if held_out is not None or stats.labels is None else [
        "calibration drawn on the transfer set, which the teacher was trained on: give a held-out cache "
        "(--eval-cache with --eval-dataset) for a calibration that means something"])
    (work / "report.html").write_text(_page(cache, _facts(stats, labelled, held_out is not None), notes, figures))
    return CacheReport(stats, _renamed(figures, out), out / "report.html", held_out)


def _renamed(figures: list[ReportFigure], out: Path) -> list[ReportFigure]:
    return [replace(f, path=out / f.path.name) for f in figures]


def _held_out(cache: TeacherCache, eval_cache: Any, eval_dataset: Any, budget: dict[str, Any]) -> CacheStats | None:
    """The held-out cache's numbers, labels included; None without one. It must be the same teacher's."""
    if eval_cache is None:
        return None
    if eval_dataset is None:
        raise KdcacheError(f"{option('eval_cache')} needs {option('eval_dataset')}, the labelled data it was dumped from")
    held = eval_cache if isinstance(eval_cache, TeacherCache) else TeacherCache.open(eval_cache)
    # digests of two schemes (a cache of an earlier release) cannot tell: trust the user there
    if same_teacher(held.meta.teacher.weights_digest, cache.meta.teacher.weights_digest) is False:
        raise KdcacheError(f"{option('eval_cache')} {held.path} holds another teacher's outputs than {cache.path}: "
                           "dump the held-out set with the same teacher")
    try:
        return cache_stats(held, eval_dataset, **budget)
    except KdcacheError as err:
        raise KdcacheError(f"{option('eval_cache')} with {option('eval_dataset')}: {err}") from None


def _confidence(stats: CacheStats, out: Path) -> ReportFigure:
    figure, (conf, ent) = new_figure(1, 2)
    sampled = stats.codec == "sampled"
    conf.hist(stats.confidence, bins=40, range=(0, 1), color="C0")
    conf.set_title("top id's share of the draws" if sampled else "teacher confidence (top-1 probability)")
    conf.set_xlabel("probability")
    conf.set_ylabel("positions" if len(stats.confidence) != stats.rows else "rows")
    ent.hist(stats.entropy, bins=40, range=(0, max(float(np.log(stats.classes)), 1e-3)), color="C1")
    ent.set_title({"topk": "entropy (kept classes + tail), nats", "hybrid": "entropy (kept classes + tail), nats", "sampled": "entropy of the draws, nats"}.get(
        stats.codec, "teacher entropy, nats"))
    ent.set_xlabel(f"nats (uniform over {stats.classes} classes: {np.log(stats.classes):.2f})")
    return ReportFigure("confidence", out / "confidence.png", save(figure, out / "confidence.png"))


def _calibration(stats: CacheStats, out: Path, held_out: bool) -> ReportFigure:
    figure, (rel, per) = new_figure(1, 2)
    conf, acc, count = stats.reliability()
    centers = (np.arange(len(count)) + 0.5) / len(count)
    seen = count > 0
    bars = rel.bar(centers[seen], acc[seen], width=1 / len(count), edgecolor="white", color="C0", label="accuracy")
    rel.bar_label(bars, labels=[f"{c:,}" for c in count[seen]], fontsize="x-small", padding=1)  # rows per bin
    rel.plot([0, 1], [0, 1], "--", color="grey", label="calibrated")
    rel.plot(conf[seen], acc[seen], "o", color="C3", markersize=3, label="bin mean confidence")
    where = "held-out rows" if held_out else "transfer-set rows"
    rel.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="teacher confidence (numbers: labelled rows per bin)",
            ylabel=f"accuracy on labelled {where}")
    rel.set_title(f"reliability on {where} (ECE {stats.calibration_error():.3f})")
    rel.legend(loc="upper left", fontsize="x-small", framealpha=0.6)
    classes, accuracy, _ = stats.class_accuracy()
    per.bar(np.arange(len(classes)), accuracy, color="C2")
    per.set_xticks(np.arange(len(classes)), [str(c) for c in classes], fontsize="small",
                   rotation=90 if len(classes) > 12 else 0)
    per.set(ylim=(0, 1), xlabel="class (most frequent labels)", ylabel="teacher accuracy")
    per.set_title("teacher accuracy per class")
    return ReportFigure("calibration", out / "calibration.png", save(figure, out / "calibration.png"))


def _mass(stats: CacheStats, out: Path) -> ReportFigure:
    figure, (ax,) = new_figure(1, 1, width=5.0)
    if stats.mass is not None and stats.mass_k is not None:
        for i, (t, mass) in enumerate(stats.mass.items()):
            low, high = np.quantile(mass, [0.1, 0.9], axis=0)
            ax.fill_between(stats.mass_k, low, high, alpha=0.2, color=f"C{i}")
            ax.plot(stats.mass_k, mass.mean(0), color=f"C{i}", label=f"T = {t:g}: mean, 10-90% of positions")
        ax.set_xscale("log")
        ax.set(xlabel="k (classes kept, --topk)", ylabel="probability mass kept", ylim=(0, 1.02))
        ax.set_title("probability mass kept by the top k classes")
        ax.legend(loc="lower right", fontsize="small")
    elif stats.kept_mass is not None:
        ax.hist(stats.kept_mass, bins=40, range=(0, 1), color="C0")
        ax.set(xlabel="probability mass kept", ylabel="positions")
        ax.set_title(f"mass the stored top-{stats.stored_k} keep")
    else:
        assert stats.distinct is not None
        ax.hist(stats.distinct, bins=np.arange(0.5, max(int(stats.distinct.max()), 1) + 1.5), color="C0")
        ax.set(xlabel="distinct ids", ylabel="positions")
        ax.set_title(f"distinct ids among {stats.stored_k} draws")
    return ReportFigure("topk_mass", out / "topk_mass.png", save(figure, out / "topk_mass.png"))


def _bytes(row_bytes: dict[str, int], out: Path) -> ReportFigure:
    figure, (ax,) = new_figure(1, 1, width=5.0, height=0.6 + 0.35 * len(row_bytes))
    names = list(row_bytes)
    ax.barh(np.arange(len(names)), [row_bytes[n] for n in names], color="C4")
    ax.set_yticks(np.arange(len(names)), [plain(n) for n in names])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set(xlabel="bytes per row (stored, no chunk padding)")
    ax.set_title(f"bytes per row by array ({sum(row_bytes.values()):,} in all)")
    return ReportFigure("bytes", out / "bytes.png", save(figure, out / "bytes.png"))


def _facts(stats: CacheStats, labelled: CacheStats, held_out: bool) -> list[tuple[str, str]]:
    facts = [("logits", f"{stats.codec}, {stats.classes} classes"),
             ("summarised", f"{stats.rows:,} rows, {stats.positions:,} positions"),
             ("mean confidence", f"{stats.confidence.mean():.4f}"),
             ("mean entropy", f"{stats.entropy.mean():.4f} nats")]
    if labelled.labels is not None and labelled.labelled().any():
        _, _, right = labelled._right()
        where = "held-out" if held_out else "transfer-set"
        facts += [("teacher accuracy", f"{right.mean():.4f} on {right.size:,} labelled {where} positions"),
                  ("calibration error (ECE)", f"{labelled.calibration_error():.4f} ({where})")]
    return facts


def _embedding_facts(stats: EmbeddingStats) -> list[tuple[str, str]]:
    return [("output", f"{stats.output}, {stats.dims} dims (a regression target)"),
            ("summarised", f"{stats.positions:,} of {stats.total:,} positions"),
            ("mean norm", f"{stats.norms.mean():.4f}"),
            ("mean cosine similarity", f"{stats.pair_cosine.mean():.4f} between positions, "
                                       f"{stats.mean_cosine.mean():.4f} to their mean")]


def _page(cache: TeacherCache, described: list[tuple[str, str]], said: list[str], figures: list[ReportFigure]) -> str:
    """One HTML file, images inlined; everything the cache says about itself is escaped."""
    meta = cache.meta
    facts = [("cache", cache.path), ("fingerprint", meta.fingerprint), ("rows", f"{meta.rows:,}"),
             ("teacher", meta.teacher.spec or meta.teacher.class_name), ("dataset", meta.dataset.spec or "?"),
             *described]
    rows = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    notes = "".join(f"<p class=note>{html.escape(n)}</p>" for n in said)
    images = "\n".join(
        f"<figure><img alt='{html.escape(f.name)}' src='data:image/png;base64,"
        f"{base64.b64encode(f.path.read_bytes()).decode()}'><figcaption>{html.escape(', '.join(f.panels))}"
        f"</figcaption></figure>" for f in figures)
    return (f"<!doctype html><html><head><meta charset=utf-8><title>kdcache report {html.escape(meta.fingerprint)}"
            "</title><style>body{font-family:sans-serif;max-width:960px;margin:auto}th{text-align:left;padding-right:"
            "1em}img{max-width:100%}.note{color:#666}</style></head><body>"
            f"<h1>kdcache report</h1><table>{rows}</table>{notes}{images}</body></html>\n")
