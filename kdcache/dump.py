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
import sys
import time
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed
from .capture import HiddenCapture, check_module_names
from .config import DumpConfig
from .errors import KdcacheError, option
from .format import SPANS, ArrayInfo, CacheMeta, DatasetInfo, DumpStats, OutputSpec, PackedTokens, TeacherInfo, Vocab
from .hfmodels import tokenizer_info
from .items import (as_rows, autocast, call_model, collate_items, fetch_batch, input_mask, move_inputs, resolve_amp,
                    resolve_device, row_digests, select_output)
from .packing import place_blocks, token_counts
from .store import (DumpLock, TeacherCache, dataset_digest, fault_point, fingerprint, is_remote, plan_blocks,
                    remove_cache, weights_digest)
from .store.location import exists, refuse_file
from .store.mismatch import identity_differences
from .store.verify import damaged_blocks
from .views import ViewedDataset
from .writer import BlockWriter, EncodedBatch, software_versions

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
                 tokenizer: Any = None, log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
                 **overrides: Any) -> TeacherCache:
    """Run ``teacher`` once over ``dataset`` and store its logits and chosen hidden outputs.

    Args:
        teacher: the model; put in eval mode, moved to the device, run under inference_mode.
        dataset: items ``(inputs, target)``, ``{..., "label": y}`` or bare inputs (label -1), or a
            🤗 ``datasets.Dataset`` (its numeric columns; see :func:`kdcache.hfdata.prepare`).
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
    dev = resolve_device(distributed.local_device(cfg.device))
    amp = resolve_amp(cfg.amp, dev)
    dataset = as_rows(dataset)
    samples = len(dataset)
    if samples == 0:
        raise KdcacheError("the dataset is empty: nothing to dump")
    if cfg.views is not None:  # rows are (sample, view) pairs, each view's transform seeded
        dataset = ViewedDataset(dataset, cfg.views, cfg.seed or 0)
    viewed = isinstance(dataset, ViewedDataset)
    cfg = cfg.updated(layout=_layout(dataset, cfg))

    # resolve the target: the fingerprint names the cache
    data_digest, w_digest = dataset_digest(dataset, _digest_mask(cfg)), weights_digest(teacher)
    fp = fingerprint(w_digest, data_digest, cfg.fingerprint_inputs(amp, viewed and dataset.explicit))
    path = _target(out, cfg.cache_root, fp)
    rank, world = distributed.world()
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
            distributed.barrier()  # no rank leaves while another still reads rank 0's word
            return TeacherCache.open(path)

        # run the teacher over this rank's unfinished blocks
        cache = cache or TeacherCache.open(path, mode="r+")
        todo = np.flatnonzero(cache.blocks_record()[:, 0] == 0).tolist()
        if rank == 0 and len(todo) < cache.n_blocks:
            log(f"resuming {path}: {cache.n_blocks - len(todo)} of {cache.n_blocks} blocks already written")
        stats = _run(teacher.to(dev).eval(), dataset, cache, [b for b in todo if b % world == rank], cfg, amp, dev,
                     cfg.progress and rank == 0, every_rank=todo)

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
    refuse_file(where, f"choose another {option('out')}")
    return where if is_remote(where) else Path(where)


def _existing(path: Any, fp: str, overwrite: bool, asked: tuple[CacheMeta, DumpConfig] | None = None
              ) -> TeacherCache | None:
    """The cache at ``path`` when it has this fingerprint; None when there is none (or it was
    removed for ``overwrite``: only ever a kdcache cache or an empty directory). ``asked``: this
    dump's description and settings, to say what differs when another cache is there."""
    if not exists(path):
        if isinstance(path, Path) and path.is_dir() and any(path.iterdir()):
            raise KdcacheError(f"{path} exists and is not a kdcache cache; choose another {option('out')}")
        return None
    if overwrite:
        remove_cache(path)
        return None
    cache = TeacherCache.open(path, mode="r+")
    if cache.fingerprint != fp:
        differs = "; ".join(identity_differences(cache.meta, *asked)) if asked else ""
        raise KdcacheError(f"{path} holds another cache (fingerprint {cache.fingerprint}, this dump is {fp}"
                           + (f"; {differs}" if differs else "") + f"); pass {option('overwrite', True)} to "
                           f"replace it or choose another {option('out')}")
    return cache


def _prepare(path: Any, meta: CacheMeta, teacher: nn.Module, dataset: Any, cfg: DumpConfig, dev: torch.device,
             log: Callable[[str], None]) -> tuple[TeacherCache | None, DumpLock | None]:
    """Rank 0: ``(cache to fill, lock held)`` — created, resumed or repaired — or ``(None, ...)``
    on a cache hit."""
    if not cfg.overwrite and not cfg.repair and exists(path):  # a finished cache needs no lock
        try:
            cache = _existing(path, meta.fingerprint, overwrite=False, asked=(meta, cfg))
        except KdcacheError:  # e.g. another dump is creating it this instant: decide under the lock
            cache = None
        if cache is not None and cache.complete:
            cache.check_layout()  # a damaged cache is no hit: say so (verify, --repair)
            return None, None
    lock = DumpLock(path)
    lock.acquire(on_wait=lambda who: log(f"waiting for the dump already writing {path} ({who})"))
    try:
        cache = _existing(path, meta.fingerprint, cfg.overwrite, asked=(meta, cfg))
        if cfg.repair:
            if cache is None:
                raise KdcacheError(f"{option('repair', True)}: there is no cache of this teacher, data and settings "
                                   f"at {path}; run the dump without it")
            _repair(cache, log)
        if cache is not None and cache.complete:
            cache.check_layout()
            return None, lock
        if cache is None:
            cache = _create(teacher.to(dev).eval(), dataset, path, meta, cfg, dev)
            fault_point("created")
        else:
            cache.create_missing_arrays()  # a creation that was interrupted
            _ensure_token_blocks(cache, dataset, cfg)
        cache.remove_partial_files()  # a killed writer's temp files; we hold the lock
        return cache, lock
    except BaseException:
        lock.release()
        raise


def _ensure_token_blocks(cache: TeacherCache, dataset: Any, cfg: DumpConfig) -> None:
    """A packed cache whose creation stopped before it placed its blocks on the token axis:
    place them again (the same counts give the same placement, checked by its crc)."""
    if cache.meta.packed is None:
        return
    try:
        cache.token_blocks()
    except KdcacheError:
        _, placed, crc = place_blocks(token_counts(dataset, cfg.mask_key, cfg.batch_size), cache.block_rows,
                                      max(a.row_bytes for a in cache.meta.data_arrays() if a.per_token))
        if crc != cache.meta.packed.blocks_crc:
            raise KdcacheError(f"the dataset's attention masks differ from those cache {cache.path} was created for; "
                               "use that dataset, or dump to another --out") from None
        cache.write_token_blocks(placed)


def _repair(cache: TeacherCache, log: Callable[[str], None]) -> None:
    """Restore damaged array metadata and mark the blocks ``verify`` finds damaged as unwritten,
    so this run writes them again (the teacher is deterministic: the same bytes)."""
    restored = cache.restore_layout()
    blocks = damaged_blocks(cache, cache.verify())
    if blocks or restored:
        log(f"repairing {cache.path}: {len(restored)} array descriptions restored, {len(blocks)} of "
            f"{cache.n_blocks} blocks to write again")
        cache.forget_blocks(blocks)
    else:
        log(f"nothing to repair in {cache.path}: every block verifies")


def _layout(dataset: Any, cfg: DumpConfig) -> str:
    """``packed`` (only real tokens stored) for sequences with an attention mask, unless asked
    otherwise; ``padded`` (fixed positions, padding stored as zeros) for everything else."""
    if cfg.layout != "auto":
        return cfg.layout
    base = dataset.dataset if isinstance(dataset, ViewedDataset) else dataset  # no view drawn to look
    inputs, _ = fetch_batch(base, [0])
    return "packed" if input_mask(inputs, cfg.mask_key) is not None else "padded"


def _digest_mask(cfg: DumpConfig) -> str | None:
    """The mask key row digests see: a packed cache digests real tokens only."""
    return cfg.mask_key if cfg.layout == "packed" else None


class _Batches(torch.utils.data.Dataset):
    """Item i is batch i of the dump: (first row, inputs, labels, input digests, explicit view
    parameters or None)."""

    def __init__(self, dataset: Any, batches: Sequence[tuple[int, int]], mask_key: str | None) -> None:
        self.dataset, self.batches, self.mask_key = dataset, list(batches), mask_key

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
        return start, inputs, labels, row_digests(inputs, input_mask(inputs, self.mask_key)), params


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
            raise KdcacheError(f"{option('topk')}/{option('sample_k')} need logits with a class axis, (B, C) or (B, L, V)")
        codec = cfg.codec(name, int(t.shape[-1]) if t.ndim > 1 else 1)
        shape = tuple(t.shape[1:])
        planned.append((name, shape, codec, OutputSpec.planned(name, codec, shape)))
    mask = input_mask(inputs, cfg.mask_key)
    if cfg.layout == "packed" and mask is None:
        raise KdcacheError(f"--layout packed needs dict inputs with an attention mask (inputs[{cfg.mask_key!r}])")
    # packed: outputs with the mask's token axis are stored per real token
    per_token = {name for name, t in outputs.items()
                 if cfg.layout == "packed" and t.ndim >= 3 and tuple(t.shape[:2]) == tuple(mask.shape)}
    counts = token_counts(dataset, cfg.mask_key, cfg.batch_size) if per_token else None
    mean_tokens = float(counts.mean()) if counts is not None else 0.0
    row_bytes = {p: int(np.prod(s[1:] if name in per_token else s, dtype=np.int64)) * d.itemsize
                 * (mean_tokens if name in per_token else 1)
                 for name, _, _, paths in planned for p, s, d in paths.values()}
    block_rows, chunks = plan_blocks({p: max(1, round(b)) for p, b in row_bytes.items()}, len(dataset), cfg.block_rows)
    packed, placed = None, None
    if per_token:
        token_bytes = max(int(np.prod(s[1:], dtype=np.int64)) * d.itemsize
                          for name, _, _, paths in planned if name in per_token for _, s, d in paths.values())
        chunk, placed, crc = place_blocks(counts, block_rows, token_bytes)
        capacity = int(placed[-1, 0] + -(-placed[-1, 1] // chunk) * chunk)
        packed = PackedTokens(tuple(n for n, *_ in planned if n in per_token), chunk, capacity, crc)
    logits = outputs["logits"]
    classes = int(logits.shape[-1]) if logits.ndim > 1 else 1
    meta = replace(meta, block_rows=block_rows, vocab=Vocab(cfg.vocab_size or classes, classes),
                   view_params_shape=view_params, mask_key=cfg.mask_key if mask is not None else None, packed=packed,
                   outputs={name: OutputSpec(name, shape, codec, {
                       key: (ArrayInfo(p, s[1:], d, packed.chunk, per_token=True) if name in per_token
                             else ArrayInfo(p, s, d, chunks[p])) for key, (p, s, d) in paths.items()})
                       for name, shape, codec, paths in planned})
    cache = TeacherCache.create(path, replace(meta, bound=tuple(a.path for a in meta.data_arrays())))
    if placed is not None:
        cache.write_token_blocks(placed)
    return cache


def _zero_padding(arrays: dict[str, torch.Tensor], mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Store padding positions (mask 0) as zeros: never as real tokens."""
    if mask is None:
        return arrays
    return {k: (v.masked_fill(~mask.view(*mask.shape, *([1] * (v.ndim - 2))), 0)
                if v.ndim >= 2 and tuple(v.shape[:2]) == tuple(mask.shape) else v) for k, v in arrays.items()}


def _run(teacher: nn.Module, dataset: Any, cache: TeacherCache, todo: list[int], cfg: DumpConfig, amp: str,
         dev: torch.device, progress: bool, every_rank: Sequence[int] = ()) -> dict[str, Any]:
    """Run the teacher over blocks ``todo`` and write them; this process's share of the stats.
    The progress bar counts the rows of ``every_rank``'s blocks (all processes'), advancing by
    this process's rows scaled to that total: ranks run in step, and only one prints."""
    batches = _plan_batches(cache, todo, cfg.batch_size)
    cuda = dev.type == "cuda"
    loader = DataLoader(_Batches(dataset, batches, _digest_mask(cfg)), batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                        pin_memory=cuda, prefetch_factor=4 if cfg.num_workers else None)
    writer = BlockWriter(cache, cfg.writer_threads, cfg.allow_nonfinite)
    mask_key, packed = cache.meta.mask_key, cache.meta.packed
    logits_spec = cache.outputs["logits"]
    positions = int(np.prod(logits_spec.shape[:-1], dtype=np.int64)) if len(logits_spec.shape) > 1 else 1
    total = sum(b - a for a, b in batches)
    everyone = sum(stop - start for start, stop in map(cache.block_range, every_rank)) or total
    bar = tqdm(total=everyone, unit="rows", unit_scale=True, desc="dump-teacher", disable=not progress,
               dynamic_ncols=True)
    scale = everyone / max(total, 1)
    t0 = time.perf_counter()
    tokens_done = 0
    try:
        with HiddenCapture(teacher, cfg.hidden) as capture:
            for start, inputs, labels, digests, params in loader:
                n = len(digests)
                mask = input_mask(inputs, mask_key)
                tokens = int(mask.sum()) if mask is not None else n * positions
                outputs = _forward(teacher, capture, move_inputs(inputs, dev, non_blocking=cuda), cfg.output_key, amp,
                                   dev)
                rows = torch.arange(start, start + n, device=dev)
                dev_mask = mask.to(dev, non_blocking=cuda) if mask is not None else None
                host = {}
                for name, t in outputs.items():
                    spec = cache.outputs[name]
                    per_token = packed is not None and name in packed.outputs
                    # a packed output's token axis may differ from batch to batch: only real tokens are kept
                    expected = (n, *(t.shape[1:2] if per_token else ()), *spec.shape[1 if per_token else 0:])
                    if tuple(t.shape) != expected:
                        raise KdcacheError(f"teacher output {name!r} for rows {start}.. has shape {tuple(t.shape[1:])}, "
                                           f"earlier rows {spec.shape}: dataset items must all have one shape")
                    # narrow on the device, then copy to pinned memory without blocking the next forward
                    encoded = spec.codec.encode(t, rows)
                    encoded = ({k: v[dev_mask] for k, v in encoded.items()} if per_token
                               else _zero_padding(encoded, dev_mask))
                    host.update({spec.arrays[key].path: v.to("cpu", non_blocking=cuda) for key, v in encoded.items()})
                if packed is not None:  # every real position of a dumped row has a target
                    host[SPANS] = torch.stack([torch.zeros_like(mask[:, 0], dtype=torch.int32),
                                               mask.sum(1, dtype=torch.int32)], 1)
                logits = outputs["logits"]
                predicted = (logits.argmax(dim=-1).to("cpu", non_blocking=cuda)
                             if logits.ndim >= 2 and tuple(logits.shape[:-1]) == tuple(labels.shape) else None)
                copied = torch.cuda.Event() if cuda else None
                if copied is not None:
                    copied.record()
                if params is not None:
                    host[cache.view_params.path] = params
                writer.put(EncodedBatch(start, host, predicted, labels, digests, tokens, copied))
                fault_point("batch")
                tokens_done += tokens
                bar.update(n * scale)
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
