"""Where a dump writes and what is already there: the target path (``out``, or the cache root
and the fingerprint), a cache hit, a cache created, resumed or repaired, under the dump's lock."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..config import DumpConfig
from ..errors import KdcacheError, option
from ..format.meta import CacheMeta
from ..format.packing import place_blocks, token_counts
from ..data.digests import row_digests
from ..data.items import fetch_batch, input_mask
from ..format.meta import ROW_DIGEST
from ..models.placement import place
from ..store import DumpLock, TeacherCache, fault_point, fingerprint, is_remote, list_dir, remove_cache
from ..store.constants import write_constants
from ..store.identity import digest_scheme
from ..store.location import exists, recognisable, refuse_file
from ..store.mismatch import identity_differences
from ..store.paths import damaged, remove_strays, strays
from ..store.verify import damaged_blocks
from .create import create_cache, plan_cache
from .head import layer_arrays, output_layer
from .loop import digest_mask

__all__ = ["default_cache_root", "target_path", "earlier_cache", "prepare"]

_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


def default_cache_root() -> Path:
    return Path(os.environ.get("KDCACHE_HOME", "kdcache-store"))


def target_path(out: str | Path | None, cache_root: str | None, fp: str) -> Any:
    """The cache's location: ``out``, or ``cache_root/<fingerprint>``; a URL stays a string."""
    root = str(cache_root or default_cache_root())
    where = str(out) if out is not None else (f"{root.rstrip('/')}/{fp}" if is_remote(root) else str(Path(root) / fp))
    refuse_file(where, f"choose another {option('out')}")
    return where if is_remote(where) else Path(where)


def earlier_cache(out: str | Path | None, path: Any, cfg: DumpConfig, meta: CacheMeta, choices: dict[str, Any],
                  blake2b_digest: Callable[[], str]) -> tuple[CacheMeta, Any]:
    """This dump's description and path, or those of the cache written before weights digests
    were crc32c (their ``blake2b`` digest named them) that is this dump's cache, so that it stays
    a cache hit, resumes or is repaired instead of being "another cache".

    Looked for at ``out`` (any cache there with a blake2b digest), or without ``out``, when the
    cache root holds no cache of this fingerprint, among its fingerprint-named caches with a
    blake2b digest that differ from this dump in nothing but the digest. Only then is the
    blake2b digest computed (``blake2b_digest``, ~0.5 GB/s), and the fingerprint it gives
    compared. At ``out``, a cache with another blake2b fingerprint is compared with this dump's
    blake2b digest, so that the refusal says truly whether the weights differ.
    """
    if cfg.overwrite:
        return meta, path
    if out is not None:
        candidates = [path]
    elif exists(path):
        return meta, path
    else:
        root = str(cfg.cache_root or default_cache_root())
        candidates = [e for e in list_dir(root) or [] if _FINGERPRINT.fullmatch(str(e).rstrip("/").rsplit("/", 1)[-1])]
    earlier = []
    for candidate in candidates:
        try:
            stored = TeacherCache.open(candidate).meta if TeacherCache.exists(candidate) else None
        except KdcacheError:  # damaged, or being created this instant: not this dump's to rename to
            continue
        if stored is None or digest_scheme(stored.teacher.weights_digest) != "blake2b":
            continue
        if out is not None or all(d.startswith("teacher weights:") for d in identity_differences(stored, meta, cfg)):
            earlier.append((candidate, stored))
    if not earlier:
        return meta, path
    digest = blake2b_digest()
    fp = fingerprint(digest, meta.dataset.digest, choices)
    renamed = replace(meta, teacher=replace(meta.teacher, weights_digest=digest))
    for candidate, stored in earlier:
        if stored.fingerprint == fp:
            return replace(renamed, fingerprint=fp), candidate
    return (renamed, path) if out is not None else (meta, path)


def existing_cache(path: Any, fp: str, overwrite: bool, asked: tuple[CacheMeta, DumpConfig] | None = None,
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


def prepare(path: Any, meta: CacheMeta, teacher: nn.Module, dataset: Any, cfg: DumpConfig, dev: torch.device,
            log: Callable[[str], None]) -> tuple[TeacherCache | None, DumpLock | None]:
    """Rank 0: ``(cache to fill, lock held)`` — created, resumed or repaired — or ``(None, ...)``
    on a cache hit."""
    if not cfg.overwrite and not cfg.repair and exists(path):  # a finished cache needs no lock
        try:
            cache = existing_cache(path, meta.fingerprint, overwrite=False, asked=(meta, cfg))
        except KdcacheError:  # e.g. another dump is creating it this instant: decide under the lock
            cache = None
        if cache is not None and cache.complete:
            cache.check_layout()  # a damaged cache is no hit: say so (verify, --repair)
            return None, None
    lock = DumpLock(path)
    lock.acquire(on_wait=lambda who: log(f"waiting for the dump already writing {path} ({who})"))
    try:
        if cfg.repair:
            cache = repair(path, meta, teacher, dataset, cfg, dev, log)
        else:
            cache = existing_cache(path, meta.fingerprint, cfg.overwrite, asked=(meta, cfg))
            if cache is not None and not is_remote(path):  # never written or deleted through a planted link
                planted = strays(path)
                if planted:
                    raise damaged(path, f"{planted[0][0]} is {planted[0][1]}")
        if cache is not None and cache.complete:
            cache.check_layout()
            return None, lock
        if cache is None:
            cache = create_cache(place(teacher, dev), dataset, path, meta, cfg, dev)
            fault_point("created")
        else:
            cache.create_missing_arrays()  # a creation that was interrupted
            ensure_token_blocks(cache, dataset, cfg)
            mend_constants(cache, teacher, cfg)
        cache.remove_partial_files()  # a killed writer's temp files; we hold the lock
        return cache, lock
    except BaseException:
        lock.release()
        raise


def ensure_token_blocks(cache: TeacherCache, dataset: Any, cfg: DumpConfig) -> None:
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
                               f"use that dataset, or dump to another {option('out')}") from None
        cache.write_token_blocks(placed)


def mend_constants(cache: TeacherCache, teacher: nn.Module, cfg: DumpConfig) -> list[str]:
    """Write again what a head cache stores once (its output layer) where it is missing or does
    not match its digest (a creation stopped before writing it, or damage); the paths written."""
    constants = cache.meta.logits.constants
    if not constants:
        return []
    layer = layer_arrays(output_layer(teacher, cfg.head or ""))
    return write_constants(cache, {c.path: layer[key] for key, c in constants.items()}, only_bad=True)


def repair(path: Any, meta: CacheMeta, teacher: nn.Module, dataset: Any, cfg: DumpConfig, dev: torch.device,
           log: Callable[[str], None]) -> TeacherCache:
    """``--repair`` (under the lock): find what is damaged, check the dataset, then mend: remove
    planted links and special files (the links themselves), rebuild an unreadable description
    from this dump's own, restore damaged array metadata and mark the damaged blocks unwritten,
    so this run writes them again (the teacher is deterministic: the same bytes). Nothing is
    written before the checks pass."""
    if not exists(path) and not recognisable(path):
        raise KdcacheError(f"{option('repair', True)}: there is no cache of this teacher, data and settings "
                           f"at {path}; run the dump without it")
    try:
        cache, rebuilt = existing_cache(path, meta.fingerprint, overwrite=False, asked=(meta, cfg)), False
    except KdcacheError:
        if is_remote(path) or not _description_unreadable(path):
            raise
        planned, _, _ = plan_cache(place(teacher, dev), dataset, meta, cfg, dev)
        cache, rebuilt = TeacherCache.described(path, planned), True
    assert cache is not None
    problems = cache.verify()  # read only: links are refused as damage, never followed
    blocks = damaged_blocks(cache, problems)
    done = cache.blocks_record()[:, 0] != 0
    if rebuilt and done.any() and all(b in blocks for b in np.flatnonzero(done).tolist()):
        raise KdcacheError(f"{option('repair', True)}: no block of {path} agrees with this dump's description (another "
                           f"teacher, data or settings wrote it); its description cannot be rebuilt from this "
                           f"command: pass {option('overwrite', True)} to replace the cache")
    check_dataset(cache, dataset, digest_mask(cfg), blocks)
    removed = [] if is_remote(path) else remove_strays(path)
    if rebuilt:
        log(f"repairing {path}: its description is unreadable; rebuilding it from this dump's")
        cache.write_description()
    restored = cache.restore_layout()
    rewritten = mend_constants(cache, teacher, cfg)
    if blocks or restored or removed or rebuilt or rewritten:
        log(f"repairing {cache.path}: {len(restored)} array descriptions restored, "
            + (f"{', '.join(rewritten)} written again, " if rewritten else "")
            + f"{len(blocks)} of {cache.n_blocks} blocks to write again"
            + (f", {len(removed)} links or special files removed ({removed[0]})" if removed else ""))
        cache.forget_blocks(blocks)
    else:
        log(f"nothing to repair in {cache.path}: every block verifies")
    return cache


def _description_unreadable(path: Any) -> bool:
    """Whether the cache at ``path`` has no description that parses (damaged, not another cache's)."""
    try:
        TeacherCache.open(path, mode="r+")
    except KdcacheError:
        return True
    return False


def check_dataset(cache: TeacherCache, dataset: Any, mask_key: str | None, blocks: list[int]) -> None:
    """Refuse, before anything is written, a dataset whose rows in the blocks about to be written
    again differ from the row digests the cache holds for them (where those are intact): a
    repaired block would then hold another input's targets."""
    for block in blocks:
        try:
            recorded = cache.load_block(ROW_DIGEST, block)
        except KdcacheError:  # damaged too: written again from this dataset
            continue
        start, stop = cache.block_range(block)
        inputs, _ = fetch_batch(dataset, range(start, stop))
        differ = np.flatnonzero(row_digests(inputs, input_mask(inputs, mask_key)) != recorded[:stop - start])
        if differ.size:
            raise KdcacheError(f"{option('repair', True)}: dataset row {start + int(differ[0])} is not the input cache "
                               f"{cache.path} was dumped from ({differ.size} rows of block {block} differ); nothing "
                               "was written: repair with the dataset it was dumped from")
