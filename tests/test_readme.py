"""README as a user reads it: every Python snippet and the minimal example run as written, and the
page stays a front page (short, copy-pasteable, about the project, not about who worked on it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def section(heading: str) -> str:
    """The README's text from ``## heading`` to the next ``## ``."""
    return README.read_text().split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def api_example() -> str:
    """The first Python block under the README's "Python API" heading, as the README has it."""
    return blocks(section("Python API"), "python")[0]


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_the_readme_api_example_runs_twice_in_a_row(tmp_path):
    code = api_example()
    assert "digits.trained_teacher()" in code and "dump_teacher" in code
    runs = [run_python(code, tmp_path) for _ in range(2)]
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


def test_the_integration_snippets_run_as_written(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("trl")
    pytest.importorskip("lightning")
    snippets = blocks(section("Integrations"), "python")
    assert [("KDTrainer(" in s, "trl.SFTTrainer" in s, "lightning.Trainer" in s) for s in snippets] == [
        (True, False, False), (False, True, False), (False, False, True)]
    outputs = []
    for code in snippets:  # in one directory, as a reader would: the second dump is a cache hit
        run = run_python(code, tmp_path)
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-3000:]
        outputs.append(run)
    for run in outputs[:2]:
        loss = float(run.stdout.rsplit("training loss ", 1)[1])
        assert 0 < loss < 20
    assert "cache hit: kdcache-store/tinylm" in outputs[1].stderr
    assert float(outputs[2].stdout.rsplit("student test accuracy: ", 1)[1]) > 0.9  # a sensible lr


@pytest.mark.skipif(shutil.which("kdcache", path=str(Path(sys.executable).parent)) is None,
                    reason="the kdcache command is not installed beside this Python")
def test_the_minimal_example_runs_as_written(tmp_path):
    pytest.importorskip("matplotlib")
    script = blocks(section("A minimal example"), "bash")[0]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "warning" not in run.stderr
    assert "checkpoint   runs/teacher/student.pt" in run.stdout  # kdcache info "$CACHE"
    for seed in (0, 1):
        epochs = [json.loads(line) for line in (tmp_path / f"runs/s{seed}/metrics.jsonl").read_text().splitlines()]
        assert len(epochs) == 60 and epochs[-1]["eval_acc"] > 0.9
    assert (tmp_path / "runs.png").read_bytes().startswith(b"\x89PNG")


def test_the_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 400
    headings = re.findall(r"^## (.+)$", text, re.M)
    for wanted in ("Install", "The two commands", "A minimal example", "The command line", "Python API",
                   "Integrations", "The cache format in brief", "How it compares, and when not to use it"):
        assert any(h.startswith(wanted) for h in headings), wanted
    for name in ("torchdistill", "DistillKit", "Megatron-LM", "Axolotl", "MaxText", "on-policy", "GKD"):
        assert name in section("How it compares, and when not to use it"), name
    assert "source .venv/bin/activate" in section("Install")
    commands = "\n".join(blocks(text, "bash"))
    assert not re.search(r"<[\w.-]+>", commands), "a placeholder that a shell reads as a redirection"
    assert not re.search(r"pip install '?kdcache\[", text), "kdcache is not on a package index"


def test_readme_and_docs_speak_of_the_project_only():
    words = re.compile(r"\b(sessions?|engineers?|the lead|helpers?)\b", re.IGNORECASE)
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        found = words.findall(page.read_text())
        assert not found, f"{page.name}: {found}"
