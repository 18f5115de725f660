"""The teacher's weights digest (crc32c pieces) and the caches named by the blake2b digest of
earlier releases: still cache hits, resumed and refused truly (tests/fixtures/blake2b-root)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import kdcache
from conftest import store_files
from kdcache.examples import digits
from kdcache.store import TeacherCache
from kdcache.store.identity import digest_scheme, same_teacher, weights_digest

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = FIXTURES / "blake2b-root"
# the two caches of blake2b-root (README there): the settings that wrote them
HYBRID = dict(topk=4, tail_samples=6, sample_draws="systematic", vocab_size=40, seed=3, layout="padded")
SAMPLED = dict(sample_k=5, vocab_size=40, seed=1, layout="padded")
TOPK = dict(topk=4, vocab_size=40, layout="padded")
HYBRID_FP, SAMPLED_FP, TOPK_FP = "3f8e28b83a35b0f9", "19d23e6702e2c480", "6d76a154ee4d5605"
EARLIER = [(HYBRID, HYBRID_FP), (SAMPLED, SAMPLED_FP), (TOPK, TOPK_FP)]


def _quiet(said: list[str]) -> dict:
    return {"progress": False, "log": said.append, "batch_size": 8, "block_rows": 16}


def test_the_digest_changes_with_any_weight_name_or_dtype_and_not_otherwise(models):
    teacher = models.teacher()
    digest = weights_digest(teacher)
    assert digest_scheme(digest) == "crc32c" and digest.startswith("crc32c:") and len(digest) == 7 + 32
    assert weights_digest(models.teacher()) == digest
    with torch.no_grad():
        teacher.head.bias[2] += 1e-6
    assert weights_digest(teacher) != digest
    assert weights_digest(models.teacher().half()) != digest
    big = torch.nn.Linear(1024, 1024)  # 4 MB: many 256 KiB pieces
    before = weights_digest(big)
    with torch.no_grad():
        big.weight.view(-1)[-1] += 1.0  # the last piece only
    assert weights_digest(big) != before


def test_the_blake2b_scheme_is_the_digest_earlier_releases_recorded(models):
    assert weights_digest(models.tiny_lm(), "blake2b") == TeacherCache.open(ROOT / HYBRID_FP).meta.teacher.weights_digest
    teacher = digits.student(width=16)
    teacher.load_state_dict(torch.load(FIXTURES / "format2-digits-teacher.pt", weights_only=True))
    recorded = TeacherCache.open(FIXTURES / "format2-digits").meta.teacher.weights_digest
    assert weights_digest(teacher, "blake2b") == recorded and digest_scheme(recorded) == "blake2b"


def test_digests_of_two_schemes_do_not_say_whether_the_teachers_differ(models):
    new, old = weights_digest(models.tiny_lm()), weights_digest(models.tiny_lm(), "blake2b")
    assert same_teacher(new, old) is None and same_teacher(new, new) is True
    assert same_teacher(old, weights_digest(models.tiny_lm(seed=1), "blake2b")) is False


@pytest.mark.parametrize(("settings", "fp"), EARLIER)
def test_a_cache_root_of_an_earlier_release_is_a_cache_hit_left_as_it_was(tmp_path, models, settings, fp):
    root = tmp_path / "root"
    shutil.copytree(ROOT, root)
    before = {str(f): (f.stat().st_mtime_ns, f.read_bytes()) for f in root.rglob("*") if f.is_file()}
    said: list[str] = []
    cache = kdcache.dump_teacher(models.tiny_lm(), models.tokens(), cache_root=str(root), **settings, **_quiet(said))
    assert said == [f"cache hit: {root / fp}"] and cache.fingerprint == fp
    assert {str(f): (f.stat().st_mtime_ns, f.read_bytes()) for f in root.rglob("*") if f.is_file()
            and f.suffix != ".lock"} == before


def test_a_partial_cache_of_an_earlier_release_resumes_under_its_name_to_the_same_bytes(tmp_path, models):
    root = tmp_path / "root"
    shutil.copytree(ROOT, root)
    TeacherCache.open(root / HYBRID_FP, mode="r+").forget_blocks([1, 2])
    said: list[str] = []
    cache = kdcache.dump_teacher(models.tiny_lm(), models.tokens(), cache_root=str(root), **HYBRID, **_quiet(said))
    assert said[0] == f"resuming {root / HYBRID_FP}: 1 of 3 blocks already written"
    assert cache.complete and cache.fingerprint == HYBRID_FP
    assert store_files(root / HYBRID_FP) == store_files(ROOT / HYBRID_FP)


@pytest.mark.parametrize(("settings", "fp"), EARLIER)
def test_a_new_dump_stores_the_bytes_an_earlier_release_stored_under_a_crc32c_name(tmp_path, models, settings, fp):
    said: list[str] = []
    cache = kdcache.dump_teacher(models.tiny_lm(), models.tokens(), tmp_path / "new", **settings, **_quiet(said))
    earlier = TeacherCache.open(ROOT / fp)
    assert cache.fingerprint != fp and digest_scheme(cache.meta.teacher.weights_digest) == "crc32c"
    for a in earlier.meta.data_arrays():
        np.testing.assert_array_equal(cache.read_array(a.path, 0, cache.rows), earlier.read_array(a.path, 0, earlier.rows))
    np.testing.assert_array_equal(cache.row_digests(), earlier.row_digests())


def test_a_root_with_earlier_caches_of_other_settings_gets_a_new_crc32c_cache(tmp_path, models):
    root = tmp_path / "root"
    shutil.copytree(ROOT, root)
    said: list[str] = []
    cache = kdcache.dump_teacher(models.tiny_lm(), models.tokens(), cache_root=str(root), **{**HYBRID, "topk": 5},
                                 **_quiet(said))
    assert said == [f"wrote {cache.path}"] and digest_scheme(cache.meta.teacher.weights_digest) == "crc32c"
    assert sorted(p.name for p in root.iterdir() if p.suffix != ".lock") == sorted([*(fp for _, fp in EARLIER),
                                                                                    cache.fingerprint])


def test_another_teacher_at_the_out_of_an_earlier_cache_is_refused_comparing_blake2b_digests(tmp_path, models):
    out = tmp_path / "c"
    shutil.copytree(ROOT / HYBRID_FP, out)
    other = models.tiny_lm(seed=1)
    with pytest.raises(kdcache.KdcacheError) as err:
        kdcache.dump_teacher(other, models.tokens(), out, **HYBRID, **_quiet([]))
    message = str(err.value)
    assert f"teacher weights: cached 57177333b087c981e090b9a3bc97bff8, this dump {weights_digest(other, 'blake2b')}" \
        in message and "dataset" not in message
    assert store_files(out) == store_files(ROOT / HYBRID_FP)
