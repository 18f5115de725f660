"""Targets held in memory (or on the device): gathered in the training process, workers send only
inputs, and the teacher side of the dense KD term precomputed once."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import kdcache
from kdcache import CachedTeacherDataset, KdcacheError, KLDivLoss, collate
from kdcache.read import resident
from kdcache.read.resident import TeacherRows
from kdcache.losses.targets import SoftTargets

from conftest import run_cli


@pytest.fixture()
def wide(tmp_path, models):
    """A cache whose logits (500 classes) outweigh the inputs 20 times."""
    ds = models.dataset(300, classes=5)
    cache = kdcache.dump_teacher(models.teacher(classes=500), ds, tmp_path / "w", hidden=["body"], progress=False)
    return ds, cache


def test_workers_send_inputs_and_rows_and_targets_are_gathered_here(wide):
    ds, cache = wide
    data = CachedTeacherDataset(ds, cache, dtype=None)
    assert data.resident is not None and data.resident.device.type == "cpu"
    # what crosses the process boundary: inputs, labels and the batch's cache rows
    batches = list(DataLoader(data.input_rows(), batch_sampler=data.batch_sampler(64), collate_fn=collate,
                              num_workers=2))
    assert all(isinstance(rows, TeacherRows) for _, _, rows in batches)
    assert len(pickle.dumps(data.input_rows())) * 5 < len(pickle.dumps(data))  # no targets pickled for spawn
    logits, hidden = cache.read("logits", 0, 300), cache.read("body", 0, 300)
    seen = []
    for inputs, labels, teacher in data.loader(64, num_workers=2):
        rows = [int(np.flatnonzero((ds.tensors[0] == x).all(1).numpy())[0]) for x in inputs]
        np.testing.assert_array_equal(teacher.logits.numpy(), logits[rows])
        np.testing.assert_array_equal(teacher.hidden["body"].numpy(), hidden[rows])
        seen += rows
    assert sorted(seen) == list(range(300))


def test_arrays_are_loaded_in_pieces(wide, monkeypatch):
    ds, cache = wide
    monkeypatch.setattr(resident, "LOAD_BYTES", 4000)  # 4 rows of logits a piece
    data = CachedTeacherDataset(ds, cache, dtype=None)
    np.testing.assert_array_equal(data.resident.arrays["logits"].numpy(), cache.read("logits", 0, 300))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_precomputed_probabilities_are_the_teachers_softmax_at_t(tmp_path, models, dtype):
    ds = models.dataset(200)
    cache = kdcache.dump_teacher(models.teacher(), ds, tmp_path / dtype, logits_dtype=dtype, progress=False)
    logits = CachedTeacherDataset(ds, cache).__getitems__(list(range(200))).collated[2].logits.double()
    data = CachedTeacherDataset(ds, cache, dtype=None).precompute(3.0)
    soft = data.__getitems__(list(range(200))).collated[2].logits
    assert isinstance(soft, SoftTargets) and soft.temperature == 3.0
    assert soft.probs.dtype == (torch.float32 if dtype == "float32" else torch.float16)
    p = torch.softmax(logits / 3.0, -1)
    torch.testing.assert_close(soft.probs.double(), p, rtol=2 ** -10, atol=1e-7)
    torch.testing.assert_close(soft.neg_entropy.double(), (p * p.log()).sum(-1), rtol=1e-5, atol=1e-6)
    data.precompute(3.0)  # idempotent at the same temperature
    with pytest.raises(KdcacheError, match="held at temperature 3"):
        data.precompute(4.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_precomputed_probabilities_take_the_logits_memory_not_memory_beside_them(tmp_path, models, dtype):
    ds = models.dataset(200)
    cache = kdcache.dump_teacher(models.teacher(), ds, tmp_path / dtype, logits_dtype=dtype, progress=False)
    data = CachedTeacherDataset(ds, cache, dtype=None)
    held, where = data.resident.nbytes, data.resident.arrays["logits"].data_ptr()
    data.precompute(2.0)
    assert data.resident.soft.probs.data_ptr() == where
    assert data.resident.nbytes == held + 4 * 200  # sum p log p: 4 bytes a row


def test_a_pinning_loader_gives_the_targets_it_gathers_as_it_gives_the_inputs(tmp_path, models):
    ds = models.dataset(100)
    cache = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "c", hidden=["body"], progress=False)
    data = CachedTeacherDataset(ds, cache, dtype=None)
    pinned = list(data.loader(32, shuffle=False, pin_memory=True))  # pinned where a GPU is (tests/test_cuda.py)
    plain = list(data.loader(32, shuffle=False))
    for (x, _, a), (y, _, b) in zip(pinned, plain):
        assert torch.equal(x, y) and torch.equal(a.logits, b.logits) and torch.equal(a.hidden["body"], b.hidden["body"])
        assert a.logits.is_pinned() == x.is_pinned()


def test_precomputed_targets_cover_the_real_vocabulary_only(tmp_path, models):
    ds = models.tokens(n=24)
    cache = kdcache.dump_teacher(models.tiny_lm(), ds, tmp_path / "lm", vocab_size=40, progress=False)
    data = CachedTeacherDataset(ds, cache, dtype=None).precompute(2.0)
    inputs, _, teacher = collate(data.__getitems__(list(range(8))))
    assert teacher.logits.probs.shape == (8, 12, 40) and teacher.logits.neg_entropy.shape == (8, 12)
    full = CachedTeacherDataset(ds, cache).__getitems__(list(range(8))).collated[2]
    student = torch.randn(8, 12, 40, requires_grad=True)
    want = KLDivLoss(2.0)(student, full.logits[..., :40], full.mask)
    got = KLDivLoss(2.0)(student, teacher.logits, teacher.mask)
    assert got.item() == pytest.approx(want.item(), rel=1e-3)


def test_precompute_needs_the_cache_in_memory(wide):
    ds, cache = wide
    with pytest.raises(KdcacheError, match="needs it in memory"):
        CachedTeacherDataset(ds, cache, in_memory=False).precompute(4.0)


def test_training_with_precomputed_targets_matches_the_logits_path(tmp_path, models):
    ds = models.dataset(300, unlabelled_from=200)
    cache = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "c", progress=False)
    runs = {}
    for precompute in (True, False):
        student = models.student()
        result = kdcache.train_student(student, ds, cache, epochs=2, batch_size=32, precompute=precompute,
                                       progress=False, num_workers=2 if precompute else 0)
        runs[precompute] = (result, torch.cat([p.detach().flatten() for p in student.parameters()]))
    # the KL is the cross-entropy minus the entropy (T^2 * ~1.6 here): float16 probabilities
    # move it by up to 2^-11 of the cross-entropy, ~0.01 at most
    for a, b in zip(runs[True][0].metrics, runs[False][0].metrics):
        assert a["kd"] == pytest.approx(b["kd"], abs=2 ** -11 * 16 * 1.6) and a["ce"] == pytest.approx(b["ce"], rel=1e-3)
        assert a["kd"] != b["kd"]  # the precomputed path really ran
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-3, atol=1e-4)


def test_cache_device_must_be_visible(wide, tmp_path, models_file):
    ds, cache = wide
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(KdcacheError, match="not a visible CUDA device"):
        CachedTeacherDataset(ds, cache, device="cuda")
    with pytest.raises(KdcacheError, match="cache_device must be auto, cpu or cuda"):
        kdcache.TrainConfig(cache_device="gpu")
    done = run_cli("train-student", "--student", f"{models_file}:student", "--dataset", f"{models_file}:dataset",
                   "--cache", cache.path, "--cache-device", "cuda", "--epochs", "1", "--no-progress",
                   "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "kdcache: error: cache device cuda" in done.stderr


def test_bfloat16_rows_are_gathered_bit_for_bit(tmp_path, models):
    ds = models.dataset(200)
    cache = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "bf", logits_dtype="bfloat16", progress=False)
    teacher = CachedTeacherDataset(ds, cache, dtype=None).__getitems__([5, 3, 199]).collated[2]
    assert teacher.logits.dtype == torch.bfloat16
    stored = cache.read_array(cache.outputs["logits"].arrays[""].path, 0, 200)
    np.testing.assert_array_equal(teacher.logits.view(torch.int16).numpy().view(np.uint16), stored[[5, 3, 199]])
