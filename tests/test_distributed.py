"""Scale-out: torchrun multi-process dumps equal single-process ones; DDP training runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import run_cli, store_files

# one torchrun at a time (two ranks each, on a 2-core box): scripts/test.sh runs --dist loadgroup
pytestmark = pytest.mark.xdist_group("torchrun")


def torchrun(*args: str, procs: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
                           "-m", "kdcache", *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("extra", [[], ["--views", "2", "--hidden", "body"], ["--head", "head"]])
def test_two_process_gloo_dump_equals_single_process_dump(tmp_path, models_file, extra):
    spec = f"{models_file}:"
    args = ["dump-teacher", "--teacher", spec + "teacher", "--dataset", spec + "dataset", "--block-rows", "32",
            "--batch-size", "16", "--no-progress", *extra]
    if "--views" in extra:
        args[4] = spec + "augmented"
    one = run_cli(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = torchrun(*[a for a in args if a != "--no-progress"], "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert store_files(tmp_path / "one") == store_files(tmp_path / "two")
    assert two.stdout.splitlines() == [str(tmp_path / "two")]  # once, not once per rank
    rows = 48 * 2 if "--views" in extra else 300  # one bar, over every rank's rows
    assert re.search(rf"100%\|\S+\| {rows}(\.0)?/{rows}(\.0)? ", two.stderr), two.stderr
    recorded = json.loads((tmp_path / "two" / "zarr.json").read_text())["attributes"]["kdcache"]
    assert recorded["complete"] and recorded["dump"]["processes"] == 2
    hit = torchrun(*args, "--out", str(tmp_path / "two"))
    assert hit.returncode == 0 and hit.stderr.count("cache hit") == 1, hit.stderr


def test_two_process_ddp_training_from_a_cache(tmp_path, models_file):
    spec = f"{models_file}:"
    dump = run_cli("dump-teacher", "--teacher", spec + "teacher", "--dataset", spec + "dataset", "--hidden", "body",
                   "--out", str(tmp_path / "c"), "--no-progress")
    assert dump.returncode == 0, dump.stderr
    run = torchrun("train-student", "--student", spec + "student", "--dataset", spec + "dataset", "--cache",
                   str(tmp_path / "c"), "--eval-dataset", spec + "dataset", "--epochs", "3", "--batch-size", "16",
                   "--hint", "body=body:mse@0.5", "--out", str(tmp_path / "run"), "--no-progress")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("student.pt") == 1 and run.stdout.count('"eval_acc"') == 1  # rank 0 alone prints
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3  # written once, by rank 0
    # 300 rows in batches of 16 = 19 batches: 9 per rank, the odd one dropped so both ranks step alike
    assert all(m["rows"] == 2 * 9 * 16 for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"] and 0 <= metrics[-1]["eval_acc"] <= 1
    assert (tmp_path / "run" / "student.pt").exists() and (tmp_path / "run" / "hints.pt").exists()
