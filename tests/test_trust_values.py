"""Every value read from a cache, a flag or a config file is range-checked before use (issue "A
shared cache can be trusted, round three"). The forged caches below recompute their block
digests as anyone can (they are keyed crc32c, not secret): what stops them is a check of the
values themselves, once per block as it is loaded, in one line naming the array and block."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import kdcache
from kdcache import CachedTeacherDataset, KdcacheError, TeacherCache
from kdcache.format.meta import BLOCKS, SPANS
from kdcache.losses import HybridKLDivLoss, SampledKLDivLoss, TopKKLDivLoss
from kdcache.losses.sparse import TargetsError
from kdcache.store.chunkfile import read_rows
from kdcache.store.identity import block_digest

from conftest import run_cli
from test_trust import _dump_cli, _one_line

QUIET = dict(progress=False, log=lambda m: None)
CODECS = {"topk": dict(topk=4), "sampled": dict(sample_k=6), "hybrid": dict(topk=3, tail_samples=4)}


def _sparse(tmp_path: Path, models, kind: str) -> tuple[Path, object]:
    """A packed sequence cache of ``kind`` over a 40-class vocabulary (6-bit ids: 40..63 fit)."""
    ds = models.tokens(n=24)
    kdcache.dump_teacher(models.tiny_lm(), ds, tmp_path / kind, vocab_size=40, block_rows=8, batch_size=8,
                         **CODECS[kind], **QUIET)
    return tmp_path / kind, ds


def _forge(path: Path, array: str, block: int, edit) -> None:
    """Rewrite block ``block`` of ``array`` with ``edit(stored rows)``, then its digest in the
    completion record, as an attacker can: the digests verify again."""
    cache = TeacherCache.open(path, mode="r+")
    a = cache.array_info(array)
    start, stop = cache.array_range(a, block)
    rows = read_rows(Path(path), array, (a.chunk_rows, *a.shape), a.dtype, cache.length(a), start, stop).copy()
    rows = edit(rows)
    cache._write_rows(array, start, rows)
    if array in cache.meta.bound:
        record = cache.blocks_record()[block].copy()
        record[5 + cache.meta.bound.index(array)] = block_digest(cache.fingerprint, array, block, rows)
        cache._write_rows(BLOCKS, block, record[None])


def _ids_beyond(rows: np.ndarray) -> np.ndarray:
    rows[...] = 0xFF  # every 6-bit id 63
    return rows


# 1. stored ids, spans, draw counts and head probabilities ----------------------------------------
@pytest.mark.parametrize("kind,array", [("topk", "topk/indices"), ("sampled", "sampled/ids"),
                                        ("hybrid", "hybrid/tail")])
def test_stored_ids_beyond_the_vocabulary_are_refused_at_block_load_and_by_verify(tmp_path, models, kind, array):
    path, ds = _sparse(tmp_path, models, kind)
    _forge(path, array, 1, _ids_beyond)
    verified = run_cli("verify", str(path))
    assert verified.returncode == 1 and f"BAD {array} block 1" in verified.stdout and "class id 63" in verified.stdout
    for in_memory in (True, False):
        with pytest.raises(KdcacheError, match=f"{array} block 1 .*class id 63, beyond the 40-class vocabulary"):
            data = CachedTeacherDataset(ds, path, in_memory=in_memory)
            data.__getitems__(list(range(len(ds))))


@pytest.mark.parametrize("count", [-4, 1 << 30])
def test_a_span_that_does_not_fit_the_token_blocks_is_refused_in_one_line(tmp_path, models, count):
    path, ds = _sparse(tmp_path, models, "topk")

    def edit(spans):
        spans[0, 1] = count
        return spans
    _forge(path, SPANS, 0, edit)
    with pytest.raises(KdcacheError, match=f"{SPANS} block 0 .*(negative token span|spans of)"):
        CachedTeacherDataset(ds, path)
    assert "_spans" in run_cli("verify", str(path)).stdout


@pytest.mark.parametrize("count", [0, 255])
def test_draw_counts_that_are_not_the_recorded_draws_are_refused(tmp_path, models, count):
    path, ds = _sparse(tmp_path, models, "sampled")
    _forge(path, "sampled/counts", 0, lambda rows: np.full_like(rows, count))
    with pytest.raises(KdcacheError, match="sampled/counts block 0 .*draw counts adding up to .* not the 6 draws"):
        CachedTeacherDataset(ds, path, in_memory=True)


def test_a_forged_hybrid_head_above_probability_one_is_refused(tmp_path, models):
    path, ds = _sparse(tmp_path, models, "hybrid")
    _forge(path, "hybrid/logprobs", 2, lambda rows: np.full_like(rows, 3.0))
    with pytest.raises(KdcacheError, match="hybrid/logprobs block 2 .*kept probabilities summing to .* > 1"):
        CachedTeacherDataset(ds, path, in_memory=False).__getitems__(list(range(len(ds))))


# 2. the losses refuse what is not a distribution, rather than clamp it ----------------------------
def test_the_topk_and_hybrid_losses_refuse_kept_mass_above_one_and_take_float16_rounding():
    g = torch.Generator().manual_seed(0)
    logits = 30 + 3 * torch.randn(2, 5, 50, generator=g)  # large logits: float16 rounds them by up to 1/64
    values, ids = logits.topk(8, -1)
    student = torch.randn(2, 5, 50, generator=g)
    lse = logits.logsumexp(-1)
    assert torch.isfinite(TopKKLDivLoss()(student, values.half().float(), ids, lse))  # rounding is not refused
    with pytest.raises(TargetsError, match="top-k probabilities sum to .* > 1 at 10 positions"):
        TopKKLDivLoss()(student, values, ids, lse - 1.0)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    assert torch.isfinite(TopKKLDivLoss()(student, values, ids, lse - 1.0, mask=mask))  # masked: not a target
    logprobs = torch.full((2, 5, 3), 3.0)
    with pytest.raises(TargetsError, match="head probabilities"):
        HybridKLDivLoss()(student, logprobs, ids[..., :3], torch.randint(8, 50, (2, 5, 4), generator=g))


def test_the_sampled_loss_refuses_positions_that_count_without_draws():
    student = torch.randn(2, 5, 50)
    ids, counts = torch.randint(0, 50, (2, 5, 4)), torch.zeros(2, 5, 4)
    with pytest.raises(TargetsError, match="10 positions that count have no draws"):
        SampledKLDivLoss()(student, ids, counts)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    assert torch.isfinite(SampledKLDivLoss()(student, ids, counts, mask=mask))  # padding may have none


# 3. the description: digests that are digests, finite temperatures ---------------------------------
def test_an_attrs_digest_that_is_not_a_digest_never_seals_a_description(tmp_path, models, models_file):
    path, _ = _sparse(tmp_path, models, "sampled")
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"]["kdcache"]["outputs"]["logits"]["codec"]["temperature"] = math.inf
    doc["attributes"]["kdcache"]["attrs_digest"] = "unserialisable"  # what a description with inf digests to
    (path / "zarr.json").write_text(json.dumps(doc))
    assert "attrs_digest" in _one_line(run_cli("info", str(path)))


def test_a_recorded_sampling_temperature_must_be_finite():
    from kdcache.format.attrs import codec_from_params
    for temperature in (math.inf, -1.0, 0.0):
        with pytest.raises(KdcacheError, match="temperature"):
            codec_from_params({"name": "sampled", "n": 6, "vocab": 40, "temperature": temperature, "seed": 0}, "c")


# 4. flags and config files: devices that exist, integers the code can hold --------------------------
def test_a_device_this_machine_lacks_is_one_line_from_a_flag_or_a_config_file(tmp_path, models_file):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    line = _one_line(_dump_cli(models_file, tmp_path / "c", "--device", "mps"))
    assert "--device mps" in line and "no MPS device" in line and not (tmp_path / "c").exists()
    config = tmp_path / "run.toml"
    config.write_text(f'student = "{models_file}:student"\ndataset = "{models_file}:dataset"\ndevice = "mps"\n'
                      f'out = "{tmp_path / "run"}"\n')
    assert "no MPS device" in _one_line(run_cli("train-student", "--config", str(config)))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("toml,message", [("views = 1099511627776", "views must be within"),
                                          ("block_rows = 1099511627776", "block_rows must be within"),
                                          ("batch_size = 4611686018427387904", "batch_size must be within")])
def test_a_dump_config_integer_beyond_what_the_code_holds_is_one_line_and_writes_nothing(tmp_path, models_file, toml,
                                                                                          message):
    config = tmp_path / "dump.toml"
    config.write_text(f'teacher = "{models_file}:teacher"\ndataset = "{models_file}:dataset"\n'
                      f'out = "{tmp_path / "c"}"\nprogress = false\n{toml}\n')
    assert message in _one_line(run_cli("dump-teacher", "--config", str(config), timeout=120))
    assert not (tmp_path / "c").exists()
