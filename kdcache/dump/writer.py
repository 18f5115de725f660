"""Stage one's writer: batches of encoded teacher outputs in, whole blocks on disk out.

A thread assembles batches into blocks (the dump's batches never straddle a block) while the
teacher runs the next batch; full blocks go to a thread pool that writes every array's chunks,
then the block's completion record. At most ``threads + 1`` blocks are held in memory.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import KdcacheError, option
from ..format.codecs import Codec, DenseCodec
from ..format.meta import SPANS, VIEW_PARAMS, ArrayInfo
from ..store import TeacherCache, is_disk_full

__all__ = ["BlockWriter", "EncodedBatch", "software_versions"]


def software_versions() -> dict[str, str]:
    """What wrote a cache (recorded in it): kdcache, torch, zarr, numpy, python."""
    import platform

    import zarr

    from .._version import __version__
    return {"kdcache": __version__, "torch": torch.__version__, "zarr": zarr.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


@dataclass
class EncodedBatch:
    """One batch of the dump, ready to store: rows ``start:start + len(digests)``."""

    start: int
    arrays: dict[str, torch.Tensor]  # array path -> encoded rows on the host (maybe still copying)
    predicted: torch.Tensor | None  # the teacher's argmax, where labels are class ids
    labels: torch.Tensor
    digests: np.ndarray
    tokens: int
    copied: Any = None  # a CUDA event recorded after the device-to-host copies


@dataclass
class _Block:
    arrays: dict[str, np.ndarray]
    digests: np.ndarray
    filled: int = 0
    labelled: int = 0
    correct: int = 0
    tokens: int = 0
    token_filled: int = 0  # a packed block: stored tokens so far (its batches arrive in order)


class BlockWriter:
    """Assemble batches into whole blocks on a thread; write blocks on a pool; keep the first error."""

    def __init__(self, cache: TeacherCache, threads: int, allow_nonfinite: bool, depth: int = 4) -> None:
        self.cache, self.allow_nonfinite = cache, allow_nonfinite
        # array path -> (output name, codec key, codec, array)
        self.arrays: dict[str, tuple[str, str, Codec, ArrayInfo]] = {
            a.path: (name, key, o.codec, a) for name, o in cache.outputs.items() for key, a in o.arrays.items()}
        if cache.view_params is not None:  # explicit augmentation parameters, stored like an output
            self.arrays[VIEW_PARAMS] = ("view parameters", "", DenseCodec("float32"), cache.view_params)
        if cache.meta.packed is not None:  # each row's span of stored tokens
            self.arrays[SPANS] = ("token spans", "", _Exact(), cache.array_info(SPANS))
        self.queue: queue.Queue[EncodedBatch | None] = queue.Queue(maxsize=depth)
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="kdcache-write")
        self.slots = threading.Semaphore(max(1, threads) + 1)  # blocks held in memory at once
        self.pending: dict[int, _Block] = {}
        self.futures: list[Future[None]] = []
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.thread = threading.Thread(target=self._run, name="kdcache-assemble", daemon=True)
        self.thread.start()

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

    def _check_finite(self, path: str, batch: EncodedBatch, stored: np.ndarray) -> None:
        name, key, codec, array = self.arrays[path]
        nonfinite = codec.nonfinite_rows(key, stored)
        bad = np.flatnonzero(nonfinite) if nonfinite is not None else ()
        if len(bad):
            row = batch.start + int(bad[0])
            if array.per_token:  # a stored token: find its row
                ends = np.cumsum(batch.arrays[SPANS][:, 1].numpy())
                row = batch.start + int(np.searchsorted(ends, bad[0], side="right"))
            hint = (f" (float16 overflows above 65504: try {option('logits_dtype', 'float32')})"
                    if stored.dtype == np.float16 else "")
            raise KdcacheError(f"teacher output {name!r} is NaN/inf at row {row} (the first bad row){hint}; "
                               f"fix the teacher or pass {option('allow_nonfinite', True)} to keep such rows")

    def _accept(self, batch: EncodedBatch) -> None:
        if batch.copied is not None:
            batch.copied.synchronize()
        n = len(batch.digests)
        block = batch.start // self.cache.block_rows
        b_start, b_stop = self.cache.block_range(block)
        if block not in self.pending:
            self.slots.acquire()
            self.pending[block] = _Block(
                arrays={path: np.empty((len(range(*self.cache.array_range(a, block))), *a.shape), a.dtype)
                        for path, (*_, a) in self.arrays.items()},
                digests=np.empty(b_stop - b_start, np.uint64))
        p = self.pending[block]
        lo, added = batch.start - b_start, 0
        for path, host in batch.arrays.items():
            stored = self.arrays[path][2].to_numpy(host)
            if not self.allow_nonfinite:
                self._check_finite(path, batch, stored)
            if self.arrays[path][3].per_token:
                if p.token_filled + len(stored) > len(p.arrays[path]):
                    raise _masks_changed(self.cache, block)
                p.arrays[path][p.token_filled:p.token_filled + len(stored)] = stored
                added = len(stored)
            else:
                p.arrays[path][lo:lo + n] = stored
        p.token_filled += added
        p.digests[lo:lo + n] = batch.digests
        if batch.predicted is not None:
            labelled = batch.labels >= 0
            p.labelled += int(labelled.sum())
            p.correct += int((batch.predicted == batch.labels)[labelled].sum())
        p.filled += n
        p.tokens += batch.tokens
        if p.filled == b_stop - b_start:
            if any(a.per_token and p.token_filled != len(p.arrays[path]) for path, (*_, a) in self.arrays.items()):
                raise _masks_changed(self.cache, block)
            del self.pending[block]
            self.futures.append(self.pool.submit(self._write, block, p))

    def _write(self, block: int, p: _Block) -> None:
        try:
            self.cache.write_block(block, p.arrays, p.digests, (p.filled, p.labelled, p.correct, p.tokens))
            self.bytes_written += sum(a.nbytes for a in p.arrays.values())
        except OSError as err:
            what = "the disk is full" if is_disk_full(err) else (err.strerror or str(err))
            raise KdcacheError(f"writing cache {self.cache.path} failed at block {block}: {what}; "
                               "finished blocks are kept: fix it and rerun the same command to resume") from None
        finally:
            self.slots.release()

    def close(self) -> None:
        """Wait for every queued batch and block write; raise the first error."""
        self.queue.put(None)
        self.thread.join()
        for f in self.futures:
            f.exception()
        self.pool.shutdown(wait=True)
        self.raise_error()


class _Exact:
    """Stores an int32 array as it is (a packed cache's spans)."""

    def to_numpy(self, host: torch.Tensor) -> np.ndarray:
        return host.numpy()

    def nonfinite_rows(self, key: str, stored: np.ndarray) -> None:
        return None


def _masks_changed(cache: TeacherCache, block: int) -> KdcacheError:
    return KdcacheError(f"block {block} of cache {cache.path} holds another number of real tokens than when the cache "
                        "was created: the dataset's attention masks changed; use that dataset, or dump to another "
                        f"{option('out')}")
