"""Finding damage: chunks that are missing, of the wrong size, corrupt, or not this cache's, and
arrays stored once (a head's layer) that do not match their recorded digest.

Work is bounded by what is on disk, never by what a (possibly hostile) description claims:
the inventory lists the files that exist and compares them with the expected chunks, naming at
most :data:`MAX_LISTED` missing ones and counting the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import zarr
from zarr.core.sync import sync

from ..errors import KdcacheError
from ..format.meta import BLOCKS, ArrayInfo
from .chunkfile import ChunkError, read_chunk
from .constants import constant_error
from .layout import chunk_key
from .paths import walk_files

if TYPE_CHECKING:
    from .cache import TeacherCache

__all__ = ["ChunkProblem", "inventory", "verify", "MAX_LISTED"]

MAX_LISTED = 100


@dataclass(frozen=True)
class ChunkProblem:
    """A stored object (chunk, or shard on object storage) that is missing, the wrong size,
    corrupt or misplaced, with the rows it holds (``count`` > 1: that many such objects)."""

    array: str
    chunk: int
    start: int
    stop: int
    reason: str
    count: int = 1
    unit: str = "chunk"  # or "block": what ``chunk`` counts

    def __str__(self) -> str:
        more = f" (and {self.count - 1} more like it)" if self.count > 1 else ""
        return f"{self.array} {self.unit} {self.chunk} (rows {self.start}..{self.stop - 1}): {self.reason}{more}"


def _objects(cache: "TeacherCache", path: str) -> tuple[int, int, int, Callable[[int], int | None]]:
    """(rows per stored object, objects, array length, object index -> its block, None for a
    constant: written at creation, before any block) of array ``path``."""
    if path == BLOCKS:
        return 1, cache.n_blocks, cache.n_blocks, lambda i: i
    a: ArrayInfo = cache.array_info(path)
    if path in _constants(cache):
        return a.chunk_rows, -(-cache.length(a) // a.chunk_rows), cache.length(a), lambda i: None
    if a.per_token:  # a packed array: token chunks, each block's range chunk-aligned
        starts = cache.token_blocks()[:, 0]
        length = cache.length(a)
        return a.chunk_rows, -(-length // a.chunk_rows), length, \
            lambda i: max(0, int(np.searchsorted(starts, i * a.chunk_rows, side="right")) - 1)
    per = cache.block_rows if cache._layout()[path][3] else a.chunk_rows  # shards on object storage
    return per, -(-cache.rows // per), cache.rows, lambda i: i * per // cache.block_rows


def _present(cache: "TeacherCache", path: str, ndim: int) -> tuple[dict[int, int | str | None], str | None]:
    """Stored object index -> size in bytes (None where the store does not say, or why it is not
    a chunk file: a link or special file), for the objects that exist and are named as kdcache
    names them; and why none of the array's objects can be read (a link on the way), if so."""
    tail = ("0",) * (ndim - 1)
    found: dict[int, int | str | None] = {}
    if isinstance(cache.group.store, zarr.storage.LocalStore):
        files, strays = walk_files(cache.path, f"{path}/c")  # never through a link
        if strays and strays[0][0] == f"{path}/c":
            return {}, f"{strays[0][1]}: its chunks are reached through it"
        for rel, what in [*files, *strays]:
            parts = tuple(rel[len(path) + 3:].split("/"))
            if parts[0].isdigit() and (parts[1:] == tail or (len(parts) < ndim and isinstance(what, str))):
                found[int(parts[0])] = what if isinstance(what, int) else f"{rel} is {what}"
        return found, None

    async def listing() -> list[str]:
        return [k async for k in cache.group.store.list_prefix(f"{path}/c/")]
    for key in sync(listing()):
        parts = tuple(key[len(path) + 3:].split("/"))
        if len(parts) == ndim and parts[0].isdigit() and parts[1:] == tail:
            found[int(parts[0])] = None
    return found, None


def inventory(cache: "TeacherCache", done: np.ndarray | None = None) -> list[ChunkProblem]:
    """Expected objects that are missing or (local stores) of the wrong size. ``done`` (bool per
    block) limits the check to finished blocks; by default every block. The description bounds
    the number of objects (:data:`kdcache.format.MAX_OBJECTS`), so this loop is bounded too."""
    problems: list[ChunkProblem] = []
    for path in cache.array_paths():
        per, count, length, block_of = _objects(cache, path)
        ndim = 2 if path == BLOCKS else 1 + len(cache.array_info(path).shape)
        present, unreachable = _present(cache, path, ndim)
        size = None
        if path != BLOCKS and isinstance(cache.group.store, zarr.storage.LocalStore):
            size = per * cache.array_info(path).row_bytes + 4
        listed: list[ChunkProblem] = []
        for index in range(count):
            block = block_of(index)
            if done is not None and block is not None and not done[min(block, len(done) - 1)]:
                continue  # an unfinished block's objects are not there yet
            if unreachable is not None:
                reason = unreachable
            elif index not in present:
                reason = "chunk file is missing"
            elif isinstance(present[index], str):
                reason = str(present[index])
            elif size is not None and present[index] != size:
                reason = "chunk file has the wrong size"
            else:
                continue
            if len(listed) < MAX_LISTED:
                listed.append(ChunkProblem(path, index, index * per, min((index + 1) * per, length), reason))
            else:
                last = listed[-1]
                listed[-1] = ChunkProblem(last.array, last.chunk, last.start, last.stop, last.reason, last.count + 1)
        problems += listed
    return problems


def _constants(cache: "TeacherCache") -> dict[str, Any]:
    return {c.path: c for c in cache.meta.constant_arrays()}


def _blocks_of(cache: "TeacherCache", problem: ChunkProblem) -> range:
    if problem.array in _constants(cache):  # rewritten whole by --repair, no block to write again
        return range(0)
    if problem.array == BLOCKS or problem.unit == "block":
        return range(problem.chunk, problem.chunk + 1)
    if cache.array_info(problem.array).per_token:  # token positions -> the blocks whose ranges hold them
        starts = cache.token_blocks()[:, 0]
        first, last = (int(np.searchsorted(starts, t, side="right")) - 1 for t in (problem.start, problem.stop - 1))
        return range(max(first, 0), last + 1)
    return range(problem.start // cache.block_rows, -(-problem.stop // cache.block_rows))


def damaged_blocks(cache: "TeacherCache", problems: list[ChunkProblem]) -> list[int]:
    """The write blocks that hold the rows of ``problems`` (a summarised problem's further
    objects are not named: repair, then verify again)."""
    return sorted({b for p in problems for b in _blocks_of(cache, p) if b < cache.n_blocks})


def verify(cache: "TeacherCache") -> list[ChunkProblem]:
    """Inventory, then read every finished block of every array through the checked reads
    (crc32c; for format 3 the block digest binding it to this cache, array and position)."""
    done = None
    if not cache.complete:
        done = cache.blocks_record()[:, 0].astype(bool)
    problems = inventory(cache, done)
    if len(problems) >= MAX_LISTED:
        return problems
    bad = set(damaged_blocks(cache, problems))
    record = cache.blocks_record() if not bad or cache.meta.bound else None
    for block in range(cache.n_blocks):
        if block in bad or (done is not None and not done[block]):
            continue
        for path in [a.path for a in cache.meta.data_arrays()]:
            try:
                cache.load_block(path, block, record[block] if record is not None else None)
            except KdcacheError as err:
                problems += _pinpoint(cache, path, block) or [
                    ChunkProblem(path, block, *cache.block_range(block), _reason(err), unit="block")]
    listed = {p.array for p in problems}
    for c in cache.meta.constant_arrays():  # read whole against the digest the description records
        reason = constant_error(cache, c) if c.path not in listed else None
        if reason is not None:
            problems.append(ChunkProblem(c.path, 0, 0, c.shape[0], reason, unit="array"))
    return problems


def _reason(err: KdcacheError) -> str:
    return str(err).split(": ", 2)[-1].split("; run kdcache verify")[0]


def _pinpoint(cache: "TeacherCache", path: str, block: int) -> list[ChunkProblem]:
    """The chunks of a bad block whose own crc32c fails (local stores); none when every chunk
    is intact but the block is not this cache's (copied or moved)."""
    if not isinstance(cache.group.store, zarr.storage.LocalStore):
        return []
    a = cache.array_info(path)
    start, stop = cache.array_range(a, block)
    found = []
    for c in range(start // a.chunk_rows, -(-stop // a.chunk_rows)):
        try:
            read_chunk(Path(cache.path), chunk_key(path, 1 + len(a.shape), c), (a.chunk_rows, *a.shape), a.dtype)
        except (FileNotFoundError, ChunkError):
            found.append(ChunkProblem(path, c, c * a.chunk_rows, min((c + 1) * a.chunk_rows, cache.length(a)),
                                      "checksum mismatch (the chunk is corrupt)",
                                      unit="token chunk" if a.per_token else "chunk"))
    return found
