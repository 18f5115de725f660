"""Caches on S3-compatible object storage (moto's standalone server on loopback)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import run_cli

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def s3():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("kdcache-test")
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def test_dump_resume_and_train_against_s3(tmp_path, models_file, s3):
    import s3fs
    from kdcache import TeacherCache
    spec = f"{models_file}:"
    dump = ["dump-teacher", "--teacher", spec + "teacher", "--dataset", spec + "dataset", "--hidden", "body",
            "--block-rows", "64", "--batch-size", "32", "--no-progress"]
    url = "s3://kdcache-test/caches/run1"
    killed = run_cli(*dump, "--out", url, env={**s3, "KDCACHE_KILL_AT": "block:2"})
    assert killed.returncode != 0
    assert not TeacherCache.open(url).complete
    resumed = run_cli(*dump, "--out", url, env=s3)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    local = run_cli(*dump, "--out", str(tmp_path / "local"), env=s3)
    assert local.returncode == 0, local.stderr
    remote, here = TeacherCache.open(url), TeacherCache.open(tmp_path / "local")
    assert remote.complete and [] == remote.verify()
    for name in ("logits", "body"):
        assert np.array_equal(remote.read(name, 0, 300), here.read(name, 0, 300))
    # whole-shard objects: one per block and array, not one per chunk
    fs = s3fs.S3FileSystem()
    assert len(fs.find("kdcache-test/caches/run1/logits/c")) == remote.n_blocks
    info = run_cli("info", url, env=s3)
    assert info.returncode == 0 and "complete" in info.stdout, info.stderr
    train = run_cli("train-student", "--student", spec + "student", "--dataset", spec + "dataset", "--cache", url,
                    "--epochs", "2", "--hint", "body=body", "--out", str(tmp_path / "run"), "--no-progress", env=s3)
    assert train.returncode == 0, train.stderr
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    missing = run_cli("info", "s3://kdcache-test/nothing-here", env=s3)
    assert missing.returncode == 2 and "no cache at s3://kdcache-test/nothing-here" in missing.stderr
    # the root of fingerprint-named caches may be a bucket prefix too; a second dump is a hit
    root = run_cli(*dump, "--cache-root", "s3://kdcache-test/store", env=s3)
    again = run_cli(*dump, "--cache-root", "s3://kdcache-test/store", env=s3)
    assert root.returncode == 0 and "cache hit" in again.stderr and again.stdout.strip().startswith("s3://kdcache-test/store/")
    recorded = json.loads(fs.cat(again.stdout.strip()[5:] + "/zarr.json"))["attributes"]["kdcache"]
    assert recorded["complete"]
    listed = run_cli("ls", "s3://kdcache-test/store", env=s3)
    assert listed.returncode == 0 and listed.stdout.startswith(again.stdout.strip() + "  complete  300 rows"), listed.stdout
    nowhere = run_cli("ls", "s3://kdcache-test/no-such-root", env=s3)
    assert nowhere.returncode == 2 and "does not exist" in nowhere.stderr


def test_packed_token_cache_on_s3_resumes_and_reads_like_a_local_one(tmp_path, models_file, models, s3):
    import torch
    from kdcache import CachedTeacherDataset, TeacherCache
    spec = f"{models_file}:"
    dump = ["dump-teacher", "--teacher", spec + "tiny_lm", "--dataset", spec + "tokens", "--topk", "4",
            "--vocab-size", "40", "--block-rows", "8", "--batch-size", "8", "--no-progress"]
    url = "s3://kdcache-test/caches/packed"
    assert run_cli(*dump, "--out", url, env={**s3, "KDCACHE_KILL_AT": "block:2"}).returncode != 0
    resumed = run_cli(*dump, "--out", url, env=s3)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    assert run_cli(*dump, "--out", str(tmp_path / "local"), env=s3).returncode == 0
    remote = TeacherCache.open(url)
    assert remote.meta.packed is not None and remote.verify() == []
    rows = list(range(40))
    got = CachedTeacherDataset(models.tokens(), url, in_memory=False).__getitems__(rows).collated[2]
    want = CachedTeacherDataset(models.tokens(), tmp_path / "local").__getitems__(rows).collated[2]
    assert all(torch.equal(got.logits[k], want.logits[k]) for k in want.logits.keys())


def test_head_cache_on_s3_stores_the_layer_once_and_reads_like_a_local_one(tmp_path, models, s3):
    import s3fs
    import torch
    from kdcache import CachedTeacherDataset, dump_teacher
    url = "s3://kdcache-test/caches/head"
    kw = dict(head="head", block_rows=8, batch_size=8, progress=False, log=lambda m: None)
    remote = dump_teacher(models.tiny_lm(sharp=1.0), models.tokens(), url, **kw)
    local = dump_teacher(models.tiny_lm(sharp=1.0), models.tokens(), tmp_path / "local", **kw)
    assert remote.verify() == []
    got = CachedTeacherDataset(models.tokens(), url, in_memory=False).__getitems__(list(range(40))).collated[2]
    want = CachedTeacherDataset(models.tokens(), local.path).__getitems__(list(range(40))).collated[2]
    assert torch.equal(got.logits.hidden, want.logits.hidden) and torch.equal(got.logits.weight, want.logits.weight)
    # a damaged layer in the bucket is found by verify and refused by a reader
    s3fs.S3FileSystem().pipe("kdcache-test/caches/head/head/bias/c/0", b"\0" * 100)
    assert [p.array for p in remote.verify()] == ["head/bias"]
    with pytest.raises(Exception, match="head/bias"):
        CachedTeacherDataset(models.tokens(), url)
