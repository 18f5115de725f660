"""A cache from elsewhere is untrusted input: no code runs from it, no wrong target leaves it,
no user file is deleted, and every failure is one line. One test (or more) per finding of the
hostile review (issue "A shared cache can be trusted")."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import kdcache
from kdcache import CachedTeacherDataset, KdcacheError, TeacherCache
from kdcache.store import plan_blocks

from conftest import run_cli, store_files


def _one_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code and len(lines) == 1, result.stderr
    assert lines[0].startswith("kdcache: error:") and "Traceback" not in result.stderr
    return lines[0]


def _dump_cli(models_file: Path, out: Path, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                   "--out", str(out), "--no-progress", *extra, cwd=cwd)


def _rewrite_attrs(cache: Path, edit) -> None:
    """Edit a cache's description as an attacker would: with a digest that matches again."""
    doc = json.loads((cache / "zarr.json").read_text())
    attrs = doc["attributes"]["kdcache"]
    edit(attrs)
    if "attrs_digest" in attrs:
        from kdcache.format.attrs import _attrs_digest
        attrs["attrs_digest"] = _attrs_digest(attrs)
    (cache / "zarr.json").write_text(json.dumps(doc))


def _chunk_file(cache: Path, array: str, index: int) -> Path:
    return next(cache.joinpath(array, "c", str(index)).rglob("*")) if cache.joinpath(array, "c", str(index)).is_dir() \
        else cache / array / "c" / str(index)


@pytest.fixture()
def cache_dir(tmp_path, models):
    kdcache.dump_teacher(models.teacher(), models.dataset(300), tmp_path / "c", hidden=["body"], block_rows=64,
                         progress=False, log=lambda m: None)
    return tmp_path / "c"


# 1. code execution ----------------------------------------------------------------------------
def test_verify_replay_never_runs_the_dataset_a_cache_names(tmp_path, models_file):
    assert _dump_cli(models_file, tmp_path / "c").returncode == 0
    marker = tmp_path / "pwned"
    _rewrite_attrs(tmp_path / "c", lambda a: a["dataset"].update(
        spec="subprocess:run", kwargs={"args": f"touch {marker}", "shell": True}))
    result = run_cli("verify", str(tmp_path / "c"), "--replay", "3")
    line = _one_line(result)
    assert "--replay needs --dataset" in line and "subprocess:run" in line and not marker.exists()
    assert run_cli("info", str(tmp_path / "c")).returncode == 0 and not marker.exists()


# 2. --overwrite deletes only kdcache caches ----------------------------------------------------
def test_overwrite_never_deletes_a_directory_kdcache_did_not_write(tmp_path, models_file):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    refused = _dump_cli(models_file, victim)
    assert "--overwrite" not in _one_line(refused)  # it does not advise deleting
    line = _one_line(_dump_cli(models_file, victim, "--overwrite"))
    assert "not a kdcache cache" in line and (victim / "thesis.tex").read_text() == "years of work"


def test_overwrite_of_the_working_directory_or_a_file_is_refused(tmp_path, models_file):
    (tmp_path / "notes.txt").write_text("keep")
    _one_line(_dump_cli(models_file, Path("."), "--overwrite", cwd=tmp_path))
    _one_line(_dump_cli(models_file, tmp_path / "notes.txt", "--overwrite"))
    (tmp_path / "sub").mkdir()
    _one_line(_dump_cli(models_file, Path(".."), "--overwrite", cwd=tmp_path / "sub"))
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_overwrite_refuses_a_cache_that_holds_someone_elses_file_and_follows_no_link(tmp_path, models_file):
    assert _dump_cli(models_file, tmp_path / "c").returncode == 0
    (tmp_path / "c" / "mine.txt").write_text("keep")
    line = _one_line(_dump_cli(models_file, tmp_path / "c", "--dataset-kwargs", '{"n": 50}', "--overwrite"))
    assert "'mine.txt'" in line and (tmp_path / "c" / "mine.txt").exists()
    (tmp_path / "c" / "mine.txt").unlink()
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "data").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _one_line(_dump_cli(models_file, tmp_path / "link", "--overwrite"))
    assert (tmp_path / "real" / "data").exists()
    replaced = _dump_cli(models_file, tmp_path / "c", "--dataset-kwargs", '{"n": 50}', "--overwrite")
    assert replaced.returncode == 0 and TeacherCache.open(tmp_path / "c").rows == 50  # a kdcache cache is replaced


# 3. config files and flags are typed -----------------------------------------------------------
@pytest.mark.parametrize("toml,message", [
    ('allow_input_mismatch = "no"', "allow_input_mismatch: must be true or false"),
    ("epochs = 2.5", "epochs: must be an integer"),
    ("batch_size = true", "batch_size: must be an integer"),
    ("student_kwargs = [1, 2]", "--student-kwargs must be a JSON object"),
    ("out = 5", "--out must be a string"),
    ("weight_decay = -1.0", "weight_decay must be >= 0"),
    ("lr = inf", "lr: must be a finite number"),
    ("temperature = inf", "temperature: must be a finite number"),
    ('device = "gpu"', "device"),
])
def test_train_config_values_are_checked_by_type_and_range(tmp_path, models_file, toml, message):
    assert _dump_cli(models_file, tmp_path / "c").returncode == 0
    config = tmp_path / "run.toml"
    config.write_text(f'student = "{models_file}:student"\ndataset = "{models_file}:dataset"\n'
                      f'cache = "{tmp_path / "c"}"\n{toml}\n')
    result = run_cli("train-student", "--config", str(config), "--dataset-kwargs", '{"n": 300, "edit_row": 3}',
                     "--no-progress", cwd=tmp_path)
    assert message in _one_line(result)
    assert not (tmp_path / "student-out" / "student.pt").exists()


def test_temperature_or_lr_inf_flags_are_refused(tmp_path, models_file):
    for flag, value in (("--temperature", "inf"), ("--lr", "inf"), ("--lr", "nan")):
        result = run_cli("train-student", "--student", f"{models_file}:student", "--dataset", f"{models_file}:dataset",
                         flag, value, "--no-progress", "--out", str(tmp_path / "run"))
        assert flag[2:] in _one_line(result)


# 4. chunks are bound to their cache and position ------------------------------------------------
def test_a_chunk_copied_from_another_cache_is_refused(tmp_path, models, models_file):
    kdcache.dump_teacher(models.teacher(), models.dataset(300), tmp_path / "a", block_rows=64, progress=False,
                         log=lambda m: None)
    kdcache.dump_teacher(models.teacher(seed=5), models.dataset(300), tmp_path / "b", block_rows=64, progress=False,
                         log=lambda m: None)
    shutil.copy(_chunk_file(tmp_path / "b", "logits", 1), _chunk_file(tmp_path / "a", "logits", 1))
    result = run_cli("verify", str(tmp_path / "a"))
    assert result.returncode == 1 and "BAD logits block 1 (rows 64..127)" in result.stdout
    assert "--repair" in result.stdout
    with pytest.raises(KdcacheError, match="not the rows this cache wrote there"):
        kdcache.train_student(models.student(), models.dataset(300), tmp_path / "a", epochs=1, progress=False)


def test_two_chunks_swapped_within_a_cache_are_refused(cache_dir, models):
    a, b = _chunk_file(cache_dir, "hidden/body", 0), _chunk_file(cache_dir, "hidden/body", 2)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    problems = TeacherCache.open(cache_dir).verify()
    assert {(p.array, p.chunk) for p in problems} == {("hidden/body", 0), ("hidden/body", 2)}
    for in_memory in (True, False):
        with pytest.raises(KdcacheError, match="hidden/body rows 0..63 are not the rows"):
            data = CachedTeacherDataset(models.dataset(300), cache_dir, in_memory=in_memory)
            for _ in data.loader(300, shuffle=False):
                pass


# 5. array metadata is checked against the description -------------------------------------------
@pytest.mark.parametrize("edit", [("endian", '"little"', '"big"'), ("data_type", '"float16"', '"int16"'),
                                  ("chunks", '"chunk_shape": [\n        64', '"chunk_shape": [\n        32')])
def test_an_edited_array_description_is_refused_in_one_line(cache_dir, models, edit):
    meta = cache_dir / "logits" / "zarr.json"
    text = meta.read_text()
    assert edit[1] in text, text
    meta.write_text(text.replace(edit[1], edit[2], 1))
    for command in ("info", "verify"):
        assert "logits" in _one_line(run_cli(command, str(cache_dir)))
    with pytest.raises(KdcacheError, match="array logits"):
        CachedTeacherDataset(models.dataset(300), cache_dir)


# 6. a chunk that disappears after a reader opened the cache --------------------------------------
def test_a_chunk_deleted_under_an_open_reader_is_an_error_naming_its_rows(cache_dir, models):
    data = CachedTeacherDataset(models.dataset(300), cache_dir, in_memory=False)
    _chunk_file(cache_dir, "logits", 3).unlink()
    with pytest.raises(KdcacheError, match="logits rows 192..255: the chunk file is missing"):
        for _ in data.loader(64, shuffle=False):
            pass


# 7. creation is crash-safe ------------------------------------------------------------------------
@pytest.mark.parametrize("point", ["created-group:1", "created-array:1", "created-array:3", "created:1"])
def test_a_dump_killed_while_creating_the_store_is_resumed_by_the_same_command(tmp_path, models_file, point):
    assert _dump_cli(models_file, tmp_path / "ref", "--hidden", "body").returncode == 0
    killed = run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                     "--hidden", "body", "--out", str(tmp_path / "c"), "--no-progress", env={"KDCACHE_KILL_AT": point})
    assert killed.returncode == -9
    if point == "created-group:1":  # what is left can also be replaced
        assert _dump_cli(models_file, tmp_path / "c", "--hidden", "body", "--overwrite").returncode == 0
    else:
        resumed = _dump_cli(models_file, tmp_path / "c", "--hidden", "body")
        assert resumed.returncode == 0, resumed.stderr
    assert store_files(tmp_path / "c") == store_files(tmp_path / "ref")


# 8. views caches read from disk; in_memory is not a truthy string --------------------------------
def test_a_views_cache_reads_the_same_from_disk_as_from_memory(tmp_path, models):
    ds = models.augmented(n=48)
    kdcache.dump_teacher(models.teacher(), ds, tmp_path / "v", views=4, seed=2, block_rows=16, progress=False,
                         log=lambda m: None)
    batches = {}
    for in_memory in ("yes", "no"):
        data = CachedTeacherDataset(ds, tmp_path / "v", in_memory=in_memory)
        assert data.in_memory == (in_memory == "yes")
        data.set_epoch(3)
        batches[in_memory] = data.__getitems__(list(range(48))).collated[2].logits
    assert torch.equal(batches["yes"], batches["no"])
    with pytest.raises(KdcacheError, match="in_memory must be"):
        CachedTeacherDataset(ds, tmp_path / "v", in_memory="nope")


# 9. hostile and damaged metadata: bounded, one line; ls keeps going; no raw control characters ----
def test_a_huge_shape_in_an_array_description_is_refused_quickly(cache_dir):
    meta = cache_dir / "logits" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"] = [10 ** 12, 5]
    meta.write_text(json.dumps(doc))
    for command in ("verify", "info"):
        assert "logits" in _one_line(run_cli(command, str(cache_dir), timeout=120))


def test_a_huge_row_count_in_the_description_is_refused_quickly(cache_dir):
    _rewrite_attrs(cache_dir, lambda a: a.update(rows=1 << 39, blocks=1 << 33) or a["dataset"].update(length=1 << 39))
    assert "beyond what kdcache writes" in _one_line(run_cli("verify", str(cache_dir), timeout=120))


def test_ls_lists_good_caches_and_one_line_per_broken_one(tmp_path, models):
    for name in ("a", "b", "z"):
        kdcache.dump_teacher(models.teacher(), models.dataset(50), tmp_path / "root" / name, progress=False,
                             log=lambda m: None)
    (tmp_path / "root" / "b" / "zarr.json").write_text("{not json")
    _rewrite_attrs(tmp_path / "root" / "z", lambda a: a["teacher"].update(spec="evil\x1b[2J\x1b[31m\rX"))
    listed = run_cli("ls", str(tmp_path / "root"))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 3 and "complete" in lines[0] and "unreadable" in lines[1] and "complete" in lines[2]
    assert "\x1b" not in listed.stdout and "\r" not in listed.stdout and "\\x1b[2J" in lines[2]
    info = run_cli("info", str(tmp_path / "root" / "z"))
    assert info.returncode == 0 and "\x1b" not in info.stdout and "\\x1b[31m" in info.stdout


def _flips(data: bytes, count: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(len(data) * 8, size=min(count, len(data) * 8), replace=False).tolist())


def test_single_bit_flips_of_every_metadata_file_give_correct_data_or_one_line(tmp_path, models):
    """Sampled bit flips (60 per zarr.json, different in each file) of a small top-k cache with a
    hidden output: each either reads exactly the original targets or raises KdcacheError (one
    line); never another exception, a hang or different data."""
    from kdcache.format import CacheMeta  # noqa: F401  (imported: the failure modes below go through it)
    ds = models.tokens(n=24)
    ref_path = tmp_path / "ref"
    kdcache.dump_teacher(models.tiny_lm(), ds, ref_path, topk=4, vocab_size=40, hidden=["rnn#0"], block_rows=8,
                         batch_size=8, progress=False, log=lambda m: None)

    def read(path: Path) -> list[np.ndarray]:
        cache = TeacherCache.open(path)
        problems = cache.verify()
        data = CachedTeacherDataset(ds, path, in_memory=True)
        targets = data.__getitems__(list(range(len(ds)))).collated[2]
        return [*(t.numpy() for t in targets.logits.__dict__.values()), targets.hidden["rnn#0"].numpy(),
                np.array([len(problems)])]

    reference = read(ref_path)
    files = sorted(ref_path.rglob("zarr.json"))
    assert len(files) == 11  # the group, 2 intermediate groups (topk, hidden), 8 arrays (packed: spans, blocks)
    outcomes = {"same": 0, "refused": 0}
    for n, file in enumerate(files):
        original = file.read_bytes()
        for bit in _flips(original, 60, n):
            flipped = bytearray(original)
            flipped[bit // 8] ^= 1 << (bit % 8)
            file.write_bytes(bytes(flipped))
            try:
                got = read(ref_path)
            except KdcacheError as err:
                assert "\n" not in str(err), (file, bit, str(err))
                outcomes["refused"] += 1
            else:
                assert all(np.array_equal(a, b) for a, b in zip(got, reference)), (file.relative_to(ref_path), bit)
                outcomes["same"] += 1
        file.write_bytes(original)
    assert outcomes["refused"] > 300 and sum(outcomes.values()) == 11 * 60


def test_bit_flipped_metadata_is_one_line_from_the_cli(cache_dir):
    rng = np.random.default_rng(0)
    for file in (cache_dir / "zarr.json", cache_dir / "logits" / "zarr.json"):
        original = file.read_bytes()
        for bit in rng.choice(len(original) * 8, size=2, replace=False):
            flipped = bytearray(original)
            flipped[bit // 8] ^= 1 << (bit % 8)
            file.write_bytes(bytes(flipped))
            result = run_cli("info", str(cache_dir))
            assert "Traceback" not in result.stderr and (result.returncode == 0 or len(
                [line for line in result.stderr.splitlines() if line.strip()]) == 1), (file.name, bit, result.stderr)
        file.write_bytes(original)


# 10. non-finite training --------------------------------------------------------------------------
def test_a_cache_with_nonfinite_targets_stops_training_with_one_line_exit_1(tmp_path, models_file):
    config = tmp_path / "nan.py"
    config.write_text(f"import sys; sys.path.insert(0, {str(models_file.parent)!r})\nimport kd_models, torch\n"
                      "def dataset():\n    ds = kd_models.dataset(300)\n    x = ds.tensors[0].clone()\n"
                      "    x[137, 0] = float('nan')\n    return torch.utils.data.TensorDataset(x, ds.tensors[1])\n")
    assert run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{config}:dataset",
                   "--allow-nonfinite", "--out", str(tmp_path / "c"), "--no-progress").returncode == 0
    result = run_cli("train-student", "--student", f"{models_file}:student", "--dataset", f"{config}:dataset",
                     "--cache", str(tmp_path / "c"), "--epochs", "2", "--out", str(tmp_path / "run"), "--no-progress")
    line = _one_line(result, code=1)
    assert "NaN/inf at epoch 1, step" in line and "nothing was saved" in line


def test_a_loss_that_turns_nonfinite_keeps_the_last_finite_epoch(tmp_path, models):
    class TurnsNaN(torch.utils.data.Dataset):
        """Finite inputs for the first 350 reads (2 probe rows, epoch 1, the start of epoch 2), then NaN."""

        def __init__(self) -> None:
            self.base, self.reads = models.dataset(300), 0

        def __len__(self) -> int:
            return 300

        def __getitem__(self, i: int):
            self.reads += 1
            x, y = self.base[i]
            return (x * float("nan") if self.reads > 350 else x), y

    kdcache.dump_teacher(models.teacher(), models.dataset(300), tmp_path / "c", progress=False, log=lambda m: None)
    with pytest.raises(kdcache.train.NonFiniteLoss, match="at epoch 2, step 1 .* holds epoch 1"):
        kdcache.train_student(models.student(), TurnsNaN(), tmp_path / "c", epochs=3, out=tmp_path / "run",
                              allow_input_mismatch=True, progress=False)
    saved = torch.load(tmp_path / "run" / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


# 11. repair --------------------------------------------------------------------------------------
def test_repair_rewrites_only_damaged_blocks_to_a_byte_identical_cache(tmp_path, models_file):
    args = ("--hidden", "body", "--block-rows", "64")
    assert _dump_cli(models_file, tmp_path / "ref", *args).returncode == 0
    assert _dump_cli(models_file, tmp_path / "c", *args).returncode == 0
    chunk = _chunk_file(tmp_path / "c", "hidden/body", 2)
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0x40
    chunk.write_bytes(bytes(raw))
    meta = tmp_path / "c" / "logits" / "zarr.json"
    meta.write_text(meta.read_text().replace('"little"', '"big"'))
    assert "--repair" in _one_line(run_cli("verify", str(tmp_path / "c")))  # the damaged description first
    hit = _dump_cli(models_file, tmp_path / "c", *args)
    assert hit.returncode != 0 or "cache hit" not in hit.stderr  # a damaged cache is not a silent hit
    repaired = _dump_cli(models_file, tmp_path / "c", *args, "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert "1 array descriptions restored, 1 of 5 blocks to write again" in repaired.stderr
    assert store_files(tmp_path / "c") == store_files(tmp_path / "ref")
    assert run_cli("verify", str(tmp_path / "c")).returncode == 0


# 12. torchrun: the cache-hit rerun leaves cleanly ---------------------------------------------------
@pytest.mark.xdist_group("torchrun")  # one torchrun at a time: 2 ranks each on 2 cores
def test_a_torchrun_cache_hit_exits_cleanly_every_time(tmp_path, models_file):
    from test_distributed import torchrun
    args = ["dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
            "--out", str(tmp_path / "c"), "--no-progress"]
    assert torchrun(*args).returncode == 0
    for _ in range(2):
        hit = torchrun(*args)
        assert hit.returncode == 0 and "terminate called" not in hit.stderr, hit.stderr[-2000:]


# 13. caches named like an array prefix, opened by a relative path ----------------------------------
def test_a_cache_named_like_an_array_prefix_opens_by_relative_path(tmp_path, models, models_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("c", "hidden", "topk", "sampled"):
        kdcache.dump_teacher(models.teacher(), models.dataset(300), name, hidden=["body"], progress=False,
                             log=lambda m: None)
        assert TeacherCache.open(name).verify() == []
        kdcache.train_student(models.student(), models.dataset(300), name, epochs=1, progress=False)
    trained = run_cli("train-student", "--student", f"{models_file}:student", "--dataset", f"{models_file}:dataset",
                      "--cache", "hidden", "--epochs", "1", "--no-progress", "--out", "run", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr


# 14. an interrupt loses seconds of teacher work, not minutes ----------------------------------------
def test_blocks_are_small_units_of_resumable_work_whatever_the_cache_size():
    for row_bytes in (20, 200, 2000):
        for rows in (10_000, 614_000, 50_000_000):
            block, chunks = plan_blocks({"logits": row_bytes, "_row_digest": 8}, rows)
            assert block <= 1024 and all(block % c == 0 for c in chunks.values())


def test_ctrl_c_keeps_every_finished_block_and_the_rerun_resumes(tmp_path, models_file):
    config = tmp_path / "slow.py"
    config.write_text(f"import sys, os, signal; sys.path.insert(0, {str(models_file.parent)!r})\nimport kd_models\n"
                      "class Interrupted(kd_models.TensorDataset):\n"
                      "    def __getitem__(self, i):\n"
                      "        if i == 5000 and os.environ.get('STOP'):\n"
                      "            os.kill(os.getpid(), signal.SIGINT)\n"
                      "        return super().__getitem__(i)\n"
                      "def dataset():\n    return Interrupted(*kd_models.dataset(6000).tensors)\n")
    args = ["dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{config}:dataset",
            "--batch-size", "100", "--out", str(tmp_path / "c"), "--no-progress"]
    stopped = run_cli(*args, env={"STOP": "1"})
    assert stopped.returncode == 130 and "rerun the same command to resume" in stopped.stderr, stopped.stderr
    done = int(TeacherCache.open(tmp_path / "c").blocks_record()[:, 0].sum())
    assert done >= 4  # rows 0..4095 were finished before row 5000 was read
    resumed = run_cli(*args)
    assert resumed.returncode == 0 and f"{done} of 6 blocks already written" in resumed.stderr
