"""Augmentation views: K seeded views per sample, replayed bit for bit in stage two."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import run_cli, store_files
from kdcache import CachedTeacherDataset, KdcacheError, TeacherCache, dump_teacher, train_student
from kdcache.read import replay_mismatches
from kdcache.store.identity import DIGEST_SAMPLE_ROWS
from kdcache.data.views import ViewedDataset, seeded, view_seed

K = 4


def _dump(models, tmp_path, ds, name="c", **kw):
    teacher = models.Recording(models.teacher())
    kw.setdefault("batch_size", 16)
    cache = dump_teacher(teacher, ds, tmp_path / name, views=K, seed=3, progress=False, log=lambda m: None, **kw)
    return cache, (torch.cat(teacher.seen) if teacher.seen else None)


def test_each_row_is_a_distinct_seeded_view_and_its_teacher_output(tmp_path, models):
    ds = models.augmented()
    cache, seen = _dump(models, tmp_path, ds)
    assert cache.rows == K * len(ds) and cache.views == K and cache.seed == 3
    assert cache.meta.dataset.length == len(ds)
    inputs = seen[2:]  # the first two rows were the shape probe
    assert len(inputs) == cache.rows
    # row r is view r % K of sample r // K, regenerated from its seed alone
    for r in (0, 1, 5, cache.rows - 1):
        assert torch.equal(ViewedDataset(ds, K, 3)[r][0], inputs[r])
    assert not torch.equal(inputs[0], inputs[1])  # views of one sample differ
    with torch.no_grad():
        expected = models.teacher()(inputs).numpy()
    np.testing.assert_allclose(cache.read("logits", 0, cache.rows).astype(np.float32), expected, atol=2e-3)


def test_seeds_do_not_depend_on_batches_workers_or_resume(tmp_path, models):
    ds = models.augmented()
    a, _ = _dump(models, tmp_path, ds, "a", batch_size=16, num_workers=0)
    b, _ = _dump(models, tmp_path, ds, "b", batch_size=5, num_workers=2, block_rows=32)
    ra, rb = (c.read("logits", 0, c.rows) for c in (a, b))
    assert np.array_equal(ra, rb) and np.array_equal(a.row_digests(), b.row_digests())
    c, _ = _dump(models, tmp_path, ds, "c", batch_size=5, num_workers=2)
    assert store_files(a.path) == store_files(c.path)


@pytest.mark.parametrize("workers", [0, 2])
def test_student_input_is_bit_identical_to_the_teachers(tmp_path, models, workers):
    ds = models.augmented()
    cache, seen = _dump(models, tmp_path, ds)
    dumped = seen[2:]
    data = CachedTeacherDataset(ds, cache)
    assert len(data) == len(ds)
    loader = data.loader(batch_size=10, shuffle=False, num_workers=workers)
    for epoch in (0, 1, 5):
        loader.batch_sampler.set_epoch(epoch)
        x = torch.cat([batch[0] for batch in loader])
        rows = torch.arange(len(ds)) * K + epoch % K
        assert torch.equal(x, dumped[rows])
    # the random view mode is a pure function of (seed, epoch, sample) and visits every view
    rand = CachedTeacherDataset(ds, cache, view="random")
    picks = []
    for epoch in range(8):
        rand.set_epoch(epoch)
        picks.append(rand.cache_rows(np.arange(len(ds))) % K)
        assert torch.equal(rand.__getitems__(list(range(len(ds)))).collated[0],
                           dumped[torch.from_numpy(np.arange(len(ds)) * K + picks[-1])])
    assert set(np.concatenate(picks).tolist()) == set(range(K))


def test_seeded_context_restores_the_callers_generators():
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    with seeded(view_seed(0, 5, 1)):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    with seeded(view_seed(0, 5, 1)):
        assert torch.equal(torch.rand(3), inside)
    assert len({view_seed(0, 5, 1), view_seed(0, 1, 5), view_seed(1, 5, 1), view_seed(0, 5, 2)}) == 4


def test_nondeterministic_transform_is_caught_by_replay_and_training(tmp_path, models, models_file):
    ds = models.augmented(nondeterministic=True)
    cache, _ = _dump(models, tmp_path, ds)
    bad, checked = replay_mismatches(models.augmented(nondeterministic=True), cache, 10)
    assert checked == 10 and len(bad) == 10
    with pytest.raises(KdcacheError, match="transform draws from a generator kdcache does not seed"):
        train_student(models.student(), ds, cache, epochs=1, progress=False)
    good, _ = _dump(models, tmp_path, models.augmented(), "good")
    assert replay_mismatches(models.augmented(), good, 50) == ([], 50)
    # the CLI replays the dataset the user names (a cache's recorded spec is never run)
    spec = f"{models_file}:"
    out = run_cli("dump-teacher", "--teacher", spec + "teacher", "--dataset", spec + "augmented",
                  "--dataset-kwargs", '{"nondeterministic": true}', "--views", "3", "--seed", "1",
                  "--out", str(tmp_path / "cli"), "--no-progress")
    assert out.returncode == 0, out.stderr
    check = run_cli("verify", str(tmp_path / "cli"), "--replay", "8", "--dataset", spec + "augmented",
                    "--dataset-kwargs", '{"nondeterministic": true}')
    assert check.returncode == 1 and "BAD replay: view" in check.stdout and "8 of 8 replayed rows differ" in check.stdout
    out = run_cli("dump-teacher", "--teacher", spec + "teacher", "--dataset", spec + "augmented", "--views", "3",
                  "--out", str(tmp_path / "cli-ok"), "--no-progress")
    ok = run_cli("verify", str(tmp_path / "cli-ok"), "--replay", "8", "--dataset", spec + "augmented")
    assert ok.returncode == 0 and "8 rows regenerated, every input matches" in ok.stdout, ok.stdout


def test_explicit_augmentation_parameters_are_stored_and_replayed(tmp_path, models):
    ds = models.param_augmented()
    cache, seen = _dump(models, tmp_path, ds)
    params = cache.read_array("_view_params", 0, cache.rows)
    assert params.shape == (cache.rows, 2) and cache.meta.view_params_shape == (2,)
    r = 7
    gen = torch.Generator().manual_seed(view_seed(3, r // K, r % K))
    assert np.array_equal(params[r], ds.sample_params(r // K, gen).numpy())
    data = CachedTeacherDataset(ds, cache)
    data.set_epoch(2)
    x = data.__getitems__(list(range(len(ds)))).collated[0]
    assert torch.equal(x, seen[2:][torch.arange(len(ds)) * K + 2])
    assert "_view_params" in TeacherCache.open(cache.path).array_paths()
    # each row's parameters are drawn once in the dump loop (besides the digest sample and probe)
    calls = []
    sample_params = type(ds).sample_params
    ds.sample_params = lambda i, generator: calls.append(i) or sample_params(ds, i, generator)
    recount = _dump(models, tmp_path, ds, name="recount")[0]
    assert recount.rows == cache.rows and len(calls) <= cache.rows + DIGEST_SAMPLE_ROWS + 3
    assert replay_mismatches(ds, cache, 20)[0] == []
    with pytest.raises(KdcacheError, match="no sample_params/apply_params"):
        CachedTeacherDataset(models.augmented(), cache)
