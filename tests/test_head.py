"""Head caches (``--head MODULE``): the input of the teacher's output layer per token plus the layer
once, giving the exact dense logits at training time through the fused, chunked KD loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, store_files
from kdcache import CachedTeacherDataset, KdcacheError, TeacherCache, collate, dump_teacher, train_student
from kdcache.format.attrs import codec_from_params
from kdcache.format.head import HeadCodec
from kdcache.losses import DivergenceLoss
from kdcache.losses.head import HeadKDLoss, head_top1
from kdcache.train.kdterm import KDTerm

OBJECTIVES = ["kl", "reverse_kl", "jsd:0.1"]


def _dump(models, path, **kw):
    return dump_teacher(models.tiny_lm(sharp=1.0), models.tokens(), path, batch_size=16, progress=False,
                        log=lambda m: None, **kw)


def _kd(cache, ds, student, objective, temperature=2.0, rows=range(24)):
    """One batch's KD term through KDTerm, as train_student computes it, and its gradient."""
    inputs, _, teacher = collate(CachedTeacherDataset(ds, cache, dtype=None).__getitems__(list(rows)))
    logits = student(**inputs)["logits"].detach().requires_grad_()
    value = KDTerm(cache.meta.logits.codec, cache.meta.vocab.real, temperature, objective)(logits, teacher.logits,
                                                                                         teacher.mask)
    value.backward()
    return float(value.detach()), logits.grad


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_fused_head_loss_equals_the_dense_loss_on_the_layer_output_in_any_chunks(objective):
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(13, 8, dtype=torch.float64), \
        torch.randn(13, dtype=torch.float64)
    student = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)  # a padded layer: 11 of 13 classes
    mask = torch.rand(3, 5) > 0.3
    teacher = (hidden @ weight.T + bias)[..., :11]
    want = DivergenceLoss(objective, 1.7)(student, teacher, mask)
    (g_want,) = torch.autograd.grad(want, student)
    for chunk in (1, 4, None):
        got = HeadKDLoss(1.7, objective, chunk_tokens=chunk)(student, hidden, weight, bias, mask)
        (g_got,) = torch.autograd.grad(got, student)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)  # the head computes in float32
    none = HeadKDLoss(1.7, objective, reduction="none")(student, hidden, weight, bias, mask)
    torch.testing.assert_close(none.double(), DivergenceLoss(objective, 1.7, reduction="none")(student, teacher) * mask,
                               rtol=1e-5, atol=1e-7)
    assert head_top1(hidden, weight, bias, 11, chunk_tokens=2).equal(teacher.argmax(-1))


@pytest.fixture()
def caches(tmp_path, models):
    ds = models.tokens()
    return ds, _dump(models, tmp_path / "dense", logits_dtype="float16"), _dump(models, tmp_path / "head", head="head")


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_head_cache_kd_loss_equals_the_dense_cache_loss_within_float16_rounding(caches, models, objective):
    ds, dense, head = caches
    student = models.tiny_lm(seed=3, sharp=1.0)
    want, g_want = _kd(dense, ds, student, objective)
    got, g_got = _kd(head, ds, student, objective)
    assert got == pytest.approx(want, rel=5e-3)
    torch.testing.assert_close(g_got, g_want, rtol=5e-3, atol=1e-6)


def test_head_cache_stores_two_bytes_per_hidden_unit_per_real_token_and_the_layer_once(caches, models):
    ds, dense, head = caches
    layer = models.tiny_lm(sharp=1.0).head
    hidden = head.meta.logits.arrays["hidden"]
    assert hidden.per_token and hidden.row_bytes == 2 * layer.in_features  # float16, no framing per token
    assert head.meta.logits.shape == dense.meta.logits.shape
    for key, want in (("weight", layer.weight), ("bias", layer.bias)):
        c = head.meta.logits.constants[key]
        assert np.array_equal(TeacherCache.open(head.path).group[c.path][:], want.detach().numpy())
    sizes = head.nbytes_on_disk()
    per_token = sum(sizes[a.path] for a in head.meta.logits.arrays.values()) / head.meta.tokens
    assert per_token <= 2 * layer.in_features + 4  # chunk checksums and alignment only


@pytest.mark.parametrize("objective", ["reverse_kl", "jsd"])
def test_reverse_kl_and_jsd_are_zero_for_the_teacher_itself_and_differ_from_kl(caches, models, objective):
    ds, dense, head = caches
    for cache in (dense, head):
        same, _ = _kd(cache, ds, models.tiny_lm(sharp=1.0), objective)
        assert same == pytest.approx(0.0, abs=1e-4)
        other = models.tiny_lm(seed=3, sharp=1.0)
        (value, grad), (kl, kl_grad) = _kd(cache, ds, other, objective), _kd(cache, ds, other, "kl")
        assert value > 1e-3 and abs(value - kl) > 1e-3 * kl
        assert (grad - kl_grad).abs().max() > 0.05 * kl_grad.abs().max()


def test_int8_head_keeps_the_loss_within_float16_rounding_of_the_dense_cache(caches, models, tmp_path):
    ds, dense, _ = caches
    int8 = _dump(models, tmp_path / "int8", head="head", head_dtype="int8")
    assert int8.meta.logits.arrays["hidden"].row_bytes + int8.meta.logits.arrays["scale"].row_bytes == 16 + 4
    student = models.tiny_lm(seed=3, sharp=1.0)
    assert _kd(int8, ds, student, "kl")[0] == pytest.approx(_kd(dense, ds, student, "kl")[0], rel=5e-3)


def test_a_teacher_whose_logits_are_not_the_layer_output_is_refused_in_one_line_naming_what_differs(tmp_path, models):
    class SoftCapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = models.tiny_lm(sharp=1.0)

        def forward(self, input_ids, attention_mask=None):
            return {"logits": 30 * torch.tanh(self.lm(input_ids)["logits"] / 30)}

    cases = [(models.tiny_lm(sharp=4.0), "head", "4 times it \\(a final scale\\)"),
             (SoftCapped(), "lm.head", "soft-capped, about 30 \\* tanh"),
             (models.tiny_lm(sharp=1.0), "rnn", "is a GRU, not a torch.nn.Linear")]
    for i, (teacher, name, words) in enumerate(cases):
        with pytest.raises(KdcacheError, match=words) as err:
            dump_teacher(teacher, models.tokens(), tmp_path / str(i), head=name, progress=False, log=lambda m: None)
        assert "\n" not in str(err.value)
        assert not (tmp_path / str(i)).exists()  # refused before anything was written


def test_head_is_one_way_to_store_the_logits_and_its_codec_is_checked_as_recorded():
    from kdcache import DumpConfig
    with pytest.raises(KdcacheError, match="choose one"):
        DumpConfig(head="lm_head", topk=8)
    with pytest.raises(KdcacheError, match="give head too"):
        DumpConfig(head_dtype="int8")
    assert "head" not in DumpConfig().fingerprint_inputs("none", False)
    good = HeadCodec(16, 48).params()
    assert codec_from_params(dict(good), "c") == HeadCodec(16, 48)
    for bad in ({**good, "bias": 1}, {**good, "dtype": "int4"}, {**good, "hidden": 0}):
        with pytest.raises(KdcacheError) as err:
            codec_from_params(bad, "c")
        assert "\n" not in str(err.value)


def _damage(cache: TeacherCache, key: str) -> Path:
    """Flip one byte of a constant's first chunk file (its crc32c no longer matches)."""
    chunk = next((Path(cache.path) / cache.meta.logits.constants[key].path / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0xFF
    chunk.write_bytes(data)
    return chunk


def test_a_damaged_layer_is_refused_on_read_listed_by_verify_and_restored_by_repair(tmp_path, models_file):
    spec = f"{models_file}:"
    dump = ["dump-teacher", "--teacher", spec + "tiny_lm", "--teacher-kwargs", '{"sharp": 1.0}', "--dataset",
            spec + "tokens", "--head", "head", "--out", str(tmp_path / "c"), "--no-progress"]
    assert run_cli(*dump).returncode == 0
    before = store_files(tmp_path / "c")
    cache = TeacherCache.open(tmp_path / "c")
    _damage(cache, "weight")
    verify = run_cli("verify", str(tmp_path / "c"))
    assert verify.returncode == 1 and "BAD head/weight array" in verify.stdout, verify.stdout
    train = run_cli("train-student", "--student", spec + "tiny_lm", "--dataset", spec + "tokens", "--cache",
                    str(tmp_path / "c"), "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress")
    assert train.returncode == 2 and train.stderr.count("\n") == 1 and "head/weight" in train.stderr, train.stderr
    repaired = run_cli(*dump, "--repair")
    assert repaired.returncode == 0 and "head/weight written again" in repaired.stderr, repaired.stderr
    assert run_cli("verify", str(tmp_path / "c")).returncode == 0
    assert store_files(tmp_path / "c") == before


def test_a_creation_killed_before_the_layer_was_written_resumes_to_the_same_cache(tmp_path, models_file):
    spec = f"{models_file}:"
    dump = ["dump-teacher", "--teacher", spec + "tiny_lm", "--teacher-kwargs", '{"sharp": 1.0}', "--dataset",
            spec + "tokens", "--head", "head", "--no-progress"]
    assert run_cli(*dump, "--out", str(tmp_path / "whole")).returncode == 0
    arrays = len(TeacherCache.open(tmp_path / "whole").array_paths()) + 1  # and _token_blocks
    killed = run_cli(*dump, "--out", str(tmp_path / "c"), env={"KDCACHE_KILL_AT": f"created-array:{arrays}"})
    assert killed.returncode != 0 and not list((tmp_path / "c" / "head" / "weight").rglob("c/*"))
    resumed = run_cli(*dump, "--out", str(tmp_path / "c"))
    assert resumed.returncode == 0, resumed.stderr
    assert store_files(tmp_path / "c") == store_files(tmp_path / "whole")


def test_train_student_from_a_head_cache_with_each_objective_and_info_shows_the_layer(tmp_path, models_file, models):
    spec = f"{models_file}:"
    dump = run_cli("dump-teacher", "--teacher", spec + "tiny_lm", "--teacher-kwargs", '{"sharp": 1.0}', "--dataset",
                   spec + "tokens", "--head", "head", "--head-dtype", "int8", "--out", str(tmp_path / "c"),
                   "--no-progress")
    assert dump.returncode == 0, dump.stderr
    info = run_cli("info", str(tmp_path / "c"))
    assert "head/weight" in info.stdout and "stored once" in info.stdout and "dtype=int8" in info.stdout
    for objective in ("kl", "jsd:0.2"):
        run = run_cli("train-student", "--student", spec + "tiny_lm", "--student-kwargs", '{"seed": 2, "sharp": 1.0}',
                      "--dataset", spec + "tokens", "--cache", str(tmp_path / "c"), "--epochs", "3", "--alpha", "1",
                      "--objective", objective, "--lr", "0.02", "--out", str(tmp_path / objective), "--no-progress")
        assert run.returncode == 0, run.stderr
        metrics = [json.loads(line) for line in (tmp_path / objective / "metrics.jsonl").read_text().splitlines()]
        assert metrics[-1]["kd"] < metrics[0]["kd"] and metrics[-1]["agree"] > 0
    bad = run_cli("train-student", "--student", spec + "tiny_lm", "--dataset", spec + "tokens", "--cache",
                  str(tmp_path / "c"), "--objective", "jsd:2", "--no-progress")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "objective" in bad.stderr, bad.stderr


def test_train_student_from_head_and_dense_caches_gives_the_same_first_epoch(caches, models):
    ds, dense, head = caches
    runs = [train_student(models.tiny_lm(seed=3, sharp=1.0), ds, c, epochs=1, batch_size=8, alpha=1.0,
                          temperature=2.0, objective="reverse_kl", progress=False, seed=0).final for c in (dense, head)]
    assert runs[1]["kd"] == pytest.approx(runs[0]["kd"], rel=5e-3)
    assert runs[1]["train_kl"] == pytest.approx(runs[0]["train_kl"], rel=5e-3)


def test_the_layer_crosses_to_dataloader_workers_and_back_as_one_object_per_process(caches, models):
    import pickle

    ds, _, head = caches
    layer = CachedTeacherDataset(ds, head).head
    assert pickle.loads(pickle.dumps(layer)) is layer  # a batch from a worker carries this process's layer
    assert layer.on("cpu")[0] is layer.weight
    runs = [train_student(models.tiny_lm(seed=3, sharp=1.0), ds, head, epochs=1, batch_size=8, alpha=1.0,
                          temperature=2.0, progress=False, seed=0, **kw).final
            for kw in ({}, {"in_memory": "no", "num_workers": 1})]
    assert runs[1]["kd"] == pytest.approx(runs[0]["kd"], rel=1e-5)


def test_report_summarises_a_head_cache_as_the_dense_logits_it_gives(caches):
    from kdcache.report.stats import cache_stats

    _, dense, head = caches
    got, want = cache_stats(head), cache_stats(dense)
    assert got.codec == "head" and got.positions == want.positions
    assert np.array_equal(got.predicted, want.predicted)
    np.testing.assert_allclose(got.entropy, want.entropy, rtol=2e-3, atol=2e-3)
