"""Stage one: run the teacher once over the transfer set and store its outputs.

:func:`dump_teacher` reads top to bottom: resolve the target (the fingerprint names it) ->
open or create the store (rank 0, under the lock; :mod:`.prepare`) -> ranks agree on what to do
-> run the teacher over the unfinished blocks (:mod:`.loop`) -> finalise.
"""

from __future__ import annotations

import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import distributed
from ..config import DumpConfig
from ..data.items import as_rows
from ..data.views import ViewedDataset
from ..errors import KdcacheError, KdcacheWarning, option, speaking_cli
from ..format.meta import CacheMeta, DatasetInfo, DumpStats, TeacherInfo, Vocab
from ..models.capture import check_module_names
from ..models.forward import resolve_amp, resolve_device
from ..models.placement import input_device, is_dispatched, offloaded_weights, place
from ..models.hf import tokenizer_info
from ..store import DumpLock, TeacherCache, dataset_digest, fingerprint, weights_digest
from .create import choose_layout
from .loop import digest_mask, run_blocks
from .prepare import default_cache_root, earlier_cache, prepare, target_path
from .writer import software_versions

__all__ = ["dump_teacher", "default_cache_root", "DumpConfig", "UntrainedTeacherWarning"]


class UntrainedTeacherWarning(KdcacheWarning):
    """The teacher is at chance on the transfer set's labelled rows: most likely untrained."""


class _Plan(Enum):
    """What rank 0 decided, broadcast so that every rank does the same."""

    HIT = "hit"  # a finished cache with this fingerprint is there: nothing to do
    RUN = "run"  # created or resumed: every rank writes its blocks
    FAILED = "failed"  # rank 0 could not prepare the cache: every rank stops


def dump_teacher(teacher: nn.Module, dataset: Any, out: str | Path | None = None, *, config: DumpConfig | None = None,
                 teacher_info: dict[str, Any] | None = None, dataset_info: dict[str, Any] | None = None,
                 tokenizer: Any = None, log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
                 **overrides: Any) -> TeacherCache:
    """Run ``teacher`` once over ``dataset`` and store its logits and chosen hidden outputs.

    Args:
        teacher: the model; put in eval mode, moved to the device, run under inference_mode.
        dataset: items ``(inputs, target)``, ``{..., "label": y}`` or bare inputs (label -1), or a
            🤗 ``datasets.Dataset`` (its numeric columns; see :func:`kdcache.data.hf.prepare`).
        out: cache directory or URL; when None, ``cache_root/<fingerprint>``.
        config: a :class:`DumpConfig`; ``overrides`` are its fields as keyword arguments
            (``hidden=["layer3"]``, ``topk=32``, ``batch_size=512``, ...). See :class:`DumpConfig`
            for each setting; the stored ones define the cache's fingerprint.
        teacher_info, dataset_info: provenance recorded in the cache (``spec``, ``kwargs``,
            ``checkpoint``): shown by ``kdcache info``, never imported.
        tokenizer: the teacher's tokenizer, when it has one: its vocabulary is recorded so that a
            student with another vocabulary can be refused in stage two.
        log: where one-line messages go (cache hit, resuming, wrote).

    Returns:
        The finished cache. A second call with the same teacher, data and stored settings
        returns the existing cache without running the teacher ("cache hit"); a killed dump
        resumes at its first unfinished block.
    """
    cfg = (config or DumpConfig()).updated(**overrides) if overrides else (config or DumpConfig())
    check_module_names(teacher, cfg.hidden)
    rank, world = distributed.world()
    dev = teacher_device(teacher, cfg, world)
    amp = resolve_amp(cfg.amp, dev)
    dataset = as_rows(dataset)
    samples = len(dataset)
    if samples == 0:
        raise KdcacheError("the dataset is empty: nothing to dump")
    if cfg.views is not None:  # rows are (sample, view) pairs, each view's transform seeded
        dataset = ViewedDataset(dataset, cfg.views, cfg.seed or 0)
    viewed = isinstance(dataset, ViewedDataset)
    cfg = cfg.updated(layout=choose_layout(dataset, cfg))

    # resolve the target: the fingerprint names the cache
    offloaded = offloaded_weights(teacher)
    data_digest, w_digest = dataset_digest(dataset, digest_mask(cfg)), weights_digest(teacher, offloaded=offloaded)
    choices = cfg.fingerprint_inputs(amp, viewed and dataset.explicit)
    fp = fingerprint(w_digest, data_digest, choices)
    path = target_path(out, cfg.cache_root, fp)
    if distributed.broadcast(fp) != fp:
        raise KdcacheError(f"rank {rank} sees another teacher or dataset than rank 0 (fingerprint {fp}): give every "
                           "rank the same checkpoint and data")
    teacher_info = teacher_info or {}
    meta = CacheMeta(
        fingerprint=fp, rows=len(dataset), block_rows=1, amp=amp, versions=software_versions(), vocab=Vocab(1, 1),
        teacher=TeacherInfo(weights_digest=w_digest, class_name=type(teacher).__qualname__,
                            spec=teacher_info.get("spec"), kwargs=teacher_info.get("kwargs") or {},
                            checkpoint=teacher_info.get("checkpoint"),
                            tokenizer=tokenizer_info(tokenizer) if tokenizer is not None else None),
        dataset=DatasetInfo(length=samples, digest=data_digest, spec=(dataset_info or {}).get("spec"),
                            kwargs=(dataset_info or {}).get("kwargs") or {}),
        outputs={}, output_key=cfg.output_key, views=cfg.views or 1, seed=(cfg.seed or 0) if viewed else None)
    if rank == 0:  # a cache named by the weights digest of earlier releases may be this dump's
        meta, path = earlier_cache(out, path, cfg, meta, choices,
                                   lambda: weights_digest(teacher, "blake2b", offloaded=offloaded))
    path = distributed.broadcast(path)

    lock: DumpLock | None = None
    try:
        # open or create (rank 0, under the lock); the other ranks wait for its word
        cache: TeacherCache | None = None
        plan = _Plan.RUN
        if rank == 0:
            try:
                cache, lock = prepare(path, meta, teacher, dataset, cfg, dev, log)
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
            distributed.barrier()  # no rank leaves while another still reads rank 0's word
            return _checked(TeacherCache.open(path), rank)

        # run the teacher over this rank's unfinished blocks
        cache = cache or TeacherCache.open(path, mode="r+")
        todo = np.flatnonzero(cache.blocks_record()[:, 0] == 0).tolist()
        if rank == 0 and len(todo) < cache.n_blocks:
            log(f"resuming {path}: {cache.n_blocks - len(todo)} of {cache.n_blocks} blocks already written")
        stats = run_blocks(place(teacher, dev), dataset, cache, [b for b in todo if b % world == rank], cfg, amp, dev,
                     cfg.progress and rank == 0, every_rank=todo)

        # finalise: every rank's blocks are on disk once gathered
        every = distributed.gather(stats)
        if rank == 0:
            cache.finalize(_total(every, str(dev), cfg))
            log(f"wrote {path}")
        distributed.barrier()
        return _checked(TeacherCache.open(path), rank)
    finally:
        if lock is not None:
            lock.release()


def teacher_device(teacher: nn.Module, cfg: DumpConfig, world: int) -> torch.device:
    """Where the dump runs: ``cfg.device`` (this process's GPU under torchrun); for a teacher
    that accelerate spread over devices (a device map), where it takes its inputs."""
    if not is_dispatched(teacher):
        return resolve_device(distributed.local_device(cfg.device))
    if world > 1:
        raise KdcacheError("the teacher is spread over devices by a device map: run its dump as one process (not "
                           "under torchrun); several processes need a teacher that fits one GPU each")
    dev = input_device(teacher)
    if cfg.device != "auto" and resolve_device(cfg.device) != dev:
        raise KdcacheError(f"the teacher's device map takes its inputs on {dev}, not {option('device', cfg.device)}: "
                           f"leave {option('device')} at auto")
    return dev


def _checked(cache: TeacherCache, rank: int) -> TeacherCache:
    """The cache, after a warning when its teacher is at chance on the labelled rows."""
    acc = cache.meta.teacher_accuracy
    if rank == 0 and acc is not None and cache.meta.teacher_at_chance:
        classes = cache.meta.vocab.real
        forgot = "--checkpoint" if speaking_cli() else "to load its trained weights"
        warnings.warn(f"the teacher is at chance on the transfer set's labelled rows ({acc.correct}/{acc.labelled} = "
                      f"{acc.accuracy:.3f}; a uniform guess over {classes} classes gets {1 / classes:.3f}): did you "
                      f"forget {forgot}? An untrained teacher has nothing to teach", UntrainedTeacherWarning,
                      stacklevel=3)
    return cache


def _total(every: list[dict[str, Any]], device: str, cfg: DumpConfig) -> DumpStats:
    """The dump's record from every rank's share (ranks ran at once: the slowest sets the time)."""
    seconds = max(max(st["seconds"] for st in every), 1e-9)
    rows, tokens = sum(st["rows"] for st in every), sum(st["tokens"] for st in every)
    return DumpStats(seconds=round(seconds, 3), rows=rows, rows_per_s=round(rows / seconds, 1), tokens=tokens,
                     tokens_per_s=round(tokens / seconds, 1),
                     mb_per_s=round(sum(st["bytes"] for st in every) / 1e6 / seconds, 2), processes=len(every),
                     device=device, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
