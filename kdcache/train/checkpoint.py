"""What a run leaves in ``--out``: the student's weights, the hint projections and the settings,
each file written whole (temp file, then rename); and the stop on a non-finite loss."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import KdcacheError
from ..store import TeacherCache

__all__ = ["save_run", "NonFiniteLoss"]


def save_run(out: Path, student: nn.Module, hint_losses: list[nn.Module], cfg: TrainConfig,
             student_spec: dict[str, Any] | None, cache: Any) -> None:
    """Write the checkpoint files, each to a temp file renamed into place (never half-written)."""
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    _replace(out / "student.pt", {"state_dict": state, "spec": student_spec or {"class": type(student).__qualname__}})
    if hint_losses:
        _replace(out / "hints.pt", {str(h): m.state_dict() for h, m in zip(cfg.hints, hint_losses)})
    cache_path = cache.path if isinstance(cache, TeacherCache) else (str(cache) if cache is not None else None)
    (out / "config.json").write_text(json.dumps({**cfg.to_json(), "cache": cache_path, "student": student_spec},
                                                indent=2) + "\n")


def _replace(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class NonFiniteLoss(KdcacheError):
    """Training stopped on a NaN/inf loss; the CLI exits with status 1 (not a usage mistake)."""

    exit_code = 1

    def __init__(self, step: int, message: str = "") -> None:
        super().__init__(message or f"NaN/inf loss at step {step}")
        self.step = step
