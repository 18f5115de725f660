"""Where a cache lives: a local directory or an fsspec URL (``s3://bucket/prefix``)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import zarr
from zarr.core.sync import sync

from ..errors import KdcacheError, option
from .paths import MAX_METADATA_BYTES, read_metadata, walk_files

__all__ = ["is_remote", "open_store", "remote_fs", "exists", "refuse_file", "size_on_disk", "list_dir", "remove_cache",
           "why_not_removable", "is_disk_full", "CACHE_ENTRIES", "recognisable", "staged", "no_cache"]


def is_remote(path: str | Path) -> bool:
    """True for an fsspec URL (``s3://bucket/prefix``, ``gs://...``), False for a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def open_store(path: str | Path, read_only: bool) -> Any:
    """A LocalStore, or zarr's fsspec store for a URL (credentials and endpoint from the usual
    environment variables, e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)."""
    if is_remote(path):
        try:
            return zarr.storage.FsspecStore.from_url(str(path), read_only=read_only)
        except ImportError as err:
            raise KdcacheError(f"{path}: object storage needs fsspec and its backend ({err.name}); "
                               "pip install 'kdcache[s3]'") from None
    # an absolute root: zarr 3.1's LocalStore lists keys wrongly under a relative root whose name
    # is also a key prefix (a cache opened as "hidden" lost "hidden/" from its keys)
    return zarr.storage.LocalStore(os.path.abspath(path), read_only=read_only)


def remote_fs(path: str | Path) -> tuple[Any, str]:
    """A synchronous fsspec filesystem for the URL, and the path within it."""
    import fsspec
    return fsspec.core.url_to_fs(str(path))


def exists(path: str | Path) -> bool:
    """Whether a cache (a zarr group) is at ``path``."""
    if is_remote(path):
        try:
            return bool(sync(open_store(path, True).exists("zarr.json")))
        except OSError as err:
            raise KdcacheError(f"cannot reach {path}: {err}; check the URL, credentials and endpoint") from None
    return os.path.lexists(Path(path) / "zarr.json")  # a link or FIFO there is a damaged cache, not none


def size_on_disk(path: str | Path, key: str) -> int:
    """Bytes under ``key`` (an array) of the cache at ``path``, on disk or in the bucket."""
    if is_remote(path):
        fs, root = remote_fs(path)
        return int(fs.du(f"{root}/{key}"))
    return sum(size for _, size in walk_files(path, key)[0])  # links are not followed


def refuse_file(path: str | Path, advice: str = "give the cache's directory") -> None:
    """One line when ``path`` is an existing file, where a cache directory belongs."""
    if not is_remote(path) and Path(path).exists() and not Path(path).is_dir():
        raise KdcacheError(f"{path} is a file, not a cache directory; {advice}")


def list_dir(root: str | Path) -> list[str] | None:
    """The entries of a local directory or an object-store prefix (full paths/URLs, sorted);
    None when it does not exist."""
    if is_remote(root):
        fs, path = remote_fs(str(root))
        try:
            names = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise KdcacheError(f"cannot reach {root}: {err}; check the URL, credentials and endpoint") from None
        protocol = str(root).split("://", 1)[0]
        return sorted(f"{protocol}://{name.rstrip('/')}" for name in names if name.rstrip("/") != path.rstrip("/"))
    if not Path(root).is_dir():
        return None
    return sorted(str(entry) for entry in Path(root).iterdir())


# what a kdcache cache directory holds; anything else in it is not kdcache's to delete
CACHE_ENTRIES = frozenset({"zarr.json", "logits", "topk", "sampled", "hybrid", "hidden", "_row_digest", "_view_params",
                           "_blocks"})


def _document(path: str | Path, key: str = "zarr.json") -> Any:
    """The JSON document ``key`` of the store at ``path`` (bounded, never through a link), or None."""
    try:
        if is_remote(path):
            fs, root = remote_fs(path)
            if fs.size(f"{root}/{key}") > MAX_METADATA_BYTES:
                return None
            text = fs.cat(f"{root}/{key}")
        else:
            text = read_metadata(path, key)
        return json.loads(text)
    except (OSError, ValueError):
        return None


def _description(path: str | Path) -> Any:
    """The group attribute ``kdcache`` of the store at ``path`` (raw JSON), or None."""
    doc = _document(path)
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    return attrs.get("kdcache") if isinstance(attrs, dict) else None


def recognisable(path: str | Path) -> bool:
    """Whether ``path`` holds a kdcache cache's completion record and row digests (the arrays
    every cache has), whatever its root description says: a cache whose description is damaged."""
    expected = {"_blocks": "int64", "_row_digest": "uint64"}
    docs = {key: _document(path, f"{key}/zarr.json") for key in expected}
    return all(isinstance(d, dict) and d.get("node_type") == "array" and d.get("data_type") == dtype
               for d, dtype in zip(docs.values(), expected.values()))


def _entries(path: str | Path) -> list[str]:
    if is_remote(path):
        fs, root = remote_fs(path)
        return [name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(root, detail=False, refresh=True)]
    return [entry.name for entry in Path(path).iterdir()]


def why_not_removable(path: str | Path) -> str | None:
    """None when ``path`` is a kdcache cache (or an empty directory) that ``--overwrite`` may
    remove; else why not. kdcache deletes only what it created."""
    if not is_remote(path):
        p = Path(path)
        if p.is_symlink():
            return "it is a symbolic link"
        if not p.is_dir():
            return "it is not a directory" if p.exists() else None
        here, target = Path.cwd().resolve(), p.resolve()
        if target == here or target in here.parents or target == Path.home().resolve():
            return "it is the working directory, one of its parents or the home directory"
    entries = _entries(path)
    if not entries:
        return None
    if not isinstance(_description(path), dict) and not recognisable(path):
        return "it is not a kdcache cache (no kdcache description in its zarr.json, no kdcache arrays)"
    foreign = sorted(e for e in entries if e not in CACHE_ENTRIES)
    if foreign:
        return f"it holds {foreign[0]!r}, which kdcache did not write"
    return None


def remove_cache(path: str | Path) -> None:
    """Delete a kdcache cache (``--overwrite``): only a directory or prefix that holds a kdcache
    cache and nothing else, or an empty directory."""
    refuse_file(path, f"choose another {option('out')}")
    reason = why_not_removable(path)
    if reason is not None:
        raise KdcacheError(f"{option('overwrite')} will not remove {path}: {reason}; choose another {option('out')}")
    if is_remote(path):
        fs, root = remote_fs(str(path))
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    p = Path(path)
    for entry in p.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    p.rmdir()


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def staged(out: Path, what: str, *, directory: bool = False) -> Iterator[Path]:
    """A temporary name beside ``out`` (a file, or with ``directory`` a new directory) to write
    ``what`` to: renamed to ``out`` when the block completes, removed when it fails, so a
    failure half-way leaves nothing at ``out``. ``out`` must not exist yet (one line otherwise)."""
    if os.path.lexists(out):
        raise KdcacheError(f"{out} exists; choose another --out for the {what}")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.partial")
    try:
        tmp.mkdir() if directory else tmp.touch(exist_ok=False)
    except OSError as err:
        raise KdcacheError(f"cannot write the {what} at {out}: {err.strerror}; check that its directory exists and "
                           "is writable") from None
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink(missing_ok=True)
        raise


def no_cache(path: str | Path) -> KdcacheError:
    """The error for a path that holds no cache; a cache root names the caches it holds."""
    inside = [entry for entry in (list_dir(path) or [])[:10_000] if exists(entry)]
    if inside:
        shown = ", ".join(inside[:4]) + (f" and {len(inside) - 4} more" if len(inside) > 4 else "")
        return KdcacheError(f"{path} is a cache root, not a cache: it holds {shown}; give one of them "
                            f"(kdcache ls {path} describes each)")
    return KdcacheError(f"no cache at {path}; run kdcache dump-teacher first (or check the path)")
