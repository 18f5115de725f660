"""Settings declared once and checked once.

A setting is a field of a frozen dataclass (:class:`~kdcache.config.DumpConfig`,
:class:`~kdcache.config.TrainConfig`) declared with :func:`setting`. The field's name is its
keyword argument and its ``--config`` TOML key; its default is the default everywhere; a setting
with ``help`` is also a command-line flag, ``--name`` (``flag`` names it otherwise), whose help
line shows the default in brackets: the CLI builds its options from these declarations
(:mod:`kdcache.cli.options`). A value of the wrong type or out of range is one
:class:`KdcacheError` line naming the setting, whether it came from a flag, a TOML file or a
keyword argument: a config file is untrusted input (``"no"`` is not a bool, ``inf`` is not a
learning rate).

Nothing here imports torch: ``kdcache --help`` reads these declarations.
"""

from __future__ import annotations

import math
import os
import re
import typing
from dataclasses import field, fields
from typing import Any, ClassVar

from ..errors import KdcacheError

__all__ = ["setting", "Settings", "AMP_CHOICES", "DEVICE", "DEFAULT_MASK_KEY", "MAX_BATCH", "MAX_WORKERS"]

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEFAULT_MASK_KEY = "attention_mask"
_AUTO = object()
# integers are held in 64 bits (numpy, torch, the cache's JSON); counts far above any real run are refused
_INT64 = 1 << 63
MAX_BATCH = 1 << 24  # rows in a batch or a write block
MAX_WORKERS = 1024  # processes or threads


def setting(default: Any, help: str | None = None, *, shown: Any = _AUTO, metavar: str | None = None,
            flag: str | None = None, switch: str | None = None, path: bool = False) -> Any:
    """A settings field declared once: ``default``; ``help`` (one sentence ending in ".") makes
    it a command-line option, whose help line shows ``[shown]`` before the final "." (by default
    the default itself, unless it is None, a bool or empty); ``metavar`` names the value in
    ``--help``; ``flag`` is the option's name when it is not the field's (``hint`` for ``hints``);
    ``switch`` the flag declaration of a bool (``--overwrite``, ``--progress/--no-progress``);
    ``path``: a path-like value is read as its string."""
    if shown is _AUTO:
        shown = None if default is None or isinstance(default, (bool, tuple)) else default
    return field(default=default, metadata={"help": help, "shown": shown, "metavar": metavar, "flag": flag,
                                            "switch": switch, "path": path})


def _describe(kind: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is tuple:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if args:
        return " or ".join(_describe(a) for a in args) + " (or left out)"
    return names.get(kind, getattr(kind, "__name__", str(kind)))


def _conform(value: Any, kind: Any) -> tuple[bool, Any]:
    """``(ok, value converted)`` for a value against a field's annotation (bool, int, float,
    str, ``X | None``, ``tuple[X, ...]``); an int is accepted as a float, nothing else converts."""
    args = typing.get_args(kind)
    if type(None) in args:
        if value is None:
            return True, None
        return _conform(value, next(a for a in args if a is not type(None)))
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_conform(v, args[0]) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if kind is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool):
        return False, value
    if kind is int:
        return isinstance(value, int) and -_INT64 <= value < _INT64, value
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value), float(value) if isinstance(value, (int, float)) else value
    return isinstance(value, kind), value


class Settings:
    """Type and range checks for a frozen settings dataclass (``_rules`` per subclass)."""

    what: ClassVar[str] = "setting"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.metadata.get("path") and isinstance(value, os.PathLike):
                value = os.fspath(value)
            ok, converted = _conform(value, hints[f.name])
            if not ok:
                raise KdcacheError(f"bad {self.what} {f.name}: must be {_describe(hints[f.name])}, got {value!r:.60}")
            object.__setattr__(self, f.name, converted)
        for ok, message in self._rules():
            if not ok:
                raise KdcacheError(f"bad {self.what}: {message}")

    def _rules(self) -> list[tuple[bool, str]]:
        return []

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> Any:
        """Build from a mapping of field names (a TOML file's keys, ``-`` read as ``_``)."""
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        if unknown:
            raise KdcacheError(f"unknown {cls.what} {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**cls._parse(values))

    @classmethod
    def _parse(cls, values: dict[str, Any]) -> dict[str, Any]:
        return values

    def updated(self, **changes: Any) -> Any:
        """A copy with ``changes`` (field names), checked like a new one."""
        return type(self).from_mapping({**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})  # type: ignore[arg-type]


