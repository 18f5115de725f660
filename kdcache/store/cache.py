"""``TeacherCache``: one cache, created and filled by stage one, opened and read by stage two.

A block's record is written only after all of its chunks are on disk; ``complete`` is set only
after every block's record is. Reading needs only zarr and numpy: nothing in the store refers
to the teacher's code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from ..errors import KdcacheError
from ..format import BLOCK_FIELDS, BLOCKS, ROW_DIGEST, VIEW_PARAMS, ArrayInfo, CacheMeta, DumpStats, OutputSpec, \
    TeacherAccuracy, read_meta, write_meta
from . import verify as _verify
from .chunkfile import ChunkFileWriter, io_pool, read_chunk
from .faults import fault_point
from .layout import chunk_key
from .location import exists, is_remote, open_store, refuse_file, remote_fs

__all__ = ["TeacherCache"]


class TeacherCache:
    """A teacher-output cache: its zarr group and its description :attr:`meta` (a
    :class:`~kdcache.format.CacheMeta`)."""

    def __init__(self, path: str | Path, group: zarr.Group, meta: CacheMeta | None = None) -> None:
        self.path = str(path)
        self.group = group
        self.meta = meta if meta is not None else read_meta(group, self.path)
        self._files: ChunkFileWriter | None = None
        self._arrays: dict[str, zarr.Array] = {}  # opened zarr arrays, for their chunk layout

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return f"TeacherCache({self.path!r}, {self.rows} rows, {', '.join(self.array_paths()[:-2])}, {state})"

    # ---- create / open ------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, meta: CacheMeta) -> "TeacherCache":
        """Create an empty cache (``complete`` false). Fails if something is already at ``path``."""
        try:
            group = zarr.open_group(store=open_store(path, False), mode="w-", zarr_format=3)
            # on object storage each write block is one shard object per array (whole-shard writes)
            shard = meta.block_rows if is_remote(path) else None
            for a in (a for o in meta.outputs.values() for a in o.arrays.values()):
                cls._create_array(group, a.path, (meta.rows, *a.shape), a.dtype, a.chunk_rows, shard)
            cls._create_array(group, ROW_DIGEST, (meta.rows,), np.dtype("uint64"), meta.block_rows)
            if meta.view_params is not None:
                cls._create_array(group, VIEW_PARAMS, (meta.rows, *meta.view_params.shape), np.dtype("float32"),
                                  meta.block_rows)
            # one chunk per block so each block's record is its own file, written after its data
            cls._create_array(group, BLOCKS, (meta.blocks, BLOCK_FIELDS), np.dtype("int64"), 1)
            write_meta(group, meta)
        except OSError as err:
            raise KdcacheError(f"cannot create cache at {path}: {err.strerror or err}; "
                               "check the path is writable and has space") from None
        return cls(path, group, meta)

    @staticmethod
    def _create_array(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: np.dtype, chunk_rows: int,
                      shard_rows: int | None = None) -> None:
        shards = (shard_rows, *shape[1:]) if shard_rows and shard_rows > chunk_rows else None
        group.create_array(name, shape=shape, chunks=(chunk_rows, *shape[1:]), shards=shards, dtype=dtype,
                           fill_value=0, compressors=[Crc32cCodec()], config={"write_empty_chunks": True})

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "TeacherCache":
        """Open an existing cache (complete or not) for reading, or with ``mode="r+"`` to resume it."""
        refuse_file(path)
        if not exists(path):
            raise KdcacheError(f"no cache at {path}; run kdcache dump-teacher first (or check the path)")
        try:
            group = zarr.open_group(store=open_store(path, mode == "r"), mode=mode, zarr_format=3)
        except (ValueError, KeyError, OSError) as err:
            raise KdcacheError(f"{path} is not a readable zarr v3 cache: {err}") from None
        return cls(path, group)

    exists = staticmethod(exists)

    # ---- the description ------------------------------------------------------------------
    @property
    def outputs(self) -> dict[str, OutputSpec]:
        return dict(self.meta.outputs)

    @property
    def rows(self) -> int:
        return self.meta.rows

    @property
    def block_rows(self) -> int:
        return self.meta.block_rows

    @property
    def n_blocks(self) -> int:
        return self.meta.blocks

    @property
    def complete(self) -> bool:
        return self.meta.complete

    @property
    def fingerprint(self) -> str:
        return self.meta.fingerprint

    @property
    def views(self) -> int:
        return self.meta.views

    @property
    def seed(self) -> int | None:
        return self.meta.seed

    @property
    def view_params(self) -> ArrayInfo | None:
        return self.meta.view_params

    @property
    def hidden_names(self) -> list[str]:
        return self.meta.hidden_names

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.rows)

    def array_paths(self) -> list[str]:
        extra = [VIEW_PARAMS] if self.view_params is not None else []
        return [a.path for o in self.outputs.values() for a in o.arrays.values()] + [ROW_DIGEST, *extra, BLOCKS]

    # ---- dump side --------------------------------------------------------------------------
    def blocks_record(self) -> np.ndarray:
        """(blocks, 5) int64: done flag, rows, labelled rows/tokens, those the teacher got right,
        real tokens (format 1 caches have the first 4 columns)."""
        return self._read(BLOCKS, 0, self.n_blocks)

    def write_block(self, block: int, arrays: dict[str, np.ndarray], digests: np.ndarray,
                    stats: tuple[int, ...]) -> None:
        """Write one block's rows of every array, then its completion record."""
        start, _ = self.block_range(block)
        for path, data in arrays.items():
            self._write_rows(path, start, data)
            fault_point("array-written")
        self._write_rows(ROW_DIGEST, start, digests)
        self._write_rows(BLOCKS, block, np.array([[1, *stats]], dtype=np.int64))
        fault_point("block")

    def _write_rows(self, path: str, start: int, data: np.ndarray) -> None:
        """Write whole chunks of rows ``start:start+len(data)`` (``start`` chunk-aligned): on a
        local store the chunk files directly, in parallel (:mod:`.chunkfile`), edge chunks padded
        with the fill value 0; elsewhere through zarr."""
        array = self.group[path]
        if not isinstance(self.group.store, zarr.storage.LocalStore) or sys.byteorder != "little":
            array[start:start + len(data)] = data
            return
        if self._files is None:
            self._files = ChunkFileWriter()
        chunk_rows = array.chunks[0]
        jobs = []
        for lo in range(0, len(data), chunk_rows):
            rows = data[lo:lo + chunk_rows]
            if len(rows) < chunk_rows:  # the edge chunk is stored at full size, zero-padded
                rows = np.concatenate([rows, np.zeros((chunk_rows - len(rows), *rows.shape[1:]), rows.dtype)])
            jobs.append((Path(self.path) / chunk_key(path, array, (start + lo) // chunk_rows), rows))
        for future in [io_pool().submit(self._files.write, file, rows) for file, rows in jobs]:
            future.result()

    def finalize(self, dump: DumpStats) -> None:
        """Mark the cache complete once every block's record is on disk."""
        record = self.blocks_record()
        if not record[:, 0].all():
            missing = int(np.flatnonzero(record[:, 0] == 0)[0])
            raise RuntimeError(f"finalize called with block {missing} not written")
        accuracy = TeacherAccuracy(labelled=int(record[:, 2].sum()), correct=int(record[:, 3].sum()))
        self.meta = self.meta.finished(dump=dump, accuracy=accuracy, tokens=int(record[:, 4].sum()))
        fault_point("finalize")
        write_meta(self.group, self.meta)

    def remove_partial_files(self) -> int:
        """Delete the temp files a killed writer left (zarr writes ``*.partial`` then renames).
        Call only while holding the dump lock."""
        if is_remote(self.path):  # object stores write whole objects: nothing is left half-written
            return 0
        leftovers = list(Path(self.path).rglob("*.partial"))
        for f in leftovers:
            f.unlink(missing_ok=True)
        return len(leftovers)

    # ---- read side --------------------------------------------------------------------------
    def _read(self, path: str, start: int, stop: int) -> np.ndarray:
        """Stored rows ``start:stop`` of array ``path``, checksums checked: a local cache's chunk
        files read directly (:func:`.chunkfile.read_chunk`), anything else through zarr."""
        try:
            if isinstance(self.group.store, zarr.storage.LocalStore) and sys.byteorder == "little":
                return self._read_chunks(path, start, stop)
            return self.group[path][start:stop]
        except ValueError as err:
            raise KdcacheError(f"cache {self.path}: {path} rows {start}..{stop - 1} are corrupt ({err}); "
                               f"run kdcache verify {self.path}, then dump again") from None

    def _read_chunks(self, path: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` from the chunk files themselves; one whole chunk is returned as read."""
        array = self._arrays.get(path)
        if array is None:
            array = self._arrays[path] = self.group[path]
        chunk_rows, shape, dtype = array.chunks[0], tuple(array.shape[1:]), array.dtype
        stop = min(stop, array.shape[0])
        first, last = start // chunk_rows, -(-stop // chunk_rows)
        chunks = [self._chunk_or_fill(Path(self.path) / chunk_key(path, array, c), (chunk_rows, *shape), dtype)
                  for c in range(first, last)]
        if len(chunks) == 1 and start == first * chunk_rows and stop - start == chunk_rows:
            return chunks[0]
        whole = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        return whole[start - first * chunk_rows:stop - first * chunk_rows].copy()

    @staticmethod
    def _chunk_or_fill(file: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A chunk file's rows; a missing one reads as the fill value 0, as zarr reads it (a block
        not yet written; readers refuse a finished cache with missing chunks when they open it)."""
        try:
            return read_chunk(file, shape, dtype)
        except FileNotFoundError:
            return np.zeros(shape, dtype)

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Stored rows ``start:stop`` of dense output ``name`` (stored dtype, checksums checked)."""
        arrays = self.read_output(name, start, stop)
        if list(arrays) != [""]:
            raise KdcacheError(f"output {name!r} is stored as {self.outputs[name].codec.name}; use read_output")
        return arrays[""]

    def read_output(self, name: str, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of every array of output ``name``: codec key -> stored rows."""
        return {key: self._read(a.path, start, stop) for key, a in self.outputs[name].arrays.items()}

    def read_array(self, path: str, start: int, stop: int) -> np.ndarray:
        return self._read(path, start, stop)

    def row_digests(self) -> np.ndarray:
        return self._read(ROW_DIGEST, 0, self.rows)

    def missing_chunks(self) -> list[_verify.ChunkProblem]:
        """Chunks whose file is gone (zarr would silently read them as zeros)."""
        return _verify.missing_chunks(self)

    def check_chunks(self) -> None:
        """Raise one clear line if any chunk file is missing."""
        problems = self.missing_chunks()
        if problems:
            raise KdcacheError(f"cache {self.path} is damaged: {problems[0]} ({len(problems)} bad chunks); "
                               f"run kdcache verify {self.path}, then dump again")

    def verify(self) -> list[_verify.ChunkProblem]:
        """Read every chunk of every array; return the missing and corrupt ones."""
        return _verify.verify(self)

    def nbytes_on_disk(self) -> dict[str, int]:
        """Bytes on disk (or in the bucket) per array."""
        if is_remote(self.path):
            fs, root = remote_fs(self.path)
            return {path: int(fs.du(f"{root}/{path}")) for path in self.array_paths()}
        return {path: sum(f.stat().st_size for f in (Path(self.path) / path).rglob("*") if f.is_file())
                for path in self.array_paths()}
