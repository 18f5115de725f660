"""The README's Python API example runs as written, twice in a row (the second time a cache hit)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def api_example() -> str:
    """The first Python block under the README's "Python API" heading, as the README has it."""
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_api_example_runs_twice_in_a_row(tmp_path):
    code = api_example()
    assert "digits.trained_teacher()" in code and "dump_teacher" in code
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs = [subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert "Traceback" not in run.stderr
    first, second = runs
    assert "wrote kdcache-store/digits" in first.stderr
    assert "cache hit: kdcache-store/digits" in second.stderr  # the same seeded teacher: the same fingerprint
    assert "TeacherCache('kdcache-store/digits', 1200 rows: logits (10,) float16, hidden/features (512,) float16; " \
           "complete" in first.stdout
    accuracy = [float(r.stdout.rsplit("student test accuracy: ", 1)[1]) for r in runs]
    assert accuracy[0] == accuracy[1] and accuracy[0] > 0.85  # a trained teacher, and a seeded student
