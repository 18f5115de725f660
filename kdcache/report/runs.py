"""``kdcache plot``: training runs side by side, from each run's ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import KdcacheError
from .canvas import new_figure, plain, save

__all__ = ["PANELS", "RunsFigure", "read_metrics", "plot_runs"]

# metric key(s) -> panel title; a panel shows whichever runs record its keys
PANELS: list[tuple[tuple[str, ...], str]] = [
    (("eval_acc",), "eval accuracy"), (("eval_loss",), "eval loss"), (("kd",), "KD term"), (("ce",), "CE term"),
    (("agree", "eval_agree"), "top-1 agreement with the teacher"), (("samples_per_s",), "samples/s"),
    (("train_kl", "eval_kl"), "KL to the teacher: train vs held-out"),
]
_PARTS = {"agree": "train", "eval_agree": "held-out", "train_kl": "train", "eval_kl": "held-out"}
_TWO_PART = {title for keys, title in PANELS if len(keys) > 1}
MAX_METRICS_BYTES = 64 << 20  # a metrics file is a few KB; refuse to read anything absurd


@dataclass(frozen=True)
class RunsFigure:
    """The PNG :func:`plot_runs` wrote, its panel titles, and what each panel plots:
    ``series[title][label] = (epochs, values)``."""

    path: Path
    panels: list[str]
    series: dict[str, dict[str, tuple[list[int], list[float]]]]


def read_metrics(run: str | Path) -> list[dict[str, float]]:
    """One dict per epoch from ``run/metrics.jsonl``: the finite numbers it records."""
    path = Path(run) / "metrics.jsonl"
    try:
        if path.stat().st_size > MAX_METRICS_BYTES:
            raise KdcacheError(f"{path} is larger than {MAX_METRICS_BYTES >> 20} MB: not a kdcache metrics file")
        lines = path.read_text().splitlines()
    except OSError as err:
        raise KdcacheError(f"cannot read {path} ({err.strerror}): pass the --out directory of a train-student run"
                           ) from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise KdcacheError(f"{path} line {n} is not JSON: not a kdcache metrics file") from None
        if not isinstance(record, dict):
            raise KdcacheError(f"{path} line {n} is not a JSON object: not a kdcache metrics file")
        records.append({k: float(v) for k, v in record.items() if isinstance(v, (int, float))
                        and not isinstance(v, bool) and math.isfinite(v)})
    return records


def _labels(runs: Sequence[Path]) -> list[str]:
    """Each run's directory name, or its path where names repeat."""
    names = [r.resolve().name or str(r) for r in runs]
    return [str(r) if names.count(n) > 1 else n for r, n in zip(runs, names)]


def plot_runs(runs: Sequence[str | Path], out: str | Path) -> RunsFigure:
    """One PNG with a panel per metric in :data:`PANELS` that any run records, runs overlaid."""
    if not runs:
        raise KdcacheError("give at least one run directory (a train-student --out)")
    paths = [Path(r) for r in runs]
    metrics = {label: read_metrics(p) for label, p in zip(_labels(paths), paths)}
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    style: dict[str, tuple[str, str]] = {}  # series name -> (colour, line style)
    for keys, title in PANELS:
        for key in keys:
            for i, (label, records) in enumerate(metrics.items()):
                points = [(int(r.get("epoch", n + 1)), r[key]) for n, r in enumerate(records) if key in r]
                if not points or (key == "kd" and not any(v for _, v in points)):  # plain runs record kd 0
                    continue
                part = _PARTS.get(key)
                name = f"{label} ({part})" if part else label
                series.setdefault(title, {})[name] = ([e for e, _ in points], [v for _, v in points])
                style[name] = (f"C{i % 10}", "--" if part == "held-out" else "-")
    if not series:
        raise KdcacheError("no metrics to plot: the runs' metrics.jsonl files are empty")
    titles = [t for _, t in PANELS if t in series]
    cols = 4 if len(titles) > 6 else 3
    figure, axes = new_figure(-(-len(titles) // cols), cols, width=3.6, height=2.8)
    for ax, title in zip(axes, titles):
        for name, (epochs, values) in series[title].items():
            colour, line = style[name]
            ax.plot(epochs, values, line, color=colour, label=plain(name))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        values = [v for _, ys in series[title].values() for v in ys]
        if min(values) > 0 and max(values) > 20 * min(values) and not title.startswith(("eval acc", "top-1", "samples")):
            ax.set_yscale("log")  # losses falling by orders of magnitude
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[len(titles):]:
        ax.set_visible(False)
    for ax in axes[:len(titles)]:  # one legend of the runs, and one for each two-part panel
        if ax is axes[0] or ax.get_title() in _TWO_PART:
            ax.legend(fontsize="x-small")
    path = Path(out)
    return RunsFigure(path, save(figure, path), series)
