"""The student's fit to the teacher per epoch, and the overfit-to-cache warning."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import kdcache
from kdcache import KdcacheError
from kdcache.train.monitor import OverfitToCacheWarning, growing_gap

from conftest import run_cli


def test_growing_gap_needs_a_growing_gap_a_stalled_held_out_kl_and_a_real_ratio():
    train = [0.10, 0.06, 0.04, 0.03, 0.02]
    assert growing_gap(train, [0.12, 0.10, 0.10, 0.11, 0.12])
    assert not growing_gap(train, [0.12, 0.10, 0.09, 0.08, 0.07])  # held-out still improving
    assert not growing_gap([0.10, 0.06, 0.04, 0.05, 0.02], [0.12, 0.10, 0.10, 0.11, 0.12])  # the gap held once
    assert not growing_gap([0.10, 0.095, 0.09, 0.085, 0.08], [0.11] * 5)  # growing and stalled, but only 1.4x
    assert not growing_gap(train[:3], [0.1, 0.2, 0.3])  # too few epochs
    assert not growing_gap(train, [0.12, float("nan"), 0.10, 0.11, 0.12])


def _fit_run(models, tmp_path, name, rows, width, **kwargs):
    """Distil a student of ``width`` from ``rows`` cached rows, with 256 held-out rows cached too."""
    teacher = models.teacher(seed=0)
    with torch.no_grad():  # a confident teacher: its KL is worth fitting
        teacher.head.weight.mul_(8)
    train, held_out = models.dataset(rows, seed=0), models.dataset(256, seed=1)
    cache = kdcache.dump_teacher(teacher, train, tmp_path / f"{name}-train", progress=False, log=lambda m: None)
    eval_cache = kdcache.dump_teacher(teacher, held_out, tmp_path / f"{name}-eval", progress=False, log=lambda m: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = kdcache.train_student(lambda: models.Student(width=width), train, cache, eval_dataset=held_out,
                                       eval_cache=eval_cache, epochs=20, batch_size=16, lr=1e-2, temperature=1.0,
                                       alpha=1.0, seed=0, progress=False, **kwargs)
    return result, [w for w in caught if issubclass(w.category, OverfitToCacheWarning)]


def test_overfit_warning_fires_once_when_a_big_student_memorises_a_small_cache(models, tmp_path):
    result, caught = _fit_run(models, tmp_path, "small", rows=32, width=128)
    assert len(caught) == 1 and "views" in str(caught[0].message)
    last = result.final
    assert last["train_kl"] < 0.2 * last["eval_kl"] and last["agree"] > last["eval_agree"]


def test_overfit_warning_stays_silent_when_the_cache_is_big_enough(models, tmp_path):
    result, caught = _fit_run(models, tmp_path, "big", rows=1200, width=8)
    assert caught == []
    assert all({"train_kl", "eval_kl", "agree", "eval_agree"} <= set(m) for m in result.metrics)
    assert result.final["eval_kl"] < result.metrics[0]["eval_kl"]


def test_fit_measures_follow_their_definition(models, tmp_path):
    ds = models.dataset(64)
    cache = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "c", progress=False)
    # the teacher side from the cached logits, not precomputed float16 probabilities: the definition exactly
    result = kdcache.train_student(models.student(), ds, cache, eval_dataset=ds, eval_cache=cache, epochs=1,
                                   temperature=2.0, precompute=False, progress=False)
    student, teacher = result.student.eval(), models.teacher().eval()
    x = ds.tensors[0]
    with torch.no_grad():
        s, t = student(x), teacher(x).half().float()  # the cache holds float16 logits
    kl = kdcache.KLDivLoss(temperature=2.0)(s, t)
    m = result.final
    assert m["train_kl"] == pytest.approx(float(kl), rel=1e-4) == pytest.approx(m["eval_kl"], rel=1e-4)
    assert m["agree"] == pytest.approx(float((s.argmax(1) == t.argmax(1)).float().mean()))


def test_an_eval_cache_of_another_teacher_is_refused(models, tmp_path):
    ds, held_out = models.dataset(64), models.dataset(32, seed=1)
    cache = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "c", progress=False)
    other = kdcache.dump_teacher(models.teacher(seed=4), held_out, tmp_path / "e", progress=False)
    with pytest.raises(KdcacheError, match="eval_cache .* holds another teacher's outputs"):
        kdcache.train_student(models.student(), ds, cache, eval_dataset=held_out, eval_cache=other, progress=False)
    with pytest.raises(KdcacheError, match="eval_cache needs eval_dataset"):
        kdcache.train_student(models.student(), ds, cache, eval_cache=other, progress=False)


def test_cli_records_the_fit_and_prints_the_warning_as_one_line(models_file, tmp_path):
    # the constructed case of the API test above, through the command line
    models_file.write_text(models_file.read_text() + SHARP_TEACHER)
    spec = f"{models_file}:"
    for name, kwargs in [("train", '{"n": 32}'), ("eval", '{"n": 256, "seed": 1}')]:
        assert run_cli("dump-teacher", "--teacher", spec + "sharp_teacher", "--dataset", spec + "dataset",
                       "--dataset-kwargs", kwargs, "--out", str(tmp_path / name), "--no-progress").returncode == 0
    run = run_cli("train-student", "--student", spec + "Student", "--student-kwargs", '{"width": 128}', "--dataset",
                  spec + "dataset", "--dataset-kwargs", '{"n": 32}', "--cache", str(tmp_path / "train"),
                  "--eval-dataset", spec + "dataset", "--eval-dataset-kwargs", '{"n": 256, "seed": 1}', "--eval-cache",
                  str(tmp_path / "eval"), "--epochs", "20", "--batch-size", "16", "--lr", "0.01", "--temperature", "1",
                  "--alpha", "1", "--out", str(tmp_path / "run"), "--no-progress")
    assert run.returncode == 0, run.stderr
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= m["agree"] <= 1 and m["eval_kl"] >= 0 for m in metrics)
    warned = [line for line in run.stderr.splitlines() if "warning" in line]
    assert len(warned) == 1 and warned[0].startswith("kdcache: warning: the student is fitting the cached rows")
    assert "(--views;" in warned[0]


SHARP_TEACHER = """

def sharp_teacher():
    t = teacher(seed=0)
    with torch.no_grad():
        t.head.weight.mul_(8)
    return t
"""
