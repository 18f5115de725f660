"""Packed token caches: only real tokens are stored; rows come back at their batch's positions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import kdcache
from kdcache import CachedTeacherDataset, TeacherCache

from conftest import run_cli, store_files

QUIET = dict(progress=False, log=lambda m: None)


class MorePadding(Dataset):
    """The same token rows with ``extra`` more padding positions on the right (and a token
    label column padded the same way)."""

    def __init__(self, base: Dataset, extra: int) -> None:
        self.base, self.extra = base, extra

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = self.base[i]
        pad = {"input_ids": 0, "attention_mask": 0, "labels": -100}
        return {k: torch.cat([v, torch.full((self.extra,), pad[k], dtype=v.dtype)]) for k, v in item.items()}


def _batches(data: CachedTeacherDataset, rows: list[int]):
    inputs, labels, teacher = data.__getitems__(rows).collated
    return inputs, teacher


@pytest.mark.parametrize("codec", [{}, {"topk": 6}, {"sample_k": 8, "seed": 1}, {"topk": 4, "tail_samples": 8, "seed": 1}])
def test_packed_rows_read_back_exactly_what_the_padded_layout_stores(tmp_path, models, codec):
    ds = models.tokens(n=40)
    kwargs = dict(vocab_size=40, hidden=["rnn#0"], batch_size=16, block_rows=8, **codec, **QUIET)
    packed = kdcache.dump_teacher(models.tiny_lm(), ds, tmp_path / "packed", **kwargs)
    padded = kdcache.dump_teacher(models.tiny_lm(), ds, tmp_path / "padded", layout="padded", **kwargs)
    assert packed.meta.packed is not None and padded.meta.packed is None
    assert packed.meta.packed.outputs == ("logits", "rnn#0")
    rows = [0, 5, 13, 39, 22, 1]
    for in_memory in (True, False):
        got_in, got = _batches(CachedTeacherDataset(ds, packed.path, in_memory=in_memory), rows)
        _, want = _batches(CachedTeacherDataset(ds, padded.path), rows)
        mask = got_in["attention_mask"].bool()
        assert torch.equal(got.mask, mask) and torch.equal(want.mask, mask)
        for key in (["logits"] if not codec else list(want.logits.keys())):
            g = got.logits if key == "logits" else got.logits[key]
            w = want.logits if key == "logits" else want.logits[key]
            assert torch.equal(g[mask], w[mask]) and not g[~mask].any()
        assert torch.equal(got.hidden["rnn#0"][mask], want.hidden["rnn#0"][mask])


def test_no_padding_position_is_stored_and_more_padding_is_a_cache_hit(tmp_path, models):
    ds = models.tokens(n=40)
    a = kdcache.dump_teacher(models.tiny_lm(), ds, tmp_path / "root" / "a", topk=4, vocab_size=40, **QUIET)
    wide = MorePadding(ds, extra=20)
    b = kdcache.dump_teacher(models.tiny_lm(), wide, tmp_path / "root" / "b", topk=4, vocab_size=40, **QUIET)
    assert a.fingerprint == b.fingerprint  # the inputs' digest does not see padding
    files_a, files_b = store_files(Path(a.path)), store_files(Path(b.path))
    token_arrays = [p for p in files_a if p.startswith("topk/")]
    assert token_arrays and all(files_a[p] == files_b[p] for p in token_arrays)
    real = int(torch.stack([ds[i]["attention_mask"] for i in range(len(ds))]).sum())
    stored_tokens = a.meta.packed.capacity
    assert a.meta.tokens == real and real <= stored_tokens < real + len(range(a.n_blocks)) * a.meta.packed.chunk
    padded = kdcache.dump_teacher(models.tiny_lm(), wide, tmp_path / "padded", topk=4, vocab_size=40,
                                  layout="padded", **QUIET)
    size = lambda c: sum(v for k, v in c.nbytes_on_disk().items() if k.startswith("topk/"))  # noqa: E731
    assert size(padded) > 2.5 * size(a)  # 32 positions stored per row instead of ~8 real ones
    # the wider-padded data reads the cache dumped from the narrower one
    _, teacher = _batches(CachedTeacherDataset(wide, a.path), [0, 1, 2])
    assert teacher.logits.values.shape == (3, 32, 4)


def test_left_and_right_padding_read_the_same_targets(tmp_path, models):
    ds = models.tokens(n=40)  # rows alternate left and right padding (see conftest.Tokens)
    cache = kdcache.dump_teacher(models.tiny_lm(), ds, tmp_path / "c", **QUIET)
    lm = models.tiny_lm()
    inputs, teacher = _batches(CachedTeacherDataset(ds, cache.path), list(range(40)))
    with torch.no_grad():
        logits = lm(**inputs)["logits"].half().float()
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(teacher.logits[mask], logits[mask])


def test_a_killed_packed_dump_resumes_to_a_byte_identical_cache(tmp_path, models_file):
    code = ("import sys, kd_models, kdcache; kdcache.dump_teacher(kd_models.tiny_lm(), kd_models.tokens(n=80), "
            "sys.argv[1], topk=4, vocab_size=40, hidden=['rnn#0'], batch_size=8, block_rows=16, writer_threads=1, "
            "progress=False)")
    env = {**os.environ, "PYTHONPATH": f"{models_file.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "ref")], env=env).returncode == 0
    for point in ("created-array:2", "created:1", "batch:5", "block:2"):
        target = tmp_path / point.replace(":", "-")
        killed = subprocess.run([sys.executable, "-c", code, str(target)], env={**env, "KDCACHE_KILL_AT": point},
                                capture_output=True)
        assert killed.returncode == -9, (point, killed.stderr[-300:])
        resumed = subprocess.run([sys.executable, "-c", code, str(target)], env=env, capture_output=True)
        assert resumed.returncode == 0, (point, resumed.stderr[-500:])
        assert store_files(target) == store_files(tmp_path / "ref"), point


@pytest.mark.xdist_group("torchrun")  # one torchrun at a time: 2 ranks each on 2 cores
def test_two_process_packed_dump_equals_one_process(tmp_path, models_file):
    from test_distributed import torchrun
    spec = f"{models_file}:"
    args = ["dump-teacher", "--teacher", spec + "tiny_lm", "--dataset", spec + "tokens", "--dataset-kwargs",
            '{"n": 64}', "--topk", "4", "--vocab-size", "40", "--block-rows", "8", "--batch-size", "8", "--no-progress"]
    assert run_cli(*args, "--out", str(tmp_path / "one")).returncode == 0
    two = torchrun(*args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert store_files(tmp_path / "one") == store_files(tmp_path / "two")


def test_a_damaged_token_chunk_is_found_and_repaired(tmp_path, models, models_file):
    spec = f"{models_file}:"
    args = ["dump-teacher", "--teacher", spec + "tiny_lm", "--dataset", spec + "tokens", "--topk", "4",
            "--vocab-size", "40", "--block-rows", "8", "--no-progress"]
    assert run_cli(*args, "--out", str(tmp_path / "ref")).returncode == 0
    assert run_cli(*args, "--out", str(tmp_path / "c")).returncode == 0
    cache = TeacherCache.open(tmp_path / "c")
    start, _ = cache.token_blocks()[3]
    chunk = tmp_path / "c" / "topk" / "values" / "c" / str(int(start) // cache.meta.packed.chunk) / "0"
    raw = bytearray(chunk.read_bytes())
    raw[3] ^= 0x10
    chunk.write_bytes(bytes(raw))
    report = run_cli("verify", str(tmp_path / "c"))
    assert report.returncode == 1 and "BAD topk/values token chunk" in report.stdout, report.stdout
    with pytest.raises(kdcache.KdcacheError, match="topk/values"):
        CachedTeacherDataset(models.tokens(), tmp_path / "c")
    repaired = run_cli(*args, "--out", str(tmp_path / "c"), "--repair")
    assert repaired.returncode == 0 and "1 of 5 blocks to write again" in repaired.stderr, repaired.stderr
    assert store_files(tmp_path / "c") == store_files(tmp_path / "ref")


def test_training_from_a_packed_cache_with_views(tmp_path, models):
    ds = models.tokens(n=24)
    cache = kdcache.dump_teacher(models.tiny_lm(), ds, tmp_path / "c", views=2, seed=3, topk=4, vocab_size=40, **QUIET)
    assert cache.meta.packed is not None and cache.rows == 48
    result = kdcache.train_student(models.tiny_lm(width=8, seed=5), ds, cache, epochs=2, batch_size=8, alpha=1.0,
                                   progress=False)
    assert len(result.metrics) == 2 and np.isfinite(result.final["kd"]) and result.final["kd"] > 0
