"""``TeacherCache``: one cache, created and filled by stage one, opened and read by stage two.

A block's record is written only after all of its chunks are on disk; ``complete`` is set only
after every block's record is. A cache is untrusted input until checked: opening it parses its
description (:class:`~kdcache.format.CacheMeta`) and compares every array's zarr metadata with
it; every read of stored rows goes through :meth:`TeacherCache.load_block`, which never returns
a fill value for a missing chunk and checks the block's digest (format 3), so a chunk from
another cache or another position is refused. Reading needs only zarr and numpy: nothing in the
store refers to the teacher's code.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.core.sync import sync

from ..errors import KdcacheError
from ..format.attrs import read_meta, write_meta
from ..format.meta import (ATTR, BLOCKS, ROW_DIGEST, TOKEN_BLOCKS, ArrayInfo, CacheMeta, DumpStats, OutputSpec,
                           TeacherAccuracy)
from . import verify as _verify
from .arrays import (create_array, described_group, layout_problem, planned_layout, restore_layout,
                     write_group_document)
from .chunkfile import ChunkError, ChunkFileWriter, read_all, read_rows
from .faults import fault_point
from .identity import block_digest
from .location import exists, is_remote, no_cache, open_store, refuse_file, size_on_disk
from .paths import damaged, metadata_problem, remove_partial, unreadable_description
from .values import value_problem

__all__ = ["TeacherCache"]


class TeacherCache:
    """A teacher-output cache: its zarr group and its description :attr:`meta` (a
    :class:`~kdcache.format.CacheMeta`)."""

    def __init__(self, path: str | Path, group: zarr.Group | None = None, meta: CacheMeta | None = None) -> None:
        """``TeacherCache(path)`` opens the cache at ``path`` for reading, as :meth:`open` does."""
        if group is None:
            self.__dict__.update(type(self).open(path).__dict__)
            return
        self.path = str(path)
        self.group = group
        self.meta = meta if meta is not None else read_meta(group, self.path)
        self._files: ChunkFileWriter | None = None
        self._blocks: np.ndarray | None = None
        self._tokens: np.ndarray | None = None
        self._constants = {c.path: c for c in self.meta.constant_arrays()}  # stored once: head/weight, head/bias
        self._arrays = {a.path: a for a in self.meta.data_arrays()} | {p: c.row for p, c in self._constants.items()}

    def __repr__(self) -> str:
        """``TeacherCache('path', 1200 rows: logits (10,) float16, hidden/features (16,) float16;
        complete, fingerprint 3f...)``"""
        outputs = ", ".join(f"{'logits' if name == 'logits' else 'hidden/' + name} {o.shape} {o.form}"
                            for name, o in self.outputs.items())
        views = f" ({self.views} views)" if self.seed is not None else ""
        state = "complete" if self.complete else "incomplete"
        return (f"TeacherCache({self.path!r}, {self.rows} rows{views}: {outputs}; {state}, "
                f"fingerprint {self.fingerprint})")

    # ---- create / open ------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, meta: CacheMeta) -> "TeacherCache":
        """Create an empty cache (``complete`` false). Fails if something is already at ``path``.

        The group document is written with its description in one write, then the arrays: a
        creation killed at any point leaves nothing, or a kdcache cache the same command resumes
        (:meth:`create_missing_arrays`)."""
        try:
            group = zarr.open_group(store=open_store(path, False), mode="w-", zarr_format=3,
                                    attributes={"kdcache": meta.to_attrs()})
            fault_point("created-group")
            cache = cls(path, group, meta)
            cache.create_missing_arrays()
        except OSError as err:
            raise KdcacheError(f"cannot create cache at {path}: {err.strerror or err}; "
                               "check the path is writable and has space, then rerun the same command") from None
        return cache

    def _layout(self) -> dict[str, tuple[tuple[int, ...], np.dtype, int, int | None]]:
        """Array path -> (shape, dtype, chunk rows, shard rows) as this cache's description says."""
        return planned_layout(self.meta, is_remote(self.path))

    def length(self, a: ArrayInfo) -> int:
        """Rows of array ``a``: the cache's, a packed per-token array's tokens or a constant's first axis."""
        if a.path in self._constants:
            return self._constants[a.path].shape[0]
        return self.meta.packed.capacity if a.per_token and self.meta.packed else self.rows

    def create_missing_arrays(self) -> None:
        """Create every array whose metadata is not there yet (all of them for a new cache; the
        rest of an interrupted creation on resume). An array present but different is damage."""
        for path, (shape, dtype, chunk_rows, shard) in self._layout().items():
            if not self._has_metadata(path):
                create_array(self.group, path, shape, dtype, chunk_rows, shard)
                fault_point("created-array")
        self.check_layout()

    _create_array = staticmethod(create_array)

    def _has_metadata(self, path: str) -> bool:
        return bool(sync(self.group.store.exists(f"{path}/zarr.json")))

    def check_layout(self) -> None:
        """Every array's zarr metadata (shape, dtype, endianness, codecs, chunking) must be what
        the cache's description says: one edited word in an array's ``zarr.json`` would
        otherwise reinterpret its bytes."""
        for path, spec in self._layout().items():
            problem = layout_problem(self.group, path, spec)
            if problem:
                raise damaged(self.path, problem)

    def restore_layout(self) -> list[str]:
        """Rewrite the metadata of every array whose ``zarr.json`` is missing, unreadable or not
        what the description says (its chunks are kept); the paths restored (``--repair``)."""
        self.group, restored = restore_layout(self.group, self._layout())
        return restored

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "TeacherCache":
        """Open an existing cache (complete or not) for reading, or with ``mode="r+"`` to resume it."""
        refuse_file(path)
        if not exists(path):
            raise no_cache(path)
        unsafe = None if is_remote(path) else metadata_problem(path, "zarr.json")  # before zarr reads it
        if unsafe:
            raise unreadable_description(path, unsafe)
        try:
            group = zarr.open_group(store=open_store(path, mode == "r"), mode=mode, zarr_format=3)
            attrs = group.attrs.asdict()
        except KdcacheError:
            raise
        except Exception as err:  # untrusted JSON parsed by zarr: any failure is damage
            raise unreadable_description(path, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                                         [:160]) from None
        cache = cls(path, group, CacheMeta.from_attrs(attrs.get("kdcache"), str(path)))
        if mode == "r":
            cache.check_layout()
        return cache

    @classmethod
    def described(cls, path: str | Path, meta: CacheMeta) -> "TeacherCache":
        """The cache at ``path`` as ``meta`` describes it, its own description neither read nor written
        (``--repair`` checks a rebuilt description against the arrays, then :meth:`write_description`)."""
        return cls(path, described_group(open_store(path, False), {ATTR: meta.to_attrs()}), meta)

    def write_description(self) -> None:
        """Write this cache's group document with its description, replacing what is there."""
        self.group = write_group_document(self.group, {ATTR: self.meta.to_attrs()})

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
        return block * self.block_rows, min((block + 1) * self.block_rows, self.rows)

    def token_blocks(self) -> np.ndarray:
        """(blocks, 2) int64 of a packed cache: each block's first token and token count, checked
        against the crc its description records."""
        if self._tokens is None:
            assert self.meta.packed is not None
            try:
                placed = self._whole(TOKEN_BLOCKS, np.dtype("int64"), 2, self.n_blocks)
            except Exception as err:  # a torn object can fail in any codec
                raise damaged(self.path, f"{TOKEN_BLOCKS} cannot be read ({type(err).__name__})") from None
            if google_crc32c.value(np.ascontiguousarray(placed).tobytes()) != self.meta.packed.blocks_crc:
                raise damaged(self.path, f"{TOKEN_BLOCKS} does not match the description's crc")
            self._tokens = placed
        return self._tokens

    def write_token_blocks(self, placed: np.ndarray) -> None:
        """Write where each block's tokens go (creation of a packed cache)."""
        self._write_rows(TOKEN_BLOCKS, 0, np.asarray(placed, np.int64))
        self._tokens = None

    def array_range(self, a: ArrayInfo, block: int) -> tuple[int, int]:
        """The rows (tokens, for a packed per-token array) block ``block`` holds in array ``a``."""
        if a.per_token and self.meta.packed is not None:
            start, count = (int(v) for v in self.token_blocks()[block])
            return start, start + count
        return self.block_range(block)

    def array_paths(self) -> list[str]:
        """Every array's path: those written by block, the completion record, the constants."""
        return [a.path for a in self.meta.data_arrays()] + [BLOCKS] + list(self._constants)

    def array_info(self, path: str) -> ArrayInfo:
        return self._arrays[path]

    # ---- dump side --------------------------------------------------------------------------
    def blocks_record(self) -> np.ndarray:
        """(blocks, fields) int64: done flag, rows, labelled rows/tokens, those the teacher got
        right, real tokens, then (format 3) each bound array's block digest. A block whose
        record is missing or unreadable reads as not done."""
        return self._whole(BLOCKS, np.dtype("int64"), self.meta.record_fields, 1)

    def _whole(self, path: str, dtype: np.dtype, width: int, chunk_rows: int) -> np.ndarray:
        """All rows of a small (rows, width) array (a missing or bad local chunk reads as zeros)."""
        if not isinstance(self.group.store, zarr.storage.LocalStore):
            return self.group[path][:]
        return read_all(Path(self.path), path, (self._layout()[path][0][0], width), dtype, chunk_rows)

    def write_block(self, block: int, arrays: dict[str, np.ndarray], digests: np.ndarray,
                    stats: tuple[int, ...]) -> None:
        """Write one block's rows of every array, then its completion record (with the digest
        of each array's block bytes, format 3)."""
        start, _ = self.block_range(block)
        for path, data in arrays.items():
            self._write_rows(path, self.array_range(self.array_info(path), block)[0], data)
            fault_point("array-written")
        self._write_rows(ROW_DIGEST, start, digests)
        written = {**arrays, ROW_DIGEST: digests}
        bound = [block_digest(self.fingerprint, path, block, written[path]) for path in self.meta.bound]
        self._write_rows(BLOCKS, block, np.array([[1, *stats, *bound]], dtype=np.int64))
        self._blocks = None
        fault_point("block")

    def forget_blocks(self, blocks: list[int]) -> None:
        """Mark blocks as not written (``--repair``) and the cache incomplete, so the next run
        of the dump writes them again."""
        for block in blocks:
            self._write_rows(BLOCKS, block, np.zeros((1, self.meta.record_fields), np.int64))
        self._blocks = None
        if self.complete:
            self.meta = replace(self.meta, complete=False)
            write_meta(self.group, self.meta)

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
        self._files.write_rows(Path(self.path), path, array.ndim, array.chunks[0], start, data)

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
        """Delete the temp files a killed writer left (``*.partial``, renamed into place when
        whole). Call only while holding the dump lock."""
        # object stores write whole objects: nothing is left half-written
        return 0 if is_remote(self.path) else remove_partial(self.path, self.array_paths())

    # ---- read side --------------------------------------------------------------------------
    def load_block(self, path: str, block: int, record: np.ndarray | None = None) -> np.ndarray:
        """Stored rows of block ``block`` of array ``path``, checked: a missing or torn chunk,
        or bytes that are not this cache's for this array and block, raise one line naming the
        rows. ``record`` is the block's ``_blocks`` row when the caller has it."""
        a = self.array_info(path)
        start, stop = self.array_range(a, block)
        if isinstance(self.group.store, zarr.storage.LocalStore):  # the chunk files themselves, never a fill value
            try:
                data = read_rows(Path(self.path), path, (a.chunk_rows, *a.shape), a.dtype, self.length(a), start, stop)
            except ChunkError as err:
                raise damaged(self.path, str(err)) from None
        else:
            try:
                data = self.group[path][start:stop]
            except Exception as err:  # a torn object can fail in any codec
                raise damaged(self.path, f"{path} rows {start}..{stop - 1} cannot be read "
                                          f"({type(err).__name__})") from None
        if self.meta.bound and path in self.meta.bound:
            if record is None:
                record = self._record()[block]
            column = 5 + self.meta.bound.index(path)
            if not record[0] or int(record[column]) != block_digest(self.fingerprint, path, block, data):
                raise damaged(self.path, f"{path} rows {start}..{stop - 1} are not the rows this cache wrote there "
                                          "(damaged, missing, or copied from another cache or position)")
        problem = value_problem(self, path, block, data)  # digests anyone can recompute; values need no secret
        if problem:
            raise damaged(self.path, f"{path} block {block} (rows {start}..{stop - 1}) {problem}")
        return data

    def _record(self) -> np.ndarray:
        """The completion record as of the first read (a reader's cache is finished: it does not
        change under it; a dump reads :meth:`blocks_record` afresh)."""
        if self._blocks is None:
            self._blocks = self.blocks_record()
        return self._blocks

    def load_array(self, path: str) -> np.ndarray:
        """Every row of array ``path``, each block checked as by :meth:`load_block`."""
        a = self.array_info(path)
        record = self._record() if self.meta.bound else None
        out = np.zeros((self.length(a), *a.shape), a.dtype)  # a packed array's alignment slack stays 0
        for block in range(self.n_blocks):
            start, stop = self.array_range(a, block)
            out[start:stop] = self.load_block(path, block, record[block] if record is not None else None)
        return out

    def _read(self, path: str, start: int, stop: int) -> np.ndarray:
        """Rows (tokens, of a packed per-token array) ``start:stop`` of an array, through the
        checked block reads; a packed array's slack between blocks reads as zeros."""
        a = self.array_info(path)
        if not 0 <= start <= stop <= self.length(a):
            raise IndexError(f"rows {start}..{stop} out of range for {path}'s {self.length(a)} rows")
        out = np.zeros((stop - start, *a.shape), a.dtype)
        if a.per_token:
            starts = self.token_blocks()[:, 0]
            first = max(0, int(np.searchsorted(starts, start, side="right")) - 1)
            last = int(np.searchsorted(starts, max(start, stop - 1), side="right")) - 1
        else:
            first, last = start // self.block_rows, max(start, stop - 1) // self.block_rows
        for block in range(first, last + 1 if stop > start else first):
            lo, hi = self.array_range(a, block)
            if hi > start and lo < stop:
                data = self.load_block(path, block)
                out[max(lo, start) - start:min(hi, stop) - start] = data[max(lo, start) - lo:min(hi, stop) - lo]
        return out

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Stored rows ``start:stop`` of dense output ``name`` (stored dtype, checked)."""
        arrays = self.read_output(name, start, stop)
        if list(arrays) != [""]:
            raise KdcacheError(f"output {name!r} is stored as {self.outputs[name].codec.name}; use read_output")
        return arrays[""]

    def read_output(self, name: str, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of every array of output ``name``: codec key -> stored rows."""
        return {key: self._read(a.path, start, stop) for key, a in self.outputs[name].arrays.items()}

    read_array = _read

    def row_digests(self) -> np.ndarray:
        return self.load_array(ROW_DIGEST)

    def check_chunks(self) -> None:
        """Raise one clear line if any chunk file is missing or of the wrong size (zarr would
        read it as zeros)."""
        problems = _verify.inventory(self)
        if problems:
            raise damaged(self.path, f"{problems[0]} ({len(problems)} bad chunks)")

    def verify(self) -> list[_verify.ChunkProblem]:
        """Read every block of every array; return the missing, corrupt and misplaced ones."""
        return _verify.verify(self)

    def nbytes_on_disk(self) -> dict[str, int]:
        """Bytes on disk (or in the bucket) per array."""
        return {path: size_on_disk(self.path, path) for path in self.array_paths()}
