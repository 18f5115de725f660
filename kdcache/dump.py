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

from . import __version__, distributed
from .capture import HiddenCapture, check_module_names
from .codecs import Codec, DenseCodec, SampledCodec, TopKCodec
from .errors import KdcacheError
from .views import ViewedDataset
from .items import (call_model, collate_items, dataset_digest, fetch_batch, move_inputs, resolve_device, row_digests,
                    select_output)
from .store import (VIEW_PARAMS, ArrayInfo, is_remote, DumpLock, OutputSpec, TeacherCache, fault_point, fingerprint, is_disk_full, plan_blocks,
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
    """Item i is batch i of the dump: (first row, inputs, labels, input digests, explicit view
    parameters or None)."""

    def __init__(self, dataset: Any, batches: Sequence[tuple[int, int]]) -> None:
        self.dataset, self.batches = dataset, list(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[int, Any, torch.Tensor, np.ndarray, torch.Tensor | None]:
        start, stop = self.batches[i]
        params = None
        if isinstance(self.dataset, ViewedDataset) and self.dataset.explicit:  # parameters drawn once, kept
            items, params = self.dataset.drawn_items(range(start, stop))
            inputs, labels = collate_items(items, range(start, stop))
        else:
            inputs, labels = fetch_batch(self.dataset, range(start, stop))
        return start, inputs, labels, row_digests(inputs), params


class _BlockWriter:
    """Assemble batches into whole blocks on a thread; write blocks on a pool; keep the first error."""

    def __init__(self, cache: TeacherCache, threads: int, allow_nonfinite: bool, depth: int = 4) -> None:
        self.cache, self.allow_nonfinite = cache, allow_nonfinite
        # array path -> (output name, codec key, codec)
        self.arrays = {a.path: (name, key, o.codec) for name, o in cache.outputs.items() for key, a in o.arrays.items()}
        self.infos = {a.path: a for o in cache.outputs.values() for a in o.arrays.values()}
        if cache.view_params is not None:  # explicit augmentation parameters, stored like an output
            self.infos[VIEW_PARAMS] = cache.view_params
            self.arrays[VIEW_PARAMS] = ("view parameters", "", DenseCodec("float32"))
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
            labels: torch.Tensor, digests: np.ndarray, tokens: int, event: Any) -> None:
        self.raise_error()
        self.queue.put((start, outputs, predicted, labels, digests, tokens, event))

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

    def _check_finite(self, path: str, start: int, stored: np.ndarray) -> None:
        name, key, codec = self.arrays[path]
        nonfinite = codec.nonfinite_rows(key, stored)
        bad = np.flatnonzero(nonfinite) if nonfinite is not None else ()
        if len(bad):
            hint = " (float16 overflows above 65504: try --logits-dtype float32)" if stored.dtype == np.float16 else ""
            raise KdcacheError(f"teacher output {name!r} is NaN/inf at row {start + int(bad[0])} (the first bad row){hint}; "
                               "fix the teacher or pass --allow-nonfinite to keep such rows")

    def _accept(self, start: int, outputs: dict[str, torch.Tensor], predicted: torch.Tensor | None,
                labels: torch.Tensor, digests: np.ndarray, tokens: int, event: Any) -> None:
        if event is not None:
            event.synchronize()
        cache, n = self.cache, len(digests)
        block = start // cache.block_rows
        b_start, b_stop = cache.block_range(block)
        if block not in self.pending:
            self.slots.acquire()
            self.pending[block] = {
                "arrays": {path: np.empty((b_stop - b_start, *a.shape), a.dtype) for path, a in self.infos.items()},
                "digests": np.empty(b_stop - b_start, np.uint64), "filled": 0, "labelled": 0, "correct": 0,
                "tokens": 0}
        p = self.pending[block]
        lo = start - b_start
        for path, host in outputs.items():
            stored = self.arrays[path][2].to_numpy(host)
            if not self.allow_nonfinite:
                self._check_finite(path, start, stored)
            p["arrays"][path][lo:lo + n] = stored
        p["digests"][lo:lo + n] = digests
        labelled = labels >= 0
        if predicted is not None:
            p["labelled"] += int(labelled.sum())
            p["correct"] += int((predicted == labels)[labelled].sum())
        p["filled"] += n
        p["tokens"] += tokens
        if p["filled"] == b_stop - b_start:
            del self.pending[block]
            self.futures.append(self.pool.submit(self._write, block, p))

    def _write(self, block: int, p: dict[str, Any]) -> None:
        try:
            self.cache.write_block(block, p["arrays"], p["digests"],
                                   (p["filled"], p["labelled"], p["correct"], p["tokens"]))
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
                 hidden_dtype: str = "float16", topk: int | None = None, sample_k: int | None = None,
                 sample_temperature: float = 1.0, vocab_size: int | None = None,
                 mask_key: str = "attention_mask", views: int | None = None, seed: int | None = None, batch_size: int = 256,
                 num_workers: int = 0,
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
        topk: store the K largest logits per position, their ids and the logsumexp
            (``topk/*``) instead of dense logits.
        sample_k: store N ids sampled from ``softmax(logits / sample_temperature)`` per position
            as unique ids + counts (``sampled/*``), seeded per row by ``seed`` (default 0).
        vocab_size: the real vocabulary when the output layer is padded (default: its width);
            sparse forms keep only real classes, and students must match one of the two sizes.
        views, seed: with ``views`` K (1 or more), row ``r`` is view ``r % K`` of sample
            ``r // K``, made by the dataset's own transform under RNGs seeded from
            ``(seed, sample, view)`` (see :mod:`kdcache.views`); ``seed`` also seeds ``sample_k``.
        mask_key: the inputs' key of a ``(B, L)`` attention mask; positions where it is 0 are
            padding, stored as zeros and returned as the ``mask`` of stage two.
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
    dev = resolve_device(distributed.local_device(device))
    amp = _resolve_amp(amp, dev)
    if topk is not None and sample_k is not None:
        raise KdcacheError("--topk and --sample-k are two ways to store the logits: choose one")
    if vocab_size is not None and vocab_size < 1:
        raise KdcacheError(f"--vocab-size must be >= 1, got {vocab_size}")
    formats = {"logits": (logits_dtype, topk, sample_k, sample_temperature, vocab_size, seed or 0),
               **{h: (hidden_dtype, None, None, 1.0, None, 0) for h in hidden}}
    for fmt in formats.values():
        _codec(fmt, vocab_size or max(topk or 1, sample_k or 1))  # fail early on a bad choice
    samples = len(dataset)
    if samples == 0:
        raise KdcacheError("the dataset is empty: nothing to dump")
    if views is not None:  # rows are (sample, view) pairs, each view's transform seeded
        dataset = ViewedDataset(dataset, views, seed or 0)

    data_digest = dataset_digest(dataset)
    w_digest = weights_digest(teacher)
    choices = {"output_key": output_key, "hidden": list(hidden), "logits_dtype": logits_dtype,
               "hidden_dtype": hidden_dtype, "amp": amp}
    if isinstance(dataset, ViewedDataset):
        choices.update(views=views, seed=seed or 0, explicit_params=dataset.explicit)
    if topk is not None or sample_k is not None or vocab_size is not None:
        choices.update(topk=topk, sample_k=sample_k, sample_temperature=sample_temperature, vocab_size=vocab_size,
                       seed=seed)
    fp = fingerprint(w_digest, data_digest, choices)
    root = str(cache_root or default_cache_root())
    where = str(out) if out is not None else (f"{root.rstrip('/')}/{fp}" if is_remote(root) else str(Path(root) / fp))
    path: Any = where if is_remote(where) else Path(where)  # a URL stays a string
    if isinstance(path, Path) and path.exists() and not path.is_dir():
        raise KdcacheError(f"{path} is a file, not a cache directory; choose another --out")

    def existing() -> TeacherCache | None:
        if not TeacherCache.exists(path):
            if isinstance(path, Path) and path.exists() and any(path.iterdir()):
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

    rank, world = distributed.world()
    if distributed.broadcast(fp) != fp:
        raise KdcacheError(f"rank {rank} sees another teacher or dataset than rank 0 (fingerprint {fp}): give every "
                           "rank the same checkpoint and data")
    lock: DumpLock | None = None

    def prepare() -> TeacherCache | None:
        """Rank 0: the cache to fill (created or resumed, lock held), or None on a cache hit."""
        nonlocal lock, overwrite
        if not overwrite and TeacherCache.exists(path):  # a finished cache needs no lock
            try:
                cache = existing()
            except KdcacheError:  # e.g. another dump is creating it this instant: decide under the lock
                cache = None
            if cache is not None and cache.complete:
                return None
        lock = DumpLock(path)
        lock.acquire(on_wait=lambda who: log(f"waiting for the dump already writing {path} ({who})"))
        cache = existing()
        overwrite = False  # done: a dump that waited on this lock must not remove our cache
        if cache is not None and cache.complete:
            return None
        if cache is None:
            cache = _create(teacher.to(dev).eval(), dataset, path, hidden, output_key, formats, mask_key, amp, dev,
                            block_rows, {
                "fingerprint": fp, "teacher": {**(teacher_info or {}), "class": type(teacher).__qualname__,
                                               "weights_digest": w_digest},
                "dataset": {**(dataset_info or {}), "length": samples, "digest": data_digest},
                "output_key": output_key, "amp": amp, "views": views or 1,
                "seed": (seed or 0) if isinstance(dataset, ViewedDataset) else None, "versions": _versions()})
            fault_point("created")
        cache.remove_partial_files()  # a killed writer's temp files; we hold the lock
        return cache

    try:
        # rank 0 creates or resumes the store; the others wait for its word, then share the blocks
        cache, status = None, "run"
        if rank == 0:
            try:
                cache = prepare()
                status = "hit" if cache is None else "run"
            except BaseException as err:
                if world > 1:
                    distributed.broadcast(f"error: {err}")
                raise
        status = distributed.broadcast(status)
        if status.startswith("error: "):
            raise KdcacheError(f"rank 0 could not prepare the cache ({status[7:]})")
        if status == "hit":
            if rank == 0:
                log(f"cache hit: {path}")
            return TeacherCache.open(path)
        teacher = teacher.to(dev).eval()
        cache = cache or TeacherCache.open(path, mode="r+")
        todo = np.flatnonzero(cache.blocks_record()[:, 0] == 0).tolist()
        if rank == 0 and len(todo) < cache.n_blocks:
            log(f"resuming {path}: {cache.n_blocks - len(todo)} of {cache.n_blocks} blocks already written")
        stats = _run(teacher, dataset, cache, [b for b in todo if b % world == rank], hidden, output_key, amp, dev,
                     batch_size, num_workers, writer_threads, allow_nonfinite, progress and rank == 0)
        every = distributed.gather(stats)  # also a barrier: every rank's blocks are on disk
        if rank == 0:
            seconds = max(st["seconds"] for st in every)
            total = {k: sum(st[k] for st in every) for k in ("rows", "tokens")}
            mb = sum(st["mb_per_s"] * st["seconds"] for st in every)
            stats = {**stats, **total, "seconds": seconds, "rows_per_s": round(total["rows"] / max(seconds, 1e-9), 1),
                     "tokens_per_s": round(total["tokens"] / max(seconds, 1e-9), 1),
                     "mb_per_s": round(mb / max(seconds, 1e-9), 2), "processes": world}
            cache.finalize({"dump": {**stats, "device": str(dev), "batch_size": batch_size,
                                     "num_workers": num_workers}})
            log(f"wrote {path}")
        distributed.barrier()
        return TeacherCache.open(path)
    finally:
        if lock is not None:
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


def _codec(fmt: tuple[Any, ...], classes: int) -> Codec:
    """The codec of one output: (dtype, topk, sample_k, sample_temperature, vocab_size, seed)."""
    dtype, topk, sample_k, temperature, vocab_size, seed = fmt
    vocab = vocab_size or classes
    if vocab > classes:
        raise KdcacheError(f"--vocab-size {vocab} is larger than the teacher's {classes} output classes")
    if topk is not None:
        return TopKCodec(topk, vocab)
    if sample_k is not None:
        return SampledCodec(sample_k, vocab, float(temperature), int(seed))
    return DenseCodec(dtype)


def _input_mask(inputs: Any, mask_key: str | None) -> torch.Tensor | None:
    """The (B, L) attention mask of dict inputs, as bool, or None."""
    if not mask_key or not isinstance(inputs, dict) or mask_key not in inputs:
        return None
    mask = inputs[mask_key]
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise KdcacheError(f"inputs[{mask_key!r}] must be a (batch, length) tensor, got "
                           f"{getattr(mask, 'shape', type(mask).__name__)}")
    return mask.bool()


def _create(teacher: nn.Module, dataset: Any, path: Path, hidden: tuple[str, ...], output_key: str | None,
            formats: dict[str, tuple[Any, ...]], mask_key: str, amp: str, dev: torch.device, block_rows: int | None,
            meta: dict[str, Any]) -> TeacherCache:
    """Learn the output shapes from a forward pass on two rows, then create the empty store."""
    probe_rows = list(range(min(2, len(dataset))))
    inputs, _ = fetch_batch(dataset, probe_rows)
    view_params = None
    if isinstance(dataset, ViewedDataset) and dataset.explicit:
        view_params = {"shape": list(dataset.draw_params(0).shape)}
    with HiddenCapture(teacher, hidden) as capture:
        outputs = _forward(teacher, capture, move_inputs(inputs, dev), output_key, amp, dev)
    specs = []
    for name, t in outputs.items():
        if t.ndim == 0 or t.shape[0] != len(probe_rows):
            raise KdcacheError(f"teacher output {name!r} has shape {tuple(t.shape)} for a batch of "
                               f"{len(probe_rows)}: its first axis must be the batch")
        if not t.is_floating_point():
            raise KdcacheError(f"teacher output {name!r} is {t.dtype}, not floating point")
        if t.ndim == 1 and formats[name][1:3] != (None, None):
            raise KdcacheError("--topk/--sample-k need logits with a class axis, (B, C) or (B, L, V)")
        codec = _codec(formats[name], int(t.shape[-1]) if t.ndim > 1 else 1)
        shape = tuple(t.shape[1:])
        specs.append((name, shape, codec, OutputSpec.paths_for(name, codec, shape)))
    row_bytes = {p: int(np.prod(s, dtype=np.int64)) * d.itemsize for *_, paths in specs for p, s, d in paths.values()}
    block_rows, chunks = plan_blocks(row_bytes, len(dataset), block_rows)
    outputs_spec = [OutputSpec(name, shape, codec, {key: ArrayInfo(p, s, d, chunks[p]) for key, (p, s, d) in paths.items()})
                    for name, shape, codec, paths in specs]
    logits = outputs["logits"]
    classes = int(logits.shape[-1]) if logits.ndim > 1 else 1
    meta = {**meta, "vocab": {"real": formats["logits"][4] or classes, "padded": classes}, "view_params": view_params,
            "mask_key": mask_key if _input_mask(inputs, mask_key) is not None else None}
    return TeacherCache.create(path, meta=meta, outputs=outputs_spec, rows=len(dataset), block_rows=block_rows)


def _zero_padding(arrays: dict[str, torch.Tensor], mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Store padding positions (mask 0) as zeros: never as real tokens."""
    if mask is None:
        return arrays
    return {k: (v.masked_fill(~mask.view(*mask.shape, *([1] * (v.ndim - 2))), 0)
                if v.ndim >= 2 and tuple(v.shape[:2]) == tuple(mask.shape) else v) for k, v in arrays.items()}


def _run(teacher: nn.Module, dataset: Any, cache: TeacherCache, todo: list[int], hidden: tuple[str, ...],
         output_key: str | None, amp: str, dev: torch.device, batch_size: int, num_workers: int,
         writer_threads: int, allow_nonfinite: bool, progress: bool) -> dict[str, Any]:
    batches = _plan_batches(cache, todo, batch_size)
    cuda = dev.type == "cuda"
    loader = DataLoader(_Batches(dataset, batches), batch_size=None, shuffle=False, num_workers=num_workers,
                        pin_memory=cuda, prefetch_factor=4 if num_workers else None)
    writer = _BlockWriter(cache, writer_threads, allow_nonfinite)
    mask_key = cache.meta.get("mask_key")
    logits_spec = cache.outputs["logits"]
    positions = int(np.prod(logits_spec.shape[:-1], dtype=np.int64)) if len(logits_spec.shape) > 1 else 1
    total = sum(b - a for a, b in batches)
    bar = tqdm(total=total, unit="rows", unit_scale=True, desc="dump-teacher", disable=not progress,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    tokens_done = 0
    try:
        with HiddenCapture(teacher, hidden) as capture:
            for start, inputs, labels, digests, params in loader:
                n = len(digests)
                mask = _input_mask(inputs, mask_key)
                tokens = int(mask.sum()) if mask is not None else n * positions
                outputs = _forward(teacher, capture, move_inputs(inputs, dev, non_blocking=cuda), output_key, amp, dev)
                rows = torch.arange(start, start + n, device=dev)
                dev_mask = mask.to(dev, non_blocking=cuda) if mask is not None else None
                host = {}
                for name, t in outputs.items():
                    spec = cache.outputs[name]
                    if tuple(t.shape) != (n, *spec.shape):
                        raise KdcacheError(f"teacher output {name!r} for rows {start}.. has shape {tuple(t.shape[1:])}, "
                                           f"earlier rows {spec.shape}: dataset items must all have one shape")
                    # narrow on the device, then copy to pinned memory without blocking the next forward
                    encoded = _zero_padding(spec.codec.encode(t, rows), dev_mask)
                    host.update({spec.arrays[key].path: v.to("cpu", non_blocking=cuda) for key, v in encoded.items()})
                logits = outputs["logits"]
                predicted = (logits.argmax(dim=-1).to("cpu", non_blocking=cuda)
                             if logits.ndim >= 2 and tuple(logits.shape[:-1]) == tuple(labels.shape) else None)
                event = torch.cuda.Event() if cuda else None
                if event is not None:
                    event.record()
                if params is not None:
                    host[VIEW_PARAMS] = params
                writer.put(start, host, predicted, labels, digests, tokens, event)
                fault_point("batch")
                tokens_done += tokens
                bar.update(n)
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "rows": total, "rows_per_s": round(total / max(seconds, 1e-9), 1),
            "tokens": tokens_done, "tokens_per_s": round(tokens_done / max(seconds, 1e-9), 1),
            "mb_per_s": round(writer.bytes_written / 1e6 / max(seconds, 1e-9), 2)}
