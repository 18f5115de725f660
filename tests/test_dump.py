"""Stage one: dump-teacher writes exactly the teacher's outputs, resumes, and reuses caches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kdcache
from kdcache import KdcacheError, TeacherCache
from kdcache.format.codecs import DenseCodec

from conftest import run_cli, store_files


def _reference(models, ds, hidden_module="body"):
    teacher = models.teacher()
    captured = {}
    handle = teacher.get_submodule(hidden_module).register_forward_hook(lambda m, a, o: captured.update(h=o))
    with torch.no_grad():
        logits = teacher(ds.tensors[0])
    handle.remove()
    return teacher, logits, captured["h"]


def test_cached_outputs_equal_teacher_outputs_in_dataset_order(tmp_path, models):
    # 300 rows, batch 64 (last batch partial), block 128 (rows not a multiple of the chunk)
    ds = models.dataset(300)
    teacher, logits, hidden = _reference(models, ds)
    cache = kdcache.dump_teacher(teacher, ds, tmp_path / "c", hidden=["body"], batch_size=64, block_rows=128,
                                 progress=False)
    assert cache.complete and cache.rows == 300 and cache.n_blocks == 3
    got_logits = cache.read("logits", 0, 300)
    got_hidden = cache.read("body", 0, 300)
    assert got_logits.dtype == np.float16 and got_logits.shape == (300, 5)
    np.testing.assert_allclose(got_logits.astype(np.float32), logits.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(got_hidden.astype(np.float32), hidden.numpy(), rtol=1e-3, atol=1e-3)
    # each row is the teacher's output for that very row (not a neighbour's)
    assert (np.abs(got_logits.astype(np.float32) - logits.numpy()).max(axis=1) < 1e-2).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_dtypes_round_trip(tmp_path, models, dtype):
    ds = models.dataset(70)
    teacher, logits, _ = _reference(models, ds)
    cache = kdcache.dump_teacher(teacher, ds, tmp_path / dtype, logits_dtype=dtype, progress=False)
    stored = cache.read("logits", 0, 70)
    assert stored.dtype == (np.float32 if dtype == "float32" else np.uint16)
    decoded = DenseCodec(dtype).decode(stored)
    tol = 0 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(decoded.numpy(), logits.numpy(), rtol=tol, atol=tol)
    assert cache.meta.outputs["logits"].codec.dtype == dtype


def test_second_identical_dump_is_a_cache_hit_without_forward(tmp_path, models, capsys):
    ds = models.dataset(100)
    teacher = models.teacher()
    kdcache.dump_teacher(teacher, ds, cache_root=tmp_path, progress=False)
    calls = models.FORWARD_CALLS[0]
    again = kdcache.dump_teacher(models.teacher(), ds, cache_root=tmp_path, progress=False)
    assert models.FORWARD_CALLS[0] == calls
    assert "cache hit" in capsys.readouterr().err
    assert Path(again.path).parent == tmp_path and Path(again.path).name == again.fingerprint


def test_fingerprint_changes_with_weights_data_and_choices(tmp_path, models):
    ds = models.dataset(50)
    base = kdcache.dump_teacher(models.teacher(), ds, cache_root=tmp_path, progress=False).fingerprint
    other_weights = kdcache.dump_teacher(models.teacher(seed=5), ds, cache_root=tmp_path, progress=False).fingerprint
    other_data = kdcache.dump_teacher(models.teacher(), models.dataset(50, seed=9), cache_root=tmp_path,
                                      progress=False).fingerprint
    other_choice = kdcache.dump_teacher(models.teacher(), ds, cache_root=tmp_path, hidden=["body"],
                                        progress=False).fingerprint
    assert len({base, other_weights, other_data, other_choice}) == 4


def test_other_fingerprint_at_path_is_refused_unless_overwrite(tmp_path, models):
    ds = models.dataset(50)
    kdcache.dump_teacher(models.teacher(), ds, tmp_path / "c", progress=False)
    with pytest.raises(KdcacheError, match="holds another cache.*pass overwrite=True to replace it"):
        kdcache.dump_teacher(models.teacher(seed=3), ds, tmp_path / "c", progress=False)
    replaced = kdcache.dump_teacher(models.teacher(seed=3), ds, tmp_path / "c", overwrite=True, progress=False)
    assert replaced.complete


def test_a_refused_dump_names_each_field_that_differs(tmp_path, models):
    ds = models.dataset(50)
    first = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "c", hidden=["body"], progress=False)
    with pytest.raises(KdcacheError) as caught:
        kdcache.dump_teacher(models.teacher(seed=3), ds, tmp_path / "c", logits_dtype="float32", progress=False)
    message = str(caught.value)
    assert f"teacher weights: cached {first.meta.teacher.weights_digest}, this dump " in message
    assert "logits: cached float16, this dump float32" in message and "hidden: cached body, this dump none" in message
    assert "dataset" not in message and "amp" not in message  # the same in both
    with pytest.raises(KdcacheError, match=r"; views: cached none, this dump 2 \(seed 0\)\); pass overwrite=True"):
        kdcache.dump_teacher(models.teacher(), ds, tmp_path / "c", hidden=["body"], views=2, progress=False)


def test_cli_errors_name_flags_where_python_errors_name_arguments(tmp_path, models_file, models):
    kdcache.dump_teacher(models.teacher(), models.dataset(), tmp_path / "c", progress=False)
    cli = run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                  "--hidden", "body", "--out", str(tmp_path / "c"), "--no-progress")
    assert cli.returncode == 2
    assert "hidden: cached none, this dump body); pass --overwrite to replace it or choose another --out" in cli.stderr
    with pytest.raises(KdcacheError, match=r"output_key='nope' not in the teacher's output keys"):
        kdcache.dump_teacher(models.DictTeacher(), models.DictItems(), tmp_path / "d", output_key="nope", progress=False)


def test_failed_dump_resumes_to_identical_cache(tmp_path, models):
    ds = models.dataset(300)
    kdcache.dump_teacher(models.teacher(), ds, tmp_path / "ref", hidden=["body"], batch_size=32, block_rows=64,
                         progress=False)
    # the same rows, but reading row 200 fails: blocks 0-2 are finished, block 3 is not
    failing = models.failing_dataset(300, fail_at=200)
    with pytest.raises(RuntimeError, match="simulated crash"):
        kdcache.dump_teacher(models.teacher(), failing, tmp_path / "c", hidden=["body"], batch_size=32,
                             block_rows=64, progress=False)
    partial = TeacherCache.open(tmp_path / "c")
    assert not partial.complete
    assert partial.blocks_record()[:, 0].tolist() == [1, 1, 1, 0, 0]
    calls = models.FORWARD_CALLS[0]
    resumed = kdcache.dump_teacher(models.teacher(), models.failing_dataset(300), tmp_path / "c", hidden=["body"],
                                   batch_size=32, block_rows=64, progress=False)
    assert models.FORWARD_CALLS[0] - calls == 4  # blocks 3 and 4 only: 64 + 44 rows in batches of 32
    assert resumed.complete
    assert store_files(tmp_path / "c") == store_files(tmp_path / "ref")


def test_sigkilled_cli_dump_resumes_to_byte_identical_cache(tmp_path, models_file):
    args = ["dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
            "--dataset-kwargs", '{"n": 4000}', "--hidden", "body", "--batch-size", "16", "--block-rows", "64",
            "--no-progress"]
    assert run_cli(*args, "--out", str(tmp_path / "ref")).returncode == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kdcache", *args, "--out", str(tmp_path / "c")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    blocks = tmp_path / "c" / "_blocks" / "c"
    deadline = time.time() + 60
    while time.time() < deadline and (not blocks.exists() or len(list(blocks.iterdir())) < 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = TeacherCache.open(tmp_path / "c")
    assert not partial.complete
    done = run_cli(*args, "--out", str(tmp_path / "c"))
    assert done.returncode == 0, done.stderr
    assert store_files(tmp_path / "c") == store_files(tmp_path / "ref")


def test_dict_inputs_dict_outputs_and_output_key(tmp_path, models):
    ds = models.DictItems(100)
    teacher = models.DictTeacher()
    cache = kdcache.dump_teacher(teacher, ds, tmp_path / "c", batch_size=30, progress=False)
    with torch.no_grad():
        ref = teacher(ds.a, ds.b)["logits"]
    np.testing.assert_allclose(cache.read("logits", 0, 100).astype(np.float32), ref.numpy(), atol=2e-3)
    with pytest.raises(KdcacheError, match="not in the teacher's output keys"):
        kdcache.dump_teacher(teacher, ds, tmp_path / "d", output_key="nope", progress=False)


def test_unlabelled_transfer_set_works_and_accuracy_counts_labelled_rows_only(tmp_path, models):
    ds = models.dataset(200, unlabelled_from=50)
    teacher = models.teacher()
    cache = kdcache.dump_teacher(teacher, ds, tmp_path / "c", progress=False)
    with torch.no_grad():
        pred = teacher(ds.tensors[0][:50]).argmax(1)
    acc = cache.meta.teacher_accuracy
    assert acc.labelled == 50
    assert acc.correct == int((pred == ds.tensors[1][:50]).sum())
    bare = torch.utils.data.TensorDataset(ds.tensors[0])  # inputs alone
    assert kdcache.dump_teacher(teacher, bare, tmp_path / "bare", progress=False).meta.teacher_accuracy.labelled == 0


def test_store_is_readable_without_the_teacher_code(tmp_path, models_file):
    result = run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                     "--out", str(tmp_path / "c"), "--no-progress")
    assert result.returncode == 0, result.stderr
    models_file.unlink()
    code = ("import kdcache,sys; c = kdcache.TeacherCache.open(sys.argv[1]); "
            "assert c.complete; print(c.read('logits', 0, 3).shape)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "(3, 5)" in out.stdout


def test_info_and_ls_describe_the_cache(tmp_path, models_file):
    run = run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                  "--hidden", "body", "--cache-root", str(tmp_path / "root"), "--no-progress")
    assert run.returncode == 0, run.stderr
    path = run.stdout.strip().splitlines()[-1]
    info = run_cli("info", path)
    assert info.returncode == 0, info.stderr
    for needle in ["complete", "rows         300", "logits", "hidden/body", "float16", "teacher accuracy",
                   f"{models_file}:teacher"]:
        assert needle in info.stdout
    # bytes per row are what a row holds (5 float16 logits, 32 float16 hidden values), not the
    # files over the rows: 300 rows sit in a chunk of 512 that is stored whole
    assert "float16  10 B/row" in info.stdout and "float16  64 B/row" in info.stdout
    listing = run_cli("ls", str(tmp_path / "root"))
    assert listing.returncode == 0 and path in listing.stdout and "complete" in listing.stdout
    again = run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                    "--hidden", "body", "--cache-root", str(tmp_path / "root"), "--no-progress")
    assert again.returncode == 0 and f"cache hit: {path}" in again.stderr


def test_a_cache_prints_what_it_holds(tmp_path, models):
    cache = kdcache.dump_teacher(models.teacher(), models.dataset(), tmp_path / "c", hidden=["body"], progress=False)
    assert repr(cache) == (f"TeacherCache({str(tmp_path / 'c')!r}, 300 rows: logits (5,) float16, hidden/body (32,) "
                           f"float16; complete, fingerprint {cache.fingerprint})")


def test_dump_help_documents_every_option():
    out = run_cli("dump-teacher", "--help", env={"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"})
    assert out.returncode == 0
    for option in ["--teacher", "--dataset", "--teacher-kwargs", "--dataset-kwargs", "--checkpoint", "--hidden",
                   "--output-key", "--logits-dtype", "--batch-size", "--num-workers", "--device", "--amp", "--out",
                   "--cache-root", "--overwrite", "--block-rows", "--allow-nonfinite"]:
        assert option in out.stdout, option


@pytest.mark.parametrize("args, message", [
    (["--teacher", "no_such_module_xyz:teacher"], "module 'no_such_module_xyz' not found"),
    (["--teacher", "garbled"], "must look like 'pkg.module:attr'"),
    (["--teacher", "{models}:nothing"], "has no attribute 'nothing'"),
    (["--teacher", "{models}:dataset"], "not a torch.nn.Module"),
    (["--dataset", "{models}:teacher"], "no __len__/__getitem__"),
    (["--teacher-kwargs", "{bad json"], "--teacher-kwargs is not valid JSON"),
    (["--teacher-kwargs", '{"nope": 1}'], "calling it failed"),
    (["--hidden", "bodyy"], "teacher has no module 'bodyy'; close names: body"),
    (["--dataset-kwargs", '{"n": 0}'], "empty dataset"),
    (["--dataset-kwargs", '{"d_in": 7}'], "do the dataset's inputs fit the teacher"),
    (["--logits-dtype", "int8"], "dtype 'int8' is not one of"),
])
def test_bad_input_gets_one_line_error_and_exit_2(tmp_path, models_file, args, message):
    base = {"--teacher": f"{models_file}:teacher", "--dataset": f"{models_file}:dataset",
            "--out": str(tmp_path / "c")}
    args = [a.replace("{models}", str(models_file)) for a in args]
    for key, value in base.items():
        if key not in args:
            args += [key, value]
    result = run_cli("dump-teacher", "--no-progress", *args)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdcache: error:"), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_checkpoint_with_wrong_keys_or_shapes_is_refused(tmp_path, models_file, models):
    torch.save({"bad.weight": torch.zeros(2)}, tmp_path / "keys.pt")
    state = models.teacher().state_dict()
    state["head.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "shapes.pt")
    for ckpt, message in [("keys.pt", "missing keys"), ("shapes.pt", "head.weight has shape (3, 3)"),
                          ("absent.pt", "does not exist")]:
        result = run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                         "--checkpoint", str(tmp_path / ckpt), "--out", str(tmp_path / "c"))
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_path_that_is_a_file_is_refused(tmp_path, models_file):
    (tmp_path / "file").write_text("x")
    result = run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                     "--out", str(tmp_path / "file"))
    assert result.returncode == 2 and "is a file" in result.stderr
    assert (tmp_path / "file").read_text() == "x"


def test_checkpoint_is_loaded_into_the_teacher(tmp_path, models_file, models):
    trained = models.teacher(seed=7)
    torch.save(trained.state_dict(), tmp_path / "t.pt")
    result = run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                     "--checkpoint", str(tmp_path / "t.pt"), "--out", str(tmp_path / "c"), "--no-progress")
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        ref = trained(models.dataset().tensors[0])
    got = TeacherCache.open(tmp_path / "c").read("logits", 0, 300)
    np.testing.assert_allclose(got.astype(np.float32), ref.numpy(), atol=2e-3)


def test_chunks_are_whole_rows_of_a_few_mb_and_divide_the_block():
    from kdcache.store import plan_blocks
    block, chunks = plan_blocks({"logits": 2000, "hidden/x": 200_000}, rows=1_000_000)
    assert chunks["logits"] * 2000 <= 2 << 20 and chunks["hidden/x"] * 200_000 <= 2 << 20
    assert chunks["hidden/x"] * 200_000 >= 1 << 20
    assert all(block % c == 0 for c in chunks.values()) and block * 202_000 <= 128 << 20
    small_block, small = plan_blocks({"logits": 20}, rows=1200)
    assert small["logits"] == 1024 and small_block == 1024  # not a 2 MB chunk for 24 KB of data
    tiny_block, _ = plan_blocks({"logits": 20}, rows=300)
    assert tiny_block == 512  # one block: never below the cache's own size rounded up
    # several blocks whenever the cache allows: writes overlap the teacher, ranks all get work
    many_block, _ = plan_blocks({"logits": 200, "hidden/x": 8192}, rows=8192)
    assert many_block == 1024


def test_nonfinite_teacher_output_is_reported_with_first_bad_row(tmp_path, models):
    ds = models.dataset(300)
    x = ds.tensors[0].clone()
    x[137, 0] = float("nan")
    bad = torch.utils.data.TensorDataset(x, ds.tensors[1])
    with pytest.raises(KdcacheError, match="NaN/inf at row 137 .*pass allow_nonfinite=True"):
        kdcache.dump_teacher(models.teacher(), bad, tmp_path / "c", batch_size=64, block_rows=64, progress=False)
    kept = kdcache.dump_teacher(models.teacher(), bad, tmp_path / "c", batch_size=64, block_rows=64,
                                allow_nonfinite=True, progress=False)
    logits = kept.read("logits", 0, 300)
    assert np.isnan(logits[137]).all() and np.isfinite(np.delete(logits, 137, axis=0)).all()


def test_float16_overflow_is_reported_as_nonfinite(tmp_path, models):
    ds = models.dataset(50)
    teacher = models.teacher()
    with torch.no_grad():
        teacher.head.weight.mul_(1e6)  # logits far beyond float16's 65504
    with pytest.raises(KdcacheError, match="float16 overflows.*try logits_dtype=.float32."):
        kdcache.dump_teacher(teacher, ds, tmp_path / "c", progress=False)
    assert kdcache.dump_teacher(teacher, ds, tmp_path / "c32", logits_dtype="float32", progress=False).complete


def test_tensor_dataset_subclass_is_read_through_its_getitem(tmp_path, models):
    """Only a plain TensorDataset is indexed directly: a subclass's __getitem__ may transform."""

    class Negated(torch.utils.data.TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return -x, y

    base = models.dataset(70)
    ds = Negated(*base.tensors)
    teacher = models.teacher()
    cache = kdcache.dump_teacher(teacher, ds, tmp_path / "c", progress=False)
    with torch.no_grad():
        want = teacher(-base.tensors[0])
    np.testing.assert_allclose(cache.read("logits", 0, 70).astype(np.float32), want.numpy(), rtol=1e-2, atol=1e-2)
    # and stage two reads the same transformed rows (their digests match the dump's)
    data = kdcache.CachedTeacherDataset(ds, cache)
    inputs, _, _ = kdcache.collate(data.__getitems__(list(range(70))))
    assert torch.equal(inputs, -base.tensors[0])
