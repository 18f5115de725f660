"""Losses against hand computations: reduction, T^2 scaling, masks, projections."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.losses import AttentionTransferLoss, HiddenStateLoss, KLDivLoss, SoftTargetCrossEntropy
from kdcache.losses.targets import SoftTargets, teacher_side


def _hand_kl(s, t, T):
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        zs = [v / T for v in srow]
        zt = [v / T for v in trow]
        ls = math.log(sum(math.exp(v) for v in zs))
        lt = math.log(sum(math.exp(v) for v in zt))
        total += sum(math.exp(b - lt) * ((b - lt) - (a - ls)) for a, b in zip(zs, zt))
    return total / len(s) * T * T


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kl_is_batchmean_times_t_squared(T):
    torch.manual_seed(0)
    s, t = torch.randn(6, 7), torch.randn(6, 7)
    assert KLDivLoss(T)(s, t).item() == pytest.approx(_hand_kl(s, t, T), rel=1e-5)
    ref = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), log_target=True, reduction="batchmean") * T * T
    assert KLDivLoss(T)(s, t).item() == pytest.approx(ref.item(), rel=1e-5)
    assert KLDivLoss(T)(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_on_sequences_averages_over_unmasked_tokens():
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    rows_s = torch.cat([s[0, :3], s[1]])
    rows_t = torch.cat([t[0, :3], t[1]])
    assert KLDivLoss(2.0)(s, t, mask).item() == pytest.approx(_hand_kl(rows_s, rows_t, 2.0), rel=1e-5)
    # padding values do not matter
    s2 = s.clone()
    s2[0, 3:] = 100.0
    assert KLDivLoss(2.0)(s2, t, mask).item() == pytest.approx(KLDivLoss(2.0)(s, t, mask).item(), rel=1e-6)
    assert KLDivLoss(2.0, reduction="none")(s, t).shape == (2, 5)


def test_soft_target_ce_is_kl_plus_teacher_entropy():
    torch.manual_seed(2)
    s, t, T = torch.randn(5, 6), torch.randn(5, 6), 3.0
    p_t = F.softmax(t / T, 1)
    entropy = -(p_t * p_t.log()).sum(1).mean() * T * T
    assert SoftTargetCrossEntropy(T)(s, t).item() == pytest.approx((KLDivLoss(T)(s, t) + entropy).item(), rel=1e-5)


def test_kl_refuses_mismatched_class_counts():
    with pytest.raises(ValueError, match="differ in shape"):
        KLDivLoss()(torch.randn(2, 5), torch.randn(2, 6))


def test_hidden_mse_and_cosine_by_hand():
    torch.manual_seed(3)
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    assert HiddenStateLoss("mse")(s, t).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)
    cos = [(a @ b / (a.norm() * b.norm())).item() for a, b in zip(s, t)]
    assert HiddenStateLoss("cosine")(s, t).item() == pytest.approx(sum(1 - c for c in cos) / 4, rel=1e-5)


def test_hidden_projection_when_dims_differ_linear_and_conv():
    loss = HiddenStateLoss("mse", student_dim=3, teacher_dim=8)
    s, t = torch.randn(4, 3), torch.randn(4, 8)
    assert loss(s, t).item() == pytest.approx(((s @ loss.projection.weight.T - t) ** 2).mean().item(), rel=1e-5)
    conv = HiddenStateLoss("mse", student_dim=3, teacher_dim=8, conv=True)
    assert isinstance(conv.projection, torch.nn.Conv2d) and conv.projection.kernel_size == (1, 1)
    s4, t4 = torch.randn(2, 3, 4, 4), torch.randn(2, 8, 4, 4)
    proj = torch.einsum("oc,bchw->bohw", conv.projection.weight[:, :, 0, 0], s4)
    assert conv(s4, t4).item() == pytest.approx(((proj - t4) ** 2).mean().item(), rel=1e-5)
    assert len(list(conv.parameters())) == 1


def test_attention_transfer_by_hand():
    torch.manual_seed(4)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)

    def at(x):
        a = x.pow(2).mean(1).flatten(1)
        return a / a.norm(dim=1, keepdim=True)

    assert AttentionTransferLoss()(s, t).item() == pytest.approx((at(s) - at(t)).pow(2).mean().item(), rel=1e-5)
    # a student map of another spatial size is resized to the teacher's
    assert AttentionTransferLoss()(torch.randn(2, 3, 8, 8), t).ndim == 0


def _reference_kl(s, t, T, mask=None, reduction="batchmean", entropy=True):
    """Autograd through the textbook formula, in float64."""
    log_ps, log_pt = F.log_softmax(s.double() / T, -1), F.log_softmax(t.double() / T, -1)
    per = (log_pt.exp() * ((log_pt if entropy else 0) - log_ps)).sum(-1) * T * T
    if reduction == "none":
        return per * (mask if mask is not None else 1)
    if mask is not None:
        per = per * mask
        return per.sum() / mask.sum() if reduction == "batchmean" else per.sum()
    return per.sum() / per.numel() if reduction == "batchmean" else per.sum()


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("cls", [KLDivLoss, SoftTargetCrossEntropy])
def test_soft_target_gradients_match_autograd_of_the_formula(cls, reduction, masked):
    torch.manual_seed(4)
    s, t = torch.randn(3, 5, 7, dtype=torch.float64), torch.randn(3, 5, 7, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float64) if masked else None
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = cls(2.5, reduction=reduction)(s1, t, mask)
    want = _reference_kl(s2, t, 2.5, mask, reduction, entropy=cls is KLDivLoss)
    torch.testing.assert_close(got, want)
    weights = torch.randn_like(got)  # an arbitrary upstream gradient
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_kl_gradcheck_and_half_precision_logits():
    torch.manual_seed(5)
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: KLDivLoss(3.0)(x, t), (s,))
    half = s.detach().to(torch.bfloat16).requires_grad_()
    KLDivLoss(3.0)(half, t.half()).backward()  # computed in float32, gradient in the logits' dtype
    assert half.grad.dtype == torch.bfloat16
    ref = s.detach().to(torch.bfloat16).double().requires_grad_()
    _reference_kl(ref, t.half().double(), 3.0).backward()
    torch.testing.assert_close(half.grad.double(), ref.grad, atol=1e-2, rtol=1e-2)


def _soft(t, T, dtype):
    log_p, p = teacher_side(t, T)
    return SoftTargets(p.to(dtype), (p * log_p).sum(-1), T)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("cls", [KLDivLoss, SoftTargetCrossEntropy])
def test_precomputed_teacher_side_gives_the_same_value_and_gradient(cls, reduction, masked):
    torch.manual_seed(6)
    s, t = torch.randn(4, 6, 100) * 3, (torch.randn(4, 6, 100) * 3).half()
    mask = (torch.rand(4, 6) > 0.3).float() if masked else None
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    want = cls(4.0, reduction=reduction)(s1, t, mask)
    got = cls(4.0, reduction=reduction)(s2, _soft(t, 4.0, torch.float16), mask)
    # float16 probabilities: each p_t within 2^-11 of its float32 value, so the value is within
    # 2^-11 of the cross-entropy term and each gradient entry within T * 2^-11 * p_t * |dL/d row|
    cross_entropy = SoftTargetCrossEntropy(4.0, reduction=reduction)(s, t, mask)
    assert ((got - want).abs() <= 2 ** -11 * cross_entropy + 1e-5).all()
    weights = torch.randn_like(got)
    (want * weights).sum().backward()
    (got * weights).sum().backward()
    p_max = torch.softmax(t.float() / 4.0, -1).max()
    rows = (mask.sum() if masked else torch.tensor(24.0)) if reduction == "batchmean" else 1.0
    bound = 4.0 * 2 ** -11 * p_max * weights.abs().max() / rows + 1e-6
    torch.testing.assert_close(s2.grad, s1.grad, rtol=0, atol=float(bound))
    assert not torch.equal(s2.grad, s1.grad)  # the float16 path really ran


def test_precomputed_teacher_side_in_float32_equals_the_logits_path():
    torch.manual_seed(7)
    s, t = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)
    got = KLDivLoss(2.0)(s, _soft(t, 2.0, torch.float32))
    got.backward()
    grad, s.grad = s.grad.clone(), None
    want = KLDivLoss(2.0)(s, t)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, s.grad)


def test_precomputed_teacher_side_refuses_another_temperature():
    soft = _soft(torch.randn(2, 5), 2.0, torch.float16)
    with pytest.raises(ValueError, match="temperature 2"):
        KLDivLoss(4.0)(torch.randn(2, 5), soft)
