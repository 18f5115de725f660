"""kdcache: offline knowledge distillation from a cached teacher.

Stage one, :func:`dump_teacher`, runs the teacher once and stores its outputs in a zarr
cache; stage two, :func:`train_student` (or your own loop over :class:`CachedTeacherDataset`
with the losses in :mod:`kdcache.losses`), trains students from it without the teacher.

The names below are imported on first use, so that ``import kdcache.cli`` (and so
``kdcache --help``) does not pay for importing torch and zarr.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> the module that defines it
_HOMES = {
    "KdcacheError": "errors", "TeacherCache": "store", "CacheMeta": "format", "dump_teacher": "dump",
    "DumpConfig": "config", "CachedTeacherDataset": "read", "ChunkShuffleBatchSampler": "read", "collate": "read",
    "TeacherTargets": "losses.targets", "TopKTargets": "losses.targets", "SampledTargets": "losses.targets",
    "HybridTargets": "losses.targets", "SoftTargets": "losses.targets",
    "train_student": "train", "evaluate": "train", "TrainConfig": "config", "Hint": "config", "KLDivLoss": "losses",
    "SoftTargetCrossEntropy": "losses", "HiddenStateLoss": "losses", "AttentionTransferLoss": "losses",
}

__all__ = ["__version__", "losses", *_HOMES]


def __getattr__(name: str) -> Any:
    if name == "losses":
        return importlib.import_module(".losses", __name__)
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static checkers and IDEs see
    from . import losses
    from .config import DumpConfig, Hint, TrainConfig
    from .dump import dump_teacher
    from .errors import KdcacheError
    from .format import CacheMeta
    from .losses import AttentionTransferLoss, HiddenStateLoss, KLDivLoss, SoftTargetCrossEntropy
    from .losses.targets import HybridTargets, SampledTargets, SoftTargets, TeacherTargets, TopKTargets
    from .read import CachedTeacherDataset, ChunkShuffleBatchSampler, collate
    from .store import TeacherCache
    from .train import evaluate, train_student
