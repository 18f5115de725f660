"""Stage two's settings, and the hint terms they name."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from ..errors import KdcacheError, option
from .checks import AMP_CHOICES, DEFAULT_MASK_KEY, DEVICE, MAX_BATCH, MAX_WORKERS, Settings, setting

__all__ = ["TrainConfig", "Hint", "HINT_KINDS"]

HINT_KINDS = ("mse", "cosine", "attention")


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
class TrainConfig(Settings):
    """Stage-two settings (``kdcache train-student``'s flags and ``--config`` TOML keys, declared here)."""

    what: ClassVar[str] = "training setting"
    epochs: int = setting(10, "Epochs.", metavar="N")
    batch_size: int = setting(64, "Batch size.", metavar="N")
    lr: float = setting(1e-3, "Learning rate.", shown="1e-3", metavar="LR")
    optimizer: str = setting("adamw", "sgd or adamw.", metavar="NAME")
    weight_decay: float = setting(0.0, "Weight decay.", shown=0, metavar="WD")
    momentum: float = setting(0.9)  # sgd's; a --config key
    temperature: float | None = setting(None, "Softmax temperature T of the KD term.", shown="4.0",
                                        metavar="T")  # 4.0; a sampled cache's own sampling temperature
    alpha: float = setting(0.9, "Weight of the KD term; CE gets 1 - alpha.", metavar="A")
    objective: str = setting("kl", "KD objective: kl, reverse_kl, jsd:BETA (generalised JSD), or mse / cosine for a regression target such as an embedding.", metavar="NAME")
    hints: tuple[Hint, ...] = setting((), "Hint term (repeatable): student module S, teacher module T, LOSS mse, "
                                          "cosine or attention [mse], WEIGHT [1.0].", flag="hint",
                                      metavar="S=T[:LOSS][@WEIGHT]")
    seed: int = setting(0, "Seed of initialisation and shuffling.", metavar="S")
    device: str = setting("auto", "auto, cpu or cuda[:N].", metavar="DEVICE")
    amp: str = setting("auto", "Autocast: auto, bf16, fp16 or none.", metavar="MODE")
    num_workers: int = setting(0, "DataLoader workers.", metavar="N")
    in_memory: str = setting("auto", "Hold the cache in memory: auto, yes or no.", metavar="WHEN")
    cache_device: str = setting("auto", "Where a cache held in memory lives: auto (the GPU when it fits a quarter of "
                                        "its free memory), cpu or cuda[:N].", metavar="DEVICE")
    precompute: bool = setting(True)  # hold the teacher side of the dense KD term (softmax at T), not the logits
    allow_input_mismatch: bool = setting(False, "Accept inputs that differ from what the teacher saw (deliberate).",
                                         switch="--allow-input-mismatch")
    view: str = setting("cycle", "Cache of K augmentation views: epoch e reads view (e % K) 'cycle' or a seeded "
                                 "'random' one.", metavar="HOW")
    mask_key: str = setting(DEFAULT_MASK_KEY, "Online teacher: inputs key of the (B, L) attention mask.",
                            metavar="KEY")  # a cache records its own
    output_key: str | None = setting(None, "Which student output to compare with the teacher's: a tuple index, dict "
                                           "key or attribute (e.g. last_hidden_state).", shown="its logits",
                                     metavar="KEY")
    resume: bool = setting(False, "Continue the run in --out from its last finished epoch (same settings; --epochs "
                                  "may grow).", switch="--resume")
    overwrite: bool = setting(False, "Replace the run in --out (only a kdcache run's own files are removed).",
                              switch="--overwrite")

    def _rules(self) -> list[tuple[bool, str]]:
        from ..losses.divergences import Divergence  # torch: imported when training is configured, not for --help

        try:
            objective_ok = self.objective in ("mse", "cosine") or bool(Divergence.parse(self.objective))
        except ValueError:
            objective_ok = False
        return [(1 <= self.epochs <= 1 << 20, "epochs must be within [1, 2^20]"),
                (1 <= self.batch_size <= MAX_BATCH, f"batch_size must be within [1, {MAX_BATCH}]"),
                (objective_ok, "objective must be kl, reverse_kl, jsd, jsd:BETA (0 < BETA < 1), mse or cosine"),
                (self.lr > 0, "lr must be > 0"),
                (self.temperature is None or self.temperature > 0, "temperature must be > 0"),
                (0.0 <= self.alpha <= 1.0, "alpha must be within [0, 1]"),
                (self.weight_decay >= 0, "weight_decay must be >= 0"), (self.momentum >= 0, "momentum must be >= 0"),
                (self.seed >= 0, "seed must be >= 0"),
                (self.optimizer in ("sgd", "adamw"), "optimizer must be sgd or adamw"),
                (self.amp in AMP_CHOICES, f"amp must be one of {', '.join(AMP_CHOICES)}"),
                (DEVICE.fullmatch(self.device) is not None, "device must be auto, cpu, cuda or cuda:N"),
                (self.in_memory in ("auto", "yes", "no"), "in_memory must be auto, yes or no"),
                (re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.cache_device) is not None,
                 "cache_device must be auto, cpu or cuda[:N]"),
                (0 <= self.num_workers <= MAX_WORKERS, f"num_workers must be within [0, {MAX_WORKERS}]"),
                (self.view in ("cycle", "random"), "view must be cycle or random"),
                (not (self.resume and self.overwrite), "resume and overwrite exclude each other: resume continues "
                                                       "the run in out, overwrite starts it again")]

    @classmethod
    def _parse(cls, values: dict[str, Any]) -> dict[str, Any]:
        if isinstance(values.get("hints"), (list, tuple)):
            values["hints"] = tuple(h if isinstance(h, Hint) else Hint.parse(h) if isinstance(h, str) else h
                                    for h in values["hints"])
        return values

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "hints": [str(h) for h in self.hints]}
