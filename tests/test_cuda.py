"""CUDA paths (autocast, pinned memory, non_blocking copies); skipped where no GPU is visible.

The same code runs on CPU in every other test (non_blocking off, no autocast). scripts/gpu_check.sh
runs this file on a machine with a GPU."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import kdcache
import kdcache.dump.teacher as dump_module
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
    # targets held in memory are gathered in this process, after the DataLoader pinned the inputs:
    # the loader pins them too
    assert inputs.is_pinned() and teacher["logits"].is_pinned()


SYNC_FREE = {"dense": {"hidden": ["body"]}, "topk": {"topk": 3}, "sampled": {"sample_k": 4},
             "hybrid": {"topk": 2, "tail_samples": 3}, "packed topk": {"topk": 4, "vocab_size": 40},
             "packed hybrid": {"topk": 4, "tail_samples": 5, "vocab_size": 40, "sample_draws": "systematic"},
             "padded sampled": {"sample_k": 6, "vocab_size": 40, "layout": "padded"}}


@pytest.mark.parametrize("form", list(SYNC_FREE))
def test_cuda_dump_loop_never_makes_the_host_wait_for_the_device(tmp_path, models, monkeypatch, form):
    """Every batch's forward, encoding and copies are queued without a synchronizing call (sync
    debug mode warns at each), so the host prepares the next batch while the device works."""
    real = dump_module.run_blocks

    def watched(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            return real(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.setattr(dump_module, "run_blocks", watched)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tokens = "vocab_size" in SYNC_FREE[form]
        teacher, data = (models.tiny_lm(), models.tokens()) if tokens else (models.teacher(), models.dataset(1000))
        kdcache.dump_teacher(teacher, data, tmp_path / "c", device="cuda", batch_size=8 if tokens else 100,
                             progress=False, **SYNC_FREE[form])
    syncs = [str(w.message) for w in seen if "synchroniz" in str(w.message)]
    assert syncs == []


def test_cuda_packed_token_dump_equals_the_cpu_dump(tmp_path, models):
    quiet = {"topk": 4, "vocab_size": 40, "batch_size": 8, "amp": "none", "progress": False}
    cpu = kdcache.dump_teacher(models.tiny_lm(), models.tokens(), tmp_path / "cpu", device="cpu", **quiet)
    gpu = kdcache.dump_teacher(models.tiny_lm(), models.tokens(), tmp_path / "gpu", device="cuda", **quiet)
    assert cpu.meta.packed is not None and cpu.fingerprint == gpu.fingerprint
    for a in cpu.meta.data_arrays():
        ours, theirs = gpu.read_array(a.path, 0, gpu.length(a)), cpu.read_array(a.path, 0, cpu.length(a))
        if a.path.endswith("values"):
            np.testing.assert_allclose(ours.astype(np.float32), theirs.astype(np.float32), atol=2e-3)
        elif a.path.endswith("logsumexp"):
            np.testing.assert_allclose(ours, theirs, rtol=1e-5)


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


def test_cuda_teacher_spread_over_the_gpu_and_the_cpu_dumps_the_cache_of_the_whole_teacher(tmp_path):
    pytest.importorskip("accelerate")
    import hf_helpers
    from kdcache.models.hf import load_pretrained, load_tokenizer

    teacher_dir = hf_helpers.save_lm(tmp_path / "teacher", layers=4, width=64)
    tok = load_tokenizer(f"hf:{teacher_dir}")
    enc = tok(hf_helpers.TEXTS[:24], padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]} for i in range(24)]
    placed = {"transformer.wte": 0, "transformer.wpe": 0, "transformer.drop": 0, "transformer.h.0": 0,
              "transformer.h.1": "cpu", "transformer.h.2": 0, "transformer.h.3": "cpu", "transformer.ln_f": 0,
              "lm_head": 0}
    spread = load_pretrained(f"hf:{teacher_dir}", device_map=placed)
    assert any(p.device.type == "meta" for p in spread.state_dict().values())  # offloaded to the CPU
    whole = load_pretrained(f"hf:{teacher_dir}")
    quiet = {"topk": 8, "batch_size": 8, "amp": "none", "progress": False}
    a = kdcache.dump_teacher(whole, rows, tmp_path / "whole", device="cuda", **quiet)
    b = kdcache.dump_teacher(spread, rows, tmp_path / "spread", **quiet)
    assert a.fingerprint == b.fingerprint and b.meta.dump.device.startswith("cuda")
    np.testing.assert_allclose(b.read_array("topk/logsumexp", 0, b.length(b.meta.logits.arrays["logsumexp"])),
                               a.read_array("topk/logsumexp", 0, a.length(a.meta.logits.arrays["logsumexp"])),
                               rtol=1e-5)
