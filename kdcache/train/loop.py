"""Stage two: train the student from cached teacher outputs (or plainly on labels).

The teacher is never loaded here: its logits and hidden states come from the cache. For
side-by-side comparisons the same loop also accepts a live ``teacher`` module (online KD).
"""

from __future__ import annotations

import json
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import distributed
from ..config import Hint, TrainConfig
from ..data.items import as_rows
from ..errors import KdcacheError, option
from ..models.capture import HiddenCapture, check_module_names
from ..models.forward import autocast, call_model, move_inputs, resolve_amp, resolve_device, select_output
from ..read.batch import collate
from ..read.dataset import CachedTeacherDataset
from ..read.resident import DEVICE_BUDGET, GatheringLoader
from ..read.sampler import ChunkShuffleBatchSampler
from ..store import TeacherCache, fault_point
from .checkpoint import NonFiniteLoss, TrainingInterrupted, run_settings, save_run
from .evaluate import LabelledRows, evaluate
from .kdterm import KDTerm, labelled_cross_entropy
from .monitor import OverfitToCacheWarning, teacher_fit
from .rundir import RunDir, RunState, restore_rng, rng_state
from .teacher import TeacherSource, probe

__all__ = ["Hint", "TrainConfig", "TrainResult", "train_student", "evaluate", "NonFiniteLoss"]

@dataclass
class TrainResult:
    """What :func:`train_student` returns: per-epoch metrics, the trained student and where
    things were saved."""

    metrics: list[dict[str, Any]] = field(default_factory=list)
    out: Path | None = None
    student: nn.Module | None = None

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _built(student: nn.Module | Callable[[], nn.Module], seed: int) -> nn.Module:
    """The student, built now (right after seeding) when given as a callable, so that its
    initial weights are the seed's."""
    if isinstance(student, nn.Module):
        return student
    if not callable(student):
        raise KdcacheError(f"student must be a torch.nn.Module or a callable that builds one, got "
                           f"{type(student).__name__}")
    _seed_everything(seed)
    model = student()
    if not isinstance(model, nn.Module):
        raise KdcacheError(f"the student callable gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def train_student(student: nn.Module | Callable[[], nn.Module], dataset: Any,
                  cache: TeacherCache | str | Path | None = None, *,
                  eval_dataset: Any = None, eval_cache: TeacherCache | str | Path | None = None,
                  teacher: nn.Module | None = None, out: str | Path | None = None,
                  config: TrainConfig | None = None, progress: bool = True, student_spec: dict[str, Any] | None = None,
                  **settings: Any) -> TrainResult:
    """Train ``student`` with ``alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(y) + sum_i w_i * hint_i``
    (``objective`` replaces the KL by the reverse KL or a generalised JSD, :class:`~kdcache.train.kdterm.KDTerm`).

    Args:
        student: the model to train (its logits picked as in dump-teacher: tensor, tuple[0],
            dict["logits"] or ``.logits``), or a callable that builds it: it is then called
            right after seeding with ``seed``, so its initial weights are reproducible (the CLI
            passes one). The trained model is ``result.student``.
        dataset: the transfer set; rows labelled -1 contribute only the KD terms.
        cache: the teacher cache dumped from ``dataset``; None trains plainly on labels
            (unless ``teacher`` is given).
        teacher: a live teacher for online KD, for comparisons only (kdcache's own path is
            ``cache``); it is run under inference_mode on every step.
        eval_dataset: labelled data for per-epoch accuracy and loss.
        eval_cache: the teacher's cache dumped from ``eval_dataset``: each epoch then records
            the student's KD term and top-1 agreement with the teacher on held-out rows
            (``eval_kl``, ``eval_agree``) beside a sample of training rows (``train_kl``,
            ``agree``, recorded whenever there is a teacher), and an
            :class:`~kdcache.train.monitor.OverfitToCacheWarning` is issued once when the gap keeps
            growing.
        out: directory for ``metrics.jsonl``, ``student.pt``, ``hints.pt`` and ``config.json``.
        config / settings: a :class:`TrainConfig`, or its fields as keyword arguments.
    """
    cfg = config if config is not None else TrainConfig()
    if settings:
        cfg = cfg.updated(**settings)
    if cache is not None and teacher is not None:
        raise KdcacheError("give either a cache or a live teacher, not both")
    if cfg.hints and cache is None and teacher is None:
        raise KdcacheError(f"{option('hints')} needs teacher hidden states: pass {option('cache')} (dumped with "
                           f"{option('hidden')})")
    rank, world = distributed.world()  # under torchrun: DDP on the student, each rank its share of batches
    run = RunDir(out)
    run.prepare(cfg, {"cache": run_settings(cfg, student_spec, cache)["cache"], "student": student_spec},
                write=rank == 0)  # refused before anything is written
    student = _built(student, cfg.seed)
    _seed_everything(cfg.seed)
    dev = resolve_device(distributed.local_device(cfg.device))
    amp = resolve_amp(cfg.amp, dev)
    student = student.to(dev)
    check_module_names(student, [h.student for h in cfg.hints], role="student")
    teacher_hidden = [h.teacher for h in cfg.hints]
    held: CachedTeacherDataset | None = None
    if cache is not None:
        data: Dataset = CachedTeacherDataset(dataset, cache, hidden=teacher_hidden,
                                             in_memory=cfg.in_memory,
                                             check_inputs=not cfg.allow_input_mismatch, dtype=None, view=cfg.view,
                                             **_cache_device(cfg.cache_device, dev))
        sampler = data.batch_sampler(cfg.batch_size, shuffle=True, seed=cfg.seed, rank=rank, world=world,
                                     read_ahead=cfg.num_workers == 0)
        held = data if data.resident is not None else None
    else:
        if teacher is not None:
            check_module_names(teacher, teacher_hidden)
        data = LabelledRows(as_rows(dataset))
        sampler = ChunkShuffleBatchSampler(len(data), cfg.batch_size, shuffle=True, seed=cfg.seed, rank=rank,
                                           world=world)
        held = None
    source = TeacherSource(teacher, teacher_hidden, dev, amp, cfg.mask_key, held)
    meta = data.meta if isinstance(data, CachedTeacherDataset) else None
    kd_loss = KDTerm(meta.logits.codec if meta else None, meta.vocab.real if meta else None, cfg.temperature,
                     cfg.objective, regression=meta.regression if meta else False)
    if held is not None and cfg.precompute and kd_loss.kind == "dense" and kd_loss.objective == "kl":
        held.precompute(kd_loss.temperature)
    # targets held in memory are gathered in this process: workers send only inputs
    loader: Any = DataLoader(held.input_rows() if held is not None else data, batch_sampler=sampler,
                             collate_fn=collate, num_workers=cfg.num_workers, pin_memory=dev.type == "cuda",
                             # workers must restart to see a new epoch's augmentation view
                             persistent_workers=cfg.num_workers > 0 and getattr(data, "views", 1) == 1,
                             multiprocessing_context=getattr(data, "worker_context", None) if cfg.num_workers else None)
    inner_loader = loader
    if held is not None:
        loader = GatheringLoader(loader, held)
    out_dir = run.path if rank == 0 else None
    progress = progress and rank == 0
    fit = (teacher_fit(data, eval_dataset, eval_cache, source.outputs, kd_loss, live_teacher=teacher is not None,
                       cfg=cfg, device=dev, amp=amp) if rank == 0 else None)
    if out_dir is not None:
        run.start(run_settings(cfg, student_spec, cache))

    with HiddenCapture(student, [h.student for h in cfg.hints], role="student") as capture:
        hint_losses = probe(student, data, source, capture, cfg, dev, amp)
        params = list(student.parameters()) + [p for m in hint_losses for p in m.parameters()]
        optimizer = (torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
                     if cfg.optimizer == "sgd" else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
        result = TrainResult(out=out_dir, student=student)
        first = _resume(run.resumed, student, hint_losses, optimizer, fit, result)
        model: nn.Module = student
        if world > 1:
            model = nn.parallel.DistributedDataParallel(student, device_ids=[dev.index] if dev.type == "cuda" else None)
        bar = tqdm(total=cfg.epochs * len(sampler), initial=first * len(sampler), unit="step", desc="train-student",
                   disable=not progress, dynamic_ncols=True)
        epoch = first
        try:
            for epoch in range(first, cfg.epochs):
                sampler.set_epoch(epoch)
                if epoch == first and run.resumed is not None:
                    if inner_loader.persistent_workers:  # its workers start (and draw a seed) as in epoch 1
                        iter(inner_loader)
                    restore_rng(run.resumed.rng)  # the generators as the uninterrupted run has them now
                try:
                    record = _epoch(model, loader, source, capture, hint_losses, kd_loss, optimizer, cfg, dev, amp,
                                    bar)
                except NonFiniteLoss as err:
                    kept = (f"{out_dir / 'student.pt'} holds epoch {epoch}, the last finite one" if epoch and out_dir
                            else "no epoch finished, so nothing was saved")
                    raise NonFiniteLoss(err.step, f"the training loss became NaN/inf at epoch {epoch + 1}, step "
                                                  f"{err.step} ({kept}); lower {option('lr')} or "
                                                  f"{option('temperature')}, or check the cache (dumped with "
                                                  f"{option('allow_nonfinite')}?) and the data") from None
                record = {"epoch": epoch + 1, **record}
                if eval_dataset is not None and rank == 0 and kd_loss.objective == "kl":
                    record.update(evaluate(student, eval_dataset, batch_size=max(cfg.batch_size, 256), device=dev,
                                           output_key=cfg.output_key))
                if fit is not None:
                    record.update(fit.measure(student))
                    overfit = fit.check([*result.metrics, record])
                    if overfit:
                        warnings.warn(overfit, OverfitToCacheWarning, stacklevel=2)
                result.metrics.append(record)
                bar.set_postfix({k: round(v, 4) for k, v in record.items() if k in ("loss", "eval_acc")})
                if out_dir is not None:  # every finished epoch is kept: a later failure loses no work
                    _save_epoch(run, record, student, hint_losses, optimizer, fit, cfg, student_spec)
        except KeyboardInterrupt:
            raise TrainingInterrupted(_interrupted(run.path, len(result.metrics), epoch, cfg.epochs)) from None
        finally:
            bar.close()
            source.close()
    return result


def _resume(state: RunState | None, student: nn.Module, hint_losses: list[nn.Module],
            optimizer: torch.optim.Optimizer, fit: Any, result: TrainResult) -> int:
    """Load a resumed run's weights, optimiser state and metrics; the first epoch to train (0-based)."""
    if state is None:
        return 0
    student.load_state_dict(state.student)
    for module, weights in zip(hint_losses, state.hints):
        module.load_state_dict(weights)
    optimizer.load_state_dict(state.optimizer)
    if fit is not None:
        fit.warned = state.warned
    result.metrics.extend(state.metrics)
    return state.epoch


def _save_epoch(run: RunDir, record: dict[str, Any], student: nn.Module, hint_losses: list[nn.Module],
                optimizer: torch.optim.Optimizer, fit: Any, cfg: TrainConfig, student_spec: Any) -> None:
    """The epoch's line, weights, then (last) the state a resumed run continues from."""
    assert run.path is not None
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    fault_point("run-metrics")
    save_run(run.path, student, hint_losses, cfg, student_spec)
    run.save_state(RunState(record["epoch"], {k: v.detach().cpu() for k, v in student.state_dict().items()},
                            [m.state_dict() for m in hint_losses], optimizer.state_dict(), rng_state(),
                            bool(fit is not None and fit.warned)))
    fault_point("run-saved")


def _interrupted(out: Path | None, finished: int, epoch: int, epochs: int) -> str:
    """What an interrupted run leaves, and how to go on."""
    if out is None:
        return f"interrupted in epoch {epoch + 1} of {epochs}; nothing was saved (no {option('out')})"
    if not finished:
        return (f"interrupted in epoch {epoch + 1} of {epochs}, before any epoch finished; rerun the same command "
                f"with {option('resume', True)} to start it again in {out}")
    return (f"interrupted in epoch {epoch + 1} of {epochs}; {out} holds epoch {finished}: rerun the same command with "
            f"{option('resume', True)} to continue from there")


def _cache_device(choice: str, dev: torch.device) -> dict[str, Any]:
    """``CachedTeacherDataset``'s ``device``/``device_budget`` for ``--cache-device``: ``auto``
    holds the targets on the training GPU when they fit a share of its free memory."""
    if choice == "auto":
        return {"device": dev, "device_budget": DEVICE_BUDGET} if dev.type == "cuda" else {"device": "cpu"}
    return {"device": choice}


def _epoch(student: nn.Module, loader: DataLoader, source: TeacherSource, capture: HiddenCapture,
           hint_losses: list[nn.Module], kd_loss: KDTerm, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
           dev: torch.device, amp: str, bar: Any) -> dict[str, float]:
    student.train()
    world = distributed.world()[1]
    sums = torch.zeros(3 + len(hint_losses), device=dev)  # loss, kd, ce, hints...; one sync per epoch
    first_bad = torch.full((), -1, dtype=torch.long, device=dev)  # the first step with a NaN/inf loss
    rows = steps = 0
    non_blocking = dev.type == "cuda"
    t0 = time.perf_counter()
    for inputs, labels, cached in loader:
        inputs = move_inputs(inputs, dev, non_blocking=non_blocking)
        labels = labels.to(dev, non_blocking=non_blocking)
        teacher = source.outputs(inputs, cached)
        with autocast(amp, dev):
            logits = select_output(call_model(student, inputs), cfg.output_key, role="student")
            hidden = capture.take() if hint_losses else {}
        # a regression target (mse, cosine) has no classes: the labels have no term
        ce = labelled_cross_entropy(logits, labels) if kd_loss.objective == "kl" else logits.new_zeros(())
        if teacher is None:
            loss = ce
            parts = [ce.detach() * 0, ce]
        else:
            kd = kd_loss(logits, teacher.logits, teacher.mask)
            hints = [m(hidden[h.student], teacher.hidden[h.teacher]) for h, m in zip(cfg.hints, hint_losses)]
            loss = cfg.alpha * kd + (1 - cfg.alpha) * ce if kd_loss.objective == "kl" else kd
            for h, v in zip(cfg.hints, hints):
                loss = loss + h.weight * v
            parts = [kd, ce, *hints]
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            if world > 1:  # hint projections live outside the DDP-wrapped student
                for p in (p for m in hint_losses for p in m.parameters() if p.grad is not None):
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
            optimizer.step()
        sums += torch.stack([loss.detach().float(), *[p.detach().float() for p in parts]])
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), steps, first_bad)
        rows += len(labels)
        steps += 1
        bar.update(1)
    seconds = time.perf_counter() - t0
    if world > 1:  # every rank's share of the epoch; a NaN on any rank stops them all
        totals = torch.cat([sums, torch.tensor([rows, steps], dtype=sums.dtype, device=dev)])
        torch.distributed.all_reduce(totals)
        sums, rows, steps = totals[:-2], int(totals[-2]), int(totals[-1])
        torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MAX)
    if int(first_bad) >= 0:
        raise NonFiniteLoss(int(first_bad) + 1)
    means = (sums / max(steps, 1)).tolist()
    record = {"loss": means[0], "kd": means[1], "ce": means[2]}
    record.update({f"hint:{h}": v for h, v in zip(cfg.hints, means[3:])})
    record.update({"rows": rows, "seconds": round(seconds, 4), "samples_per_s": rows / max(seconds, 1e-9)})
    return record


