"""Stage two's data: the transfer set zipped with the cached teacher outputs.

- :mod:`.dataset`   :class:`CachedTeacherDataset`: batches of (inputs, labels, teacher targets), checked
- :mod:`.blocks`    rows read from disk a whole block at a time, kept in an LRU, read ahead
- :mod:`.resident`  targets held whole on the host or the GPU, gathered where the step runs
- :mod:`.sampler`   shuffled batches that read few chunks
- :mod:`.batch`     :class:`TeacherBatch` and :func:`collate`
- :mod:`.replay`    a cache's seeded rows regenerated and checked (``verify --replay``)
"""

from .batch import TeacherBatch, collate
from .dataset import CachedTeacherDataset, open_complete_cache
from .replay import replay_mismatches
from .sampler import ChunkShuffleBatchSampler

__all__ = ["CachedTeacherDataset", "ChunkShuffleBatchSampler", "TeacherBatch", "collate", "open_complete_cache",
           "replay_mismatches"]
