"""Whole chunk files written and read directly, byte for byte as zarr lays them out.

zarr 3.1 funnels every write through one event-loop thread, which caps a dump near 0.2 GB/s;
kdcache writes a local cache's chunk files itself, in parallel: C-order little-endian bytes,
then their crc32c (zarr's ``Crc32cCodec``), to a temp file that is renamed into place, so a
kill never tears a chunk. ``tests/test_store.py`` checks the files equal zarr's. Reads mirror
it (:func:`read_chunk`): one ``readinto`` of the whole file into the array it becomes, the
checksum checked, no event loop and no copy through zarr's buffers.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c
import numpy as np

from .layout import chunk_key
from .paths import inside, open_regular, path_problem

__all__ = ["ChunkFileWriter", "io_pool", "aligned_empty", "read_chunk", "read_rows", "read_all", "ChunkError", "crc32c"]

_IO_POOL: tuple[int, ThreadPoolExecutor] | None = None
_DIRECT_ALIGN = 4096


def io_pool() -> ThreadPoolExecutor:
    """The process's pool of chunk-reading and -writing threads (created on first use, and again
    in a forked DataLoader worker, which inherits the pool but none of its threads)."""
    global _IO_POOL
    if _IO_POOL is None or _IO_POOL[0] != os.getpid():
        _IO_POOL = (os.getpid(), ThreadPoolExecutor(min(8, os.cpu_count() or 2), thread_name_prefix="kdcache-io"))
    return _IO_POOL[1]


_CRC_PIECE = 256 << 10


def crc32c(raw: np.ndarray, crc: int = 0) -> int:
    """crc32c of ``raw`` (uint8, contiguous), as zarr's ``Crc32cCodec`` computes it (continuing
    ``crc``). Computed
    256 KiB at a time: google_crc32c holds the GIL while it runs (~0.15 ms per MB), and a whole
    chunk at once stalls the teacher loop's or training loop's Python for that long."""
    for start in range(0, raw.nbytes, _CRC_PIECE):
        crc = google_crc32c.extend(crc, raw[start:start + _CRC_PIECE])
    return crc


class ChunkError(ValueError):
    """A chunk file that is not what its array says: wrong size or checksum."""


def read_chunk(root: Path, key: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The rows of chunk file ``key`` of the local cache at ``root`` (C-order bytes of ``shape``
    in ``dtype``, then their crc32c).

    Raises FileNotFoundError for a missing file and :class:`ChunkError` for one of the wrong
    size or checksum, or one that is (or is reached through) a link or not a regular file."""
    problem = path_problem(root, key)
    if problem:
        raise ChunkError(problem)
    file = Path(root, key)
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    try:
        fd = open_regular(file)
    except FileNotFoundError:
        raise
    except OSError as err:  # a link (ELOOP) or a FIFO or device (EINVAL) planted where the chunk belongs
        raise ChunkError(f"chunk file {file.name} is not a regular file ({err.strerror})") from None
    out = np.empty(nbytes + 4, np.uint8)
    with open(fd, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size != nbytes + 4:
            raise ChunkError(f"chunk file {file.name} has {size} bytes, expected {nbytes + 4}")
        view, done = memoryview(out), 0  # type: ignore[arg-type]
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise ChunkError(f"chunk file {file.name} ended after {done} of {nbytes + 4} bytes")
            done += got
    if crc32c(out[:nbytes]) != int.from_bytes(out[nbytes:].tobytes(), "little"):
        raise ChunkError(f"chunk file {file.name} fails its crc32c checksum")
    return out[:nbytes].view(dtype).reshape(shape)


def read_rows(root: Path, path: str, chunk_shape: tuple[int, ...], dtype: np.dtype, length: int, start: int,
              stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the array ``path`` of the local cache at ``root`` (``length`` rows in
    chunks of ``chunk_shape``), read from the chunk files themselves, crc32c checked, never a fill
    value; one whole chunk is returned as read. A missing or bad file is a :class:`ChunkError`
    naming its rows."""
    chunk_rows = chunk_shape[0]
    first, last = start // chunk_rows, -(-stop // chunk_rows)
    chunks = []
    for c in range(first, last):
        lo, hi = c * chunk_rows, min((c + 1) * chunk_rows, length)
        try:
            chunks.append(read_chunk(root, chunk_key(path, len(chunk_shape), c), chunk_shape, dtype))
        except FileNotFoundError:
            raise ChunkError(f"{path} rows {lo}..{hi - 1}: the chunk file is missing") from None
        except ChunkError as err:
            raise ChunkError(f"{path} rows {lo}..{hi - 1}: {err}") from None
    if len(chunks) == 1 and start == first * chunk_rows and stop - start == chunk_rows:
        return chunks[0]
    whole = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    return whole[start - first * chunk_rows:stop - first * chunk_rows]


def read_all(root: Path, path: str, shape: tuple[int, int], dtype: np.dtype, chunk_rows: int) -> np.ndarray:
    """Every row of a small 2-D array ``path`` of ``shape`` (a completion record) from its chunk
    files, a missing or bad chunk read as zeros (a block not done)."""
    out = np.zeros(shape, dtype)
    for c in range(-(-shape[0] // chunk_rows)):
        try:
            rows = read_chunk(root, chunk_key(path, 2, c), (chunk_rows, shape[1]), dtype)
        except (FileNotFoundError, ChunkError):
            continue
        out[c * chunk_rows:(c + 1) * chunk_rows] = rows[:shape[0] - c * chunk_rows]
    return out


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array on page-aligned anonymous memory: chunks of it whose offsets are
    multiples of 4 KiB go to O_DIRECT writes as they are, without a staging copy."""
    nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    return np.frombuffer(mmap.mmap(-1, nbytes), np.dtype(dtype), int(np.prod(shape, dtype=np.int64))).reshape(shape)


class ChunkFileWriter:
    """Writes chunk files of one cache; thread-safe.

    Files of at least ``min_direct_bytes`` bypass the page cache (O_DIRECT) where the
    filesystem allows it: a dump writes each byte once and reads it back rarely, and filling
    the page cache costs kernel CPU the teacher needs (measured: 0.2-0.3 s per 64 MB on the
    2-core box, ~0.005 s with O_DIRECT). ``KDCACHE_DIRECT_IO=0`` turns it off. A filesystem
    that refuses O_DIRECT (EINVAL, e.g. tmpfs) turns it off for this writer.
    """

    min_direct_bytes = 1 << 20

    def __init__(self, direct: bool | None = None) -> None:
        if direct is None:
            direct = os.environ.get("KDCACHE_DIRECT_IO", "1") != "0"
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._staging = threading.local()

    def write(self, file: Path, rows: np.ndarray) -> None:
        raw = np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
        checksum = np.uint32(crc32c(raw)).tobytes()
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.{uuid.uuid4().hex}.partial")
        if not (self.direct and raw.nbytes >= self.min_direct_bytes and self._write_direct(tmp, raw, checksum)):
            with open(tmp, "wb") as f:
                f.write(raw.data)
                f.write(checksum)
        os.replace(tmp, file)

    def write_rows(self, root: Path, path: str, ndim: int, chunk_rows: int, start: int, data: np.ndarray) -> None:
        """Write rows ``start:start+len(data)`` (``start`` chunk-aligned) of the ``ndim``-dimensional
        array ``path`` of the local cache at ``root`` as whole chunk files, in parallel; the edge
        chunk is stored at full size, zero-padded (zarr's fill value)."""
        jobs = []
        for lo in range(0, len(data), chunk_rows):
            rows = data[lo:lo + chunk_rows]
            if len(rows) < chunk_rows:
                rows = np.concatenate([rows, np.zeros((chunk_rows - len(rows), *rows.shape[1:]), rows.dtype)])
            # never through a link planted in the cache (it would write outside it)
            jobs.append((inside(root, chunk_key(path, ndim, (start + lo) // chunk_rows), make_dirs=True), rows))
        for future in [io_pool().submit(self.write, file, rows) for file, rows in jobs]:
            future.result()

    def _write_direct(self, path: Path, raw: np.ndarray, checksum: bytes) -> bool:
        """Write ``raw + checksum`` to a new file with O_DIRECT, in whole 4 KiB blocks, then cut
        the file to its exact size. Where ``raw`` starts page-aligned (a chunk of a block buffer
        from :func:`aligned_empty`), its whole 4 KiB blocks are written from where they lie and
        only the tail passes through the staging buffer (one per thread); otherwise all of it
        does. False, with nothing left behind, where the filesystem refuses O_DIRECT."""
        size = raw.nbytes + len(checksum)
        bulk = raw.nbytes // _DIRECT_ALIGN * _DIRECT_ALIGN if raw.ctypes.data % _DIRECT_ALIGN == 0 else 0
        tail = raw[bulk:]
        padded = -(-(size - bulk) // _DIRECT_ALIGN) * _DIRECT_ALIGN
        buf = getattr(self._staging, "buf", None)
        if buf is None or len(buf) < padded:
            buf = self._staging.buf = mmap.mmap(-1, padded)  # anonymous memory is page-aligned
        staged = np.frombuffer(buf, np.uint8, padded)
        staged[:tail.nbytes] = tail
        staged[tail.nbytes:size - bulk] = np.frombuffer(checksum, np.uint8)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            self.direct = False
            return False
        try:
            for view in (memoryview(raw[:bulk]), memoryview(buf)[:padded]):  # type: ignore[arg-type]
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:])
            os.ftruncate(fd, size)
        except OSError as err:
            os.close(fd)
            path.unlink(missing_ok=True)
            if err.errno != errno.EINVAL:
                raise
            self.direct = False
            return False
        os.close(fd)
        return True
