"""A head cache's output layer for stage two: its weight and bias read once, whole, checked against
the digests the cache's description records, and held as one
:class:`~kdcache.losses.targets.HeadWeights` per cache and process, which every batch's
:class:`~kdcache.losses.targets.HeadTargets` carries."""

from __future__ import annotations

import numpy as np

from ..format.codecs import DenseCodec
from ..losses.targets import HeadWeights
from ..store import TeacherCache
from ..store.constants import load_constant

__all__ = ["output_layer"]


def output_layer(cache: TeacherCache) -> HeadWeights | None:
    """The output layer a head cache stores once, on the host (None for other caches)."""
    constants = cache.meta.logits.constants
    if not constants:
        return None
    weight_dtype = getattr(cache.meta.logits.codec, "weight_dtype", "float32")
    as_tensor = DenseCodec(weight_dtype).to_tensor  # bfloat16 bits back to bfloat16
    held = {key: as_tensor(np.ascontiguousarray(load_constant(cache, c))) for key, c in constants.items()}
    key = ":".join([cache.fingerprint, *(f"{c.digest:08x}" for c in constants.values())])
    return HeadWeights.shared(key, held["weight"], held.get("bias"))
