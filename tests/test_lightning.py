"""Lightning: the data module dumps once in prepare_data and the KD mix-in trains from the cache."""

from __future__ import annotations

import pytest
import torch

L = pytest.importorskip("lightning")

import kdcache  # noqa: E402
from kdcache.integrations.lightning import KDDataModule, KDStudent  # noqa: E402


def _trainer(tmp_path, epochs):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))


def test_data_module_dumps_once_and_the_student_trains_two_epochs(tmp_path, models):
    data = models.dataset(200)
    builds = []

    def teacher():
        builds.append(1)
        return models.teacher()

    module = KDDataModule(data, tmp_path / "cache", teacher=teacher, batch_size=32, eval_dataset=models.dataset(60, seed=9))
    student = KDStudent(models.student(), temperature=4.0, alpha=0.9, lr=1e-2)
    before = models.FORWARD_CALLS[0]
    trainer = _trainer(tmp_path, 2)
    trainer.fit(student, datamodule=module)
    assert trainer.current_epoch == 2 and trainer.global_step == 2 * 7  # ceil(200 / 32) batches an epoch
    assert builds == [1] and models.FORWARD_CALLS[0] > before
    assert kdcache.TeacherCache.open(tmp_path / "cache").complete
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["kd"]) and logged["kd"] > 0 and "val_acc" in logged

    # the same KD loss the library's losses give on a cached batch
    inputs, labels, teacher_rows = next(iter(module.train_dataloader()))
    with torch.no_grad():
        loss, _, _ = student.distillation_terms((inputs, labels, teacher_rows))
        logits = student(inputs)
    expected = 0.9 * kdcache.KLDivLoss(4.0)(logits, teacher_rows.logits.float()) + \
        0.1 * torch.nn.functional.cross_entropy(logits, labels)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)

    # a second run finds the cache: the teacher is neither built nor run
    calls = models.FORWARD_CALLS[0]
    again = KDDataModule(data, tmp_path / "cache", teacher=teacher, batch_size=32)
    _trainer(tmp_path, 1).fit(KDStudent(models.student()), datamodule=again)
    assert builds == [1, 1] and models.FORWARD_CALLS[0] == calls


def test_the_lightning_module_distils_a_head_cache_with_the_objective_it_is_given(tmp_path, models):
    data = models.dataset(96)
    module = KDDataModule(data, tmp_path / "head", teacher=models.teacher, batch_size=32, dump={"head": "head"})
    student = KDStudent(models.student(), temperature=2.0, alpha=1.0, objective="reverse_kl", lr=1e-2)
    trainer = _trainer(tmp_path, 1)
    trainer.fit(student, datamodule=module)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["kd"])
    inputs, labels, targets = next(iter(module.train_dataloader()))
    with torch.no_grad():
        _, kd, _ = student.distillation_terms((inputs, labels, targets))
        teacher_logits = models.teacher()(inputs)
        want = kdcache.losses.ReverseKLDivLoss(2.0)(student(inputs), teacher_logits)
    assert float(kd) == pytest.approx(float(want), rel=5e-3)
