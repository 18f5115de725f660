"""Stage two: train-student from the cache, with the teacher never loaded."""

from __future__ import annotations

import json

import pytest
import torch

import kdcache
from kdcache import CachedTeacherDataset, KdcacheError, KLDivLoss, collate
from kdcache.train import Hint, TrainConfig

from conftest import run_cli


@pytest.fixture()
def dumped(tmp_path, models):
    ds = models.dataset(300, unlabelled_from=200)
    teacher = models.teacher()
    cache = kdcache.dump_teacher(teacher, ds, tmp_path / "c", hidden=["body"], progress=False)
    return ds, teacher, cache


def test_kd_loss_and_gradients_from_cache_equal_online(dumped, models):
    ds, teacher, cache = dumped
    data = CachedTeacherDataset(ds, cache)
    inputs, labels, cached = collate(data.__getitems__(list(range(0, 300, 3))))
    losses, grads = [], []
    for teacher_logits in (cached["logits"], teacher(inputs).detach()):
        student = models.student()
        loss = KLDivLoss(temperature=4.0)(student(inputs), teacher_logits)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-2, atol=1e-4)


def test_training_is_deterministic_with_a_seed(dumped, models):
    ds, _, cache = dumped
    states = []
    for _ in range(2):
        student = models.student()
        kdcache.train_student(student, ds, cache, epochs=2, batch_size=32, seed=5, progress=False)
        states.append(student.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k])


def test_unlabelled_rows_contribute_only_kd(tmp_path, models):
    ds = models.dataset(120, unlabelled_from=0)  # no labels at all
    cache = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "u", progress=False)
    result = kdcache.train_student(models.student(), ds, cache, epochs=1, progress=False)
    assert result.final["ce"] == 0.0 and result.final["kd"] > 0
    student = models.student()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    kdcache.train_student(student, ds, epochs=1, progress=False)  # plain: nothing to learn from
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_loss_composition_matches_formula(dumped, models):
    ds, _, cache = dumped
    result = kdcache.train_student(models.student(), ds, cache, epochs=1, alpha=0.3, temperature=2.0,
                                   hints=[Hint("body", "body", "mse", 0.5)], progress=False, lr=1e-9)
    m = result.final
    assert m["loss"] == pytest.approx(0.3 * m["kd"] + 0.7 * m["ce"] + 0.5 * m["hint:body=body:mse@0.5"], rel=1e-4)


def test_hint_with_other_dims_learns_a_projection_saved_apart(dumped, models, tmp_path):
    ds, _, cache = dumped
    out = tmp_path / "run"
    result = kdcache.train_student(models.student(), ds, cache, epochs=6, hints=["body=body:mse@1.0"], out=out,
                                   lr=1e-2, progress=False)
    hints = torch.load(out / "hints.pt")
    weight = hints["body=body:mse@1"]["projection.weight"]
    assert weight.shape == (32, 8)  # student width 8 -> teacher width 32
    first, last = result.metrics[0]["hint:body=body:mse@1"], result.final["hint:body=body:mse@1"]
    assert last < first
    state = torch.load(out / "student.pt")["state_dict"]
    assert not any(k.startswith("projection") for k in state)


def test_unknown_hint_module_is_refused(dumped, models):
    ds, _, cache = dumped
    with pytest.raises(KdcacheError, match="student has no module 'bod'; close names: body"):
        kdcache.train_student(models.student(), ds, cache, hints=["bod=body"], progress=False)
    with pytest.raises(KdcacheError, match="holds no hidden output 'head'"):
        kdcache.train_student(models.student(), ds, cache, hints=["body=head"], progress=False)


def test_student_with_other_class_count_is_refused(dumped, models):
    ds, _, cache = dumped
    with pytest.raises(KdcacheError, match="vocabulary/class count must be 5"):
        kdcache.train_student(models.student(classes=6), ds, cache, progress=False)


def test_bad_settings_are_refused():
    with pytest.raises(KdcacheError, match="alpha must be within"):
        TrainConfig(alpha=1.5)
    with pytest.raises(KdcacheError, match="unknown training setting 'epoch'"):
        TrainConfig.from_mapping({"epoch": 3})
    with pytest.raises(KdcacheError, match="must look like"):
        Hint.parse("nonsense")


def test_cli_trains_from_cache_after_teacher_source_is_deleted(tmp_path, models_file):
    # the teacher lives in its own file; the student and data in another
    teacher_file = tmp_path / "teacher_only.py"
    teacher_file.write_text(models_file.read_text())
    cache = tmp_path / "cache"
    dump = run_cli("dump-teacher", "--teacher", f"{teacher_file}:teacher", "--dataset", f"{models_file}:dataset",
                   "--hidden", "body", "--out", str(cache), "--no-progress")
    assert dump.returncode == 0, dump.stderr
    teacher_file.unlink()
    out = tmp_path / "run"
    train = run_cli("train-student", "--student", f"{models_file}:student", "--dataset", f"{models_file}:dataset",
                    "--eval-dataset", f"{models_file}:dataset", "--cache", str(cache), "--epochs", "2",
                    "--hint", "body=body:cosine@0.1", "--out", str(out), "--no-progress")
    assert train.returncode == 0, train.stderr
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    for key in ("loss", "kd", "ce", "hint:body=body:cosine@0.1", "eval_acc", "eval_loss", "samples_per_s"):
        assert key in lines[-1]
    saved = torch.load(out / "student.pt")
    assert saved["spec"]["spec"] == f"{models_file}:student" and "head.weight" in saved["state_dict"]
    assert json.loads((out / "config.json").read_text())["cache"] == str(cache)


def test_cli_config_file_with_flags_overriding(tmp_path, models_file):
    config = tmp_path / "run.toml"
    config.write_text(f'student = "{models_file}:student"\ndataset = "{models_file}:dataset"\n'
                      f'epochs = 3\nlr = 0.01\ntemperature = 2.0\nbatch-size = 16\n')
    out = tmp_path / "run"
    result = run_cli("train-student", "--config", str(config), "--epochs", "1", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["lr"] == 0.01 and saved["batch_size"] == 16 and saved["temperature"] == 2.0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--cache", "{tmp}/nowhere"], "no cache at"),
    (["--hint", "body=body:l1"], "loss 'l1' is not one of"),
    (["--alpha", "2"], "alpha must be within"),
    (["--config", "{tmp}/missing.toml"], "cannot read --config"),
    (["--hint", "body=body"], "--hint needs teacher hidden states"),
])
def test_train_cli_errors_are_one_line(tmp_path, models_file, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = run_cli("train-student", "--student", f"{models_file}:student", "--dataset", f"{models_file}:dataset",
                     "--out", str(tmp_path / "o"), "--no-progress", *args)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_train_refuses_a_cache_of_another_dataset_via_cli(tmp_path, models_file):
    cache = tmp_path / "cache"
    assert run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                   "--out", str(cache), "--no-progress").returncode == 0
    result = run_cli("train-student", "--student", f"{models_file}:student", "--dataset", f"{models_file}:dataset",
                     "--dataset-kwargs", '{"edit_row": 125}', "--cache", str(cache), "--out", str(tmp_path / "o"),
                     "--no-progress")
    assert result.returncode == 2 and "dataset row 125 is not the input the teacher saw" in result.stderr


def test_seeded_cli_runs_give_identical_student_bytes_and_metrics(tmp_path, models_file):
    # the student spec names the class itself, which seeds nothing: only --seed can fix its weights
    cache = tmp_path / "cache"
    assert run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                   "--hidden", "body", "--out", str(cache), "--no-progress").returncode == 0
    runs = []
    for name, seed in [("a", "3"), ("b", "3"), ("c", "4")]:
        out = tmp_path / name
        done = run_cli("train-student", "--student", f"{models_file}:Student", "--dataset", f"{models_file}:dataset",
                       "--cache", str(cache), "--hint", "body=body:mse@0.1", "--epochs", "2", "--seed", seed,
                       "--device", "cpu", "--out", str(out), "--no-progress")
        assert done.returncode == 0, done.stderr
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        for m in metrics:  # wall-clock figures aside
            del m["seconds"], m["samples_per_s"]
        runs.append(((out / "student.pt").read_bytes(), (out / "hints.pt").read_bytes(), metrics))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]


def test_a_student_given_as_a_callable_is_built_under_the_seed(dumped, models):
    ds, _, cache = dumped
    results = [kdcache.train_student(models.Student, ds, cache, epochs=1, seed=seed, progress=False) for seed in (7, 7)]
    a, b = (r.student.state_dict() for r in results)
    assert all(torch.equal(a[k], b[k]) for k in a)
