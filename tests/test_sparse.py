"""Sparse logits for large vocabularies and sequences: top-k and sampled caches, masks, losses."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conftest import run_cli, store_files
from kdcache import (CachedTeacherDataset, CacheMeta, DumpConfig, KdcacheError, TeacherCache, dump_teacher,
                     train_student)
from kdcache.format.attrs import codec_from_params
from kdcache.format.draws import counter_uniforms
from kdcache.format.sparse import HybridCodec, SampledCodec, TopKCodec, pack_ids, unpack_ids
from kdcache.format.attrs import _attrs_digest
from kdcache.data.items import fetch_batch
from kdcache.losses import HybridKLDivLoss, KLDivLoss, SampledKLDivLoss, TopKKLDivLoss

VOCAB, PADDED = 40, 48


def _round_trip(codec, logits, rows):
    """Encode ``logits`` of cache ``rows`` as stored, and decode them."""
    return codec.decode({k: codec.to_numpy(v) for k, v in codec.encode(logits, rows).items()})


def _teacher_logits(models, ds):
    inputs, _ = fetch_batch(ds, range(len(ds)))
    with torch.no_grad():
        logits = models.tiny_lm()(**inputs)["logits"]
    return logits, inputs["attention_mask"].bool()


@pytest.fixture()
def topk_cache(tmp_path, models):
    ds = models.tokens()
    cache = dump_teacher(models.tiny_lm(), ds, tmp_path / "topk", topk=8, vocab_size=VOCAB, batch_size=16,
                         layout="padded",
                         progress=False, log=lambda m: None)
    return ds, cache


def test_topk_cache_stores_torch_topk_and_logsumexp_of_real_tokens(topk_cache, models):
    ds, cache = topk_cache
    logits, mask = _teacher_logits(models, ds)
    stored = cache.read_output("logits", 0, len(ds))
    assert set(stored) == {"values", "indices", "logsumexp"} and "logits" not in cache.group
    values, ids = logits[..., :VOCAB].topk(8, dim=-1)
    got = TopKCodec(8, VOCAB).decode(stored)
    assert torch.equal(got["indices"][mask], ids[mask])
    torch.testing.assert_close(got["values"][mask], values[mask], atol=2e-2, rtol=1e-3)  # float16
    torch.testing.assert_close(got["logsumexp"][mask], logits[..., :VOCAB].logsumexp(-1)[mask])
    # padding is not stored as tokens: zero values, ids and logsumexp
    assert not stored["values"][~mask.numpy()].any() and not stored["logsumexp"][~mask.numpy()].any()
    meta = cache.meta
    assert (meta.vocab.real, meta.vocab.padded) == (VOCAB, PADDED) and meta.mask_key == "attention_mask"
    assert meta.tokens == int(mask.sum())
    assert meta.outputs["logits"].codec.params() == {"name": "topk", "k": 8, "vocab": VOCAB, "index_bits": 6}
    assert stored["indices"].shape == (len(ds), 12, 6)  # 8 ids x 6 bits = 6 bytes


@pytest.mark.parametrize("bits", [1, 6, 15, 17, 24])
def test_id_packing_round_trips(bits):
    ids = torch.randint(0, 2**bits, (3, 5, 13))
    packed = pack_ids(ids, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-13 * bits // 8)
    assert torch.equal(unpack_ids(packed, 13, bits), ids)


def test_top32_of_a_32k_vocabulary_fits_128_bytes_per_token():
    arrays = TopKCodec(32, 32000).arrays((2048, 32000))
    per_token = sum(int(np.prod(shape[1:])) * dtype.itemsize for shape, dtype in arrays.values())
    assert per_token == 64 + 60 + 4  # float16 values, 15-bit ids, float32 logsumexp
    sampled = SampledCodec(32, 32000).arrays((2048, 32000))
    assert sum(int(np.prod(s[1:])) * d.itemsize for s, d in sampled.values()) == 60 + 32
    hybrid = HybridCodec(16, 32, 32000).arrays((2048, 32000))
    assert sum(int(np.prod(s[1:])) * d.itemsize for s, d in hybrid.values()) == 32 + 30 + 60  # no logsumexp needed


def test_sampled_cache_counts_draws_per_real_token_and_is_batch_independent(tmp_path, models):
    ds = models.tokens()
    a = dump_teacher(models.tiny_lm(), ds, tmp_path / "a", sample_k=16, vocab_size=VOCAB, seed=3, batch_size=16,
                     layout="padded",
                     progress=False, log=lambda m: None)
    b = dump_teacher(models.tiny_lm(), ds, tmp_path / "b", sample_k=16, vocab_size=VOCAB, seed=3, batch_size=5,
                     layout="padded",
                     block_rows=8, progress=False, log=lambda m: None)
    _, mask = _teacher_logits(models, ds)
    got = SampledCodec(16, VOCAB, 1.0, 3).decode(a.read_output("logits", 0, len(ds)))
    assert torch.all(got["counts"].sum(-1)[mask] == 16) and torch.all(got["counts"].sum(-1)[~mask] == 0)
    assert int(got["ids"].max()) < VOCAB
    other = SampledCodec(16, VOCAB, 1.0, 3).decode(b.read_output("logits", 0, len(ds)))
    assert all(torch.equal(got[k], other[k]) for k in got)  # seeded per row, not per batch
    assert a.meta.outputs["logits"].codec.temperature == 1.0


def test_sampled_counts_are_an_unbiased_estimate_of_the_teacher():
    z = torch.randn(1, 10).repeat(4000, 1) * 2
    codec = SampledCodec(8, 10, temperature=2.0, seed=0)
    got = _round_trip(codec, z, torch.arange(4000))
    freq = torch.zeros(10).scatter_add_(0, got["ids"].flatten(), got["counts"].flatten()) / (8 * 4000)
    torch.testing.assert_close(freq, torch.softmax(z[0] / 2, -1), atol=0.01, rtol=0)
    u = counter_uniforms(0, torch.arange(1000), 1, 8)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.02


def test_systematic_draws_are_unbiased_and_give_each_class_floor_or_ceil_of_n_p():
    z = torch.randn(1, 10).repeat(4000, 1) * 2
    p = torch.softmax(z[0] / 2, -1)
    got = _round_trip(SampledCodec(8, 10, temperature=2.0, seed=0, draws="systematic"), z, torch.arange(4000))
    per_class = torch.zeros(4000, 10).scatter_add_(1, got["ids"], got["counts"])
    torch.testing.assert_close(per_class.mean(0) / 8, p, atol=0.01, rtol=0)  # unbiased
    assert torch.all(per_class >= torch.floor(8 * p) - 1e-6) and torch.all(per_class <= torch.ceil(8 * p) + 1e-6)
    iid = _round_trip(SampledCodec(8, 10, temperature=2.0, seed=0), z, torch.arange(4000))
    iid_per_class = torch.zeros(4000, 10).scatter_add_(1, iid["ids"], iid["counts"])
    assert float(per_class.var(0).sum()) < 0.5 * float(iid_per_class.var(0).sum())
    hybrid = _round_trip(HybridCodec(3, 8, 10, temperature=2.0, seed=0, draws="systematic"), z, torch.arange(4000))
    head = p.topk(3).indices
    tail_p = p.scatter(0, head, 0.0) / (1 - p[head].sum())
    tail_counts = torch.zeros(4000, 10).scatter_add_(1, hybrid.tail, torch.ones(4000, 8))
    torch.testing.assert_close(tail_counts.mean(0) / 8, tail_p, atol=0.01, rtol=0)
    assert torch.all(tail_counts <= torch.ceil(8 * tail_p) + 1e-6)


def test_sample_draws_are_recorded_and_fingerprinted_only_when_systematic(tmp_path, models):
    iid = DumpConfig(sample_k=8)
    assert "sample_draws" not in iid.fingerprint_inputs("none", False)
    assert iid.codec("logits", 40).params() == SampledCodec(8, 40).params() and "draws" not in SampledCodec(8, 40).params()
    systematic = DumpConfig(sample_k=8, sample_draws="systematic")
    assert systematic.fingerprint_inputs("none", False) == {**iid.fingerprint_inputs("none", False),
                                                             "sample_draws": "systematic"}
    with pytest.raises(KdcacheError, match="sample_draws must be one of iid, systematic"):
        DumpConfig(sample_k=8, sample_draws="sobol")
    with pytest.raises(KdcacheError, match="give one of them"):
        DumpConfig(topk=8, sample_draws="systematic")
    cache = dump_teacher(models.tiny_lm(), models.tokens(), tmp_path / "c", topk=4, tail_samples=8, vocab_size=VOCAB,
                         sample_draws="systematic", progress=False, log=lambda m: None)
    reopened = TeacherCache.open(cache.path)
    assert reopened.meta.logits.codec == HybridCodec(4, 8, VOCAB, 1.0, 0, "systematic")
    recorded = {**SampledCodec(8, VOCAB).params(), "draws": "sobol"}  # a cache from elsewhere
    with pytest.raises(KdcacheError, match="a cache: codec parameter draws 'sobol' is not one of systematic"):
        codec_from_params(recorded, "a cache")
    with pytest.raises(KdcacheError, match="wrong type"):
        codec_from_params({**recorded, "draws": 3}, "a cache")
    assert reopened.meta.fingerprint != dump_teacher(models.tiny_lm(), models.tokens(), tmp_path / "d", topk=4,
                                                     tail_samples=8, vocab_size=VOCAB, progress=False,
                                                     log=lambda m: None).meta.fingerprint


def test_a_recorded_sparse_codec_must_cover_the_real_vocabulary_and_name_a_known_scheme(topk_cache):
    _, cache = topk_cache
    attrs = cache.meta.to_attrs()
    CacheMeta.from_attrs(attrs, "c")
    wider = copy.deepcopy(attrs)
    wider["outputs"]["logits"]["codec"].update(vocab=PADDED, index_bits=6)  # ids up to 47 for 40 real classes
    wider["attrs_digest"] = _attrs_digest(wider)  # as an attacker would
    with pytest.raises(KdcacheError, match=r"codec's vocabulary \(48\) is not the real one \(40\)"):
        CacheMeta.from_attrs(wider, "c")
    spelled_out = {**SampledCodec(8, VOCAB).params(), "draws": "iid"}  # iid is recorded by leaving it out
    with pytest.raises(KdcacheError, match="draws 'iid' is not one of systematic"):
        codec_from_params(spelled_out, "c")


def test_sparse_targets_held_as_tensors_decode_as_from_disk():
    rows, z = torch.arange(6), torch.randn(6, 5, VOCAB) * 3
    for codec in (TopKCodec(4, VOCAB), SampledCodec(8, VOCAB, seed=1), HybridCodec(4, 8, VOCAB, seed=1)):
        stored = {k: codec.to_numpy(v) for k, v in codec.encode(z, rows).items()}
        from_disk = codec.decode(stored)
        held = codec.decode({k: torch.from_numpy(v) for k, v in stored.items()})  # as ResidentTargets holds them
        assert all(torch.equal(held[k], from_disk[k]) for k in from_disk.keys())
        on_meta = codec.decode({k: torch.from_numpy(v).to("meta") for k, v in stored.items()})  # a device, not numpy
        assert all(on_meta[k].shape == from_disk[k].shape for k in from_disk.keys())


def test_hybrid_loss_value_is_the_kl_to_its_head_and_counted_tail_draws():
    torch.manual_seed(5)
    vocab, t = 12, 2.0
    student = torch.randn(2, 3, vocab)
    teacher = torch.randn(2, 3, vocab)
    teacher[..., :3] += 6  # the head is classes 0-2; the tail draws below are outside it
    logprobs, indices = torch.log_softmax(teacher, -1).topk(3, dim=-1)
    tail = torch.tensor([4, 4, 4, 9, 9, 11]).expand(2, 3, 6)  # repeated draws: 3, 2 and 1 shares
    head = logprobs.exp()
    q = torch.zeros(2, 3, vocab).scatter(-1, indices, head)
    q = q.scatter_add(-1, tail, ((1 - head.sum(-1, keepdim=True)) / 6).expand(2, 3, 6))
    log_ps = torch.log_softmax(student / t, -1)
    want = (torch.xlogy(q, q) - q * log_ps).sum(-1).mean() * t * t  # batchmean: per position of a sequence
    torch.testing.assert_close(HybridKLDivLoss(t)(student, logprobs, indices, tail), want)
    many = torch.randint(3, vocab, (4, 4096))  # many draws: counted by sorting, not an N x N comparison
    lp, ids = torch.log_softmax(teacher[0, :1].expand(4, vocab), -1).topk(3, dim=-1)
    assert torch.isfinite(HybridKLDivLoss(1.0)(torch.randn(4, vocab), lp, ids, many))


def test_hybrid_cache_stores_the_exact_head_and_tail_draws_outside_it(tmp_path, models):
    ds = models.tokens()
    quiet = dict(vocab_size=VOCAB, topk=4, tail_samples=16, seed=3, layout="padded", progress=False, log=lambda m: None)
    cache = dump_teacher(models.tiny_lm(), ds, tmp_path / "a", batch_size=16, **quiet)
    logits, mask = _teacher_logits(models, ds)
    stored = cache.read_output("logits", 0, len(ds))
    assert set(stored) == {"logprobs", "indices", "tail"} and "logits" not in cache.group and "hybrid" in cache.group
    got = HybridCodec(4, 16, VOCAB, 1.0, 3).decode(stored)
    logprobs, head = torch.log_softmax(logits[..., :VOCAB], -1).topk(4, dim=-1)
    assert torch.equal(got.indices[mask], head[mask])
    torch.testing.assert_close(got.logprobs[mask], logprobs[mask].clamp_min(-1e4), atol=2e-3, rtol=1e-3)  # float16
    tail = got.tail[mask]
    assert int(tail.max()) < VOCAB and torch.all(tail[:, 1:] >= tail[:, :-1])  # real classes, sorted
    assert not (tail.unsqueeze(-1) == got.indices[mask].unsqueeze(-2)).any()  # never a head class
    assert not stored["logprobs"][~mask.numpy()].any() and not stored["tail"][~mask.numpy()].any()
    assert cache.meta.outputs["logits"].codec.params() == {"name": "hybrid", "k": 4, "n": 16, "vocab": VOCAB,
                                                         "temperature": 1.0, "seed": 3, "index_bits": 6}
    other = dump_teacher(models.tiny_lm(), ds, tmp_path / "b", batch_size=5, block_rows=8, **quiet)
    files = store_files(other.path)
    assert all(files[k] == v for k, v in store_files(cache.path).items() if k.startswith("hybrid/c/"))  # seeded per row


def test_hybrid_tail_draws_are_an_unbiased_estimate_of_the_tail():
    z = (torch.randn(1, 12) * 2).repeat(3000, 1)
    got = _round_trip(HybridCodec(3, 8, 12, temperature=2.0, seed=1), z, torch.arange(3000))
    p = torch.softmax(z[0] / 2, -1)
    head = p.topk(3).indices
    assert torch.equal(got.indices, head.expand(3000, 3))
    torch.testing.assert_close(got.logprobs[0].float(), p[head].log(), atol=1e-3, rtol=0)
    tail_mass = 1 - float(p[head].sum())
    estimate = torch.zeros(12).scatter_add_(0, got.tail.flatten(), torch.full((3000 * 8,), tail_mass / (3000 * 8)))
    assert float(estimate[head].sum()) == 0
    torch.testing.assert_close(estimate, p.scatter(0, head, 0.0), atol=0.006, rtol=0)


def test_hybrid_loss_equals_the_dense_loss_when_the_head_holds_all_the_mass():
    torch.manual_seed(3)
    student = torch.randn(3, 5, 30, requires_grad=True)
    teacher = torch.randn(3, 5, 30) * 3
    mask = torch.rand(3, 5) > 0.3
    tail = torch.randint(0, 30, (3, 5, 4))  # draws of a tail of no mass weigh nothing
    for t in (1.0, 4.0):
        logprobs, ids = torch.log_softmax(teacher / t, -1).topk(30, dim=-1)
        dense = KLDivLoss(t)(student, teacher, mask)
        hybrid = HybridKLDivLoss(t)(student, logprobs, ids, tail, mask)
        torch.testing.assert_close(hybrid, dense)
        torch.testing.assert_close(torch.autograd.grad(hybrid, student)[0], torch.autograd.grad(dense, student)[0])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hybrid_loss_gradient_is_an_unbiased_estimate_of_the_dense_gradient(temperature):
    """Over many draws of the tail (rows of one logits vector), the mean gradient is the dense one."""
    torch.manual_seed(4)
    rows, vocab = 4000, 25
    teacher = (torch.randn(1, vocab) * 2).expand(rows, vocab)
    student = torch.randn(1, vocab, requires_grad=True)
    got = _round_trip(HybridCodec(4, 3, vocab, temperature, seed=2), teacher, torch.arange(rows))
    hybrid = HybridKLDivLoss(temperature)(student.expand(rows, vocab), **dict(got))
    dense = KLDivLoss(temperature)(student, teacher[:1])
    g_hybrid, g_dense = torch.autograd.grad(hybrid, student)[0], torch.autograd.grad(dense, student)[0]
    # float16 head log-probabilities and 12,000 tail draws: a few standard errors of the tail estimate
    torch.testing.assert_close(g_hybrid, g_dense, atol=0.01 * temperature, rtol=0)
    values, ids = teacher[:1].topk(4)  # top-k's folded tail is off by 5x that, as the tail is not modelled
    topk = TopKKLDivLoss(temperature)(student, values, ids, teacher[:1].logsumexp(-1))
    assert float((torch.autograd.grad(topk, student)[0] - g_dense).abs().max()) > 0.05 * temperature


def test_topk_loss_equals_dense_loss_when_k_is_the_vocabulary():
    torch.manual_seed(0)
    student = torch.randn(3, 5, 30, requires_grad=True)
    teacher = torch.randn(3, 5, 30) * 3
    mask = torch.rand(3, 5) > 0.3
    values, ids = teacher.topk(30, dim=-1)
    for t in (1.0, 4.0):
        dense = KLDivLoss(t)(student, teacher, mask)
        sparse = TopKKLDivLoss(t)(student, values, ids, teacher.logsumexp(-1), mask)
        torch.testing.assert_close(sparse, dense)
        g_dense, = torch.autograd.grad(dense, student)
        g_sparse, = torch.autograd.grad(sparse, student)
        torch.testing.assert_close(g_sparse, g_dense)


def test_topk_loss_at_t1_is_the_kl_of_kept_classes_plus_tail():
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 20), torch.randn(4, 20) * 2
    values, ids = teacher.topk(5, dim=-1)
    p = torch.softmax(teacher, -1)
    q = torch.softmax(student, -1)
    pk, qk = p.gather(-1, ids), q.gather(-1, ids)
    pt, qt = 1 - pk.sum(-1), 1 - qk.sum(-1)
    expected = ((pk * (pk / qk).log()).sum(-1) + pt * (pt / qt).log()).mean()
    torch.testing.assert_close(TopKKLDivLoss(1.0)(student, values, ids, teacher.logsumexp(-1)), expected)


def test_masked_positions_do_not_count_in_any_kd_loss():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 6, 12), torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    noisy = student.clone()
    noisy[~mask] += 100 * torch.randn_like(noisy[~mask])
    values, ids = teacher.topk(4, -1)
    sampled, hybrid = (_round_trip(c, teacher, torch.arange(2)) for c in (SampledCodec(8, 12), HybridCodec(3, 8, 12)))
    losses = [lambda s: KLDivLoss(2.0)(s, teacher, mask),
              lambda s: TopKKLDivLoss(2.0)(s, values, ids, teacher.logsumexp(-1), mask),
              lambda s: SampledKLDivLoss(1.0)(s, sampled["ids"], sampled["counts"], mask),
              lambda s: HybridKLDivLoss(1.0)(s, **dict(hybrid), mask=mask)]
    for loss in losses:
        torch.testing.assert_close(loss(noisy), loss(student))
        assert float(loss(student)) > 0


def test_dataset_returns_sparse_teacher_and_padding_mask(topk_cache):
    ds, cache = topk_cache
    data = CachedTeacherDataset(ds, cache)
    inputs, labels, teacher = data.__getitems__([0, 3, 7]).collated
    assert torch.equal(teacher["mask"], inputs["attention_mask"].bool())
    assert teacher["logits"]["values"].shape == (3, 12, 8) and teacher["logits"]["indices"].dtype == torch.int64
    assert labels.shape == (3, 12)
    row = data[3]  # per-row access works for sparse outputs too
    assert row[2]["logits"]["values"].shape == (12, 8)


def test_student_distils_from_topk_sampled_and_hybrid_caches_and_wrong_vocabulary_is_refused(tmp_path, topk_cache,
                                                                                              models):
    ds, cache = topk_cache
    teacher_logits, mask = _teacher_logits(models, ds)
    p_t = torch.softmax(teacher_logits[..., :VOCAB], -1)

    def kl_to_teacher(student):
        with torch.no_grad():
            logq = torch.log_softmax(student(**fetch_batch(ds, range(len(ds)))[0])["logits"][..., :VOCAB], -1)
        return float((p_t * (p_t.log() - logq)).sum(-1)[mask].mean())

    sampled = dump_teacher(models.tiny_lm(), ds, tmp_path / "s", sample_k=16, vocab_size=VOCAB, progress=False,
                           log=lambda m: None)
    hybrid = dump_teacher(models.tiny_lm(), ds, tmp_path / "h", topk=2, tail_samples=8, vocab_size=VOCAB,
                          progress=False, log=lambda m: None)
    for cache_path, padded in ((cache, VOCAB), (sampled, PADDED), (hybrid, PADDED)):
        student = models.tiny_lm(width=8, padded=padded, seed=4)
        before = kl_to_teacher(student)
        result = train_student(student, ds, cache_path, epochs=15, lr=0.02, alpha=1.0, batch_size=8,
                               progress=False, temperature=None)
        assert result.final["kd"] > 0 and kl_to_teacher(student) < 0.7 * before
    with pytest.raises(KdcacheError, match="vocabulary/class count must be 40 or 48"):
        train_student(models.tiny_lm(width=8, padded=44), ds, cache, epochs=1, progress=False)
    for drawn in (sampled, hybrid):
        with pytest.raises(KdcacheError, match="sampled at temperature 1"):
            train_student(models.tiny_lm(width=8), ds, drawn, epochs=1, temperature=4.0, progress=False)


def test_tail_samples_need_a_head_with_a_tail_and_enter_the_fingerprint_only_when_given():
    with pytest.raises(KdcacheError, match="give topk too"):
        DumpConfig(tail_samples=8)
    with pytest.raises(KdcacheError, match="leaves no tail"):
        DumpConfig(topk=40, tail_samples=8).codec("logits", 40)
    assert DumpConfig(topk=8, tail_samples=4, seed=2).codec("logits", 48) == HybridCodec(8, 4, 48, 1.0, 2)
    top8 = DumpConfig(topk=8).fingerprint_inputs("none", False)
    assert "tail_samples" not in top8
    assert DumpConfig(topk=8, tail_samples=4).fingerprint_inputs("none", False) == {**top8, "tail_samples": 4}


def test_cli_topk_dump_info_and_training(tmp_path, models_file):
    spec = f"{models_file}:"
    out = run_cli("dump-teacher", "--teacher", spec + "tiny_lm", "--dataset", spec + "tokens", "--topk", "4",
                  "--vocab-size", "40", "--out", str(tmp_path / "c"), "--no-progress")
    assert out.returncode == 0, out.stderr
    info = run_cli("info", str(tmp_path / "c"))
    assert info.returncode == 0 and "topk/indices" in info.stdout and "B/token" in info.stdout, info.stdout
    assert "40 classes (output layer 48)" in info.stdout
    train = run_cli("train-student", "--student", spec + "tiny_lm", "--student-kwargs", '{"width": 8}',
                    "--dataset", spec + "tokens", "--cache", str(tmp_path / "c"), "--epochs", "2",
                    "--out", str(tmp_path / "run"), "--no-progress")
    assert train.returncode == 0, train.stderr
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["kd"] > 0
    both = run_cli("dump-teacher", "--teacher", spec + "tiny_lm", "--dataset", spec + "tokens", "--topk", "4",
                   "--sample-k", "4", "--out", str(tmp_path / "d"))
    assert both.returncode == 2 and "choose one" in both.stderr and "Traceback" not in both.stderr
    big = run_cli("dump-teacher", "--teacher", spec + "tiny_lm", "--dataset", spec + "tokens", "--topk", "41",
                  "--vocab-size", "40", "--out", str(tmp_path / "e"))
    assert big.returncode == 2 and "larger than the vocabulary" in big.stderr
    tail = run_cli("dump-teacher", "--teacher", spec + "tiny_lm", "--dataset", spec + "tokens", "--tail-samples", "4",
                   "--out", str(tmp_path / "f"))
    assert tail.returncode == 2 and "give topk too" in tail.stderr and "Traceback" not in tail.stderr
    assert TeacherCache.exists(tmp_path / "c")


def test_cli_hybrid_systematic_dump_trains_in_another_process_and_a_bad_scheme_is_one_line(tmp_path, models_file):
    spec = f"{models_file}:"
    dump = ["dump-teacher", "--teacher", spec + "tiny_lm", "--dataset", spec + "tokens", "--topk", "4",
            "--tail-samples", "8", "--vocab-size", "40", "--no-progress"]
    out = run_cli(*dump, "--sample-draws", "systematic", "--out", str(tmp_path / "c"))
    assert out.returncode == 0, out.stderr
    assert TeacherCache.open(tmp_path / "c").meta.logits.codec == HybridCodec(4, 8, 40, 1.0, 0, "systematic")
    train = run_cli("train-student", "--student", spec + "tiny_lm", "--student-kwargs", '{"width": 8}',
                    "--dataset", spec + "tokens", "--cache", str(tmp_path / "c"), "--epochs", "1",
                    "--out", str(tmp_path / "run"), "--no-progress")
    assert train.returncode == 0, train.stderr
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["kd"] > 0
    bad = run_cli(*dump, "--sample-draws", "sobol", "--out", str(tmp_path / "d"))
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("kdcache: error:"), bad.stderr
    assert "sample_draws must be one of iid, systematic" in lines[0] and not (tmp_path / "d").exists()


@pytest.mark.parametrize("bits", [1, 3, 7, 8, 13, 15, 16, 17, 24, 31])
@pytest.mark.parametrize("k", [1, 5, 32])
def test_packed_ids_are_the_little_endian_bit_string_of_the_ids(bits, k):
    ids = torch.randint(0, 2**bits, (4, 3, k), generator=torch.Generator().manual_seed(bits * 100 + k))
    bit_string = ((ids.numpy()[..., None] >> np.arange(bits)) & 1).reshape(4, 3, k * bits).astype(np.uint8)
    np.testing.assert_array_equal(pack_ids(ids, bits).numpy(), np.packbits(bit_string, axis=-1, bitorder="little"))


@pytest.mark.parametrize("codec", [TopKCodec(5, 37), SampledCodec(9, 37, 0.8, 4), SampledCodec(300, 37, 1.0, 1),
                                   HybridCodec(3, 11, 37, 1.5, 2, "systematic"), HybridCodec(2, 7, 37)],
                         ids=lambda c: type(c).__name__)
def test_encoding_the_real_tokens_alone_stores_what_encoding_the_whole_batch_stores_there(codec):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, 40, generator=g) * 3  # padded vocabulary 40, real 37
    rows = torch.tensor([7, 8, 9])
    real = (torch.rand(3, 50, generator=g) < 0.6).reshape(-1).nonzero().squeeze(1)
    whole = codec.encode(logits, rows)
    tokens = codec.encode_tokens(logits.reshape(-1, 40)[real], rows.repeat_interleave(50)[real], real % 50)
    assert whole.keys() == tokens.keys()
    for key, stored in whole.items():
        assert torch.equal(stored.reshape(150, *stored.shape[2:])[real], tokens[key]), key
