"""CUDA paths (autocast, pinned memory, non_blocking copies); skipped where no GPU is visible.

The same code runs on CPU in every other test (non_blocking off, no autocast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdcache
from kdcache import CachedTeacherDataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_dump_equals_cpu_dump_and_bf16_autocast_is_close(tmp_path, models):
    ds = models.dataset(1000)
    cpu = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "cpu", hidden=["body"], device="cpu", progress=False)
    gpu = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "gpu", hidden=["body"], device="cuda", amp="none",
                               num_workers=2, progress=False)
    bf16 = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "bf16", hidden=["body"], device="cuda", amp="bf16",
                                progress=False)
    ref = cpu.read("logits", 0, 1000).astype(np.float32)
    np.testing.assert_allclose(gpu.read("logits", 0, 1000).astype(np.float32), ref, atol=2e-3)
    np.testing.assert_allclose(bf16.read("logits", 0, 1000).astype(np.float32), ref, atol=5e-2)
    assert bf16.meta.amp == "bf16" and gpu.meta.dump.device.startswith("cuda")
    np.testing.assert_array_equal(gpu.row_digests(), cpu.row_digests())


def test_cuda_training_from_cache(tmp_path, models):
    ds = models.dataset(1000)
    cache = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "c", device="cuda", progress=False)
    result = kdcache.train_student(models.student(), ds, cache, epochs=2, device="cuda", num_workers=2,
                                   progress=False)
    assert result.final["kd"] < result.metrics[0]["kd"] or result.final["kd"] > 0
    data = CachedTeacherDataset(ds, cache)
    inputs, labels, teacher = next(iter(data.loader(64, pin_memory=True)))
    assert teacher["logits"].is_pinned()


def test_cuda_resident_targets_are_gathered_on_the_device(tmp_path, models):
    ds = models.dataset(1000)
    cache = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "c", hidden=["body"], device="cpu", progress=False)
    data = CachedTeacherDataset(ds, cache, dtype=None, device="cuda")
    assert data.resident.arrays["logits"].is_cuda
    host = CachedTeacherDataset(ds, cache, dtype=None)
    for (x, _, on_gpu), (_, _, on_host) in zip(data.loader(64, shuffle=False, num_workers=2),
                                               host.loader(64, shuffle=False)):
        assert on_gpu.logits.is_cuda and on_gpu.hidden["body"].is_cuda
        assert torch.equal(on_gpu.logits.cpu(), on_host.logits)
    data.precompute(4.0)
    soft = data.gather(data._inputs(list(range(8)))[2]).logits
    assert soft.probs.is_cuda and soft.neg_entropy.is_cuda


def test_cuda_training_with_targets_on_the_device(tmp_path, models):
    ds = models.dataset(1000)
    cache = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "c", device="cpu", progress=False)
    on_gpu = kdcache.train_student(models.student(), ds, cache, epochs=2, device="cuda", cache_device="cuda",
                                   num_workers=2, progress=False)
    on_host = kdcache.train_student(models.student(), ds, cache, epochs=2, device="cuda", cache_device="cpu",
                                    progress=False)
    assert on_gpu.final["kd"] == pytest.approx(on_host.final["kd"], rel=1e-3)
