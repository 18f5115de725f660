"""Typed reading of an untrusted JSON object: every failure is one :class:`KdcacheError` line
naming the field (the parser under :meth:`kdcache.format.CacheMeta.from_attrs`)."""

from __future__ import annotations

import math
from typing import Any

from ..errors import KdcacheError

__all__ = ["JsonReader", "malformed", "MAX_ROWS", "MAX_DIM"]

MAX_ROWS = 1 << 40
MAX_DIM = 1 << 31


def malformed(where: str, what: str) -> KdcacheError:
    return KdcacheError(f"{where}: its kdcache metadata is malformed ({what}); the cache is damaged or was not "
                        "written by kdcache: rebuild its description with the dump-teacher command that wrote it plus "
                        "--repair, or replace it with --overwrite")


class JsonReader:
    """Typed access to one JSON object of the attrs, every failure one line naming the field."""

    def __init__(self, value: Any, where: str, prefix: str = "") -> None:
        if not isinstance(value, dict):
            raise malformed(where, f"{prefix.rstrip('.') or 'the attrs'} is a {type(value).__name__}, not an object")
        self.value, self.where, self.prefix = value, where, prefix

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.value:
            if optional:
                return None
            raise malformed(self.where, f"field {self.prefix}{key} is missing")
        return self.value[key]

    def _bad(self, key: str, expected: str) -> KdcacheError:
        return malformed(self.where, f"field {self.prefix}{key} must be {expected}, got {self.value.get(key)!r:.60}")

    def count(self, key: str, *, low: int = 0, high: int = MAX_ROWS, optional: bool = False) -> int | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._bad(key, f"an integer in [{low}, {high}]")
        return value

    def number(self, key: str, *, optional: bool = False) -> float | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._bad(key, "a finite number")
        return float(value)

    def text(self, key: str, *, optional: bool = False) -> str | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def flag(self, key: str) -> bool:
        value = self._get(key, False)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def shape(self, key: str) -> tuple[int, ...]:
        value = self._get(key, False)
        if not isinstance(value, list) or len(value) > 8 or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in value):
            raise self._bad(key, f"a list of at most 8 sizes in [0, {MAX_DIM}]")
        return tuple(value)

    def obj(self, key: str, *, optional: bool = False) -> "JsonReader | None":
        value = self._get(key, optional)
        if value is None and optional:
            return None
        return JsonReader(value, self.where, f"{self.prefix}{key}.")

    def mapping(self, key: str, *, optional: bool = False) -> dict[str, Any]:
        value = self._get(key, optional)
        if value is None and optional:
            return {}
        if not isinstance(value, dict):
            raise self._bad(key, "an object")
        return value
