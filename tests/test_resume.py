"""train-student's --out: a run interrupted or killed resumes with --resume to the weights of an
uninterrupted run; an existing run or anyone else's files are never replaced without being asked."""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

import pytest

from conftest import run_cli

# a student with dropout (so the run draws from torch's generator every step) that sends itself a
# real SIGINT at its N-th training forward when KD_SIGINT_AT says so
MODELS = textwrap.dedent('''
    import os, signal
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    CALLS = [0]

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.3))
            self.head = nn.Linear(16, 5)
        def forward(self, x):
            if self.training:
                CALLS[0] += 1
                if CALLS[0] == int(os.environ.get("KD_SIGINT_AT", "0")):
                    os.kill(os.getpid(), signal.SIGINT)
            return self.head(self.body(x))

    def teacher():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 5))

    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 12, generator=g)
        return TensorDataset(x, (x[:, :5] * 3).argmax(1))
''')
EPOCHS, STEPS = 4, 8  # 256 rows in batches of 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One teacher cache (logits and the hidden state "1") for the module's runs."""
    where = tmp_path_factory.mktemp("teacher")
    (where / "m.py").write_text(MODELS)
    dumped = run_cli("dump-teacher", "--teacher", "m.py:teacher", "--dataset", "m.py:data", "--hidden", "1",
                     "--out", "cache", "--no-progress", cwd=where)
    assert dumped.returncode == 0, dumped.stderr
    return where / "cache"


@pytest.fixture()
def setup(tmp_path: Path, cache: Path):
    (tmp_path / "m.py").write_text(MODELS)
    return tmp_path, cache


def train(tmp_path: Path, cache: Path, out: str, *extra: str, env: dict | None = None):
    return run_cli("train-student", "--student", "m.py:Student", "--dataset", "m.py:data", "--cache", str(cache),
                   "--hint", "body.1=1:mse@0.5", "--epochs", str(EPOCHS), "--batch-size", "32", "--lr", "0.01",
                   "--seed", "3", "--out", out, "--no-progress", *extra, cwd=tmp_path, env=env)


def metrics(run: Path) -> list[dict]:
    timing = ("seconds", "samples_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def same_run(a: Path, b: Path) -> None:
    for name in ("student.pt", "hints.pt"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert metrics(a) == metrics(b)
    assert len(metrics(a)) == EPOCHS


def test_a_run_interrupted_by_sigint_resumes_to_the_weights_of_an_uninterrupted_run(setup):
    tmp_path, cache = setup
    whole = train(tmp_path, cache, "whole")
    assert whole.returncode == 0, whole.stderr
    stopped = train(tmp_path, cache, "parts", env={"KD_SIGINT_AT": str(2 * STEPS + 3)})  # in epoch 3
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        "kdcache: interrupted; interrupted in epoch 3 of 4; parts holds epoch 2: rerun the same command with --resume "
        "to continue from there")
    assert len(metrics(tmp_path / "parts")) == 2
    resumed = train(tmp_path, cache, "parts", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the run in parts" in resumed.stderr
    same_run(tmp_path / "whole", tmp_path / "parts")


def test_a_run_killed_between_its_epoch_files_resumes_from_the_last_whole_epoch(setup):
    tmp_path, cache = setup
    assert train(tmp_path, cache, "whole").returncode == 0
    # SIGKILL after epoch 2's metrics line, before its resume state: the run resumes after epoch 1
    killed = train(tmp_path, cache, "parts", env={"KDCACHE_KILL_AT": "run-metrics:2"})
    assert killed.returncode == -signal.SIGKILL
    assert len(metrics(tmp_path / "parts")) == 2
    resumed = train(tmp_path, cache, "parts", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    same_run(tmp_path / "whole", tmp_path / "parts")


def test_resume_with_more_epochs_continues_the_same_run(setup):
    tmp_path, cache = setup
    assert train(tmp_path, cache, "whole").returncode == 0
    short = run_cli("train-student", "--student", "m.py:Student", "--dataset", "m.py:data", "--cache", str(cache),
                    "--hint", "body.1=1:mse@0.5", "--epochs", "2", "--batch-size", "32", "--lr", "0.01", "--seed", "3",
                    "--out", "parts", "--no-progress", cwd=tmp_path)
    assert short.returncode == 0, short.stderr
    assert train(tmp_path, cache, "parts", "--resume").returncode == 0
    same_run(tmp_path / "whole", tmp_path / "parts")


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_a_second_run_into_the_same_out_is_refused_and_changes_nothing(setup):
    tmp_path, cache = setup
    assert train(tmp_path, cache, "run").returncode == 0
    before = snapshot(tmp_path / "run")
    again = train(tmp_path, cache, "run")
    assert again.returncode == 2
    assert again.stderr.strip() == ("kdcache: error: --out run holds a train-student run (4 of 4 epochs finished): "
                                    "pass --resume to continue it, --overwrite to start it again, or choose another --out")
    assert snapshot(tmp_path / "run") == before
    other = train(tmp_path, cache, "run", "--resume", "--lr", "0.1")  # not the same run: refused too
    assert other.returncode == 2 and "was started with lr 0.01, this one gives 0.1" in other.stderr
    assert snapshot(tmp_path / "run") == before


def test_a_folder_of_other_files_is_refused_even_with_overwrite(setup):
    tmp_path, cache = setup
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "student.pt").write_text("my own file")
    for flags in ((), ("--overwrite",), ("--resume",)):
        refused = train(tmp_path, cache, "mine", *flags)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "holds files that are not a train-student run (student.pt)" in refused.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["student.pt"]
    assert (mine / "student.pt").read_text() == "my own file"


def test_overwrite_removes_only_the_previous_runs_own_files(setup):
    tmp_path, cache = setup
    assert train(tmp_path, cache, "run").returncode == 0
    (tmp_path / "run" / "notes.txt").write_text("kept")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 1}\n' * 9)
    again = train(tmp_path, cache, "run", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "run" / "notes.txt").read_text() == "kept"
    assert len(metrics(tmp_path / "run")) == EPOCHS


def test_resume_where_there_is_no_run_is_refused(setup):
    tmp_path, cache = setup
    refused = train(tmp_path, cache, "nothing", "--resume")
    assert refused.returncode == 2 and "there is no run in --out nothing to resume" in refused.stderr
    assert not (tmp_path / "nothing").exists()


def test_python_callers_are_told_argument_names(tmp_path):
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    import kdcache

    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    kdcache.train_student(nn.Linear(4, 2), data, out=tmp_path / "r", epochs=1, progress=False)
    with pytest.raises(kdcache.KdcacheError, match=r"pass resume=True to continue it, overwrite=True to start it again"):
        kdcache.train_student(nn.Linear(4, 2), data, out=tmp_path / "r", epochs=1, progress=False)
