"""Finding damage: chunks that are missing or fail their checksum, with the rows they hold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from zarr.core.sync import sync

from .layout import chunk_key

if TYPE_CHECKING:
    from .cache import TeacherCache

__all__ = ["ChunkProblem", "missing_chunks", "verify", "unwritten"]


@dataclass(frozen=True)
class ChunkProblem:
    """A chunk that is missing or fails its checksum, with the rows it holds."""

    array: str
    chunk: int
    start: int
    stop: int
    reason: str

    def __str__(self) -> str:
        return f"{self.array} chunk {self.chunk} (rows {self.start}..{self.stop - 1}): {self.reason}"


MISSING = "chunk file is missing"


def stored_chunks(cache: "TeacherCache", path: str) -> Iterator[tuple[int, int, int, str]]:
    """``(chunk, first row, stop row, store key)`` of every stored object of array ``path``."""
    array = cache.group[path]
    chunk_rows = array.shards[0] if array.shards is not None else array.chunks[0]  # one stored object each
    for c in range(-(-array.shape[0] // chunk_rows)):
        yield c, c * chunk_rows, min((c + 1) * chunk_rows, array.shape[0]), chunk_key(path, array, c)


def _stored_keys(cache: "TeacherCache", path: str) -> set[str]:
    async def listing() -> list[str]:
        return [k async for k in cache.group.store.list_prefix(f"{path}/c")]
    return set(sync(listing()))


def missing_chunks(cache: "TeacherCache") -> list[ChunkProblem]:
    """Chunks whose file is gone (zarr would silently read them as zeros)."""
    problems = []
    for path in cache.array_paths():
        keys = _stored_keys(cache, path)
        problems += [ChunkProblem(path, c, a, b, MISSING)
                     for c, a, b, key in stored_chunks(cache, path) if key not in keys]
    return problems


def verify(cache: "TeacherCache") -> list[ChunkProblem]:
    """Read every chunk of every array; return the missing and corrupt ones."""
    problems = missing_chunks(cache)
    seen = {(p.array, p.chunk) for p in problems}
    for path in cache.array_paths():
        for c, a, b, _ in stored_chunks(cache, path):
            if (path, c) in seen:
                continue
            try:
                cache.group[path][a:b]
            except Exception as err:  # a torn chunk can fail in any codec
                problems.append(ChunkProblem(path, c, a, b, f"{type(err).__name__}: {err}"))
    return problems


def unwritten(cache: "TeacherCache", problems: list[ChunkProblem]) -> list[ChunkProblem]:
    """The missing chunks that belong to blocks the dump has not written yet: what an
    incomplete cache is expected to lack (a resumed dump writes them), as opposed to damage."""
    from ..format import BLOCKS

    done = cache.blocks_record()[:, 0] != 0
    block_rows = cache.block_rows

    def blocks_of(p: ChunkProblem) -> range:
        if p.array == BLOCKS:  # one chunk per block: its "rows" are blocks
            return range(p.start, p.stop)
        return range(p.start // block_rows, (p.stop - 1) // block_rows + 1)

    return [p for p in problems if p.reason == MISSING and not any(done[b] for b in blocks_of(p))]
