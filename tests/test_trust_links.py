"""Links and special files planted in or beside a cache (issue "A shared cache can be trusted,
round three"): nothing outside a cache is read as a cache file, written, truncated or deleted,
and no FIFO or /dev/zero hangs a command or eats its memory. One test per finding; every CLI
case is one line on stderr, its exit code, and the outside file or directory untouched."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import kdcache
from kdcache import KdcacheError, TeacherCache

from conftest import run_cli
from test_trust import _chunk_file, _dump_cli, _one_line

QUICK = 60  # seconds: a hang fails fast instead of blocking the run


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _user_dir(tmp_path: Path) -> Path:
    """A user's directory that a planted link points at."""
    mine = tmp_path / "mine"
    (mine / "c" / "0").mkdir(parents=True)
    (mine / "mine.partial").write_text("a download in progress")
    (mine / "c" / "0" / "download.partial").write_text("another")
    (mine / "notes.txt").write_text("keep")
    return mine


def _killed_dump(models_file: Path, out: Path) -> None:
    """A dump of 5 blocks killed after its second: a cache the same command resumes."""
    killed = run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                     "--block-rows", "64", "--out", str(out), "--no-progress", env={"KDCACHE_KILL_AT": "block:2"})
    assert killed.returncode == -9, killed.stderr


# 1. the lock beside the cache ---------------------------------------------------------------------
def test_a_lock_file_planted_as_a_link_is_refused_and_its_target_untouched(tmp_path, models_file):
    notes = tmp_path / "notes.txt"
    notes.write_text("years of notes")
    (tmp_path / "x.lock").symlink_to(notes)
    line = _one_line(_dump_cli(models_file, tmp_path / "x"))
    assert "x.lock" in line and "symbolic link" in line
    assert notes.read_text() == "years of notes" and not (tmp_path / "x").exists()


def test_import_refuses_a_lock_file_planted_as_a_link(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("years of notes")
    source = tmp_path / "v.jsonl"
    source.write_text('{"prompt_token_ids": [1, 2, 3], "prompt_logprobs": [null, {"2": -0.1, "4": -2.5}, '
                      '{"3": -0.2, "1": -1.9}]}\n')
    (tmp_path / "x.lock").symlink_to(notes)
    line = _one_line(run_cli("import", "vllm", str(source), "--out", str(tmp_path / "x"), "--vocab-size", "8"))
    assert "x.lock" in line and notes.read_text() == "years of notes" and not (tmp_path / "x").exists()


# 2. links inside the cache: never written through, deleted through or read as cache files ------------
def test_repair_replaces_a_linked_chunk_directory_without_writing_into_its_target(tmp_path, models_file):
    assert _dump_cli(models_file, tmp_path / "c", "--block-rows", "64").returncode == 0
    mine = _user_dir(tmp_path)
    before = _snapshot(mine)
    shutil.rmtree(tmp_path / "c" / "logits" / "c")
    (tmp_path / "c" / "logits" / "c").symlink_to(mine, target_is_directory=True)
    verified = run_cli("verify", str(tmp_path / "c"), timeout=QUICK)
    assert verified.returncode == 1 and "symbolic link" in verified.stdout, verified.stdout + verified.stderr
    repaired = _dump_cli(models_file, tmp_path / "c", "--block-rows", "64", "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert _snapshot(mine) == before
    assert not (tmp_path / "c" / "logits" / "c").is_symlink()
    assert run_cli("verify", str(tmp_path / "c")).returncode == 0


def test_a_resumed_dump_refuses_a_linked_chunk_directory_and_writes_nothing_into_its_target(tmp_path, models_file):
    _killed_dump(models_file, tmp_path / "c")
    mine = _user_dir(tmp_path)
    before = _snapshot(mine)
    for f in (tmp_path / "c" / "logits" / "c").iterdir():
        shutil.rmtree(f)
    os.rmdir(tmp_path / "c" / "logits" / "c")
    (tmp_path / "c" / "logits" / "c").symlink_to(mine, target_is_directory=True)
    line = _one_line(_dump_cli(models_file, tmp_path / "c", "--block-rows", "64"))
    assert "logits/c is a symbolic link" in line and "--repair" in line
    assert _snapshot(mine) == before


def test_the_partial_file_clean_up_never_deletes_through_a_linked_array_directory(tmp_path, models_file):
    _killed_dump(models_file, tmp_path / "c")
    mine = _user_dir(tmp_path)
    shutil.copy(tmp_path / "c" / "logits" / "zarr.json", mine / "zarr.json")  # as the array's own directory
    before = _snapshot(mine)
    shutil.rmtree(tmp_path / "c" / "logits")
    (tmp_path / "c" / "logits").symlink_to(mine, target_is_directory=True)
    line = _one_line(_dump_cli(models_file, tmp_path / "c", "--block-rows", "64"))
    assert "logits is a symbolic link" in line
    assert _snapshot(mine) == before
    repaired = _dump_cli(models_file, tmp_path / "c", "--block-rows", "64", "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert _snapshot(mine) == before and not (tmp_path / "c" / "logits").is_symlink()
    assert run_cli("verify", str(tmp_path / "c")).returncode == 0


def test_a_chunk_file_linked_to_an_outside_copy_is_damage_not_data(tmp_path, models):
    kdcache.dump_teacher(models.teacher(), models.dataset(300), tmp_path / "c", hidden=["body"], block_rows=64,
                         progress=False, log=lambda m: None)
    chunk = _chunk_file(tmp_path / "c", "hidden/body", 2)
    outside = tmp_path / "outside.bin"
    shutil.move(chunk, outside)  # the very bytes, only reached through a link
    chunk.symlink_to(outside)
    verified = run_cli("verify", str(tmp_path / "c"), timeout=QUICK)
    assert verified.returncode == 1 and "BAD hidden/body chunk 2" in verified.stdout
    assert "symbolic link" in verified.stdout
    with pytest.raises(KdcacheError, match="symbolic link"):
        kdcache.CachedTeacherDataset(models.dataset(300), tmp_path / "c", in_memory=True)


# 3. special files where metadata belongs: no hang, no unbounded read ----------------------------------
def test_a_fifo_as_the_root_description_is_one_line_for_every_command(tmp_path, models_file):
    assert _dump_cli(models_file, tmp_path / "c").returncode == 0
    (tmp_path / "c" / "zarr.json").unlink()
    os.mkfifo(tmp_path / "c" / "zarr.json")
    for args in (("info",), ("verify",), ("report", "--out", str(tmp_path / "r"))):
        line = _one_line(run_cli(*args, str(tmp_path / "c"), timeout=QUICK))
        assert "zarr.json" in line and "FIFO" in line, line
    assert "FIFO" in _one_line(_dump_cli(models_file, tmp_path / "c"))


def test_a_fifo_as_an_array_description_is_one_line_and_repair_restores_it(tmp_path, models_file):
    assert _dump_cli(models_file, tmp_path / "c").returncode == 0
    (tmp_path / "c" / "logits" / "zarr.json").unlink()
    os.mkfifo(tmp_path / "c" / "logits" / "zarr.json")
    for command in ("info", "verify"):
        assert "logits/zarr.json is a FIFO" in _one_line(run_cli(command, str(tmp_path / "c"), timeout=QUICK))
    repaired = _dump_cli(models_file, tmp_path / "c", "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert run_cli("verify", str(tmp_path / "c")).returncode == 0


def test_one_fifo_cache_does_not_hang_ls_of_a_whole_root(tmp_path, models):
    for name in ("a", "b", "z"):
        kdcache.dump_teacher(models.teacher(), models.dataset(50), tmp_path / "root" / name, progress=False,
                             log=lambda m: None)
    (tmp_path / "root" / "b" / "zarr.json").unlink()
    os.mkfifo(tmp_path / "root" / "b" / "zarr.json")
    os.mkfifo(tmp_path / "root" / "a" / "_blocks" / "c" / "0" / "1.fifo")  # a stray: not a chunk name
    listed = run_cli("ls", str(tmp_path / "root"), timeout=QUICK)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 3 and "complete" in lines[0] and "unreadable" in lines[1] and "FIFO" in lines[1]


def test_a_description_linked_to_dev_zero_is_read_bounded_and_overwrite_replaces_the_cache(tmp_path, models_file):
    assert _dump_cli(models_file, tmp_path / "c").returncode == 0
    (tmp_path / "c" / "zarr.json").unlink()
    (tmp_path / "c" / "zarr.json").symlink_to("/dev/zero")
    assert "symbolic link" in _one_line(run_cli("info", str(tmp_path / "c"), timeout=QUICK))
    replaced = _dump_cli(models_file, tmp_path / "c", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert TeacherCache.open(tmp_path / "c").complete
