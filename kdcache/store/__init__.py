"""The cache on disk or object storage: one module per concept.

- :mod:`.layout`    block and chunk planning, chunk keys
- :mod:`.identity`  what names a cache: teacher weights, dataset and output choices
- :mod:`.location`  local paths and fsspec URLs: open, list, remove
- :mod:`.paths`     paths inside a local cache: no link or special file on the way, bounded metadata
- :mod:`.lock`      one writer per cache (``flock``)
- :mod:`.chunkfile` whole chunk files written directly (O_DIRECT where allowed)
- :mod:`.faults`    the crash-test hook
- :mod:`.cache`     :class:`TeacherCache`: create, fill, open, read
- :mod:`.verify`    missing and corrupt chunks
- :mod:`.values`    what a block's values may be, checked as it loads

The description a cache records about itself is :class:`kdcache.format.CacheMeta`.
"""

from ..format.meta import BLOCKS, FORMAT_VERSION, ROW_DIGEST, VIEW_PARAMS, ArrayInfo, CacheMeta, OutputSpec
from .cache import TeacherCache
from .faults import fault_point
from .identity import block_digest, dataset_digest, fingerprint, weights_digest
from .layout import plan_blocks
from .location import is_disk_full, is_remote, list_dir, remove_cache
from .lock import DumpLock, dump_in_progress
from .verify import ChunkProblem

__all__ = ["FORMAT_VERSION", "BLOCKS", "ROW_DIGEST", "VIEW_PARAMS", "ArrayInfo", "OutputSpec", "CacheMeta",
           "TeacherCache", "DumpLock", "ChunkProblem", "plan_blocks", "fingerprint", "weights_digest",
           "dataset_digest", "block_digest", "dump_in_progress", "remove_cache", "is_disk_full", "is_remote", "list_dir",
           "fault_point"]
