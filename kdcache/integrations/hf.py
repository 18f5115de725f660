"""🤗 ``transformers.Trainer`` that distils from a kdcache cache: the two-line change.

.. code-block:: python

    from kdcache.integrations.hf import KDTrainer          # was: from transformers import Trainer
    trainer = KDTrainer(model=student, args=TrainingArguments(...), train_dataset=ds,
                        kd_cache="kdcache-store/<fingerprint>", temperature=2.0, alpha=0.5)
    trainer.train()

``train_dataset`` is the dataset the cache was dumped from (the same rows, prepared the same
way). Each item gets its row index (``kd_row``, kept through ``remove_unused_columns=True``),
and :class:`KDCollator` attaches the cached teacher targets of the batch's rows — dense, top-k,
sampled or hybrid logits, a head cache's hidden states (its output layer loaded once), hidden states and the token mask, as :class:`~kdcache.losses.targets.TeacherTargets` —
read through :class:`~kdcache.read.dataset.CachedTeacherDataset`, which checks every row's input
digest. The teacher is never loaded. The loss is ``alpha * KD + (1 - alpha) * the model's own
loss`` (its ``labels`` loss, shifted for causal LMs), a per-batch mean that ``Trainer`` divides
over gradient-accumulation steps; it works under ``torchrun``/accelerate and bf16/fp16 like any
``Trainer``. Evaluation batches carry no teacher targets and report the model's own loss.

TRL's ``SFTTrainer`` (or any ``Trainer`` subclass) takes the same mix-in::

    class KDSFTTrainer(KDTrainerMixin, SFTTrainer): ...

given a dataset SFTTrainer does not re-tokenize or pack (``dataset_kwargs={"skip_prepare_dataset": True}``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers import Trainer
from transformers.data.data_collator import default_data_collator

from ..config import Hint
from ..errors import KdcacheError
from ..format.meta import CacheMeta
from ..losses import HiddenStateLoss
from ..losses.targets import TeacherTargets
from ..models.capture import HiddenCapture
from ..models.forward import call_model, select_output
from ..models.hf import check_tokenizer
from ..read.batch import collate
from ..read.dataset import CachedTeacherDataset
from ..store import TeacherCache
from ..train.kdterm import KDTerm, check_student_logits

__all__ = ["KDTrainer", "KDTrainerMixin", "KDCollator", "IndexedRows", "ROW_KEY", "TEACHER_KEY"]

ROW_KEY = "kd_row"  # each item's row index in the cache
TEACHER_KEY = "kd_teacher"  # the batch's TeacherTargets


class IndexedRows(torch.utils.data.Dataset):
    """The items of ``dataset`` (dicts, HF style) with their row index under ``kd_row``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def _indexed(self, item: Any, i: int) -> dict[str, Any]:
        if not isinstance(item, Mapping):
            raise KdcacheError(f"KDTrainer needs dict items (HF style, e.g. input_ids/attention_mask/labels); row {i} "
                               f"is a {type(item).__name__}")
        return {**item, ROW_KEY: i}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._indexed(self.dataset[i], i)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(list(indices)) if getitems is not None else [self.dataset[i] for i in indices]
        return [self._indexed(item, i) for item, i in zip(items, indices)]


class KDCollator:
    """Collate with ``collator`` and attach the rows' cached teacher targets under ``kd_teacher``.

    Features that carry ``kd_row`` (training rows from :class:`IndexedRows`) get the targets of
    those rows, read with ``cached.__getitems__`` (input digests checked); features without it
    (evaluation) are collated as they are.
    """

    def __init__(self, cached: CachedTeacherDataset, collator: Callable[[list[Any]], Any] | None = None) -> None:
        self.cached, self.collator = cached, collator or default_data_collator

    def __call__(self, features: list[Any]) -> Any:
        if not features or not isinstance(features[0], Mapping) or ROW_KEY not in features[0]:
            return self.collator(features)
        rows = [int(f[ROW_KEY]) for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != ROW_KEY} for f in features])
        _, _, teacher = collate(self.cached.__getitems__(rows))
        batch[TEACHER_KEY] = teacher
        return batch


def _tokenizer_of(processing_class: Any) -> Any:
    """The tokenizer of a ``processing_class`` (a tokenizer, or a processor holding one)."""
    if processing_class is None or hasattr(processing_class, "get_vocab"):
        return processing_class
    return getattr(processing_class, "tokenizer", None)


class KDTrainerMixin:
    """Distillation for a ``transformers.Trainer`` subclass: put it first, ``class T(KDTrainerMixin, Trainer)``.

    Args (keywords, besides the Trainer's own):
        kd_cache: the cache dumped from ``train_dataset`` (a path, URL or TeacherCache).
        teacher: instead of ``kd_cache``, a live teacher run on every step (online KD, for
            comparisons only: kdcache's own path is the cache).
        temperature: T of the KL (default 4; a sampled or hybrid cache's own).
        alpha: weight of the KD term; the model's own (labels) loss gets ``1 - alpha``. With
            ``alpha=1`` labels are not needed.
        objective: ``"kl"``, ``"reverse_kl"`` or ``"jsd:BETA"`` (GKD's generalised JSD) for logits
            (:class:`~kdcache.train.kdterm.KDTerm` says which cache supports which),
            ``"mse"``/``"cosine"`` for a regression target (an embedding) stored as the cache's
            primary output.
        output_key: which student output is compared with the cache's primary output (default:
            ``.logits``, as at dump time).
        hints: ``"STUDENT_MODULE=TEACHER_MODULE[:mse|cosine][@WEIGHT]"`` terms on cached hidden
            states of equal width (a projection would need training outside the model).
        allow_vocab_mismatch: accept a ``processing_class`` whose vocabulary differs from the
            teacher's recorded one (refused by default: the same ids would mean other tokens).
        kd_in_memory: ``"auto"``, True or False: hold the cache's arrays in memory.
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean: Trainer divides it over GA steps

    def __init__(self, *args: Any, kd_cache: TeacherCache | str | Path | None = None, teacher: nn.Module | None = None,
                 temperature: float | None = None, alpha: float = 0.9, objective: str = "kl",
                 output_key: str | None = None, hints: Sequence[str | Hint] = (), allow_vocab_mismatch: bool = False,
                 kd_in_memory: bool | str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if (kd_cache is None) == (teacher is None):
            raise KdcacheError("give kd_cache (a kdcache cache) or teacher (online KD, for comparisons), not both or none")
        if not 0.0 <= alpha <= 1.0:
            raise KdcacheError(f"alpha must be within [0, 1], got {alpha}")
        self.model_accepts_loss_kwargs = False  # the model's loss stays a per-batch mean, as the KD term
        self.kd_alpha, self.kd_output_key = float(alpha), output_key
        self.kd_hints = tuple(h if isinstance(h, Hint) else Hint.parse(h) for h in hints)
        if any(h.kind == "attention" for h in self.kd_hints):
            raise KdcacheError("KDTrainer hints are mse or cosine; attention transfer is train-student's")
        self.kd_teacher = teacher
        self.kd_meta: CacheMeta | None = None
        if kd_cache is not None:
            if self.train_dataset is None:
                raise KdcacheError("KDTrainer needs train_dataset: the dataset the cache was dumped from")
            cached = CachedTeacherDataset(self.train_dataset, kd_cache, hidden=[h.teacher for h in self.kd_hints],
                                          in_memory=kd_in_memory, dtype=None)
            check_tokenizer(cached.meta.teacher.tokenizer, _tokenizer_of(getattr(self, "processing_class", None)),
                            allow=allow_vocab_mismatch, flag="allow_vocab_mismatch=True")
            self.kd_meta = cached.meta
            self.train_dataset = IndexedRows(self.train_dataset)
            self.data_collator = KDCollator(cached, self.data_collator)
            self.kd_term = KDTerm(cached.meta.logits.codec, cached.meta.vocab.real, temperature, objective)
        else:
            assert teacher is not None
            teacher.to(self.args.device).eval()
            self.kd_term = KDTerm(None, None, temperature, objective)
        self._kd_teacher_capture = (HiddenCapture(teacher, [h.teacher for h in self.kd_hints]).__enter__()
                                    if teacher is not None and self.kd_hints else None)
        self._kd_capture = (HiddenCapture(self.model, [h.student for h in self.kd_hints], role="student").__enter__()
                            if self.kd_hints else None)
        self._kd_hint_losses = [HiddenStateLoss(h.kind) for h in self.kd_hints]
        self._kd_checked = False

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        if ROW_KEY not in self._signature_columns:  # type: ignore[attr-defined]
            self._signature_columns.append(ROW_KEY)  # type: ignore[attr-defined]

    def _online_targets(self, inputs: dict[str, Any]) -> TeacherTargets:
        """The live teacher's outputs for ``inputs`` (online KD)."""
        assert self.kd_teacher is not None
        with torch.no_grad():
            logits = select_output(call_model(self.kd_teacher, inputs), self.kd_output_key)
            hidden = self._kd_teacher_capture.take() if self._kd_teacher_capture is not None else {}
        mask = inputs.get("attention_mask")
        return TeacherTargets(logits=logits, hidden=hidden,
                              mask=mask.bool() if isinstance(mask, torch.Tensor) and mask.shape == logits.shape[:-1]
                              else None)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """``alpha * KD + (1 - alpha) * the model's loss`` on training batches; the model's own
        loss on batches without teacher targets (evaluation)."""
        teacher = inputs.pop(TEACHER_KEY, None)
        if self.kd_teacher is not None and model.training:
            model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            teacher = self._online_targets(model_inputs)
        if teacher is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                        num_items_in_batch=num_items_in_batch)
        if self.kd_alpha == 1.0:
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**inputs)
        student = select_output(outputs, self.kd_output_key, role="student")
        teacher = teacher.to(student.device)
        if not self._kd_checked and self.kd_term.divergence is not None:
            check_student_logits(tuple(student.shape[1:]), teacher.logits, self.kd_meta)
        self._kd_checked = True
        loss = self.kd_alpha * self.kd_term(student, teacher.logits, teacher.mask)
        if self.kd_alpha < 1.0:
            own = outputs.get("loss") if isinstance(outputs, Mapping) else None
            if own is None:
                raise KdcacheError("alpha < 1 needs the model's own loss: give the batches labels, or use alpha=1")
            loss = loss + (1.0 - self.kd_alpha) * own
        if self._kd_capture is not None:
            hidden = self._kd_capture.take()
            for h, term in zip(self.kd_hints, self._kd_hint_losses):
                s, t = hidden[h.student], teacher.hidden[h.teacher]
                if s.shape[-1] != t.shape[-1]:
                    raise KdcacheError(f"hint {h}: student width {s.shape[-1]} != teacher width {t.shape[-1]}; "
                                       "KDTrainer hints need equal widths")
                loss = loss + h.weight * term(s, t, teacher.mask if teacher.mask is not None and
                                              teacher.mask.shape == s.shape[:-1] else None)
        return (loss, outputs) if return_outputs else loss


class KDTrainer(KDTrainerMixin, Trainer):
    """``transformers.Trainer`` distilling from a kdcache cache; see :class:`KDTrainerMixin`."""
