"""Matplotlib figures drawn off-screen (the Agg canvas), without pyplot's global state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import KdcacheError

__all__ = ["new_figure", "save", "plain"]


def new_figure(rows: int, cols: int, *, width: float = 4.0, height: float = 3.0) -> tuple[Any, list[Any]]:
    """A figure of ``rows`` x ``cols`` panels (inches per panel), on an Agg canvas: ``(figure,
    axes in reading order)``. One line naming the extra to install when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise KdcacheError("figures need matplotlib: pip install 'kdcache[plot]'") from None
    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, [ax for row in axes for ax in row]


def save(figure: Any, path: Path) -> list[str]:
    """Write ``figure`` as a PNG; the titles of its panels, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        figure.savefig(path, dpi=80, pil_kwargs={"optimize": True})
    except OSError as err:
        raise KdcacheError(f"cannot write {path}: {err.strerror}") from None
    return [ax.get_title() for ax in figure.axes if ax.get_visible() and ax.get_title()]


def plain(text: str) -> str:
    """``text`` shown as typed: matplotlib would read ``$...$`` in a label as math."""
    return text.replace("$", r"\$")
