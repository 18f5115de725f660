"""One writer per cache: an exclusive ``flock`` on ``<cache>.lock`` holding the writer's pid and host.

The lock file sits beside a cache that may come from elsewhere: it is opened without following
a link and must be a regular file of its own (one link), so a planted ``<cache>.lock`` that
points at a user's file is refused, never written or truncated."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import KdcacheError
from .location import is_remote
from .paths import open_regular

__all__ = ["DumpLock", "dump_in_progress"]


def _lock_path(path: str | Path) -> Path:
    return Path(str(path).rstrip("/") + ".lock")


class DumpLock:
    """An exclusive ``flock`` on ``<cache>.lock`` that holds the writer's pid and host.

    The kernel drops the lock when its holder dies, so a crashed dump never leaves a stale
    lock behind: the next dump takes it over and resumes.
    """

    def __init__(self, path: str | Path) -> None:
        self.file = _lock_path(path)
        self.remote = is_remote(path)  # object storage: no lock (run one dump per remote cache)
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            fd = open_regular(self.file)
            try:
                info = json.loads(os.read(fd, 4096) or "{}")
            finally:
                os.close(fd)
        except (OSError, ValueError):
            info = {}
        if not isinstance(info, dict):
            info = {}
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')}"

    def acquire(self, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> None:
        if self.remote:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            fd = open_regular(self.file, os.O_RDWR | os.O_CREAT)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.EINVAL):
                raise KdcacheError(f"lock file {self.file} is a symbolic link or not a regular file: kdcache writes "
                                   "only a plain file there; remove it (what it points to is not kdcache's), then "
                                   "rerun") from None
            raise KdcacheError(f"cannot create lock file {self.file}: {err.strerror}; check the path is writable") from None
        if os.fstat(fd).st_nlink != 1:  # a hard link to someone's file: never truncate it
            os.close(fd)
            raise KdcacheError(f"lock file {self.file} has other names (a hard link): remove it, then rerun")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                os.close(fd)
                raise KdcacheError(f"another dump ({self.holder()}) is writing {self.file.with_suffix('')}; "
                                   "wait for it to finish") from None
            if on_wait is not None:
                on_wait(self.holder())
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.time()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DumpLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def dump_in_progress(path: str | Path) -> str | None:
    """``"pid N on HOST"`` when a live dump holds the cache's lock, else None (object storage
    has no lock)."""
    if is_remote(path):
        return None
    try:
        fd = open_regular(_lock_path(path))
    except OSError:  # none, or not a lock kdcache wrote: no dump holds it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return DumpLock(path).holder()
    finally:
        os.close(fd)
