"""Stage one's writer: batches of encoded teacher outputs in, whole blocks on disk out.

The teacher loop writes each batch's encoded outputs straight into its block's buffers (the
dump's batches never straddle a block); a thread checks and counts each batch while the teacher
runs the next one; full blocks go to a thread pool that writes every array's chunks, then the
block's completion record. At most ``threads + 1`` blocks are held in memory, their buffers
allocated once.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .codecs import Codec, DenseCodec
from .errors import KdcacheError
from .format import VIEW_PARAMS, ArrayInfo
from .store import TeacherCache, is_disk_full
from .store.chunkfile import aligned_empty

__all__ = ["BlockWriter", "EncodedBatch"]


@dataclass
class EncodedBatch:
    """One batch of the dump, written into its block's buffers (:meth:`BlockWriter.rows`):
    rows ``start:start + len(digests)``."""

    start: int
    hits: torch.Tensor | None  # where labels are class ids: the label's logit is the row's largest
    labels: torch.Tensor
    digests: np.ndarray
    tokens: int
    copied: Any = None  # a CUDA event recorded after the device-to-host copies into the block


@dataclass
class _Block:
    arrays: dict[str, np.ndarray]  # path -> the block's rows (views of ``buffers``)
    tensors: dict[str, torch.Tensor]  # the same memory as tensors of the encoded dtype, to copy into
    digests: np.ndarray
    buffers: tuple[dict[str, np.ndarray], np.ndarray]  # the whole-block buffers, reused
    filled: int = 0
    labelled: int = 0
    correct: int = 0
    tokens: int = 0


def _wire_view(array: np.ndarray) -> torch.Tensor:
    """A stored array as the tensor its codec's ``encode`` gives (same memory): uint16 arrays
    (bfloat16 bits, large counts) as int16, which a copy fills with the same 16 bits."""
    return torch.from_numpy(array.view(np.int16) if array.dtype == np.uint16 else array)


class BlockWriter:
    """Whole blocks on disk from batches written in place: the teacher loop copies each batch's
    encoded outputs straight into its block's buffers (:meth:`rows`; on CUDA a device-to-host
    copy into pinned buffers, on CPU the narrowing to the stored dtype is that copy), then
    :meth:`put` hands the batch to a thread that checks it for NaN/inf and counts it; full
    blocks go to a pool that writes every array's chunks, then the block's record. Buffers of
    ``threads + 1`` blocks are allocated once and reused. The first error is kept."""

    def __init__(self, cache: TeacherCache, threads: int, allow_nonfinite: bool, pinned: bool = False,
                 depth: int = 4) -> None:
        self.cache, self.allow_nonfinite, self.pinned = cache, allow_nonfinite, pinned
        # array path -> (output name, codec key, codec, array)
        self.arrays: dict[str, tuple[str, str, Codec, ArrayInfo]] = {
            a.path: (name, key, o.codec, a) for name, o in cache.outputs.items() for key, a in o.arrays.items()}
        if cache.view_params is not None:  # explicit augmentation parameters, stored like an output
            self.arrays[VIEW_PARAMS] = ("view parameters", "", DenseCodec("float32"), cache.view_params)
        self.queue: queue.Queue[EncodedBatch | None] = queue.Queue(maxsize=depth)
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="kdcache-write")
        self.slots = threading.Semaphore(max(1, threads) + 1)  # blocks held in memory at once
        # block buffers are reused: a fresh 100 MB block costs ~0.2 s of page faults per GB written,
        # and page-aligned ones go to O_DIRECT without a staging copy
        self.free: list[tuple[dict[str, np.ndarray], np.ndarray]] = []
        self.lock = threading.Lock()  # guards free and pending
        self.pending: dict[int, _Block] = {}
        self.futures: list[Future[None]] = []
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.thread = threading.Thread(target=self._run, name="kdcache-assemble", daemon=True)
        self.thread.start()

    def rows(self, start: int, n: int) -> dict[str, torch.Tensor]:
        """Where rows ``start:start + n`` of every array go (path -> tensor of the encoded dtype),
        in their block's buffers; waits while ``threads + 1`` blocks are held."""
        self.raise_error()
        block = start // self.cache.block_rows
        with self.lock:
            p = self.pending.get(block)
        if p is None:
            self.slots.acquire()
            arrays, digests = self._buffers()
            b_start, b_stop = self.cache.block_range(block)
            views = {path: a[:b_stop - b_start] for path, a in arrays.items()}
            p = _Block(arrays=views, digests=digests[:b_stop - b_start], buffers=(arrays, digests),
                       tensors={path: _wire_view(a) for path, a in views.items()})
            with self.lock:
                self.pending[block] = p
        lo = start - block * self.cache.block_rows
        return {path: t[lo:lo + n] for path, t in p.tensors.items()}

    def put(self, batch: EncodedBatch) -> None:
        self.raise_error()
        self.queue.put(batch)

    def raise_error(self) -> None:
        for f in [f for f in self.futures if f.done()]:
            self.futures.remove(f)
            if f.exception() is not None and self.error is None:
                self.error = f.exception()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (batch := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._accept(batch)
                except BaseException as err:  # handed to the main thread
                    self.error = err

    def _check_finite(self, path: str, start: int, stored: np.ndarray) -> None:
        name, key, codec, _ = self.arrays[path]
        nonfinite = codec.nonfinite_rows(key, stored)
        bad = np.flatnonzero(nonfinite) if nonfinite is not None else ()
        if len(bad):
            hint = " (float16 overflows above 65504: try --logits-dtype float32)" if stored.dtype == np.float16 else ""
            raise KdcacheError(f"teacher output {name!r} is NaN/inf at row {start + int(bad[0])} (the first bad row){hint}; "
                               "fix the teacher or pass --allow-nonfinite to keep such rows")

    def _accept(self, batch: EncodedBatch) -> None:
        if batch.copied is not None:
            batch.copied.synchronize()
        n = len(batch.digests)
        block = batch.start // self.cache.block_rows
        b_start, b_stop = self.cache.block_range(block)
        with self.lock:
            p = self.pending[block]
        lo = batch.start - b_start
        if not self.allow_nonfinite:
            for path in p.arrays:
                self._check_finite(path, batch.start, p.arrays[path][lo:lo + n])
        p.digests[lo:lo + n] = batch.digests
        if batch.hits is not None:
            labelled = batch.labels >= 0
            p.labelled += int(labelled.sum())
            p.correct += int(batch.hits[labelled].sum())
        p.filled += n
        p.tokens += batch.tokens
        if p.filled == b_stop - b_start:
            with self.lock:
                del self.pending[block]
            self.futures.append(self.pool.submit(self._write, block, p))

    def _buffers(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """A whole block's arrays (page-aligned; pinned for CUDA copies) and digests."""
        with self.lock:
            if self.free:
                return self.free.pop()
        rows = self.cache.block_rows
        empty = _pinned_empty if self.pinned else aligned_empty
        return ({path: empty((rows, *a.shape), a.dtype) for path, (*_, a) in self.arrays.items()},
                np.empty(rows, np.uint64))

    def _write(self, block: int, p: _Block) -> None:
        try:
            self.cache.write_block(block, p.arrays, p.digests, (p.filled, p.labelled, p.correct, p.tokens))
            self.bytes_written += sum(a.nbytes for a in p.arrays.values())
        except OSError as err:
            what = "the disk is full" if is_disk_full(err) else (err.strerror or str(err))
            raise KdcacheError(f"writing cache {self.cache.path} failed at block {block}: {what}; "
                               "finished blocks are kept: fix it and rerun the same command to resume") from None
        finally:
            with self.lock:
                self.free.append(p.buffers)
            self.slots.release()

    def close(self) -> None:
        """Wait for every queued batch and block write; raise the first error."""
        self.queue.put(None)
        self.thread.join()
        for f in self.futures:
            f.exception()
        self.pool.shutdown(wait=True)
        self.raise_error()


def _pinned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array in page-locked host memory: the target of non-blocking copies
    from a CUDA device."""
    nbytes = max(1, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    raw = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    return raw[:int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize].view(dtype).reshape(shape)
