"""The ``kdcache report`` and ``kdcache plot`` commands (registered by :mod:`kdcache.cli`):
parse, call :mod:`kdcache.report`, print what was written."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import MAX_LENGTH, TEXT_COLUMN, TOKENIZER, read_dataset

__all__ = ["report_cmd", "plot_cmd"]


def report_cmd(
    path: str = typer.Argument(..., help="A cache directory or URL."),
    out: Optional[Path] = typer.Option(None, help="Where the PNGs and report.html go "
                                       "[report-<fingerprint>]."),
    dataset: Optional[str] = typer.Option(None, help="The dataset the cache was dumped from: adds "
                                          "calibration and per-class accuracy from its labels (the spec recorded in "
                                          "the cache is never imported)."),
    dataset_kwargs: Optional[str] = typer.Option(None, help="JSON keyword arguments for --dataset."),
    eval_cache: Optional[str] = typer.Option(None, help="The same teacher's cache of --eval-dataset: draw calibration "
                                             "and per-class accuracy on these held-out rows instead.",
                                             metavar="PATH"),
    eval_dataset: Optional[str] = typer.Option(None, help="The labelled held-out dataset --eval-cache was dumped "
                                               "from.", metavar="SPEC"),
    eval_dataset_kwargs: Optional[str] = typer.Option(None, help="JSON keyword arguments for --eval-dataset."),
    text_column: Optional[str] = TEXT_COLUMN,
    max_length: Optional[int] = MAX_LENGTH,
    tokenizer: Optional[str] = TOKENIZER,
    positions: int = typer.Option(200_000, help="Summarise at most about N positions (rows x tokens), "
                                  "whole chunks chosen at random."),
) -> None:
    """Figures of what a cache holds (teacher confidence and entropy, calibration and per-class
    accuracy on labelled rows, top-k probability mass, bytes per row; for an embedding, norms and
    cosine similarities) and one HTML page."""
    from ..errors import KdcacheError
    from ..report import write_report
    from ..store import TeacherCache

    if positions < 1:
        raise KdcacheError(f"--positions must be >= 1, got {positions}")
    if (eval_cache is None) != (eval_dataset is None):
        raise KdcacheError("--eval-cache and --eval-dataset go together: the held-out cache and the data it was "
                           "dumped from")
    cache = TeacherCache.open(path)
    read = (text_column, max_length, tokenizer)
    data = read_dataset(dataset, dataset_kwargs, *read) if dataset else None
    held = read_dataset(eval_dataset, eval_dataset_kwargs, *read) if eval_dataset else None
    report = write_report(cache, out or Path(f"report-{cache.fingerprint}"), data, eval_cache=eval_cache,
                          eval_dataset=held, max_positions=positions)
    for figure in report.figures:
        typer.echo(f"{figure.path}  {'; '.join(figure.panels)}")
    typer.echo(str(report.page))


def plot_cmd(
    runs: list[Path] = typer.Argument(..., help="train-student --out directories."),
    out: Path = typer.Option(Path("runs.png"), help="The PNG to write."),
) -> None:
    """Runs side by side from their metrics.jsonl: eval accuracy and loss, KD and CE terms,
    top-1 agreement with the teacher, samples/s, and train vs held-out KL when recorded."""
    from ..report import plot_runs

    figure = plot_runs(runs, out)
    typer.echo(f"{figure.path}  {'; '.join(figure.panels)}")
