"""The KD divergences (forward KL, reverse KL, generalised JSD) against their definitions: values,
closed-form gradients, T^2 scaling, masks, and the top-k loss's bucketed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.losses import DivergenceLoss, JSDivLoss, KLDivLoss, ReverseKLDivLoss, TopKKLDivLoss
from kdcache.losses.divergences import Divergence


def _reference(name, s, t, T, beta=0.5):
    """Per row, from the definitions with torch's own ops (GKD's/TRL's form of the JSD)."""
    log_q, log_p = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    if name == "kl":
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1) * T * T
    if name == "reverse_kl":
        return F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1) * T * T
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), 0)
    kl_p = F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
    kl_q = F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1)
    return (beta * kl_p + (1 - beta) * kl_q) * T * T


@pytest.mark.parametrize("name,beta", [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
def test_each_divergence_matches_its_definition_value_and_gradient(name, beta):
    torch.manual_seed(0)
    s = torch.randn(4, 6, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, 9, dtype=torch.float64)
    mask = torch.rand(4, 6) > 0.3
    loss = DivergenceLoss(Divergence(name, beta), temperature=2.0)
    want = (_reference(name, s, t, 2.0, beta) * mask).sum() / mask.sum()
    got = loss(s, t, mask)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)  # the mask weighs in float32
    (g_got,) = torch.autograd.grad(got, s)
    (g_want,) = torch.autograd.grad(want, s)
    assert torch.allclose(g_got, g_want, atol=1e-8)
    assert loss(s, t, mask.long()).item() == pytest.approx(got.item())
    per_token = DivergenceLoss(Divergence(name, beta), 2.0, reduction="none")(s, t)
    assert torch.allclose(per_token, _reference(name, s, t, 2.0, beta))


def test_reverse_kl_and_jsd_are_zero_for_a_student_equal_to_the_teacher_and_differ_from_kl():
    torch.manual_seed(1)
    s, t = torch.randn(8, 11), torch.randn(8, 11)
    kl = KLDivLoss(1.5)(s, t).item()
    for loss in (ReverseKLDivLoss(1.5), JSDivLoss(0.5, 1.5), JSDivLoss(0.1, 1.5)):
        assert loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
        assert loss(s, t).item() > 1e-3 and abs(loss(s, t).item() - kl) > 1e-3
    assert DivergenceLoss("kl", 1.5)(s, t).item() == pytest.approx(kl, rel=1e-6)


def test_jsd_tends_to_beta_times_the_forward_kl_as_beta_goes_to_zero():
    torch.manual_seed(2)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    kl = KLDivLoss(1.0)(s, t).item()
    assert JSDivLoss(1e-4, 1.0)(s, t).item() / 1e-4 == pytest.approx(kl, rel=2e-3)


def test_objective_names_parse_and_bad_ones_say_what_is_accepted():
    assert Divergence.parse("jsd:0.1") == Divergence("jsd", 0.1) and str(Divergence.parse("jsd:0.1")) == "jsd:0.1"
    assert Divergence.parse("jsd") == Divergence("jsd", 0.5) and str(Divergence.parse("reverse_kl")) == "reverse_kl"
    for bad, words in (("jsd:1", "within \\(0, 1\\)"), ("jsd:x", "needs a number"), ("kl:0.2", "only jsd"),
                       ("tvd", "one of kl, reverse_kl, jsd")):
        with pytest.raises(ValueError, match=words):
            Divergence.parse(bad)


@pytest.mark.parametrize("objective", ["reverse_kl", "jsd:0.3"])
def test_topk_divergences_equal_the_dense_ones_when_k_is_the_vocabulary(objective):
    torch.manual_seed(3)
    s, t = torch.randn(3, 4, 10), torch.randn(3, 4, 10)
    values, indices = t.topk(10, -1)
    got = TopKKLDivLoss(1.0, divergence=objective)(s, values, indices, t.logsumexp(-1))
    assert got.item() == pytest.approx(DivergenceLoss(objective, 1.0)(s, t).item(), rel=1e-5)


def test_topk_reverse_kl_is_the_divergence_of_the_kept_classes_plus_tail_buckets():
    torch.manual_seed(4)
    s, t = torch.randn(6, 12), torch.randn(6, 12)
    values, indices = t.topk(3, -1)
    p = F.softmax(t, -1)
    q = F.softmax(s, -1)
    fold = lambda d: torch.cat([d.gather(-1, indices), 1 - d.gather(-1, indices).sum(-1, keepdim=True)], -1)  # noqa: E731
    want = (fold(q) * (fold(q).log() - fold(p).log())).sum(-1).mean()
    got = TopKKLDivLoss(1.0, divergence="reverse_kl")(s, values, indices, t.logsumexp(-1))
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


def test_kd_term_refuses_divergences_a_sampled_or_hybrid_cache_cannot_estimate_in_one_line():
    from kdcache import KdcacheError, TrainConfig
    from kdcache.format.sparse import HybridCodec, SampledCodec, TopKCodec
    from kdcache.train.kdterm import KDTerm

    for codec in (SampledCodec(8, 40), HybridCodec(4, 8, 40)):
        with pytest.raises(KdcacheError, match="estimate the KL's gradient without bias") as err:
            KDTerm(codec, 40, None, "reverse_kl")
        assert "\n" not in str(err.value)
        assert KDTerm(codec, 40, None, "kl").objective == "kl"
    assert KDTerm(TopKCodec(4, 40), 40, 1.0, "jsd:0.2").loss.divergence == Divergence("jsd", 0.2)
    with pytest.raises(KdcacheError, match="objective must be kl, reverse_kl, jsd"):
        TrainConfig(objective="jsd:2")
    assert TrainConfig(objective="jsd:0.9").objective == "jsd:0.9"


def test_train_student_minimises_the_reverse_kl_of_a_dense_cache_held_in_memory(tmp_path, models):
    from kdcache import dump_teacher, train_student

    data = models.dataset(120)
    cache = dump_teacher(models.teacher(), data, tmp_path / "c", progress=False, log=lambda m: None)
    result = train_student(models.student(), data, cache, epochs=4, batch_size=32, lr=1e-2, alpha=1.0,
                           objective="reverse_kl", temperature=2.0, progress=False)
    kd = [m["kd"] for m in result.metrics]
    assert kd[-1] < kd[0]
    # the recorded KD term is the reverse KL of the trained student, not the forward KL
    x, _ = data[:]
    with torch.no_grad():
        s, t = result.student(x), models.teacher()(x)
    assert result.final["train_kl"] == pytest.approx(ReverseKLDivLoss(2.0)(s, t).item(), rel=5e-3)
