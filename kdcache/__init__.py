"""kdcache: offline knowledge distillation from a cached teacher.

Stage one, :func:`dump_teacher`, runs the teacher once and stores its outputs in a zarr
cache; stage two, :func:`train_student` (or your own loop over :class:`CachedTeacherDataset`
with the losses in :mod:`kdcache.losses`), trains students from it without the teacher.
"""

__version__ = "0.1.0"

from . import losses  # noqa: E402
from .targets import SampledTargets, SoftTargets, TeacherTargets, TopKTargets  # noqa: E402
from .config import DumpConfig, Hint, TrainConfig  # noqa: E402
from .dataset import CachedTeacherDataset, ChunkShuffleBatchSampler, collate  # noqa: E402
from .dump import dump_teacher  # noqa: E402
from .errors import KdcacheError  # noqa: E402
from .format import CacheMeta  # noqa: E402
from .losses import AttentionTransferLoss, HiddenStateLoss, KLDivLoss, SoftTargetCrossEntropy  # noqa: E402
from .store import TeacherCache  # noqa: E402
from .train import train_student  # noqa: E402

__all__ = ["__version__", "KdcacheError", "TeacherCache", "CacheMeta", "dump_teacher", "DumpConfig",
           "CachedTeacherDataset", "ChunkShuffleBatchSampler", "collate", "TeacherTargets", "TopKTargets",
           "SampledTargets", "SoftTargets", "train_student", "TrainConfig", "Hint", "losses", "KLDivLoss", "SoftTargetCrossEntropy",
           "HiddenStateLoss", "AttentionTransferLoss"]
