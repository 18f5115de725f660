"""The crash-test hook: ``KDCACHE_KILL_AT="event:n"`` SIGKILLs the process at the n-th ``event``."""

from __future__ import annotations

import os
import signal

__all__ = ["fault_point"]

_FAULT = os.environ.get("KDCACHE_KILL_AT", "")
_counts: dict[str, int] = {}


def fault_point(event: str) -> None:
    """With ``KDCACHE_KILL_AT="event:n"`` the process SIGKILLs itself at the n-th ``event``
    (``created``, ``batch``, ``array-written``, ``block``, ``finalize``). Unset, it does nothing."""
    if not _FAULT or not _FAULT.startswith(event + ":"):
        return
    _counts[event] = _counts.get(event, 0) + 1
    if _counts[event] == int(_FAULT.rsplit(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)
