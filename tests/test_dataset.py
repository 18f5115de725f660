"""CachedTeacherDataset: right rows, fast batched reads, refusals with one clear line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import kdcache
from kdcache import CachedTeacherDataset, ChunkShuffleBatchSampler, KdcacheError


@pytest.fixture()
def dumped(tmp_path, models):
    ds = models.dataset(300)
    teacher = models.teacher()
    cache = kdcache.dump_teacher(teacher, ds, tmp_path / "c", hidden=["body"], block_rows=64, batch_size=50,
                                 progress=False)
    return ds, teacher, cache


def _check_items(batches, ds, cache):
    seen = set()
    logits = cache.read("logits", 0, 300).astype(np.float32)
    hidden = cache.read("body", 0, 300).astype(np.float32)
    for inputs, labels, teacher in batches:
        assert teacher["logits"].dtype == torch.float32
        for x, y, tl, th in zip(inputs, labels, teacher["logits"], teacher["hidden"]["body"]):
            i = int(np.flatnonzero((ds.tensors[0] == x).all(1).numpy())[0])
            assert int(y) == int(ds.tensors[1][i])
            np.testing.assert_array_equal(tl.numpy(), logits[i])
            np.testing.assert_array_equal(th.numpy(), hidden[i])
            seen.add(i)
    assert seen == set(range(300))


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("workers", [0, 2])
def test_items_zip_inputs_labels_and_their_own_teacher_rows(dumped, in_memory, workers):
    ds, _, cache = dumped
    data = CachedTeacherDataset(ds, cache, in_memory=in_memory, chunk_cache_bytes=4096)
    assert data.in_memory is in_memory
    _check_items(data.loader(32, shuffle=True, num_workers=workers), ds, cache)


def test_single_item_and_default_collate_work(dumped):
    ds, _, cache = dumped
    data = CachedTeacherDataset(ds, cache.path)
    x, y, teacher = data[5]
    assert torch.equal(x, ds.tensors[0][5]) and y == int(ds.tensors[1][5])
    assert teacher["logits"].shape == (5,) and teacher["hidden"]["body"].shape == (32,)
    inputs, labels, t = next(iter(DataLoader(data, batch_size=8)))  # torch's default collate
    assert inputs.shape == (8, 12) and t["logits"].shape == (8, 5)


def test_mismatched_length_is_refused(dumped, models):
    _, _, cache = dumped
    with pytest.raises(KdcacheError, match="the dataset has 299 rows but cache .* has 300"):
        CachedTeacherDataset(models.dataset(299), cache)


@pytest.mark.parametrize("row", [0, 150, 299, 77])
def test_one_edited_row_is_caught_before_its_target_is_used(dumped, models, row):
    _, _, cache = dumped
    edited = models.dataset(300, edit_row=row)
    with pytest.raises(KdcacheError, match="(content differs|is not the input the teacher saw)"):
        data = CachedTeacherDataset(edited, cache)
        for _ in data.loader(64, shuffle=False):
            pass


def test_reordered_dataset_is_caught(dumped, models):
    ds, _, cache = dumped
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    shuffled = torch.utils.data.TensorDataset(ds.tensors[0][perm], ds.tensors[1][perm])
    with pytest.raises(KdcacheError, match="differs|not the input"):
        data = CachedTeacherDataset(shuffled, cache)
        next(iter(data.loader(64)))


def test_input_mismatch_allowed_when_asked(dumped, models):
    _, _, cache = dumped
    data = CachedTeacherDataset(models.dataset(300, edit_row=77), cache, check_inputs=False)
    assert sum(len(b[1]) for b in data.loader(64)) == 300


def test_incomplete_cache_is_refused(tmp_path, models):
    with pytest.raises(RuntimeError):
        kdcache.dump_teacher(models.teacher(), models.failing_dataset(300, fail_at=250), tmp_path / "c",
                             block_rows=64, progress=False)
    with pytest.raises(KdcacheError, match="incomplete .* rerun the same kdcache dump-teacher command"):
        CachedTeacherDataset(models.dataset(300), tmp_path / "c")


def test_unknown_hidden_is_refused(dumped):
    ds, _, cache = dumped
    with pytest.raises(KdcacheError, match="holds no hidden output 'head'"):
        CachedTeacherDataset(ds, cache, hidden=["head"])


def test_chunk_shuffle_sampler_is_a_permutation_grouped_by_blocks():
    sampler = ChunkShuffleBatchSampler(1000, 37, seed=3, unit_rows=64, window_units=2)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000)) and len(batches) == len(sampler)
    # a batch draws from its window of 2 blocks (or two windows where it straddles them), so
    # reading from disk touches few chunks; a full shuffle would touch ~14 of the 16 blocks
    assert max(len({i // 64 for i in b}) for b in batches) <= 4
    first = flat
    sampler.set_epoch(1)
    assert [i for b in sampler for i in b] != first
    sampler.set_epoch(0)
    assert [i for b in sampler for i in b] == first


def _python_digest(row_bytes: bytes, multipliers: list[int]) -> int:
    """row_digests by its definition, in plain Python integers (caches on disk depend on it)."""
    padded = row_bytes + b"\0" * (-len(row_bytes) % 8)
    words = [int.from_bytes(padded[i:i + 8], "little") for i in range(0, len(padded), 8)]
    h = (sum(w * m for w, m in zip(words, multipliers)) + len(row_bytes)) % 2**64
    for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        h = ((h ^ (h >> shift)) * mul) % 2**64
    return h ^ (h >> 31)


@pytest.mark.parametrize("shape,dtype", [((3, 5), torch.float32), ((2, 3, 7), torch.float16), ((4, 20000), torch.float32)])
def test_row_digests_follow_their_definition(shape, dtype):
    from kdcache.data.digests import _multipliers, row_digests
    rows = torch.randn(*shape).to(dtype)
    raw = [r.contiguous().numpy().tobytes() for r in rows]
    mult = [int(m) for m in _multipliers(-(-len(raw[0]) // 8))]
    assert row_digests(rows).tolist() == [_python_digest(b, mult) for b in raw]


def test_next_windows_chunks_are_read_while_this_window_trains(tmp_path, models):
    ds = models.dataset(2048)
    cache = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "w", block_rows=1024, batch_size=256, progress=False)
    # windows of one 1,024-row block; the chunk cache holds two windows
    data = CachedTeacherDataset(ds, cache, in_memory=False, chunk_cache_bytes=2 * 1024 * 18, dtype=None)
    loader = data.loader(256, num_workers=0)
    windows = loader.batch_sampler.windows()
    assert len(windows) == 2
    batches = iter(loader)
    next(batches)  # the first batch reads window 0, and window 1 is asked for
    second = {int(c) for c in np.unique(windows[1] // cache.outputs["logits"].arrays[""].chunk_rows)}
    assert {c for (path, c) in data.blocks.ahead if path == "logits"} == second
    logits = cache.read("logits", 0, 2048)
    for inputs, labels, teacher in batches:
        rows = [int(np.flatnonzero((ds.tensors[0] == x).all(1).numpy())[0]) for x in inputs]
        np.testing.assert_array_equal(teacher.logits.numpy(), logits[rows])
    assert not data.blocks.ahead  # every chunk read ahead was used
