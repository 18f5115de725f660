"""Integrity and concurrency: corrupt chunks are found, one writer per cache, readers wait for dumps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import kdcache
from kdcache import CachedTeacherDataset, KdcacheError, TeacherCache
from kdcache.store import FORMAT_VERSION, DumpLock, dump_in_progress

from conftest import run_cli


@pytest.fixture()
def cache_dir(tmp_path, models):
    kdcache.dump_teacher(models.teacher(), models.dataset(300), tmp_path / "c", hidden=["body"], block_rows=64,
                         progress=False)
    return tmp_path / "c"


def _chunk(cache_dir: Path, array: str, index: int) -> Path:
    return cache_dir / array / "c" / str(index) / "0"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_chunk_is_reported_by_verify_and_refused_by_readers(cache_dir, models, damage):
    chunk = _chunk(cache_dir, "logits", 2)
    raw = bytearray(chunk.read_bytes())
    if damage == "flip":
        raw[7] ^= 0x01
        chunk.write_bytes(bytes(raw))
    elif damage == "truncate":
        chunk.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        chunk.unlink()
    result = run_cli("verify", str(cache_dir))
    assert result.returncode == 1
    assert "BAD logits chunk 2 (rows 128..191)" in result.stdout
    with pytest.raises(KdcacheError, match="logits"):
        data = CachedTeacherDataset(models.dataset(300), cache_dir)
        for _ in data.loader(64, shuffle=False):
            pass


def test_verify_passes_an_intact_cache(cache_dir):
    result = run_cli("verify", str(cache_dir))
    assert result.returncode == 0 and result.stdout.startswith("ok:")


def test_verify_of_an_incomplete_cache_says_so_first_and_lists_only_damage(tmp_path, models):
    with pytest.raises(RuntimeError, match="simulated crash"):  # blocks 0-2 written, 3-4 not
        kdcache.dump_teacher(models.teacher(), models.failing_dataset(300, fail_at=200), tmp_path / "c",
                             hidden=["body"], block_rows=64, batch_size=32, progress=False)
    result = run_cli("verify", str(tmp_path / "c"))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines == [f"cache {tmp_path / 'c'} is incomplete: 3 of 5 blocks written; rerun its dump-teacher command "
                     "to finish it"]  # the unwritten blocks' chunks are not there yet: that is no damage
    _chunk(tmp_path / "c", "logits", 1).unlink()  # a written block loses a chunk: that is damage
    lines = run_cli("verify", str(tmp_path / "c")).stdout.splitlines()
    assert "is incomplete" in lines[0] and "is damaged: 1 missing, corrupt or misplaced chunks" in lines[1]
    assert lines[2:] == ["BAD logits chunk 1 (rows 64..127): chunk file is missing"]


def test_reader_refuses_a_cache_under_a_running_dump(cache_dir, models):
    lock = DumpLock(cache_dir)
    lock.acquire()
    try:
        meta_file = cache_dir / "zarr.json"
        text = meta_file.read_text()
        meta_file.write_text(text.replace('"complete": true', '"complete": false'))
        assert dump_in_progress(cache_dir) is not None
        with pytest.raises(KdcacheError, match="still being written \\(dump in progress: pid"):
            CachedTeacherDataset(models.dataset(300), cache_dir)
    finally:
        lock.release()
    assert dump_in_progress(cache_dir) is None


def test_two_dumps_started_at_once_write_once(tmp_path, models_file):
    args = [sys.executable, "-m", "kdcache", "dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset",
            f"{models_file}:dataset", "--dataset-kwargs", '{"n": 3000}', "--batch-size", "16", "--block-rows", "64",
            "--out", str(tmp_path / "c"), "--no-progress"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    errs = "".join(err for _, err in outs)
    assert errs.count("wrote ") == 1 and "cache hit" in errs
    assert TeacherCache.open(tmp_path / "c").complete


def test_a_store_being_created_is_waited_for_not_refused(tmp_path, models):
    """The instant between a dump creating the zarr group and writing its attrs: readers are
    told a dump is in progress, a second dump waits for the lock (it used to fail)."""
    import shutil
    import threading

    import zarr
    path = tmp_path / "c"
    lock = DumpLock(path)
    lock.acquire()
    zarr.open_group(str(path), mode="w", zarr_format=3)  # all a creating dump has written so far
    result: dict = {}
    second = threading.Thread(target=lambda: result.update(cache=kdcache.dump_teacher(
        models.teacher(), models.dataset(100), path, progress=False, log=lambda m: None)))
    try:
        with pytest.raises(KdcacheError, match="still being written"):
            CachedTeacherDataset(models.dataset(100), path)
        second.start()
        second.join(timeout=2)
        assert second.is_alive() and not result  # waiting on the lock, not refusing the store
        shutil.rmtree(path)  # the first dump gives up; the second must then write the cache itself
    finally:
        lock.release()
    second.join(timeout=60)
    assert result["cache"].complete and result["cache"].rows == 100


def test_lock_of_a_killed_dump_is_recovered(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from kdcache.store import DumpLock; DumpLock(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(60)"), str(tmp_path / "c")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    assert f"pid {holder.pid}" in (dump_in_progress(tmp_path / "c") or "")
    with pytest.raises(KdcacheError, match="another dump"):
        DumpLock(tmp_path / "c").acquire(wait=False)
    holder.kill()
    holder.wait()
    lock = DumpLock(tmp_path / "c")
    lock.acquire(wait=False)  # the kernel dropped the dead holder's lock
    lock.release()


def test_newer_format_version_is_refused(cache_dir):
    meta_file = cache_dir / "zarr.json"
    meta_file.write_text(meta_file.read_text().replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 99'))
    with pytest.raises(KdcacheError, match="newer kdcache \\(cache format 99"):
        TeacherCache.open(cache_dir)


def test_unwritable_path_is_a_clear_error(tmp_path, models_file):
    if os.geteuid() == 0:
        target = "/proc/kdcache-cannot-write-here"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = str(tmp_path / "ro" / "c")
    result = run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                     "--out", target, "--no-progress")
    assert result.returncode == 2 and "kdcache: error:" in result.stderr and "Traceback" not in result.stderr


KILL_POINTS = (["created:1", "finalize:1"] + [f"batch:{n}" for n in (1, 2, 3, 4, 5, 8, 10, 13, 16, 19)]
               + [f"array-written:{n}" for n in (1, 2, 4, 7)] + [f"block:{n}" for n in (1, 2, 3, 5)])


@pytest.mark.slow
def test_sigkill_at_20_points_resumes_to_byte_identical_cache_and_no_reader_accepts_partial(tmp_path, models_file,
                                                                                              models):
    from conftest import store_files
    code = ("import sys, kd_models, kdcache; kdcache.dump_teacher(kd_models.teacher(), kd_models.dataset(300), "
            "sys.argv[1], hidden=['body'], batch_size=16, block_rows=64, writer_threads=2, progress=False)")
    env = {**os.environ, "PYTHONPATH": f"{models_file.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "ref")], env=env).returncode == 0
    reference = store_files(tmp_path / "ref")
    assert len(KILL_POINTS) >= 20
    for point in KILL_POINTS:
        target = tmp_path / point.replace(":", "-")
        killed = subprocess.run([sys.executable, "-c", code, str(target)], env={**env, "KDCACHE_KILL_AT": point},
                                capture_output=True)
        assert killed.returncode == -9, (point, killed.stderr[-500:])
        if TeacherCache.exists(target):
            with pytest.raises(KdcacheError, match="incomplete"):
                CachedTeacherDataset(models.dataset(300), target)
        resumed = subprocess.run([sys.executable, "-c", code, str(target)], env=env, capture_output=True)
        assert resumed.returncode == 0, (point, resumed.stderr[-500:])
        assert store_files(target) == reference, point


@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_is_a_clear_error_and_the_dump_resumes_once_space_is_back(tmp_path, models_file, small_disk):
    from conftest import store_files
    args = ["dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
            "--dataset-kwargs", '{"n": 3000}', "--hidden", "body", "--block-rows", "256", "--writer-threads", "1",
            "--no-progress"]
    assert run_cli(*args, "--out", str(tmp_path / "ref")).returncode == 0
    full = run_cli(*args, "--out", str(small_disk / "c"))
    assert full.returncode == 2, full.stderr
    lines = [l for l in full.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "disk is full" in lines[0] and "rerun the same command to resume" in lines[0]
    done_before = int(TeacherCache.open(small_disk / "c").blocks_record()[:, 0].sum())
    assert done_before >= 1  # finished blocks were kept
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    resumed = run_cli(*args, "--out", str(small_disk / "c"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done_before} of 12 blocks already written" in resumed.stderr
    assert store_files(small_disk / "c") == store_files(tmp_path / "ref")


def test_many_readers_train_from_one_cache_at_once(tmp_path, models_file):
    cache = tmp_path / "c"
    assert run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                   "--out", str(cache), "--no-progress").returncode == 0
    procs = [subprocess.Popen([sys.executable, "-m", "kdcache", "train-student", "--student", f"{models_file}:student",
                               "--dataset", f"{models_file}:dataset", "--cache", str(cache), "--epochs", "2",
                               "--seed", str(i), "--out", str(tmp_path / f"run{i}"), "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all((tmp_path / f"run{i}" / "student.pt").exists() for i in range(3))


def test_hidden_module_returning_a_tuple_is_reported_and_can_be_indexed(tmp_path):
    import torch
    from torch import nn

    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x.sum(1)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.pair(x)[0])

    ds = torch.utils.data.TensorDataset(torch.randn(20, 4), torch.randint(0, 3, (20,)))
    with pytest.raises(KdcacheError, match="hidden module 'pair' returns a tuple, not a tensor; pick element 0 with 'pair#0'"):
        kdcache.dump_teacher(Model(), ds, tmp_path / "a", hidden=["pair"], progress=False)
    cache = kdcache.dump_teacher(Model(), ds, tmp_path / "b", hidden=["pair#0"], progress=False)
    assert cache.outputs["pair#0"].shape == (4,)


def test_non_tensor_teacher_output_is_reported(tmp_path):
    import torch
    from torch import nn

    class Words(nn.Module):
        def forward(self, x):
            return "not logits"

    ds = torch.utils.data.TensorDataset(torch.randn(10, 4))
    with pytest.raises(KdcacheError, match="the teacher returns a str"):
        kdcache.dump_teacher(Words(), ds, tmp_path / "c", progress=False)


def test_dataset_items_of_differing_shapes_are_reported(tmp_path, models):
    import torch

    class Ragged(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.randn(12 if i < 5 else 13), 0

    with pytest.raises(KdcacheError, match="cannot be batched"):
        kdcache.dump_teacher(models.teacher(), Ragged(), tmp_path / "c", batch_size=10, progress=False)
