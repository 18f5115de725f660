"""Lightning: a ``LightningDataModule`` that dumps the teacher once and serves cached batches,
and a mix-in that computes the KD terms.

.. code-block:: python

    data = KDDataModule(transfer_set, "kdcache-store/run1", teacher=teacher, batch_size=64)
    model = KDStudent(student, temperature=4.0, alpha=0.9, lr=1e-3)
    lightning.Trainer(max_epochs=10).fit(model, datamodule=data)

``prepare_data`` (rank 0 of each node, as Lightning calls it) runs :func:`~kdcache.dump_teacher`
— a cache hit after the first run — and ``setup`` opens the cache in every process as a
:class:`~kdcache.read.dataset.CachedTeacherDataset`. Training batches are ``(inputs, labels, teacher)``
with ``teacher`` a :class:`~kdcache.losses.targets.TeacherTargets`; under DDP each rank reads its share
of the batches (the loader's own batch sampler: pass ``use_distributed_sampler=False``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import DumpConfig
from ..data.items import as_rows, fetch_batch
from ..dump.teacher import dump_teacher
from ..errors import KdcacheError
from ..format.meta import CacheMeta
from ..models.forward import call_model, select_output
from ..read.batch import TeacherBatch, collate
from ..read.dataset import CachedTeacherDataset
from ..train.kdterm import KDTerm, check_student_logits, labelled_cross_entropy

__all__ = ["KDDataModule", "KDLossMixin", "KDStudent"]


class _Rows(torch.utils.data.Dataset):
    """Evaluation rows read a batch at a time: ``(inputs, labels, None)``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = as_rows(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> TeacherBatch:
        inputs, labels = fetch_batch(self.dataset, indices)
        return TeacherBatch(inputs, labels, None)


class KDDataModule(L.LightningDataModule):
    """Cached-teacher batches for Lightning.

    Args:
        dataset: the transfer set (items as kdcache reads them, or a ``datasets.Dataset``).
        cache: where the cache is, or is to be written.
        teacher: the teacher, or a callable that builds it (called only when the dump runs);
            None when the cache already exists.
        dump: :class:`~kdcache.DumpConfig` (or its fields as a dict) for the dump.
        tokenizer: the teacher's tokenizer, recorded in the cache.
        hidden: cached hidden outputs to read (default: all).
        eval_dataset: labelled rows for ``val_dataloader`` (``(inputs, labels, None)`` batches).
    """

    def __init__(self, dataset: Any, cache: str | Path, *, teacher: nn.Module | Callable[[], nn.Module] | None = None,
                 dump: DumpConfig | dict[str, Any] | None = None, tokenizer: Any = None,
                 hidden: list[str] | None = None, batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 eval_dataset: Any = None, in_memory: bool | str = "auto") -> None:
        super().__init__()
        self.dataset, self.cache, self.teacher, self.tokenizer = dataset, str(cache), teacher, tokenizer
        self.dump = dump if isinstance(dump, DumpConfig) else DumpConfig.from_mapping(dict(dump or {}))
        self.hidden, self.batch_size, self.num_workers, self.seed = hidden, batch_size, num_workers, seed
        self.eval_dataset, self.in_memory = eval_dataset, in_memory
        self.train_set: CachedTeacherDataset | None = None

    def prepare_data(self) -> None:
        """Dump the teacher (rank 0; a cache hit once it is there)."""
        if self.teacher is None:
            return
        teacher = self.teacher if isinstance(self.teacher, nn.Module) else self.teacher()
        dump_teacher(teacher, self.dataset, self.cache, config=self.dump.updated(progress=False),
                     tokenizer=self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        """Open the cache in this process."""
        if self.train_set is None:
            self.train_set = CachedTeacherDataset(self.dataset, self.cache, hidden=self.hidden, in_memory=self.in_memory,
                                                  dtype=None)

    @property
    def meta(self) -> CacheMeta:
        if self.train_set is None:
            raise KdcacheError("KDDataModule.setup() has not run: the cache is not open yet")
        return self.train_set.meta

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        assert self.train_set is not None
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = self.train_set.batch_sampler(self.batch_size, shuffle=True, seed=self.seed, rank=rank, world=world)
        return DataLoader(self.train_set, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers,
                          persistent_workers=False, multiprocessing_context=self.train_set.worker_context
                          if self.num_workers else None)

    def val_dataloader(self) -> DataLoader | list[Any]:
        if self.eval_dataset is None:
            return []
        rows = _Rows(self.eval_dataset)
        batches = [list(range(s, min(s + self.batch_size, len(rows)))) for s in range(0, len(rows), self.batch_size)]
        return DataLoader(rows, batch_sampler=batches, collate_fn=collate)


class KDLossMixin:
    """KD terms for a ``LightningModule`` trained on :class:`KDDataModule` batches.

    ``self.distillation_loss(batch)`` runs the module on ``inputs`` (``self(x)``, ``self(*x)``,
    ``self(**x)``), picks its logits and returns ``alpha * KD + (1 - alpha) * CE(labels)``, logging
    ``kd``, ``ce`` and ``loss`` (:meth:`distillation_terms` gives them without logging). The KD term
    fits the cache (dense, top-k, sampled, hybrid or head; padded vocabularies cut to the real one).
    Set ``kd_temperature`` / ``kd_alpha`` / ``kd_objective`` (``kl``, ``reverse_kl``, ``jsd:BETA``;
    :class:`~kdcache.train.kdterm.KDTerm`) on the module.
    """

    kd_temperature: float | None = None  # 4.0; a sampled or hybrid cache's own
    kd_alpha: float = 0.9
    kd_objective: str = "kl"

    def _kd_term(self) -> tuple[KDTerm, CacheMeta | None]:
        term = getattr(self, "_kd_cached_term", None)
        if term is None:
            datamodule = getattr(getattr(self, "trainer", None), "datamodule", None)
            meta = datamodule.meta if isinstance(datamodule, KDDataModule) else None
            term = (KDTerm(meta.logits.codec if meta else None, meta.vocab.real if meta else None, self.kd_temperature,
                           self.kd_objective), meta)
            self._kd_cached_term = term
        return term

    def distillation_loss(self, batch: Any) -> torch.Tensor:
        """The training loss of a batch, with ``kd``, ``ce`` and ``loss`` logged."""
        loss, kd, ce = self.distillation_terms(batch)
        self.log_dict({"kd": kd.detach(), "ce": ce.detach(), "loss": loss.detach()},  # type: ignore[attr-defined]
                      prog_bar=True, batch_size=len(batch[1]))
        return loss

    def distillation_terms(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, kd, ce)`` of an ``(inputs, labels, teacher)`` batch."""
        inputs, labels, teacher = batch
        logits = select_output(call_model(self, inputs), None, role="student")  # type: ignore[arg-type]
        term, meta = self._kd_term()
        if not getattr(self, "_kd_checked", False):
            check_student_logits(tuple(logits.shape[1:]), teacher.logits, meta)
            self._kd_checked = True
        kd = term(logits, teacher.logits, teacher.mask)
        ce = labelled_cross_entropy(logits, labels)
        return self.kd_alpha * kd + (1 - self.kd_alpha) * ce, kd, ce


class KDStudent(KDLossMixin, L.LightningModule):
    """A ready ``LightningModule`` distilling ``student`` from :class:`KDDataModule` batches (AdamW)."""

    def __init__(self, student: nn.Module, *, temperature: float | None = None, alpha: float = 0.9,
                 objective: str = "kl", lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.student, self.lr, self.weight_decay = student, lr, weight_decay
        self.kd_temperature, self.kd_alpha, self.kd_objective = temperature, alpha, objective

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.distillation_loss(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, labels, _ = batch
        logits = select_output(call_model(self, inputs), None, role="student")
        keep = labels >= 0
        self.log_dict({"val_ce": labelled_cross_entropy(logits, labels),
                       "val_acc": (logits.argmax(-1)[keep] == labels[keep]).float().mean()}, batch_size=len(labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
