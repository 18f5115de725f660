"""Stage two: train the student from cached teacher outputs (or plainly on labels).

The teacher is never loaded here: its logits and hidden states come from the cache. For
side-by-side comparisons the same loop also accepts a live ``teacher`` module (online KD).
"""

from __future__ import annotations

import json
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import distributed
from .capture import HiddenCapture, check_module_names
from .config import Hint, TrainConfig
from .dataset import CachedTeacherDataset, ChunkShuffleBatchSampler, TeacherBatch, collate
from .errors import KdcacheError, option
from .items import as_rows, autocast, call_model, fetch_batch, move_inputs, resolve_amp, resolve_device, select_output
from .kdterm import KDTerm, check_student_logits, labelled_cross_entropy
from .losses import AttentionTransferLoss, HiddenStateLoss
from .monitor import OverfitToCacheWarning, teacher_fit
from .resident import DEVICE_BUDGET, GatheringLoader
from .store import TeacherCache
from .targets import TeacherTargets

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


class _LabelledRows(Dataset):
    """Plain training data: batches of ``(inputs, labels, {})`` read the same way as the cache's."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: Sequence[int]) -> TeacherBatch:
        inputs, labels = fetch_batch(self.dataset, list(indices))
        return TeacherBatch(inputs, labels, None)

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])[0]


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


def _build_hint_loss(hint: Hint, student_out: torch.Tensor, teacher_out: torch.Tensor) -> nn.Module:
    if hint.kind == "attention":
        if student_out.ndim != 4 or teacher_out.ndim != 4:
            raise KdcacheError(f"{option('hints')} {hint}: attention transfer needs conv maps (B, C, H, W), got student "
                               f"{tuple(student_out.shape[1:])} and teacher {tuple(teacher_out.shape[1:])}")
        return AttentionTransferLoss()
    conv = student_out.ndim == 4
    if (student_out.ndim != teacher_out.ndim or (not conv and student_out.shape[1:-1] != teacher_out.shape[1:-1])):
        raise KdcacheError(f"{option('hints')} {hint}: student output {tuple(student_out.shape[1:])} cannot be matched to "
                           f"teacher output {tuple(teacher_out.shape[1:])}")
    axis = 1 if conv else -1
    return HiddenStateLoss(hint.kind, int(student_out.shape[axis]), int(teacher_out.shape[axis]), conv=conv)


class _Teacher:
    """Where teacher outputs come from: the batch (cache; gathered from the arrays ``held`` in
    memory, maybe on the device already), a live module (online) or nowhere (plain)."""

    def __init__(self, module: nn.Module | None, hidden: Sequence[str], device: torch.device, amp: str,
                 mask_key: str, held: CachedTeacherDataset | None = None) -> None:
        self.module = module.to(device).eval() if module is not None else None
        self.capture = HiddenCapture(self.module, hidden) if self.module is not None else None
        self.device, self.amp, self.mask_key, self.held = device, amp, mask_key, held
        if self.capture is not None:
            self.capture.__enter__()

    def outputs(self, inputs: Any, cached: TeacherTargets | None) -> TeacherTargets | None:
        if self.module is None:
            if self.held is not None and self.held.resident is not None and self.held.resident.device == self.device:
                return cached  # gathered where the step runs
            # rows arrive in their stored width (half the bytes to move); the losses widen them
            # to float32 inside their own first op on the device
            return cached.to(self.device, non_blocking=True) if cached is not None else None
        assert self.capture is not None
        with torch.inference_mode(), autocast(self.amp, self.device):
            logits = select_output(call_model(self.module, inputs), None)
            hidden = self.capture.take()
        mask = inputs.get(self.mask_key) if isinstance(inputs, dict) else None
        return TeacherTargets(logits=logits.float(), hidden={k: v.float() for k, v in hidden.items()},
                              mask=mask.bool() if isinstance(mask, torch.Tensor) and mask.shape == logits.shape[:-1]
                              else None)

    def close(self) -> None:
        if self.capture is not None:
            self.capture.__exit__(None, None, None)


def evaluate(student: nn.Module, dataset: Any, *, batch_size: int = 256, device: str | torch.device | None = None,
             ) -> dict[str, float]:
    """Accuracy and cross-entropy of ``student`` over the labelled rows of ``dataset``."""
    dev = resolve_device(device)
    dataset = as_rows(dataset)
    was_training = student.training
    student.eval()
    correct = seen = 0
    loss_sum = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            inputs, labels = fetch_batch(dataset, range(start, min(start + batch_size, len(dataset))))
            logits = select_output(call_model(student, move_inputs(inputs, dev)), None).float()
            labels = labels.to(dev)
            keep = labels >= 0
            if keep.any():
                loss_sum += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
                correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
                seen += int(keep.sum())
    student.train(was_training)
    return {"eval_acc": correct / seen if seen else float("nan"), "eval_loss": loss_sum / seen if seen else float("nan"),
            "eval_rows": seen}


def train_student(student: nn.Module | Callable[[], nn.Module], dataset: Any,
                  cache: TeacherCache | str | Path | None = None, *,
                  eval_dataset: Any = None, eval_cache: TeacherCache | str | Path | None = None,
                  teacher: nn.Module | None = None, out: str | Path | None = None,
                  config: TrainConfig | None = None, progress: bool = True, student_spec: dict[str, Any] | None = None,
                  **settings: Any) -> TrainResult:
    """Train ``student`` with ``alpha * T^2 * KL(p_t^T || p_s^T) + (1 - alpha) * CE(y) + sum_i w_i * hint_i``.

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
            :class:`~kdcache.monitor.OverfitToCacheWarning` is issued once when the gap keeps
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
    student = _built(student, cfg.seed)
    _seed_everything(cfg.seed)
    rank, world = distributed.world()  # under torchrun: DDP on the student, each rank its share of batches
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
        data = _LabelledRows(as_rows(dataset))
        sampler = ChunkShuffleBatchSampler(len(data), cfg.batch_size, shuffle=True, seed=cfg.seed, rank=rank,
                                           world=world)
        held = None
    source = _Teacher(teacher, teacher_hidden, dev, amp, cfg.mask_key, held)
    kd_loss = (KDTerm(data.meta.logits.codec, data.meta.vocab.real, cfg.temperature)
               if isinstance(data, CachedTeacherDataset) else KDTerm(None, None, cfg.temperature))
    if held is not None and cfg.precompute and kd_loss.kind == "dense":
        held.precompute(kd_loss.temperature)
    # targets held in memory are gathered in this process: workers send only inputs
    loader: Any = DataLoader(held.input_rows() if held is not None else data, batch_sampler=sampler,
                             collate_fn=collate, num_workers=cfg.num_workers, pin_memory=dev.type == "cuda",
                             # workers must restart to see a new epoch's augmentation view
                             persistent_workers=cfg.num_workers > 0 and getattr(data, "views", 1) == 1,
                             multiprocessing_context=getattr(data, "worker_context", None) if cfg.num_workers else None)
    if held is not None:
        loader = GatheringLoader(loader, held)
    out_dir = Path(out) if out is not None and rank == 0 else None
    progress = progress and rank == 0
    fit = (teacher_fit(data, eval_dataset, eval_cache, source.outputs, kd_loss, live_teacher=teacher is not None,
                       cfg=cfg, device=dev, amp=amp) if rank == 0 else None)
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "metrics.jsonl").write_text("")
        except OSError as err:
            raise KdcacheError(f"cannot write to {option('out')} {out_dir}: {err.strerror}") from None

    with HiddenCapture(student, [h.student for h in cfg.hints], role="student") as capture:
        hint_losses = _probe(student, data, source, capture, cfg, dev, amp)
        params = list(student.parameters()) + [p for m in hint_losses for p in m.parameters()]
        optimizer = (torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
                     if cfg.optimizer == "sgd" else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
        result = TrainResult(out=out_dir, student=student)
        model: nn.Module = student
        if world > 1:
            model = nn.parallel.DistributedDataParallel(student, device_ids=[dev.index] if dev.type == "cuda" else None)
        bar = tqdm(total=cfg.epochs * len(sampler), unit="step", desc="train-student", disable=not progress,
                   dynamic_ncols=True)
        try:
            for epoch in range(cfg.epochs):
                sampler.set_epoch(epoch)
                try:
                    record = _epoch(model, loader, source, capture, hint_losses, kd_loss, optimizer, cfg, dev, amp,
                                    bar)
                except NonFiniteLoss as err:
                    kept = (f"{out_dir / 'student.pt'} holds epoch {epoch}, the last finite one" if epoch and out_dir
                            else "no epoch finished, so nothing was saved")
                    raise NonFiniteLoss(err.step, f"the training loss became NaN/inf at epoch {epoch + 1}, step "
                                                  f"{err.step} ({kept}); lower --lr or --temperature, or check the "
                                                  "cache (dumped with --allow-nonfinite?) and the data") from None
                record = {"epoch": epoch + 1, **record}
                if eval_dataset is not None and rank == 0:
                    record.update(evaluate(student, eval_dataset, batch_size=max(cfg.batch_size, 256), device=dev))
                if fit is not None:
                    record.update(fit.measure(student))
                    overfit = fit.check([*result.metrics, record])
                    if overfit:
                        warnings.warn(overfit, OverfitToCacheWarning, stacklevel=2)
                result.metrics.append(record)
                bar.set_postfix({k: round(v, 4) for k, v in record.items() if k in ("loss", "eval_acc")})
                if out_dir is not None:  # every finished epoch is kept: a later failure loses no work
                    with open(out_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                    _save(out_dir, student, hint_losses, cfg, student_spec, cache)
        finally:
            bar.close()
            source.close()
    return result


def _cache_device(choice: str, dev: torch.device) -> dict[str, Any]:
    """``CachedTeacherDataset``'s ``device``/``device_budget`` for ``--cache-device``: ``auto``
    holds the targets on the training GPU when they fit a share of its free memory."""
    if choice == "auto":
        return {"device": dev, "device_budget": DEVICE_BUDGET} if dev.type == "cuda" else {"device": "cpu"}
    return {"device": choice}


def _probe(student: nn.Module, data: Dataset, source: _Teacher, capture: HiddenCapture, cfg: TrainConfig,
           dev: torch.device, amp: str) -> list[nn.Module]:
    """Run two rows through the student (eval mode, no grad) to check its logits against the
    teacher's and size the hint projections."""
    inputs, _, cached = collate(data.__getitems__(list(range(min(2, len(data))))))  # type: ignore[attr-defined]
    inputs = move_inputs(inputs, dev)
    student.eval()
    with torch.no_grad(), autocast(amp, dev):
        logits = select_output(call_model(student, inputs), None)
        hidden = capture.take() if cfg.hints else {}
    student.train()
    teacher = source.outputs(inputs, cached)
    if teacher is not None:
        check_student_logits(tuple(logits.shape[1:]), teacher.logits, getattr(data, "meta", None))
    with torch.random.fork_rng(devices=[]):  # projections from the seed alone, whatever the data drew
        torch.manual_seed(cfg.seed)
        losses = [_build_hint_loss(h, hidden[h.student], teacher.hidden[h.teacher]) for h in cfg.hints] if teacher else []
    return [m.to(dev) for m in losses]


def _epoch(student: nn.Module, loader: DataLoader, source: _Teacher, capture: HiddenCapture,
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
            logits = select_output(call_model(student, inputs), None)
            hidden = capture.take() if hint_losses else {}
        ce = labelled_cross_entropy(logits, labels)
        if teacher is None:
            loss = ce
            parts = [ce.detach() * 0, ce]
        else:
            kd = kd_loss(logits, teacher.logits, teacher.mask)
            hints = [m(hidden[h.student], teacher.hidden[h.teacher]) for h, m in zip(cfg.hints, hint_losses)]
            loss = cfg.alpha * kd + (1 - cfg.alpha) * ce
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


def _save(out: Path, student: nn.Module, hint_losses: list[nn.Module], cfg: TrainConfig,
          student_spec: dict[str, Any] | None, cache: Any) -> None:
    """Write the checkpoint files, each to a temp file renamed into place (never half-written)."""
    state = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    _replace(out / "student.pt", {"state_dict": state, "spec": student_spec or {"class": type(student).__qualname__}})
    if hint_losses:
        _replace(out / "hints.pt", {str(h): m.state_dict() for h, m in zip(cfg.hints, hint_losses)})
    cache_path = cache.path if isinstance(cache, TeacherCache) else (str(cache) if cache is not None else None)
    (out / "config.json").write_text(json.dumps({**cfg.to_json(), "cache": cache_path, "student": student_spec},
                                                indent=2) + "\n")


def _replace(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class NonFiniteLoss(KdcacheError):
    """Training stopped on a NaN/inf loss; the CLI exits with status 1 (not a usage mistake)."""

    exit_code = 1

    def __init__(self, step: int, message: str = "") -> None:
        super().__init__(message or f"NaN/inf loss at step {step}")
        self.step = step
