"""A run's ``--out`` directory: what may be written there, and the state a run resumes from.

A train-student run owns a few files in its directory (:data:`RUN_FILES`). A new run goes only
into a directory that does not exist or is empty; a previous run there is continued
(``resume``), replaced (``overwrite``: its own files removed, nothing else), or the new run is
refused; a directory holding anything else is always refused. Every check happens before
anything is written, so a refused run changes nothing.

After each finished epoch the run writes ``resume.pt`` whole (temp file, then rename), last:
the student's and hint projections' weights, the optimiser's state, every random generator's
state and the epoch. ``metrics.jsonl`` may hold one epoch more than ``resume.pt`` (a run
killed between the two writes); a resumed run keeps the lines of the epochs it resumes from.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..errors import KdcacheError, option
from .checkpoint import replace_file

__all__ = ["RUN_FILES", "RunDir", "RunState", "rng_state", "restore_rng"]

RUN_FILES = ("config.json", "metrics.jsonl", "student.pt", "hints.pt", "resume.pt")
STATE_FILE = "resume.pt"
STATE_FORMAT = 1
# settings that change how a run runs, not what it computes: a resumed run may change them
_HOW = ("epochs", "resume", "overwrite", "num_workers", "in_memory", "cache_device", "device")


def _owned(name: str) -> bool:
    return name in RUN_FILES or (name.endswith(".partial") and name[:-len(".partial")] in RUN_FILES)


def rng_state() -> dict[str, Any]:
    """Every generator a run draws from (Python, numpy, torch CPU and CUDA), as tensors and
    plain values (loadable with ``torch.load(weights_only=True)``)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                               has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`rng_state` took."""
    version, words, gauss = state["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class RunState:
    """What ``resume.pt`` holds: the state after ``epoch`` finished epochs."""

    epoch: int
    student: dict[str, torch.Tensor]
    hints: list[dict[str, torch.Tensor]]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    warned: bool = False
    metrics: list[dict[str, Any]] = field(default_factory=list)  # the finished epochs' records (from metrics.jsonl)

    def to_file(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "epoch": self.epoch, "student": self.student, "hints": self.hints,
                "optimizer": self.optimizer, "rng": self.rng, "warned": self.warned}


class RunDir:
    """The ``out`` directory of a run (``out=None``: nothing is written). :meth:`prepare`
    checks it and, when the run may go there, makes it ready; :attr:`resumed` is the state to
    continue from (None: start at epoch 1)."""

    def __init__(self, out: str | Path | None) -> None:
        self.path = Path(out) if out is not None else None
        self.resumed: RunState | None = None

    # ---- what is there ---------------------------------------------------------------------
    def _entries(self) -> list[str] | None:
        """The directory's entries; None when it does not exist. A link or a file where the
        directory belongs is refused."""
        assert self.path is not None
        if self.path.is_symlink():
            raise KdcacheError(f"{option('out')} {self.path} is a symbolic link; give a directory")
        if not self.path.exists():
            return None
        if not self.path.is_dir():
            raise KdcacheError(f"{option('out')} {self.path} is a file, not a directory; choose another "
                               f"{option('out')}")
        try:
            return sorted(e.name for e in self.path.iterdir())
        except OSError as err:
            raise KdcacheError(f"cannot read {option('out')} {self.path}: {err.strerror}") from None

    def _recorded(self) -> dict[str, Any] | None:
        """The previous run's ``config.json`` when it is a train-student run's, else None."""
        assert self.path is not None
        config = self.path / "config.json"
        if config.is_symlink() or not config.is_file() or config.stat().st_size > 1 << 20:
            return None
        try:
            recorded = json.loads(config.read_text())
        except (OSError, ValueError):
            return None
        return recorded if isinstance(recorded, dict) and {"epochs", "seed", "cache"} <= set(recorded) else None

    def finished_epochs(self) -> int:
        """Lines of the previous run's ``metrics.jsonl`` (its finished epochs)."""
        assert self.path is not None
        try:
            with open(self.path / "metrics.jsonl", "rb") as f:
                return sum(1 for line in f if line.strip())
        except OSError:
            return 0

    # ---- the checks --------------------------------------------------------------------------
    def check(self, cfg: TrainConfig, identity: dict[str, Any]) -> bool:
        """Refuse a directory the run may not use, or a resumed run whose settings or
        ``identity`` (what else the run records: ``cache``, ``student``) differ from the
        previous run's (one line; nothing written). True when it holds a previous run that
        ``resume`` or ``overwrite`` applies to."""
        if self.path is None:
            return False
        entries = self._entries()
        where = f"{option('out')} {self.path}"
        if not entries:
            if cfg.resume:
                raise KdcacheError(f"{option('resume')}: there is no run in {where} to resume; leave out "
                                   f"{option('resume')} to start one")
            return False
        recorded = self._recorded()
        if recorded is None:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise KdcacheError(f"{where} holds files that are not a train-student run ({shown}); choose another "
                               f"{option('out')} (kdcache never replaces files it did not write)")
        if not cfg.resume and not cfg.overwrite:
            raise KdcacheError(f"{where} holds a train-student run ({self.finished_epochs()} of "
                               f"{recorded.get('epochs')} epochs finished): pass {option('resume', True)} to continue "
                               f"it, {option('overwrite', True)} to start it again, or choose another {option('out')}")
        if cfg.resume:
            self._check_same_run(cfg, identity, recorded)
            self._check_epochs(self.finished_epochs(), cfg)
        return True

    def prepare(self, cfg: TrainConfig, identity: dict[str, Any], *, write: bool = True) -> None:
        """:meth:`check` the directory, then make it ready: remove a replaced run's files, or
        load the state a resumed run continues from (:attr:`resumed`). Under torchrun every rank
        loads the state and only rank 0 writes (``write``)."""
        previous = self.check(cfg, identity)
        if not previous:
            return
        assert self.path is not None
        if cfg.overwrite:
            if write:
                self._remove_run_files()
            return
        self.resumed = self._load_state(cfg)

    def _remove_run_files(self) -> None:
        assert self.path is not None
        for entry in self.path.iterdir():
            if _owned(entry.name) and entry.is_file() and not entry.is_symlink():
                entry.unlink()

    def _check_same_run(self, cfg: TrainConfig, identity: dict[str, Any], recorded: dict[str, Any]) -> None:
        now = {**cfg.to_json(), **identity}
        for key, value in now.items():
            if key in _HOW or key not in recorded:
                continue
            if json.loads(json.dumps(value)) != recorded[key]:
                raise KdcacheError(f"{option('resume')}: the run in {option('out')} {self.path} was started with "
                                   f"{key} {json.dumps(recorded[key])[:80]}, this one gives {json.dumps(value)[:80]}; "
                                   f"resume it with its own settings, or start again with {option('overwrite', True)}")

    def _load_state(self, cfg: TrainConfig) -> RunState | None:
        assert self.path is not None
        path = self.path / STATE_FILE
        if not path.exists():  # the run finished no epoch: it starts again at epoch 1
            return None
        if path.is_symlink() or not path.is_file():
            raise KdcacheError(f"{path} is not a file kdcache wrote; start the run again with "
                               f"{option('overwrite', True)}")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)  # data only: never code from a file
        except Exception as err:  # noqa: BLE001 - a damaged or foreign file, whatever torch raises
            raise KdcacheError(f"cannot read {path} ({type(err).__name__}); start the run again with "
                               f"{option('overwrite', True)}") from None
        if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT or not isinstance(raw.get("epoch"), int):
            raise KdcacheError(f"{path} is not a train-student resume state; start the run again with "
                               f"{option('overwrite', True)}")
        epoch = raw["epoch"]
        self._check_epochs(epoch, cfg)
        metrics = self._metrics(epoch)
        return RunState(epoch, raw["student"], raw["hints"], raw["optimizer"], raw["rng"], bool(raw.get("warned")),
                        metrics)

    def _check_epochs(self, finished: int, cfg: TrainConfig) -> None:
        if finished > cfg.epochs:
            raise KdcacheError(f"{option('resume')}: the run in {option('out')} {self.path} finished {finished} "
                               f"epochs, more than {option('epochs', cfg.epochs)}; give at least "
                               f"{option('epochs', finished)}")

    def _metrics(self, epochs: int) -> list[dict[str, Any]]:
        """The first ``epochs`` records of ``metrics.jsonl`` (a killed run may have written one more)."""
        assert self.path is not None
        records = []
        with open(self.path / "metrics.jsonl") as f:
            for line in f:
                if line.strip() and len(records) < epochs:
                    records.append(json.loads(line))
        if len(records) < epochs:
            raise KdcacheError(f"{self.path / 'metrics.jsonl'} holds {len(records)} epochs, {STATE_FILE} {epochs}: the "
                               f"run's files disagree; start it again with {option('overwrite', True)}")
        return records

    # ---- writing -----------------------------------------------------------------------------
    def start(self, settings: dict[str, Any]) -> None:
        """Create the directory and record the run's settings (``config.json``), so that even a run
        stopped in its first epoch is known as one; a resumed run keeps only the lines of the
        epochs it resumes from in ``metrics.jsonl``."""
        if self.path is None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_json(self.path / "config.json", settings)
            kept = self.resumed.metrics if self.resumed is not None else []
            (self.path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in kept))
        except OSError as err:
            raise KdcacheError(f"cannot write to {option('out')} {self.path}: {err.strerror}") from None

    def save_state(self, state: RunState) -> None:
        """Write ``resume.pt`` whole: a kill leaves the previous epoch's or this one's."""
        if self.path is None:
            return
        replace_file(self.path / STATE_FILE, state.to_file())


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)
