"""What a block's stored values may be, checked once as the block is loaded.

The block digests bind bytes to their cache and position but anyone can recompute them, so a
forged cache passes them; a value check needs no secret. Each block of a sparse output is
checked by its codec (``stored_problem``: class ids below the vocabulary, draw counts adding up
to the recorded draws, kept probabilities that sum to at most 1), and a packed cache's spans
against its token blocks, before any of it reaches a reader, ``verify`` or an allocation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..format.meta import SPANS
from ..format.packing import spans_problem

if TYPE_CHECKING:
    from .cache import TeacherCache

__all__ = ["value_problem"]


def value_problem(cache: "TeacherCache", path: str, block: int, data: np.ndarray) -> str | None:
    """Why block ``block`` of array ``path`` (its stored rows ``data``) holds values its cache
    cannot hold, or None."""
    meta = cache.meta
    if path == SPANS and meta.packed is not None:
        return spans_problem(data, int(cache.token_blocks()[block][1]))
    for output in meta.outputs.values():
        for key, a in output.arrays.items():
            check = getattr(output.codec, "stored_problem", None)
            if a.path != path or check is None:
                continue
            # a padded sequence cache stores its padding positions as zeros
            padded = meta.mask_key is not None and not a.per_token and len(output.shape) >= 2
            return check(key, data, lambda other: cache.load_block(output.arrays[other].path, block), padded)
    return None
