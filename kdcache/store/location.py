"""Where a cache lives: a local directory or an fsspec URL (``s3://bucket/prefix``)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import zarr
from zarr.core.sync import sync

from ..errors import KdcacheError

__all__ = ["is_remote", "open_store", "remote_fs", "exists", "refuse_file", "list_dir", "remove_cache",
           "is_disk_full"]


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
    return zarr.storage.LocalStore(str(path), read_only=read_only)


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
    return (Path(path) / "zarr.json").exists()


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


def remove_cache(path: str | Path) -> None:
    """Delete a cache directory (``--overwrite``)."""
    if is_remote(path):
        fs, root = remote_fs(str(path))
        if fs.exists(root):
            fs.rm(root, recursive=True)
        return
    refuse_file(path, "choose another --out")
    if Path(path).is_dir():
        shutil.rmtree(path)


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
