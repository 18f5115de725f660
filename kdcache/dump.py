"""Stage one: run the teacher once over the transfer set and store its outputs.

:func:`dump_teacher` reads top to bottom: resolve the target (the fingerprint names it) ->
open or create the store (rank 0, under the lock) -> ranks agree on what to do -> run the
teacher over the unfinished blocks -> finalise. The loop keeps the accelerator busy: a
DataLoader (with workers) prepares and digests the next batches, the teacher runs under
``inference_mode`` (autocast on CUDA), outputs are narrowed to the stored dtype on the device and
copied to pinned host memory without blocking, and :class:`~kdcache.writer.BlockWriter`
assembles and writes whole blocks on other threads.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import replace
from enum import Enum
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
from .codecs import DenseCodec
from .config import DumpConfig
from .errors import KdcacheError
from .format import ArrayInfo, CacheMeta, DatasetInfo, DumpStats, OutputSpec, TeacherInfo, Vocab
from .items import (autocast, call_model, collate_items, fetch_batch, move_inputs, resolve_amp, resolve_device,
                    row_digests, select_output)
from .store import (DumpLock, TeacherCache, dataset_digest, fault_point, fingerprint, is_remote, plan_blocks,
                    remove_cache, weights_digest)
from .store.location import exists, refuse_file
from .views import ViewedDataset
from .writer import BlockWriter, EncodedBatch

__all__ = ["dump_teacher", "default_cache_root", "DumpConfig"]


def default_cache_root() -> Path:
    return Path(os.environ.get("KDCACHE_HOME", "kdcache-store"))


class _Plan(Enum):
    """What rank 0 decided, broadcast so that every rank does the same."""

    HIT = "hit"  # a finished cache with this fingerprint is there: nothing to do
    RUN = "run"  # created or resumed: every rank writes its blocks
    FAILED = "failed"  # rank 0 could not prepare the cache: every rank stops


def dump_teacher(teacher: nn.Module, dataset: Any, out: str | Path | None = None, *, config: DumpConfig | None = None,
                 teacher_info: dict[str, Any] | None = None, dataset_info: dict[str, Any] | None = None,
                 log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
                 **overrides: Any) -> TeacherCache:
    """Run ``teacher`` once over ``dataset`` and store its logits and chosen hidden outputs.

    Args:
        teacher: the model; put in eval mode, moved to the device, run under inference_mode.
        dataset: items ``(inputs, label)``, ``{..., "label": y}`` or bare inputs (label -1).
        out: cache directory or URL; when None, ``cache_root/<fingerprint>``.
        config: a :class:`DumpConfig`; ``overrides`` are its fields as keyword arguments
            (``hidden=["layer3"]``, ``topk=32``, ``batch_size=512``, ...). See :class:`DumpConfig`
            for each setting; the stored ones define the cache's fingerprint.
        teacher_info, dataset_info: provenance recorded in the cache (``spec``, ``kwargs``,
            ``checkpoint``): shown by ``kdcache info``, never imported.
        log: where one-line messages go (cache hit, resuming, wrote).

    Returns:
        The finished cache. A second call with the same teacher, data and stored settings
        returns the existing cache without running the teacher ("cache hit"); a killed dump
        resumes at its first unfinished block.
    """
    cfg = (config or DumpConfig()).updated(**overrides) if overrides else (config or DumpConfig())
    check_module_names(teacher, cfg.hidden)
    dev = resolve_device(distributed.local_device(cfg.device))
    amp = resolve_amp(cfg.amp, dev)
    samples = len(dataset)
    if samples == 0:
        raise KdcacheError("the dataset is empty: nothing to dump")
    if cfg.views is not None:  # rows are (sample, view) pairs, each view's transform seeded
        dataset = ViewedDataset(dataset, cfg.views, cfg.seed or 0)
    viewed = isinstance(dataset, ViewedDataset)

    # resolve the target: the fingerprint names the cache
    data_digest, w_digest = dataset_digest(dataset), weights_digest(teacher)
    fp = fingerprint(w_digest, data_digest, cfg.fingerprint_inputs(amp, viewed and dataset.explicit))
    path = _target(out, cfg.cache_root, fp)
    rank, world = distributed.world()
    if distributed.broadcast(fp) != fp:
        raise KdcacheError(f"rank {rank} sees another teacher or dataset than rank 0 (fingerprint {fp}): give every "
                           "rank the same checkpoint and data")
    teacher_info = teacher_info or {}
    meta = CacheMeta(
        fingerprint=fp, rows=len(dataset), block_rows=1, amp=amp, versions=_versions(), vocab=Vocab(1, 1),
        teacher=TeacherInfo(weights_digest=w_digest, class_name=type(teacher).__qualname__,
                            spec=teacher_info.get("spec"), kwargs=teacher_info.get("kwargs") or {},
                            checkpoint=teacher_info.get("checkpoint")),
        dataset=DatasetInfo(length=samples, digest=data_digest, spec=(dataset_info or {}).get("spec"),
                            kwargs=(dataset_info or {}).get("kwargs") or {}),
        outputs={}, output_key=cfg.output_key, views=cfg.views or 1, seed=(cfg.seed or 0) if viewed else None)

    lock: DumpLock | None = None
    try:
        # open or create (rank 0, under the lock); the other ranks wait for its word
        cache: TeacherCache | None = None
        plan = _Plan.RUN
        if rank == 0:
            try:
                cache, lock = _prepare(path, meta, teacher, dataset, cfg, dev, log)
            except BaseException as err:
                distributed.broadcast((_Plan.FAILED.value, str(err)))  # the other ranks stop too
                raise
            plan = _Plan.HIT if cache is None else _Plan.RUN
        decided, problem = distributed.broadcast((plan.value, ""))
        plan = _Plan(decided)
        if plan is _Plan.FAILED:
            raise KdcacheError(f"rank 0 could not prepare the cache ({problem})")
        if plan is _Plan.HIT:
            if rank == 0:
                log(f"cache hit: {path}")
            return TeacherCache.open(path)

        # run the teacher over this rank's unfinished blocks
        cache = cache or TeacherCache.open(path, mode="r+")
        todo = np.flatnonzero(cache.blocks_record()[:, 0] == 0).tolist()
        if rank == 0 and len(todo) < cache.n_blocks:
            log(f"resuming {path}: {cache.n_blocks - len(todo)} of {cache.n_blocks} blocks already written")
        stats = _run(teacher.to(dev).eval(), dataset, cache, [b for b in todo if b % world == rank], cfg, amp, dev,
                     cfg.progress and rank == 0)

        # finalise: every rank's blocks are on disk once gathered
        every = distributed.gather(stats)
        if rank == 0:
            cache.finalize(_total(every, str(dev), cfg))
            log(f"wrote {path}")
        distributed.barrier()
        return TeacherCache.open(path)
    finally:
        if lock is not None:
            lock.release()


def _target(out: str | Path | None, cache_root: str | None, fp: str) -> Any:
    """The cache's location: ``out``, or ``cache_root/<fingerprint>``; a URL stays a string."""
    root = str(cache_root or default_cache_root())
    where = str(out) if out is not None else (f"{root.rstrip('/')}/{fp}" if is_remote(root) else str(Path(root) / fp))
    refuse_file(where, "choose another --out")
    return where if is_remote(where) else Path(where)


def _existing(path: Any, fp: str, overwrite: bool) -> TeacherCache | None:
    """The cache at ``path`` when it has this fingerprint; None when there is none (or it was
    removed for ``overwrite``)."""
    if not exists(path):
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


def _prepare(path: Any, meta: CacheMeta, teacher: nn.Module, dataset: Any, cfg: DumpConfig, dev: torch.device,
             log: Callable[[str], None]) -> tuple[TeacherCache | None, DumpLock | None]:
    """Rank 0: ``(cache to fill, lock held)`` — created or resumed — or ``(None, ...)`` on a cache hit."""
    if not cfg.overwrite and exists(path):  # a finished cache needs no lock
        try:
            cache = _existing(path, meta.fingerprint, overwrite=False)
        except KdcacheError:  # e.g. another dump is creating it this instant: decide under the lock
            cache = None
        if cache is not None and cache.complete:
            return None, None
    lock = DumpLock(path)
    lock.acquire(on_wait=lambda who: log(f"waiting for the dump already writing {path} ({who})"))
    try:
        cache = _existing(path, meta.fingerprint, cfg.overwrite)
        if cache is not None and cache.complete:
            return None, lock
        if cache is None:
            cache = _create(teacher.to(dev).eval(), dataset, path, meta, cfg, dev)
            fault_point("created")
        cache.remove_partial_files()  # a killed writer's temp files; we hold the lock
        return cache, lock
    except BaseException:
        lock.release()
        raise


def _versions() -> dict[str, str]:
    return {"kdcache": __version__, "torch": torch.__version__, "zarr": zarr.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


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


def _as_is(batch: Any) -> Any:
    """The loader's ``collate_fn``: a batch is already one (torch's default would walk it and
    turn its numpy digests into tensors, ~50 us a batch)."""
    return batch


def _plan_batches(cache: TeacherCache, blocks: Sequence[int], batch_size: int) -> list[tuple[int, int]]:
    """Batches of rows that never straddle a block, so each block fills from its own batches."""
    batches = []
    for block in blocks:
        start, stop = cache.block_range(block)
        batches += [(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size)]
    return batches


def _forward(teacher: nn.Module, capture: HiddenCapture, inputs: Any, output_key: str | None, amp: str,
             dev: torch.device) -> dict[str, torch.Tensor]:
    with torch.inference_mode(), autocast(amp, dev):
        try:
            output = call_model(teacher, inputs)
        except KdcacheError:
            raise
        except (RuntimeError, TypeError, ValueError) as err:
            raise KdcacheError(f"the teacher failed on a batch of the dataset ({type(err).__name__}: "
                               f"{str(err).splitlines()[0]}); do the dataset's inputs fit the teacher?") from None
        return {"logits": select_output(output, output_key), **capture.take()}


def _input_mask(inputs: Any, mask_key: str | None) -> torch.Tensor | None:
    """The (B, L) attention mask of dict inputs, as bool, or None."""
    if not mask_key or not isinstance(inputs, dict) or mask_key not in inputs:
        return None
    mask = inputs[mask_key]
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise KdcacheError(f"inputs[{mask_key!r}] must be a (batch, length) tensor, got "
                           f"{getattr(mask, 'shape', type(mask).__name__)}")
    return mask.bool()


def _create(teacher: nn.Module, dataset: Any, path: Any, meta: CacheMeta, cfg: DumpConfig,
            dev: torch.device) -> TeacherCache:
    """Learn the output shapes from a forward pass on two rows, then create the empty store."""
    probe_rows = list(range(min(2, len(dataset))))
    inputs, _ = fetch_batch(dataset, probe_rows)
    view_params = None
    if isinstance(dataset, ViewedDataset) and dataset.explicit:
        view_params = tuple(dataset.draw_params(0).shape)
    with HiddenCapture(teacher, cfg.hidden) as capture:
        outputs = _forward(teacher, capture, move_inputs(inputs, dev), cfg.output_key, meta.amp, dev)
    planned = []
    for name, t in outputs.items():
        if t.ndim == 0 or t.shape[0] != len(probe_rows):
            raise KdcacheError(f"teacher output {name!r} has shape {tuple(t.shape)} for a batch of "
                               f"{len(probe_rows)}: its first axis must be the batch")
        if not t.is_floating_point():
            raise KdcacheError(f"teacher output {name!r} is {t.dtype}, not floating point")
        if name == "logits" and t.ndim == 1 and cfg.sparse:
            raise KdcacheError("--topk/--sample-k need logits with a class axis, (B, C) or (B, L, V)")
        codec = cfg.codec(name, int(t.shape[-1]) if t.ndim > 1 else 1)
        shape = tuple(t.shape[1:])
        planned.append((name, shape, codec, OutputSpec.planned(name, codec, shape)))
    row_bytes = {p: int(np.prod(s, dtype=np.int64)) * d.itemsize for *_, paths in planned for p, s, d in paths.values()}
    block_rows, chunks = plan_blocks(row_bytes, len(dataset), cfg.block_rows)
    logits = outputs["logits"]
    classes = int(logits.shape[-1]) if logits.ndim > 1 else 1
    meta = replace(meta, block_rows=block_rows, vocab=Vocab(cfg.vocab_size or classes, classes),
                   view_params_shape=view_params,
                   mask_key=cfg.mask_key if _input_mask(inputs, cfg.mask_key) is not None else None,
                   outputs={name: OutputSpec(name, shape, codec, {key: ArrayInfo(p, s, d, chunks[p])
                                                                  for key, (p, s, d) in paths.items()})
                            for name, shape, codec, paths in planned})
    return TeacherCache.create(path, meta)


def _zero_padding(arrays: dict[str, torch.Tensor], mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Store padding positions (mask 0) as zeros: never as real tokens."""
    if mask is None:
        return arrays
    return {k: (v.masked_fill(~mask.view(*mask.shape, *([1] * (v.ndim - 2))), 0)
                if v.ndim >= 2 and tuple(v.shape[:2]) == tuple(mask.shape) else v) for k, v in arrays.items()}


def _store(spec: OutputSpec, output: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor | None,
           into: dict[str, torch.Tensor], cuda: bool) -> None:
    """Encode one teacher output into its block's buffers (codec key -> tensor of the rows). On
    CUDA the codec narrows on the device and the copy to the pinned buffers does not block the
    next forward; on CPU a dense output is narrowed by the copy itself (one pass, no temporary)."""
    if not cuda and isinstance(spec.codec, DenseCodec) and mask is None:
        target = into[""]
        target = target.view(torch.bfloat16) if spec.codec.dtype == "bfloat16" else target
        target.copy_(output.detach())
        return
    for key, value in _zero_padding(spec.codec.encode(output, rows), mask).items():
        into[key].copy_(value, non_blocking=cuda)


def _hits(logits: torch.Tensor, labels: torch.Tensor, cuda: bool) -> torch.Tensor | None:
    """Where labels are class ids (one per row or token): True where the label's logit is the
    row's largest (a tie at the top counts), on the host. ``amax`` and one gather cost a tenth
    of ``argmax`` on a CPU (21 vs 350 us for 256 x 1,000; argmax was a third of a dump's time)."""
    if logits.ndim < 2 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        return None
    y = labels.to(logits.device, non_blocking=cuda)
    classes = logits.shape[-1]
    picked = logits.gather(-1, y.clamp(0, classes - 1).unsqueeze(-1)).squeeze(-1)
    return ((picked >= logits.amax(-1)) & (y < classes)).to("cpu", non_blocking=cuda)


def _run(teacher: nn.Module, dataset: Any, cache: TeacherCache, todo: list[int], cfg: DumpConfig, amp: str,
         dev: torch.device, progress: bool) -> dict[str, Any]:
    """Run the teacher over blocks ``todo`` and write them; this process's share of the stats."""
    batches = _plan_batches(cache, todo, cfg.batch_size)
    cuda = dev.type == "cuda"
    loader = DataLoader(_Batches(dataset, batches), batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                        pin_memory=cuda, prefetch_factor=4 if cfg.num_workers else None, collate_fn=_as_is)
    writer = BlockWriter(cache, cfg.writer_threads, cfg.allow_nonfinite, pinned=cuda)
    mask_key = cache.meta.mask_key
    logits_spec = cache.outputs["logits"]
    positions = int(np.prod(logits_spec.shape[:-1], dtype=np.int64)) if len(logits_spec.shape) > 1 else 1
    total = sum(b - a for a, b in batches)
    bar = tqdm(total=total, unit="rows", unit_scale=True, desc="dump-teacher", disable=not progress,
               dynamic_ncols=True)
    t0 = time.perf_counter()
    tokens_done = 0
    try:
        with HiddenCapture(teacher, cfg.hidden) as capture:
            for start, inputs, labels, digests, params in loader:
                n = len(digests)
                mask = _input_mask(inputs, mask_key)
                tokens = int(mask.sum()) if mask is not None else n * positions
                outputs = _forward(teacher, capture, move_inputs(inputs, dev, non_blocking=cuda), cfg.output_key, amp,
                                   dev)
                rows = torch.arange(start, start + n, device=dev)
                dev_mask = mask.to(dev, non_blocking=cuda) if mask is not None else None
                block = writer.rows(start, n)  # this batch's rows of every array, in its block's buffers
                for name, t in outputs.items():
                    spec = cache.outputs[name]
                    if tuple(t.shape) != (n, *spec.shape):
                        raise KdcacheError(f"teacher output {name!r} for rows {start}.. has shape {tuple(t.shape[1:])}, "
                                           f"earlier rows {spec.shape}: dataset items must all have one shape")
                    _store(spec, t, rows, dev_mask, {key: block[a.path] for key, a in spec.arrays.items()}, cuda)
                hits = _hits(outputs["logits"], labels, cuda)
                copied = torch.cuda.Event() if cuda else None
                if copied is not None:
                    copied.record()
                if params is not None:
                    block[cache.view_params.path].copy_(params)
                writer.put(EncodedBatch(start, hits, labels, digests, tokens, copied))
                fault_point("batch")
                tokens_done += tokens
                bar.update(n)
    finally:
        bar.close()
        writer.close()
    return {"seconds": time.perf_counter() - t0, "rows": total, "tokens": tokens_done,
            "bytes": writer.bytes_written}


def _total(every: list[dict[str, Any]], device: str, cfg: DumpConfig) -> DumpStats:
    """The dump's record from every rank's share (ranks ran at once: the slowest sets the time)."""
    seconds = max(max(st["seconds"] for st in every), 1e-9)
    rows, tokens = sum(st["rows"] for st in every), sum(st["tokens"] for st in every)
    return DumpStats(seconds=round(seconds, 3), rows=rows, rows_per_s=round(rows / seconds, 1), tokens=tokens,
                     tokens_per_s=round(tokens / seconds, 1),
                     mb_per_s=round(sum(st["bytes"] for st in every) / 1e6 / seconds, 2), processes=len(every),
                     device=device, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
