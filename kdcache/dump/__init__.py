"""Stage one: run the teacher once over the transfer set and store its outputs.

- :mod:`.teacher`  :func:`dump_teacher`, top to bottom: target, prepare, agree, run, finalise
- :mod:`.prepare`  where the cache goes and what is there: a hit, or a cache created, resumed, repaired
- :mod:`.create`   a new cache planned from a forward pass of the teacher on two rows
- :mod:`.loop`     the teacher over the dump's blocks, outputs encoded on the device
- :mod:`.writer`   batches in, whole blocks on disk out, on other threads
"""

from .prepare import default_cache_root
from .teacher import dump_teacher

__all__ = ["dump_teacher", "default_cache_root"]
