"""What a run leaves in ``--out``: the student's weights, the hint projections and the settings
(each file written whole: temp file, then rename); and the stop on a non-finite loss."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import KdcacheError
from ..store import TeacherCache

__all__ = ["save_run", "run_settings", "replace_file", "NonFiniteLoss", "TrainingInterrupted"]


def save_run(out: Path, student: nn.Module, hint_losses: list[nn.Module], cfg: TrainConfig,
             student_spec: dict[str, Any] | None) -> None:
    """Write the student's and the hint projections' weights, each to a temp file renamed into
    place (never half-written)."""
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    replace_file(out / "student.pt", {"state_dict": state,
                                      "spec": student_spec or {"class": type(student).__qualname__}})
    if hint_losses:
        replace_file(out / "hints.pt", {str(h): m.state_dict() for h, m in zip(cfg.hints, hint_losses)})


def run_settings(cfg: TrainConfig, student_spec: dict[str, Any] | None, cache: Any) -> dict[str, Any]:
    """What ``config.json`` records: the settings, the cache's path and the student's spec."""
    cache_path = cache.path if isinstance(cache, TeacherCache) else (str(cache) if cache is not None else None)
    return {**cfg.to_json(), "cache": cache_path, "student": student_spec}


def replace_file(path: Path, obj: Any) -> None:
    """``torch.save`` to a temp file renamed into place (never half-written)."""
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class NonFiniteLoss(KdcacheError):
    """Training stopped on a NaN/inf loss; the CLI exits with status 1 (not a usage mistake)."""

    exit_code = 1

    def __init__(self, step: int, message: str = "") -> None:
        super().__init__(message or f"NaN/inf loss at step {step}")
        self.step = step


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training, with what the run's directory holds now: the message
    the CLI prints (exit status 130)."""
