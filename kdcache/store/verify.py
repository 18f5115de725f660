"""Finding damage: chunks that are missing or fail their checksum, with the rows they hold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from zarr.core.sync import sync

from .layout import chunk_key

if TYPE_CHECKING:
    from .cache import TeacherCache

__all__ = ["ChunkProblem", "missing_chunks", "verify"]


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
        problems += [ChunkProblem(path, c, a, b, "chunk file is missing")
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
