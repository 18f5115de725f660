"""The one exception type for user mistakes, and how its messages name settings."""

from __future__ import annotations

from typing import Any

__all__ = ["KdcacheError", "KdcacheWarning", "option", "speak_cli", "speaking_cli"]

# Settings whose flag is not their name with "-" for "_".
_FLAGS = {"hints": "--hint"}
_SPEAKING = {"cli": False}


class KdcacheError(Exception):
    """A mistake the user can fix: bad spec, mismatched cache, unwritable path...

    The CLI prints ``str(err)`` as one line and exits with status 2. Anything else raised
    inside kdcache is a bug and keeps its traceback.
    """


class KdcacheWarning(UserWarning):
    """Something kdcache noticed that is probably a mistake but not certainly one (an untrained
    teacher, a student fitting the cache): a warning to Python callers, one ``kdcache: warning:``
    line on the command line."""


def speaking_cli() -> bool:
    """Whether messages are for the command line (flags) rather than Python callers (arguments)."""
    return _SPEAKING["cli"]


def speak_cli() -> None:
    """Make :func:`option` name command-line flags from now on (the ``kdcache`` command calls
    this once; Python callers are told argument names)."""
    _SPEAKING["cli"] = True


def option(name: str, value: Any = ...) -> str:
    """A setting as the caller typed it, for error messages: ``overwrite=True`` /
    ``logits_dtype='float32'`` to a Python caller, ``--overwrite`` / ``--logits-dtype float32``
    on the command line. Without ``value``, just the setting's name (``out`` / ``--out``)."""
    if _SPEAKING["cli"]:
        flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
        return flag if value is ... or value is True else f"{flag} {value}"
    return name if value is ... else f"{name}={value!r}"
