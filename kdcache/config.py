"""Settings that travel between the CLI, config files and the library, checked once.

:class:`DumpConfig` (stage one) and :class:`TrainConfig` (stage two) are frozen dataclasses. A
value of the wrong type or out of range is one :class:`KdcacheError` line naming the setting,
whether it came from a flag, a TOML file or a keyword argument: a config file is untrusted
input (``"no"`` is not a bool, ``inf`` is not a learning rate).
"""

from __future__ import annotations

import math
import os
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from .codecs import DTYPES, Codec, DenseCodec, HybridCodec, SampledCodec, TopKCodec
from .draws import DRAWS
from .errors import KdcacheError, option

__all__ = ["DumpConfig", "TrainConfig", "Hint", "AMP_CHOICES"]

AMP_CHOICES = ("auto", "bf16", "fp16", "none")
HINT_KINDS = ("mse", "cosine", "attention")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEFAULT_MASK_KEY = "attention_mask"


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
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value), float(value) if isinstance(value, (int, float)) else value
    return isinstance(value, kind), value


class _Settings:
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


@dataclass(frozen=True)
class Hint:
    """A hidden-state term: ``weight * loss(student_module output, teacher_module output)``."""

    student: str
    teacher: str
    kind: str = "mse"
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "Hint":
        """``STUDENT_MODULE=TEACHER_MODULE[:mse|cosine|attention][@WEIGHT]``."""
        body, _, weight = text.partition("@")
        pair, _, kind = body.partition(":")
        student, eq, teacher = pair.partition("=")
        if not eq or not student or not teacher:
            raise KdcacheError(f"{option('hints')} {text!r} must look like STUDENT_MODULE=TEACHER_MODULE[:mse|cosine|attention][@WEIGHT]")
        kind = kind or "mse"
        if kind not in HINT_KINDS:
            raise KdcacheError(f"{option('hints')} {text!r}: loss {kind!r} is not one of {', '.join(HINT_KINDS)}")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise KdcacheError(f"{option('hints')} {text!r}: weight {weight!r} is not a number") from None
        if not math.isfinite(w):
            raise KdcacheError(f"{option('hints')} {text!r}: weight must be finite")
        return cls(student, teacher, kind, w)

    def __str__(self) -> str:
        return f"{self.student}={self.teacher}:{self.kind}@{self.weight:g}"


@dataclass(frozen=True)
class DumpConfig(_Settings):
    """Stage-one settings; the CLI's flags and ``--config`` TOML keys have the same names.

    The first group defines *what is stored* and so the cache's fingerprint
    (:meth:`fingerprint_inputs`); the second only *how the dump runs*, and a dump that differs
    in it alone is still a cache hit.
    """

    what: ClassVar[str] = "dump setting"
    # what is stored
    hidden: tuple[str, ...] = ()
    output_key: str | None = None
    logits_dtype: str = "float16"
    hidden_dtype: str = "float16"
    topk: int | None = None
    sample_k: int | None = None
    sample_temperature: float = 1.0
    tail_samples: int | None = None  # with topk: N draws from the other classes (HybridCodec)
    sample_draws: str = "iid"  # how sample_k / tail_samples draw: iid or systematic (kdcache.draws)
    vocab_size: int | None = None
    mask_key: str = DEFAULT_MASK_KEY
    views: int | None = None
    seed: int | None = None
    amp: str = "auto"
    # how the dump runs
    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    block_rows: int | None = None
    allow_nonfinite: bool = False
    writer_threads: int = 8
    layout: str = "auto"
    cache_root: str | None = field(default=None, metadata={"path": True})
    overwrite: bool = False
    repair: bool = False
    progress: bool = True

    def _rules(self) -> list[tuple[bool, str]]:
        return [
            ("logits" not in self.hidden and len(set(self.hidden)) == len(self.hidden),
             "hidden names must be distinct module names"),
            (self.logits_dtype in DTYPES, f"logits_dtype: dtype {self.logits_dtype!r} is not one of {', '.join(DTYPES)}"),
            (self.hidden_dtype in DTYPES, f"hidden_dtype: dtype {self.hidden_dtype!r} is not one of {', '.join(DTYPES)}"),
            (self.topk is None or self.sample_k is None, "topk and sample_k are two ways to store the logits: choose one"),
            (self.topk is None or self.topk >= 1, "topk must be >= 1"),
            (self.sample_k is None or 1 <= self.sample_k <= 65535, "sample_k must be within [1, 65535]"),
            (self.sample_temperature > 0, "sample_temperature must be > 0"),
            (self.tail_samples is None or self.topk is not None,
             "tail_samples draws the classes outside a top-k head: give topk too"),
            (self.tail_samples is None or 1 <= self.tail_samples <= 65535, "tail_samples must be within [1, 65535]"),
            (self.sample_draws in DRAWS, f"sample_draws must be one of {', '.join(DRAWS)}"),
            (self.sample_draws == "iid" or self.sample_k is not None or self.tail_samples is not None,
             "sample_draws chooses how sample_k or tail_samples draw: give one of them"),
            (self.vocab_size is None or self.vocab_size >= 1, "vocab_size must be >= 1"),
            (self.views is None or self.views >= 1, "views must be >= 1"),
            (self.amp in AMP_CHOICES, f"amp must be one of {', '.join(AMP_CHOICES)}"),
            (_DEVICE.fullmatch(self.device) is not None, "device must be auto, cpu, cuda or cuda:N"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.block_rows is None or self.block_rows >= 1, "block_rows must be >= 1"),
            (self.writer_threads >= 1, "writer_threads must be >= 1"),
            (self.layout in ("auto", "packed", "padded"), "layout must be auto, packed or padded"),
            (not (self.repair and self.overwrite), "repair and overwrite exclude each other: repair keeps the "
                                                   "cache's good blocks, overwrite replaces it"),
        ]

    def fingerprint_inputs(self, amp: str, explicit_params: bool) -> dict[str, Any]:
        """The output choices hashed into the fingerprint, with ``amp`` resolved for the device
        and ``explicit_params`` telling whether the dataset records its augmentation.

        Kept exactly as earlier releases computed them, so their caches stay cache hits;
        settings added since enter only when they differ from their default.
        """
        choices: dict[str, Any] = {"output_key": self.output_key, "hidden": list(self.hidden),
                                   "logits_dtype": self.logits_dtype, "hidden_dtype": self.hidden_dtype, "amp": amp}
        if self.views is not None:
            choices.update(views=self.views, seed=self.seed or 0, explicit_params=explicit_params)
        if self.topk is not None or self.sample_k is not None or self.vocab_size is not None:
            choices.update(topk=self.topk, sample_k=self.sample_k, sample_temperature=self.sample_temperature,
                           vocab_size=self.vocab_size, seed=self.seed)
        if self.mask_key != DEFAULT_MASK_KEY:
            choices["mask_key"] = self.mask_key
        if self.tail_samples is not None:
            choices["tail_samples"] = self.tail_samples
        if self.sample_draws != "iid":
            choices["sample_draws"] = self.sample_draws
        return choices

    def codec(self, name: str, classes: int) -> Codec:
        """The codec of output ``name`` (``logits`` or a hidden module) with ``classes`` columns."""
        if name != "logits":
            return DenseCodec(self.hidden_dtype)
        vocab = self.vocab_size or classes
        if vocab > classes:
            raise KdcacheError(f"{option('vocab_size', vocab)} is larger than the teacher's {classes} output classes")
        if self.topk is not None and self.tail_samples is not None:
            return HybridCodec(self.topk, self.tail_samples, vocab, self.sample_temperature, self.seed or 0,
                               self.sample_draws)
        if self.topk is not None:
            return TopKCodec(self.topk, vocab)
        if self.sample_k is not None:
            return SampledCodec(self.sample_k, vocab, self.sample_temperature, self.seed or 0, self.sample_draws)
        return DenseCodec(self.logits_dtype)

    @property
    def sparse(self) -> bool:
        return self.topk is not None or self.sample_k is not None


@dataclass(frozen=True)
class TrainConfig(_Settings):
    """Stage-two settings; the CLI's flags and ``--config`` TOML keys have the same names."""

    what: ClassVar[str] = "training setting"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9
    temperature: float | None = None  # 4.0; a sampled cache's own sampling temperature
    alpha: float = 0.9
    hints: tuple[Hint, ...] = ()
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    num_workers: int = 0
    in_memory: str = "auto"
    cache_device: str = "auto"  # where targets held in memory live: auto (the GPU when they fit), cpu, cuda[:N]
    precompute: bool = True  # hold the teacher side of the dense KD term (softmax at T) instead of the logits
    allow_input_mismatch: bool = False
    view: str = "cycle"
    mask_key: str = DEFAULT_MASK_KEY  # an online teacher's attention mask (a cache records its own)

    def _rules(self) -> list[tuple[bool, str]]:
        return [(self.epochs >= 1, "epochs must be >= 1"), (self.batch_size >= 1, "batch_size must be >= 1"),
                (self.lr > 0, "lr must be > 0"),
                (self.temperature is None or self.temperature > 0, "temperature must be > 0"),
                (0.0 <= self.alpha <= 1.0, "alpha must be within [0, 1]"),
                (self.weight_decay >= 0, "weight_decay must be >= 0"), (self.momentum >= 0, "momentum must be >= 0"),
                (self.seed >= 0, "seed must be >= 0"),
                (self.optimizer in ("sgd", "adamw"), "optimizer must be sgd or adamw"),
                (self.amp in AMP_CHOICES, f"amp must be one of {', '.join(AMP_CHOICES)}"),
                (_DEVICE.fullmatch(self.device) is not None, "device must be auto, cpu, cuda or cuda:N"),
                (self.in_memory in ("auto", "yes", "no"), "in_memory must be auto, yes or no"),
                (re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.cache_device) is not None,
                 "cache_device must be auto, cpu or cuda[:N]"),
                (self.num_workers >= 0, "num_workers must be >= 0"),
                (self.view in ("cycle", "random"), "view must be cycle or random")]

    @classmethod
    def _parse(cls, values: dict[str, Any]) -> dict[str, Any]:
        if isinstance(values.get("hints"), (list, tuple)):
            values["hints"] = tuple(h if isinstance(h, Hint) else Hint.parse(h) if isinstance(h, str) else h
                                    for h in values["hints"])
        return values

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "hints": [str(h) for h in self.hints]}
