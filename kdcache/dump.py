"""Stage one: run the teacher once over the transfer set and store its outputs.

The loop keeps the accelerator busy: a DataLoader (with workers) prepares and digests the
next batches, the teacher runs under ``inference_mode`` (autocast on CUDA), outputs are
narrowed to the stored dtype on the device and copied to pinned host memory without
blocking, and a writer thread assembles whole blocks that a thread pool writes in parallel.
"""

from __future__ import annotations

import hashlib
import os
import platform
import queue
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import zarr
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import __version__
from .capture import HiddenCapture, check_module_names
from .codecs import DenseCodec
from .errors import KdcacheError
from .items import (call_model, dataset_digest, fetch_batch, move_inputs, resolve_device, row_digests,
                    select_output)
from .store import (DumpLock, OutputSpec, TeacherCache, fault_point, fingerprint, is_disk_full, plan_blocks,
                    remove_cache)

__all__ = ["dump_teacher", "weights_digest", "default_cache_root"]

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def default_cache_root() -> Path:
    return Path(os.environ.get("KDCACHE_HOME", "kdcache-store"))


def _resolve_amp(amp: str, device: torch.device) -> str:
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    if amp not in AMP:
        raise KdcacheError(f"--amp must be auto, bf16, fp16 or none, got {amp!r}")
    return amp


def weights_digest(model: nn.Module) -> str:
    """blake2b over the teacher's state dict (names, dtypes, shapes and bytes), without copies."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class _Batches(torch.utils.data.Dataset):
    """Item i is batch i of the dump: (first row, inputs, labels, input digests)."""

    def __init__(self, dataset: Any, batches: Sequence[tuple[int, int]]) -> None:
        self.dataset, self.batches = dataset, list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[int, Any, torch.Tensor, np.ndarray]:
        start, stop = self.batches[i]
        inputs, labels = fetch_batch(self.dataset, range(start, stop))
        return start, inputs, labels, row_digests(inputs)


class _BlockWriter:
    """Assemble batches into whole blocks on a thread; write blocks on a pool; keep the first error."""

    def __init__(self, cache: TeacherCache, threads: int, allow_nonfinite: bool, depth: int = 4) -> None:
        self.cache, self.allow_nonfinite = cache, allow_nonfinite
        self.codecs = {name: o.codec for name, o in cache.outputs.items()}
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="kdcache-write")
        self.slots = threading.Semaphore(max(1, threads) + 1)  # blocks held in memory at once
        self.pending: dict[int, dict[str, Any]] = {}
        self.futures: list[Future[None]] = []
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.thread = threading.Thread(target=self._run, name="kdcache-assemble", daemon=True)
        self.thread.start()

    def put(self, start: int, outputs: dict[str, torch.Tensor], predicted: torch.Tensor | None,
            labels: torch.Tensor, digests: np.ndarray, event: Any) -> None:
        self.raise_error()
        self.queue.put((start, outputs, predicted, labels, digests, event))

    def raise_error(self) -> None:
        for f in [f for f in self.futures if f.done()]:
            self.futures.remove(f)
            if f.exception() is not None and self.error is None:
                self.error = f.exception()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._accept(*item)
                except BaseException as err:  # handed to the main thread
                    self.error = err

    def _check_finite(self, name: str, start: int, stored: np.ndarray) -> None:
        bad = np.flatnonzero(self.codecs[name].nonfinite_rows(stored))
        if bad.size:
            hint = " (float16 overflows above 65504: try --logits-dtype float32)" if self.codecs[name].dtype == "float16" else ""
            raise KdcacheError(f"teacher output {name!r} is NaN/inf at row {start + int(bad[0])} (the first bad row){hint}; "
                               "fix the teacher or pass --allow-nonfinite to keep such rows")

    def _accept(self, start: int, outputs: dict[str, torch.Tensor], predicted: torch.Tensor | None,
                labels: torch.Tensor, digests: np.ndarray, event: Any) -> None:
        if event is not None:
            event.synchronize()
        cache, n = self.cache, len(digests)
        block = start // cache.block_rows
        b_start, b_stop = cache.block_range(block)
        if block not in self.pending:
            self.slots.acquire()
            self.pending[block] = {
                "arrays": {name: np.empty((b_stop - b_start, *o.shape), o.codec.stored_dtype)
                           for name, o in cache.outputs.items()},
                "digests": np.empty(b_stop - b_start, np.uint64), "filled": 0, "labelled": 0, "correct": 0}
        p = self.pending[block]
        lo = start - b_start
        for name, host in outputs.items():
            stored = self.codecs[name].to_numpy(host)
            if not self.allow_nonfinite:
                self._check_finite(name, start, stored)
            p["arrays"][name][lo:lo + n] = stored
        p["digests"][lo:lo + n] = digests
        labelled = labels >= 0
        if predicted is not None:
            p["labelled"] += int(labelled.sum())
            p["correct"] += int((predicted == labels)[labelled].sum())
        p["filled"] += n
        if p["filled"] == b_stop - b_start:
            del self.pending[block]
            self.futures.append(self.pool.submit(self._write, block, p))

    def _write(self, block: int, p: dict[str, Any]) -> None:
        try:
            self.cache.write_block(block, p["arrays"], p["digests"], (p["filled"], p["labelled"], p["correct"]))
            self.bytes_written += sum(a.nbytes for a in p["arrays"].values())
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


def _plan_batches(cache: TeacherCache, blocks: Sequence[int], batch_size: int) -> list[tuple[int, int]]:
    """Batches of rows that never straddle a block, so each block fills from its own batches."""
    batches = []
    for block in blocks:
        start, stop = cache.block_range(block)
        batches += [(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size)]
    return batches


def _versions() -> dict[str, str]:
    return {"kdcache": __version__, "torch": torch.__version__, "zarr": zarr.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def dump_teacher(teacher: nn.Module, dataset: Any, out: str | Path | None = None, *,
                 hidden: Sequence[str] = (), output_key: str | None = None, logits_dtype: str = "float16",
                 hidden_dtype: str = "float16", batch_size: int = 256, num_workers: int = 0,
                 device: str | torch.device | None = None, amp: str = "auto",
                 cache_root: str | Path | None = None, overwrite: bool = False, block_rows: int | None = None,
                 allow_nonfinite: bool = False, writer_threads: int = 8, progress: bool = True,
                 teacher_info: dict[str, Any] | None = None, dataset_info: dict[str, Any] | None = None,
                 log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> TeacherCache:
    """Run ``teacher`` once over ``dataset`` and store its logits and ``hidden`` module outputs.

    Args:
        teacher: the model; put in eval mode, moved to ``device``, run under inference_mode.
        dataset: items ``(inputs, label)``, ``{..., "label": y}`` or bare inputs (label -1).
        out: cache directory; when None, ``cache_root/<fingerprint>``.
        hidden: dotted submodule names whose outputs are stored under ``hidden/<name>``.
        output_key: picks the logits from a tuple (index), dict (key) or object (attribute).
        logits_dtype, hidden_dtype: ``float16`` (default), ``float32`` or ``bfloat16``.
        amp: ``auto`` (bf16 on CUDA, none on CPU), ``bf16``, ``fp16`` or ``none``.
        overwrite: replace a cache with another fingerprint (or redo the same one).
        block_rows: rows per write block (default: chosen for ~2 MB chunks).

    Returns:
        The finished cache. A second call with the same teacher, data and choices returns the
        existing cache without running the teacher ("cache hit"); a killed dump resumes.
    """
    hidden = tuple(hidden)
    if "logits" in hidden or len(set(hidden)) != len(hidden):
        raise KdcacheError("--hidden names must be distinct module names")
    check_module_names(teacher, hidden)
    if batch_size < 1:
        raise KdcacheError(f"--batch-size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    amp = _resolve_amp(amp, dev)
    codecs = {"logits": DenseCodec(logits_dtype), **{h: DenseCodec(hidden_dtype) for h in hidden}}
    rows = len(dataset)
    if rows == 0:
        raise KdcacheError("the dataset is empty: nothing to dump")

    data_digest = dataset_digest(dataset)
    w_digest = weights_digest(teacher)
    choices = {"output_key": output_key, "hidden": list(hidden), "logits_dtype": logits_dtype,
               "hidden_dtype": hidden_dtype, "amp": amp}
    fp = fingerprint(w_digest, data_digest, choices)
    path = Path(out) if out is not None else Path(cache_root or default_cache_root()) / fp
    if path.exists() and not path.is_dir():
        raise KdcacheError(f"{path} is a file, not a cache directory; choose another --out")

    def existing() -> TeacherCache | None:
        if not TeacherCache.exists(path):
            if path.exists() and any(path.iterdir()):
                if not overwrite:
                    raise KdcacheError(f"{path} exists and is not a kdcache cache; choose another --out or pass --overwrite")
                remove_cache(path)
            return None
        cache = TeacherCache.open(path, mode="r+")
        if cache.fingerprint != fp or overwrite:
            if not overwrite:
                raise KdcacheError(f"{path} holds another cache (fingerprint {cache.fingerprint}, this dump is {fp}); "
                                   "pass --overwrite to replace it or choose another --out")
            remove_cache(path)
            return None
        return cache

    if not overwrite and TeacherCache.exists(path):
        cache = existing()
        if cache is not None and cache.complete:
            log(f"cache hit: {path}")
            return TeacherCache.open(path)

    lock = DumpLock(path)
    lock.acquire(on_wait=lambda who: log(f"waiting for the dump already writing {path} ({who})"))
    try:
        cache = existing()
        overwrite = False  # done: a dump that waited on this lock must not remove our cache
        if cache is not None and cache.complete:
            log(f"cache hit: {path}")
            return TeacherCache.open(path)
        teacher = teacher.to(dev).eval()
        if cache is None:
            cache = _create(teacher, dataset, path, hidden, output_key, codecs, amp, dev, block_rows, {
                "fingerprint": fp, "teacher": {**(teacher_info or {}), "class": type(teacher).__qualname__,
                                               "weights_digest": w_digest},
                "dataset": {**(dataset_info or {}), "length": rows, "digest": data_digest},
                "output_key": output_key, "amp": amp, "views": 1, "seed": None, "versions": _versions()})
            fault_point("created")
        cache.remove_partial_files()  # a killed writer's temp files; we hold the lock
        todo = np.flatnonzero(cache.blocks_record()[:, 0] == 0).tolist()
        if len(todo) < cache.n_blocks:
            log(f"resuming {path}: {cache.n_blocks - len(todo)} of {cache.n_blocks} blocks already written")
        stats = _run(teacher, dataset, cache, todo, hidden, output_key, amp, dev, batch_size, num_workers,
                     writer_threads, allow_nonfinite, progress)
        cache.finalize({"dump": {**stats, "device": str(dev), "batch_size": batch_size, "num_workers": num_workers}})
        log(f"wrote {path}")
        return TeacherCache.open(path)
    finally:
        lock.release()


def _forward(teacher: nn.Module, capture: HiddenCapture, inputs: Any, output_key: str | None, amp: str,
             dev: torch.device) -> dict[str, torch.Tensor]:
    autocast = torch.autocast(dev.type, dtype=AMP[amp]) if AMP[amp] is not None else nullcontext()
    with torch.inference_mode(), autocast:
        try:
            output = call_model(teacher, inputs)
        except KdcacheError:
            raise
        except (RuntimeError, TypeError, ValueError) as err:
            raise KdcacheError(f"the teacher failed on a batch of the dataset ({type(err).__name__}: "
                               f"{str(err).splitlines()[0]}); do the dataset's inputs fit the teacher?") from None
        return {"logits": select_output(output, output_key), **capture.take()}


def _create(teacher: nn.Module, dataset: Any, path: Path, hidden: tuple[str, ...], output_key: str | None,
            codecs: dict[str, DenseCodec], amp: str, dev: torch.device, block_rows: int | None,
            meta: dict[str, Any]) -> TeacherCache:
    """Learn the output shapes from a forward pass on two rows, then create the empty store."""
    probe_rows = list(range(min(2, len(dataset))))
    inputs, _ = fetch_batch(dataset, probe_rows)
    with HiddenCapture(teacher, hidden) as capture:
        outputs = _forward(teacher, capture, move_inputs(inputs, dev), output_key, amp, dev)
    shapes = {}
    for name, t in outputs.items():
        if t.ndim == 0 or t.shape[0] != len(probe_rows):
            raise KdcacheError(f"teacher output {name!r} has shape {tuple(t.shape)} for a batch of "
                               f"{len(probe_rows)}: its first axis must be the batch")
        if not t.is_floating_point():
            raise KdcacheError(f"teacher output {name!r} is {t.dtype}, not floating point")
        shapes[name] = tuple(t.shape[1:])
    row_bytes = {name: int(np.prod(s, dtype=np.int64)) * codecs[name].stored_dtype.itemsize
                 for name, s in shapes.items()}
    block_rows, chunks = plan_blocks(row_bytes, len(dataset), block_rows)
    outputs_spec = [OutputSpec(name, OutputSpec.path_for(name), shapes[name], codecs[name].dtype, chunks[name])
                    for name in shapes]
    return TeacherCache.create(path, meta=meta, outputs=outputs_spec, rows=len(dataset), block_rows=block_rows)


def _run(teacher: nn.Module, dataset: Any, cache: TeacherCache, todo: list[int], hidden: tuple[str, ...],
         output_key: str | None, amp: str, dev: torch.device, batch_size: int, num_workers: int,
         writer_threads: int, allow_nonfinite: bool, progress: bool) -> dict[str, Any]:
    batches = _plan_batches(cache, todo, batch_size)
    cuda = dev.type == "cuda"
    loader = DataLoader(_Batches(dataset, batches), batch_size=None, shuffle=False, num_workers=num_workers,
                        pin_memory=cuda, prefetch_factor=4 if num_workers else None)
    codecs = {name: o.codec for name, o in cache.outputs.items()}
    writer = _BlockWriter(cache, writer_threads, allow_nonfinite)
    total = sum(b - a for a, b in batches)
    bar = tqdm(total=total, unit="rows", unit_scale=True, desc="dump-teacher", disable=not progress,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        with HiddenCapture(teacher, hidden) as capture:
            for start, inputs, labels, digests in loader:
                outputs = _forward(teacher, capture, move_inputs(inputs, dev, non_blocking=cuda), output_key, amp, dev)
                for name, t in outputs.items():
                    if tuple(t.shape) != (len(digests), *cache.outputs[name].shape):
                        raise KdcacheError(f"teacher output {name!r} for rows {start}.. has shape {tuple(t.shape[1:])}, "
                                           f"earlier rows {cache.outputs[name].shape}: dataset items must all have one shape")
                # narrow and take the argmax on the device, then copy to pinned memory without
                # blocking the next forward
                host = {name: codecs[name].encode(t).to("cpu", non_blocking=cuda) for name, t in outputs.items()}
                logits = outputs["logits"]
                predicted = logits.argmax(dim=1).to("cpu", non_blocking=cuda) if logits.ndim == 2 else None
                event = torch.cuda.Event() if cuda else None
                if event is not None:
                    event.record()
                writer.put(start, host, predicted, labels, digests, event)
                fault_point("batch")
                bar.update(len(digests))
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "rows": total, "rows_per_s": round(total / max(seconds, 1e-9), 1),
            "mb_per_s": round(writer.bytes_written / 1e6 / max(seconds, 1e-9), 2)}
