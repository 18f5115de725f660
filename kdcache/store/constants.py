"""Arrays a codec stores once per cache (a head cache's output layer): written whole at creation
(and again by a resumed creation or ``--repair``), read whole, and checked against the digest the
description records (:class:`~kdcache.format.meta.ConstantArray`) on every read."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr

from ..errors import KdcacheError
from ..format.meta import ConstantArray
from .chunkfile import ChunkError, read_rows
from .identity import constant_digest

if TYPE_CHECKING:
    from .cache import TeacherCache

__all__ = ["load_constant", "write_constants", "constant_error", "planned_constant"]

CHUNK_BYTES = 2 << 20


def planned_constant(fingerprint: str, path: str, data: np.ndarray) -> ConstantArray:
    """The description of ``data`` stored once at ``path`` of the cache ``fingerprint``: ~2 MB
    chunks of whole rows, and the digest of its bytes."""
    row_bytes = max(1, data[:1].nbytes)
    chunk_rows = max(1, min(len(data), CHUNK_BYTES // row_bytes))
    return ConstantArray(path, tuple(data.shape), data.dtype, chunk_rows, constant_digest(fingerprint, path, data))


def _damaged(cache: "TeacherCache", what: str) -> KdcacheError:
    return KdcacheError(f"cache {cache.path} is damaged: {what}; run kdcache verify {cache.path}, then repair it with "
                        "the dump-teacher command that wrote it plus --repair")


def load_constant(cache: "TeacherCache", c: ConstantArray) -> np.ndarray:
    """The whole constant ``c`` of ``cache``, as stored: a missing or torn chunk, or bytes that
    do not match the digest the description records, is one line."""
    try:
        if isinstance(cache.group.store, zarr.storage.LocalStore):  # the chunk files themselves, never a fill value
            data = read_rows(Path(cache.path), c.path, (c.chunk_rows, *c.shape[1:]), c.dtype, c.shape[0], 0, c.shape[0])
        else:
            data = np.asarray(cache.group[c.path][:])
    except ChunkError as err:
        raise _damaged(cache, str(err)) from None
    except Exception as err:  # a torn object can fail in any codec
        raise _damaged(cache, f"{c.path} cannot be read ({type(err).__name__})") from None
    if data.shape != c.shape or constant_digest(cache.fingerprint, c.path, data) != c.digest:
        raise _damaged(cache, f"{c.path} is not the array this cache stored there (its digest differs)")
    return data


def write_constants(cache: "TeacherCache", data: dict[str, np.ndarray], only_bad: bool = False) -> list[str]:
    """Write the constants ``data`` (path -> array, each matching its description's digest);
    with ``only_bad``, only those that do not read back whole and matching. The paths written."""
    written = []
    for c in cache.meta.constant_arrays():
        array = np.ascontiguousarray(data[c.path])
        if constant_digest(cache.fingerprint, c.path, array) != c.digest:
            raise KdcacheError(f"the teacher's {c.path} differs from the one cache {cache.path} was created with; "
                               "dump this teacher to another --out")
        if only_bad and not constant_error(cache, c):
            continue
        cache._write_rows(c.path, 0, array)
        written.append(c.path)
    return written


def constant_error(cache: "TeacherCache", c: ConstantArray) -> str | None:
    """Why constant ``c`` does not read back whole and matching its digest, or None."""
    try:
        load_constant(cache, c)
    except KdcacheError as err:
        return str(err).split(" is damaged: ", 1)[-1].split("; run kdcache verify")[0]
    return None
