"""The cache format: one zarr v3 group holding teacher outputs, row-chunked, with a per-block
completion record, checksums on every chunk, and attrs that describe what is inside.

Layout (a **contract**, see README "Cache format"):

- ``logits``                 (rows, *out_shape)  raw teacher logits, float16 by default
- ``hidden/<module.name>``   (rows, *shape)      one array per captured module output
- ``_row_digest``            (rows,) uint64      digest of each row's input (alignment check)
- ``_view_params``           (rows, P) float32   explicit augmentation parameters (optional)
- ``_blocks``                (blocks, 5) int64   completion record: done, rows, labelled, correct, tokens
- group attrs ``kdcache``: format version, fingerprint, teacher, dataset, outputs, versions,
  ``complete``, and the dump's timings under ``dump``.

Every array is chunked along rows only; a write block covers whole chunks of every array, so
no two writers ever touch one chunk. A block's record is written only after all of its
chunks are on disk; ``complete`` is set only after every block's record is.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.sync import sync

from .codecs import Codec, codec_from_meta, codec_params
from .errors import KdcacheError

__all__ = ["FORMAT_VERSION", "ArrayInfo", "OutputSpec", "TeacherCache", "DumpLock", "plan_blocks", "fingerprint",
           "dump_in_progress", "ChunkProblem", "remove_cache", "is_disk_full", "is_remote"]

FORMAT_VERSION = 2  # 2: multi-array codecs (top-k, sampled), tokens column; reads 1
BLOCKS = "_blocks"
BLOCK_FIELDS = 5  # done, rows, labelled, correct, tokens
ROW_DIGEST = "_row_digest"
VIEW_PARAMS = "_view_params"
ATTR = "kdcache"
TARGET_CHUNK_BYTES = 2 << 20
MAX_BLOCK_BYTES = 128 << 20
MAX_CHUNK_ROWS = 1 << 16
MIN_BLOCKS, MIN_BLOCK_ROWS = 16, 1024


@dataclass(frozen=True)
class ArrayInfo:
    """One stored array: its path in the group, per-row shape, stored dtype and chunk rows."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass(frozen=True)
class OutputSpec:
    """One teacher output (``logits`` or a hidden module): its per-row shape, the codec that
    stores it and the arrays the codec writes (codec key -> :class:`ArrayInfo`)."""

    name: str
    shape: tuple[int, ...]
    codec: Codec
    arrays: dict[str, ArrayInfo]

    @property
    def dtype(self) -> str:
        return getattr(self.codec, "dtype", "float16")

    @property
    def row_bytes(self) -> int:
        return sum(a.row_bytes for a in self.arrays.values())

    @staticmethod
    def base_path(name: str, codec: Codec) -> str:
        if name != "logits":
            return f"hidden/{name}"
        return "logits" if codec.name == "dense" else codec.name

    @staticmethod
    def paths_for(name: str, codec: Codec, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...], np.dtype]]:
        """Codec key -> (array path, per-row shape, stored dtype) of an output."""
        base = OutputSpec.base_path(name, codec)
        return {key: (f"{base}/{key}" if key else base, s, d) for key, (s, d) in codec.arrays(shape).items()}

    def to_meta(self) -> dict[str, Any]:
        primary = next(iter(self.arrays.values()))
        return {"shape": list(self.shape), "codec": codec_params(self.codec), "dtype": self.dtype,
                "path": primary.path, "stored_dtype": str(primary.dtype), "chunk_rows": primary.chunk_rows,
                "arrays": {key: {"path": a.path, "shape": list(a.shape), "stored_dtype": str(a.dtype),
                                 "chunk_rows": a.chunk_rows} for key, a in self.arrays.items()}}

    @classmethod
    def from_meta(cls, name: str, o: dict[str, Any]) -> "OutputSpec":
        codec = codec_from_meta(o["codec"] if isinstance(o.get("codec"), dict) else None, o.get("dtype"))
        arrays = o.get("arrays") or {"": {"path": o["path"], "shape": o["shape"], "stored_dtype": o["stored_dtype"],
                                          "chunk_rows": o["chunk_rows"]}}  # format 1: one dense array
        return cls(name, tuple(o["shape"]), codec,
                   {key: ArrayInfo(a["path"], tuple(a["shape"]), np.dtype(a["stored_dtype"]), int(a["chunk_rows"]))
                    for key, a in arrays.items()})


def plan_blocks(row_bytes: dict[str, int], rows: int, block_rows: int | None = None) -> tuple[int, dict[str, int]]:
    """Pick the write block and each array's chunk rows (powers of two, chunks divide blocks).

    Each array aims at ~2 MB chunks (never more rows than the cache has, rounded up to a
    power of two, since zarr stores an edge chunk at full size); the block is the largest
    chunk, capped at 128 MB of all arrays together, since a block is held in host memory
    until written, and halved (not below 1,024 rows) until the cache has 16 blocks.
    """
    cap = min(MAX_CHUNK_ROWS, 1 << max(0, rows - 1).bit_length())
    ideal = {p: max(1, min(cap, 1 << max(0, (TARGET_CHUNK_BYTES // max(b, 1)).bit_length() - 1)))
             for p, b in row_bytes.items()}
    if block_rows is None:
        block_rows = max(ideal.values())
        total = sum(row_bytes.values()) + 8
        while block_rows > 1 and block_rows * total > MAX_BLOCK_BYTES:
            block_rows //= 2
        # at least MIN_BLOCKS blocks (down to MIN_BLOCK_ROWS rows each): writes overlap the
        # teacher, resume is fine-grained and torchrun ranks all get blocks
        while block_rows > MIN_BLOCK_ROWS and rows < MIN_BLOCKS * block_rows:
            block_rows //= 2
    elif block_rows < 1:
        raise KdcacheError(f"block rows must be >= 1, got {block_rows}")
    chunks = {}
    for p, rows in ideal.items():
        rows = min(rows, block_rows)
        while block_rows % rows:
            rows //= 2
        chunks[p] = rows
    return block_rows, chunks


def fingerprint(weights_digest: str, dataset_digest: str, choices: dict[str, Any]) -> str:
    """Name of a cache: hash of the teacher's weights, the dataset and what is stored."""
    blob = json.dumps({"format": FORMAT_VERSION, "weights": weights_digest, "dataset": dataset_digest,
                       "choices": choices}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_FAULT = os.environ.get("KDCACHE_KILL_AT", "")
_fault_counts: dict[str, int] = {}


def fault_point(event: str) -> None:
    """Crash-test hook: with ``KDCACHE_KILL_AT="event:n"`` the process SIGKILLs itself at the
    n-th ``event`` (``created``, ``batch``, ``array-written``, ``block``, ``finalize``). Unset, it
    does nothing."""
    if not _FAULT or not _FAULT.startswith(event + ":"):
        return
    _fault_counts[event] = _fault_counts.get(event, 0) + 1
    if _fault_counts[event] == int(_FAULT.rsplit(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)


def _lock_path(path: str | Path) -> Path:
    return Path(str(path).rstrip("/") + ".lock")


class DumpLock:
    """An exclusive ``flock`` on ``<cache>.lock`` that holds the writer's pid and host.

    The kernel drops the lock when its holder dies, so a crashed dump never leaves a stale
    lock behind: the next dump takes it over and resumes.
    """

    def __init__(self, path: str | Path) -> None:
        self.file = _lock_path(path)
        self.remote = is_remote(path)  # object storage: no lock (run one dump per remote cache)
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.file.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')}"

    def acquire(self, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> None:
        if self.remote:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise KdcacheError(f"cannot create lock file {self.file}: {err.strerror}; check the path is writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                raise KdcacheError(f"another dump ({self.holder()}) is writing {self.file.with_suffix('')}; "
                                   "wait for it to finish") from None
            if on_wait is not None:
                on_wait(self.holder())
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.time()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DumpLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def dump_in_progress(path: str | Path) -> str | None:
    """``"pid N on HOST"`` when a live dump holds the cache's lock, else None (object storage
    has no lock)."""
    if is_remote(path):
        return None
    file = _lock_path(path)
    if not file.exists():
        return None
    fd = os.open(file, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return DumpLock(path).holder()
    finally:
        os.close(fd)


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


_IO_POOL: ThreadPoolExecutor | None = None


def _io_pool() -> ThreadPoolExecutor:
    global _IO_POOL
    if _IO_POOL is None:
        _IO_POOL = ThreadPoolExecutor(min(8, os.cpu_count() or 2), thread_name_prefix="kdcache-io")
    return _IO_POOL


# Chunk files of at least this size bypass the page cache (O_DIRECT) where the filesystem
# allows it: a dump writes each byte once and reads it back rarely, and filling the page cache
# costs kernel CPU that the teacher needs (measured: 0.2-0.3 s per 64 MB on the 2-core box,
# ~0.005 s with O_DIRECT). KDCACHE_DIRECT_IO=0 turns it off.
DIRECT_MIN_BYTES = 1 << 20
_DIRECT_ALIGN = 4096
_direct_ok = hasattr(os, "O_DIRECT") and os.environ.get("KDCACHE_DIRECT_IO", "1") != "0"
_staging = threading.local()


def _write_chunk_file(file: Path, rows: np.ndarray) -> None:
    raw = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
    checksum = np.uint32(google_crc32c.value(raw)).tobytes()
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.name}.{uuid.uuid4().hex}.partial")
    if not (_direct_ok and raw.nbytes >= DIRECT_MIN_BYTES and _write_direct(tmp, raw, checksum)):
        with open(tmp, "wb") as f:
            f.write(raw.data)
            f.write(checksum)
    os.replace(tmp, file)


def _write_direct(path: Path, raw: np.ndarray, checksum: bytes) -> bool:
    """Write ``raw + checksum`` to a new file with O_DIRECT: the bytes go from an aligned
    staging buffer (one per thread) in whole 4 KiB blocks, then the file is cut to its exact
    size. False, with nothing left behind, where the filesystem refuses O_DIRECT."""
    global _direct_ok
    size = raw.nbytes + len(checksum)
    padded = -(-size // _DIRECT_ALIGN) * _DIRECT_ALIGN
    buf = getattr(_staging, "buf", None)
    if buf is None or len(buf) < padded:
        buf = _staging.buf = mmap.mmap(-1, padded)  # anonymous memory is page-aligned
    staged = np.frombuffer(buf, np.uint8, padded)
    staged[:raw.nbytes] = raw
    staged[raw.nbytes:size] = np.frombuffer(checksum, np.uint8)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        _direct_ok = False  # e.g. tmpfs: buffered writes from now on
        return False
    try:
        view, done = memoryview(buf)[:padded], 0
        while done < padded:
            done += os.write(fd, view[done:])
        os.ftruncate(fd, size)
    except OSError as err:
        os.close(fd)
        path.unlink(missing_ok=True)
        if err.errno != errno.EINVAL:
            raise
        _direct_ok = False
        return False
    os.close(fd)
    return True


def _chunk_key(path: str, array: Any, chunk: int) -> str:
    """Store key of row-chunk ``chunk`` of the array at ``path`` (chunks span every other axis)."""
    return f"{path}/{array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))}"


def is_remote(path: str | Path) -> bool:
    """True for an fsspec URL (``s3://bucket/prefix``, ``gs://...``), False for a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def _open_store(path: str | Path, read_only: bool) -> Any:
    """A LocalStore, or zarr's fsspec store for a URL (credentials and endpoint from the usual
    environment variables, e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)."""
    if is_remote(path):
        try:
            return zarr.storage.FsspecStore.from_url(str(path), read_only=read_only)
        except ImportError as err:
            raise KdcacheError(f"{path}: object storage needs fsspec and its backend ({err.name}); "
                               "pip install 'kdcache[s3]'") from None
    return zarr.storage.LocalStore(str(path), read_only=read_only)


def _remote_fs(path: str) -> tuple[Any, str]:
    """A synchronous fsspec filesystem for the URL, and the path within it."""
    import fsspec
    return fsspec.core.url_to_fs(str(path))


class TeacherCache:
    """A teacher-output cache on disk: create and fill it (stage one), open and read it (stage two).

    Reading needs only zarr and numpy: nothing in the store refers to the teacher's code.
    """

    def __init__(self, path: str | Path, group: zarr.Group) -> None:
        self.path = str(path)
        self.group = group
        meta = group.attrs.get(ATTR)
        if not isinstance(meta, dict):
            raise KdcacheError(f"{path} is a zarr group but not a kdcache cache (no '{ATTR}' attrs)")
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise KdcacheError(f"{path} was written by a newer kdcache (cache format {version}, this one reads "
                               f"<= {FORMAT_VERSION}); upgrade kdcache")
        self.meta: dict[str, Any] = meta
        self.outputs: dict[str, OutputSpec] = {name: OutputSpec.from_meta(name, o)
                                               for name, o in meta["outputs"].items()}

    # ---- create / open ------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, *, meta: dict[str, Any], outputs: list[OutputSpec], rows: int,
               block_rows: int) -> "TeacherCache":
        """Create an empty cache (``complete`` false). Fails if something is already at ``path``."""
        n_blocks = -(-rows // block_rows)
        meta = {**meta, "format_version": FORMAT_VERSION, "rows": rows, "block_rows": block_rows,
                "blocks": n_blocks, "complete": False,
                "outputs": {o.name: o.to_meta() for o in outputs}}
        try:
            group = zarr.open_group(store=_open_store(path, False), mode="w-", zarr_format=3)
            # on object storage each write block is one shard object per array (whole-shard writes)
            shard = block_rows if is_remote(path) else None
            for a in (a for o in outputs for a in o.arrays.values()):
                cls._create_array(group, a.path, (rows, *a.shape), a.dtype, a.chunk_rows, shard)
            cls._create_array(group, ROW_DIGEST, (rows,), np.dtype("uint64"), block_rows)
            if meta.get("view_params"):
                cls._create_array(group, VIEW_PARAMS, (rows, *meta["view_params"]["shape"]), np.dtype("float32"),
                                  block_rows)
            # one chunk per block so each block's record is its own file, written after its data
            cls._create_array(group, BLOCKS, (n_blocks, BLOCK_FIELDS), np.dtype("int64"), 1)
            group.attrs[ATTR] = meta
        except OSError as err:
            raise KdcacheError(f"cannot create cache at {path}: {err.strerror or err}; "
                               "check the path is writable and has space") from None
        return cls(path, group)

    @staticmethod
    def _create_array(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: np.dtype, chunk_rows: int,
                      shard_rows: int | None = None) -> None:
        shards = (shard_rows, *shape[1:]) if shard_rows and shard_rows > chunk_rows else None
        group.create_array(name, shape=shape, chunks=(chunk_rows, *shape[1:]), shards=shards, dtype=dtype,
                           fill_value=0, compressors=[Crc32cCodec()], config={"write_empty_chunks": True})

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "TeacherCache":
        """Open an existing cache (complete or not) for reading, or with ``mode="r+"`` to resume it."""
        if not is_remote(path) and Path(path).exists() and not Path(path).is_dir():
            raise KdcacheError(f"{path} is a file, not a cache directory")
        if not TeacherCache.exists(path):
            raise KdcacheError(f"no cache at {path}; run kdcache dump-teacher first (or check the path)")
        try:
            group = zarr.open_group(store=_open_store(path, mode == "r"), mode=mode, zarr_format=3)
        except (ValueError, KeyError, OSError) as err:
            raise KdcacheError(f"{path} is not a readable zarr v3 cache: {err}") from None
        return cls(path, group)

    @staticmethod
    def exists(path: str | Path) -> bool:
        if is_remote(path):
            try:
                return bool(sync(_open_store(path, True).exists("zarr.json")))
            except OSError as err:
                raise KdcacheError(f"cannot reach {path}: {err}; check the URL, credentials and endpoint") from None
        return (Path(path) / "zarr.json").exists()

    # ---- properties -------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return int(self.meta["rows"])

    @property
    def block_rows(self) -> int:
        return int(self.meta["block_rows"])

    @property
    def n_blocks(self) -> int:
        return int(self.meta["blocks"])

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def views(self) -> int:
        return int(self.meta.get("views") or 1)

    @property
    def seed(self) -> int | None:
        return self.meta.get("seed")

    @property
    def view_params(self) -> ArrayInfo | None:
        """The explicit augmentation parameters array, when the dataset records them."""
        vp = self.meta.get("view_params")
        return ArrayInfo(VIEW_PARAMS, tuple(vp["shape"]), np.dtype("float32"), self.block_rows) if vp else None

    @property
    def hidden_names(self) -> list[str]:
        return [n for n in self.outputs if n != "logits"]

    def block_range(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.rows)

    # ---- dump side --------------------------------------------------------------------------
    def blocks_record(self) -> np.ndarray:
        """(blocks, 5) int64: done flag, rows, labelled rows/tokens, those the teacher got right,
        real tokens (format 1 caches have the first 4 columns)."""
        return self._read(BLOCKS, 0, self.n_blocks)

    def write_block(self, block: int, arrays: dict[str, np.ndarray], digests: np.ndarray,
                    stats: tuple[int, ...]) -> None:
        """Write one block's rows of every array, then its completion record."""
        start, stop = self.block_range(block)
        for path, data in arrays.items():
            self._write_rows(path, start, data)
            fault_point("array-written")
        self._write_rows(ROW_DIGEST, start, digests)
        self._write_rows(BLOCKS, block, np.array([[1, *stats]], dtype=np.int64))
        fault_point("block")

    def _write_rows(self, path: str, start: int, data: np.ndarray) -> None:
        """Write whole chunks of rows ``start:start+len(data)`` (``start`` chunk-aligned).

        On a local store the chunk files are written directly, in parallel, byte for byte as
        zarr lays them out (C-order little-endian bytes, then their crc32c, edge chunks padded
        with the fill value 0, written to a temp file and renamed): zarr 3.1 funnels every
        write through one event-loop thread, which caps a dump near 0.2 GB/s. Elsewhere zarr
        writes them. tests/test_store.py checks the two give identical files.
        """
        array = self.group[path]
        if not isinstance(self.group.store, zarr.storage.LocalStore) or sys.byteorder != "little":
            array[start:start + len(data)] = data
            return
        chunk_rows = array.chunks[0]
        jobs = []
        for lo in range(0, len(data), chunk_rows):
            rows = data[lo:lo + chunk_rows]
            if len(rows) < chunk_rows:  # the edge chunk is stored at full size, zero-padded
                rows = np.concatenate([rows, np.zeros((chunk_rows - len(rows), *rows.shape[1:]), rows.dtype)])
            jobs.append((Path(self.path) / _chunk_key(path, array, (start + lo) // chunk_rows), rows))
        for future in [_io_pool().submit(_write_chunk_file, file, rows) for file, rows in jobs]:
            future.result()

    def finalize(self, extra: dict[str, Any]) -> None:
        """Mark the cache complete once every block's record is on disk."""
        record = self.blocks_record()
        if not record[:, 0].all():
            missing = int(np.flatnonzero(record[:, 0] == 0)[0])
            raise RuntimeError(f"finalize called with block {missing} not written")
        labelled, correct = int(record[:, 2].sum()), int(record[:, 3].sum())
        accuracy = {"labelled": labelled, "correct": correct,
                    "accuracy": (correct / labelled) if labelled else None}
        tokens = int(record[:, 4].sum()) if record.shape[1] > 4 else None
        self.meta = {**self.meta, **extra, "teacher_accuracy": accuracy, "tokens": tokens, "complete": True}
        fault_point("finalize")
        self.group.attrs[ATTR] = self.meta

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
        try:
            return self.group[path][start:stop]
        except ValueError as err:
            raise KdcacheError(f"cache {self.path}: {path} rows {start}..{stop - 1} are corrupt ({err}); "
                               f"run kdcache verify {self.path}, then dump again") from None

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

    def _chunks(self, path: str) -> Iterator[tuple[int, int, int, str]]:
        array = self.group[path]
        chunk_rows = array.shards[0] if array.shards is not None else array.chunks[0]  # one stored object each
        for c in range(-(-array.shape[0] // chunk_rows)):
            yield c, c * chunk_rows, min((c + 1) * chunk_rows, array.shape[0]), _chunk_key(path, array, c)

    def _stored_keys(self, path: str) -> set[str]:
        async def listing() -> list[str]:
            return [k async for k in self.group.store.list_prefix(f"{path}/c")]
        return set(sync(listing()))

    def array_paths(self) -> list[str]:
        extra = [VIEW_PARAMS] if self.view_params is not None else []
        return [a.path for o in self.outputs.values() for a in o.arrays.values()] + [ROW_DIGEST, *extra, BLOCKS]

    def missing_chunks(self) -> list[ChunkProblem]:
        """Chunks whose file is gone (zarr would silently read them as zeros)."""
        problems = []
        for path in self.array_paths():
            keys = self._stored_keys(path)
            problems += [ChunkProblem(path, c, a, b, "chunk file is missing")
                         for c, a, b, key in self._chunks(path) if key not in keys]
        return problems

    def check_chunks(self) -> None:
        """Raise one clear line if any chunk file is missing."""
        problems = self.missing_chunks()
        if problems:
            raise KdcacheError(f"cache {self.path} is damaged: {problems[0]} ({len(problems)} bad chunks); "
                               f"run kdcache verify {self.path}, then dump again")

    def verify(self) -> list[ChunkProblem]:
        """Read every chunk of every array; return the missing and corrupt ones."""
        problems = self.missing_chunks()
        seen = {(p.array, p.chunk) for p in problems}
        for path in self.array_paths():
            for c, a, b, _ in self._chunks(path):
                if (path, c) in seen:
                    continue
                try:
                    self.group[path][a:b]
                except Exception as err:  # a torn chunk can fail in any codec
                    problems.append(ChunkProblem(path, c, a, b, f"{type(err).__name__}: {err}"))
        return problems

    def nbytes_on_disk(self) -> dict[str, int]:
        """Bytes on disk (or in the bucket) per array."""
        if is_remote(self.path):
            fs, root = _remote_fs(self.path)
            return {path: int(fs.du(f"{root}/{path}")) for path in self.array_paths()}
        return {path: sum(f.stat().st_size for f in (Path(self.path) / path).rglob("*") if f.is_file())
                for path in self.array_paths()}


def list_dir(root: str | Path) -> list[str] | None:
    """The entries of a local directory or an object-store prefix (full paths/URLs, sorted);
    None when it does not exist."""
    if is_remote(root):
        fs, path = _remote_fs(str(root))
        try:
            names = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise KdcacheError(f"cannot reach {root}: {err}; check the URL, credentials and endpoint") from None
        protocol = str(root).split("://", 1)[0]
        return sorted(f"{protocol}://{name.rstrip('/')}" for name in names if name.rstrip("/") != path.rstrip("/"))
    if not Path(root).is_dir():
        return None
    return sorted(str(entry) for entry in Path(root).iterdir())


def remove_cache(path: str | Path) -> None:
    """Delete a cache directory (``--overwrite``)."""
    if is_remote(path):
        fs, root = _remote_fs(str(path))
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        raise KdcacheError(f"{path} is a file, not a cache directory; choose another --out")


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
