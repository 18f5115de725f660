"""Where a dump writes and what is already there: the target path (``out``, or the cache root
and the fingerprint), a cache hit, a cache created, resumed or repaired, under the dump's lock."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import DumpConfig
from ..errors import KdcacheError, option
from ..format.meta import CacheMeta
from ..format.packing import place_blocks, token_counts
from ..store import DumpLock, TeacherCache, fault_point, is_remote, remove_cache
from ..store.location import exists, refuse_file
from ..store.mismatch import identity_differences
from ..store.verify import damaged_blocks
from .create import create_cache

__all__ = ["default_cache_root", "target_path", "prepare"]


def default_cache_root() -> Path:
    return Path(os.environ.get("KDCACHE_HOME", "kdcache-store"))


def target_path(out: str | Path | None, cache_root: str | None, fp: str) -> Any:
    """The cache's location: ``out``, or ``cache_root/<fingerprint>``; a URL stays a string."""
    root = str(cache_root or default_cache_root())
    where = str(out) if out is not None else (f"{root.rstrip('/')}/{fp}" if is_remote(root) else str(Path(root) / fp))
    refuse_file(where, f"choose another {option('out')}")
    return where if is_remote(where) else Path(where)


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
        cache = existing_cache(path, meta.fingerprint, cfg.overwrite, asked=(meta, cfg))
        if cfg.repair:
            if cache is None:
                raise KdcacheError(f"{option('repair', True)}: there is no cache of this teacher, data and settings "
                                   f"at {path}; run the dump without it")
            repair(cache, log)
        if cache is not None and cache.complete:
            cache.check_layout()
            return None, lock
        if cache is None:
            cache = create_cache(teacher.to(dev).eval(), dataset, path, meta, cfg, dev)
            fault_point("created")
        else:
            cache.create_missing_arrays()  # a creation that was interrupted
            ensure_token_blocks(cache, dataset, cfg)
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


def repair(cache: TeacherCache, log: Callable[[str], None]) -> None:
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
