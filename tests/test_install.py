"""README's Install steps from a fresh clone, then ``kdcache --help`` in a new shell, as written.

The steps run word for word in bash. Only the network is replaced: pip may not download
(``PIP_NO_INDEX``), and the packages it would fetch (torch, typer, zarr, setuptools for the
build, ...) come from the environment running the tests, on ``PYTHONPATH``. kdcache itself is
installed from the clone, and the test checks that the ``kdcache`` command runs the clone's code.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from test_readme import blocks, section

ROOT = Path(__file__).resolve().parent.parent


def install_steps() -> str:
    """The Install section's first bash block, as the README has it."""
    return blocks(section("Install"), "bash")[0]


def offline_env(home: Path) -> dict[str, str]:
    """A shell with nothing of this test run's environment but PATH's system part and, standing in
    for the package index, the test environment's site-packages."""
    return {"HOME": str(home), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
            "PYTHONPATH": sysconfig.get_paths()["purelib"], "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def source_repo(tmp_path: Path) -> Path:
    """A git repository of the checkout's committed files (the checkout itself when it is one)."""
    if (ROOT / ".git").exists() and subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                                   capture_output=True).returncode == 0:
        return ROOT
    repo = tmp_path / "origin"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", "*.egg-info", "__pycache__", "kdcache-store"))
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, capture_output=True)
    return repo


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_install_steps_put_kdcache_on_path_in_a_new_shell(tmp_path):
    steps = install_steps()
    assert "git clone" in steps and "python3 -m venv .venv" in steps and "source .venv/bin/activate" in steps
    home = tmp_path / "home"
    home.mkdir()
    # python3 on PATH is the interpreter of this test run, as a user's python3 >= 3.11 would be
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python3").symlink_to(Path(sys.executable).resolve())
    env = offline_env(home)
    env["PATH"] = f"{shim}:{env['PATH']}"
    env["REPO"] = str(source_repo(tmp_path))
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", steps], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Usage: kdcache" in run.stdout
    clone = tmp_path / "kdcache"
    # a new shell: nothing from the first one but the files it left
    again = subprocess.run(["bash", "-c", "source .venv/bin/activate && command -v kdcache && kdcache --help && "
                            "python -c 'import kdcache; print(kdcache.__file__)'"],
                           cwd=clone, env=offline_env(home), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stdout.splitlines()
    assert lines[0] == str(clone / ".venv" / "bin" / "kdcache")
    assert "dump-teacher" in again.stdout and "train-student" in again.stdout
    assert Path(lines[-1]).resolve() == (clone / "kdcache" / "__init__.py").resolve()  # the clone's code
