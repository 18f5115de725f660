"""Paths inside a local cache, checked before anything is read, written or deleted there.

A cache directory may come from elsewhere, and a planted symbolic link or special file in it
would make kdcache write, truncate or delete a user's file, hang on a FIFO or read /dev/zero
without end. So: every path below a cache's root is walked component by component without
following links (a link or a non-directory on the way is damage); files are opened with
``O_NOFOLLOW | O_NONBLOCK`` and must be regular; metadata files (``zarr.json``) are read only
when they are regular and at most :data:`MAX_METADATA_BYTES`. The root itself is the path the
user named and is taken as given.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import KdcacheError

__all__ = ["MAX_METADATA_BYTES", "damaged", "unreadable_description", "path_problem", "inside", "open_regular",
           "read_metadata",
           "metadata_problem", "strays", "remove_strays", "walk_files",
           "remove_partial"]

# a cache's zarr.json holds its description: kilobytes; far above any real one, far below what hurts
MAX_METADATA_BYTES = 16 << 20


def damaged(path: str | Path, what: str) -> KdcacheError:
    """One line: the cache at ``path`` is damaged (``what``), and how to mend it."""
    return KdcacheError(f"cache {path} is damaged: {what}; run kdcache verify {path}, then repair it with the "
                        "dump-teacher command that wrote it plus --repair")


def unreadable_description(path: str | Path, why: str) -> KdcacheError:
    """One line: the root description of the cache at ``path`` cannot be read, and the ways out."""
    return KdcacheError(f"cache {path}: its description (zarr.json) cannot be read ({why}); rebuild it with the "
                        "dump-teacher command that wrote the cache plus --repair, or replace the cache with "
                        "--overwrite")


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def path_problem(root: str | Path, key: str, *, final: str = "file") -> str | None:
    """Why ``root/key`` is not a path kdcache may use: a component below ``root`` that is a link
    or not a directory, or the last one, when it exists, not a ``final`` ("file": regular file,
    or "dir"); None otherwise. A missing component is no problem: it is created, or missing."""
    parts = [p for p in key.split("/") if p]
    here = Path(root)
    for n, part in enumerate(parts):
        here = here / part
        try:
            mode = os.lstat(here).st_mode
        except FileNotFoundError:
            return None
        wanted = stat.S_ISREG if n == len(parts) - 1 and final == "file" else stat.S_ISDIR
        if not wanted(mode):
            what = "a file" if stat.S_ISREG(mode) else "a directory" if stat.S_ISDIR(mode) else \
                f"{_kind(mode)} (kdcache writes none)"
            return f"{'/'.join(parts[:n + 1])} is {what}"
    return None


def inside(root: str | Path, key: str, *, make_dirs: bool = False) -> Path:
    """``root/key``, a file path whose directories below ``root`` are real directories (created
    with ``make_dirs``); a link or non-directory on the way raises :func:`damaged`."""
    problem = path_problem(root, key, final="file")
    if problem:
        raise damaged(root, problem)
    path = Path(root, key)
    if make_dirs:
        here = Path(root)
        for part in [p for p in key.split("/") if p][:-1]:
            here = here / part
            try:
                os.mkdir(here)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(here).st_mode):  # planted since the check
                    raise damaged(root, f"{here.relative_to(root)} is not a directory") from None
    return path


def open_regular(file: str | Path, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """A descriptor of ``file`` opened without following a link and without blocking on a FIFO;
    raises OSError(ELOOP) for a link and OSError(EINVAL) for anything but a regular file."""
    fd = os.open(file, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{_kind(os.fstat(fd).st_mode)}, not a regular file", str(file))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def metadata_problem(root: str | Path, key: str) -> str | None:
    """Why the metadata file ``root/key`` may not be read (a link or special file on the way or
    at the end, or larger than :data:`MAX_METADATA_BYTES`), or None (also when it is missing)."""
    problem = path_problem(root, key, final="file")
    if problem:
        return problem
    try:
        size = os.lstat(Path(root, key)).st_size
    except FileNotFoundError:
        return None
    if size > MAX_METADATA_BYTES:
        return f"{key} has {size} bytes, more than a kdcache description ever holds"
    return None


def read_metadata(root: str | Path, key: str) -> bytes:
    """The bytes of metadata file ``root/key`` (checked by :func:`metadata_problem`); OSError
    when it cannot be read, ValueError when it may not be."""
    problem = metadata_problem(root, key)
    if problem:
        raise ValueError(problem)
    fd = open_regular(Path(root, key))
    try:
        data = os.read(fd, MAX_METADATA_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_METADATA_BYTES:
        raise ValueError(f"{key} grew past {MAX_METADATA_BYTES} bytes")
    return data


def walk_files(root: str | Path, key: str = "") -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """``(files, strays)`` below ``root/key`` without following links: regular files as
    (relative path, size), and every link or special file as (relative path, what it is). Work
    is bounded by what is on disk."""
    files: list[tuple[str, int]] = []
    found: list[tuple[str, str]] = []
    start = Path(root, key) if key else Path(root)
    if key:
        problem = path_problem(root, key, final="dir")
        if problem:
            return [], [(key, problem)]
    stack = [start]
    while stack:
        here = stack.pop()
        try:
            entries = list(os.scandir(here))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            rel = str(Path(entry.path).relative_to(root))
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                stack.append(Path(entry.path))
            elif stat.S_ISREG(mode):
                files.append((rel, entry.stat(follow_symlinks=False).st_size))
            else:
                found.append((rel, _kind(mode)))
    return files, found


def remove_partial(root: str | Path, keys: list[str]) -> int:
    """Delete the ``*.partial`` temp files below ``root/key`` for each key (regular files inside
    the cache, never reached through a link); how many."""
    leftovers = [rel for key in keys for rel, _ in walk_files(root, key)[0] if rel.endswith(".partial")]
    for rel in leftovers:
        Path(root, rel).unlink(missing_ok=True)
    return len(leftovers)


def strays(root: str | Path) -> list[tuple[str, str]]:
    """Every link or special file inside the local cache at ``root``: (relative path, what)."""
    return walk_files(root)[1]


def remove_strays(root: str | Path) -> list[str]:
    """Delete the links and special files inside the local cache at ``root`` (the links
    themselves: what they point to is never touched); the relative paths removed."""
    removed = []
    for rel, _ in strays(root):
        os.unlink(Path(root, rel))
        removed.append(rel)
    return removed
