"""The KD term from the input of the teacher's output layer: the teacher's logits ``h @ W.T + b``
computed on the training device a chunk of tokens at a time and fused with the divergence, so the
``[tokens, vocab]`` matrix of teacher logits never exists whole (nor its probabilities).

Forward computes each chunk's teacher logits, both log-softmaxes and the divergence, and keeps
only the student's logits, the hidden states and the layer; backward computes each chunk's
teacher side again and writes the closed-form gradient (:meth:`Divergence.grad`) into the
student's logits' gradient. Memory beyond the student's own logits is a few ``chunk x vocab``
float32 buffers: ~``CHUNK_BYTES`` each.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .divergences import Divergence
from .reduction import check_reduction, check_temperature

__all__ = ["HeadKDLoss", "head_logits", "head_top1", "CHUNK_BYTES"]

CHUNK_BYTES = 32 << 20  # float32 bytes of one chunk's teacher logits: 256 tokens at V = 32k


def _chunk(tokens: int, vocab: int, chunk_tokens: int | None) -> int:
    return max(1, chunk_tokens if chunk_tokens is not None else CHUNK_BYTES // (4 * max(vocab, 1)))


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``hidden @ weight.T + bias`` in float32: (N, H) x (V, H) -> (N, V). A half-precision layer
    on a GPU multiplies in its own dtype (tensor cores, float32 accumulation), as the teacher did;
    elsewhere in float32."""
    dtype = weight.dtype if weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    out = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return out.float()


def head_top1(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, classes: int | None = None,
              chunk_tokens: int | None = None) -> torch.Tensor:
    """The teacher's most likely class per position, int64 (B, *P), from ``hidden`` (B, *P, H): the
    argmax of ``h @ W.T + b`` over the first ``classes`` rows of the layer, a chunk at a time."""
    classes = weight.shape[0] if classes is None else classes
    flat = hidden.reshape(-1, hidden.shape[-1])
    step = _chunk(len(flat), classes, chunk_tokens)
    w, b = weight[:classes], None if bias is None else bias[:classes]
    top = [head_logits(flat[a:a + step], w, b).argmax(-1) for a in range(0, len(flat), step)]
    return (torch.cat(top) if top else flat.new_zeros(0, dtype=torch.long)).reshape(hidden.shape[:-1])


class _FusedHeadDivergence(torch.autograd.Function):
    """Per token (N of them) ``T^2 * D(softmax(head(h)/T), softmax(s/T))``; reduced when ``scale``
    is given (``scale * sum``), else per token. Gradient: student logits only."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, t: float, div: Divergence, scale: float | None, step: int) -> torch.Tensor:
        per_token = torch.empty(len(student), dtype=torch.float32, device=student.device)
        for a in range(0, len(student), step):
            log_p, log_q = _sides(student[a:a + step], hidden[a:a + step], weight, bias, t)
            per_token[a:a + step] = div.value(log_p, log_q)
        ctx.save_for_backward(student, hidden, weight, bias)
        ctx.t, ctx.div, ctx.scale, ctx.step = t, div, scale, step
        per_token = per_token * (t * t)
        return per_token if scale is None else per_token.sum() * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        student, hidden, weight, bias = ctx.saved_tensors
        out = torch.empty_like(student)
        g = grad * (ctx.t * (ctx.scale if ctx.scale is not None else 1.0))  # d(T^2 D)/ds = T dD/d(s/T)
        for a in range(0, len(student), ctx.step):
            log_p, log_q = _sides(student[a:a + ctx.step], hidden[a:a + ctx.step], weight, bias, ctx.t)
            piece = g if ctx.scale is not None else g[a:a + ctx.step].unsqueeze(-1)
            out[a:a + ctx.step] = (ctx.div.grad(log_p, log_q) * piece).to(out.dtype)
        return out, None, None, None, None, None, None, None


def _sides(student: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) of a chunk at temperature ``t``, float32: the teacher's from its layer."""
    inv_t = 1.0 / t
    log_p = torch.log_softmax(head_logits(hidden, weight, bias) * inv_t, dim=-1)
    return log_p, torch.log_softmax(student.float() * inv_t, dim=-1)


class HeadKDLoss(nn.Module):
    """``T^2 * D(softmax(z_t / T), softmax(s / T))`` with the teacher's logits ``z_t = h @ W.T + b``
    computed from the input of its output layer, ``chunk_tokens`` tokens at a time (default: the
    tokens whose float32 logits take :data:`CHUNK_BYTES`).

    Args:
        temperature: T > 0 (any: the logits are exact, so one cache serves every temperature).
        divergence: ``"kl"`` (Hinton's), ``"reverse_kl"`` or ``"jsd:BETA"`` (:mod:`.divergences`).
        reduction: ``"batchmean"`` (mean over rows / unmasked tokens), ``"sum"`` or ``"none"``.

    Shapes: ``student_logits`` ``(B, *P, V)``; ``hidden`` ``(B, *P, H)`` (any float dtype);
    ``weight`` ``(V', H)`` and ``bias`` ``(V',)`` or None, the layer's, with ``V' >= V`` (a padded
    layer's extra rows are dropped: the student's ``V`` classes are compared); ``mask`` ``(B, *P)``,
    True (1) where a position counts. Equal, within the precision the hidden states are stored in,
    to :class:`~kdcache.losses.DivergenceLoss` on the dense logits, value and gradient.
    """

    def __init__(self, temperature: float = 1.0, divergence: str | Divergence = "kl", reduction: str = "batchmean",
                 chunk_tokens: int | None = None) -> None:
        super().__init__()
        self.temperature, self.reduction = check_temperature(temperature), reduction
        self.divergence, self.chunk_tokens = Divergence.parse(divergence), chunk_tokens

    def forward(self, student_logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        prefix, vocab = student_logits.shape[:-1], student_logits.shape[-1]
        check_reduction(self.reduction, mask, prefix)
        if hidden.shape[:-1] != prefix or weight.ndim != 2 or hidden.shape[-1] != weight.shape[1] \
                or weight.shape[0] < vocab or (bias is not None and bias.shape != weight.shape[:1]):
            raise ValueError(f"head shapes do not fit: student {tuple(student_logits.shape)}, hidden "
                             f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}, bias "
                             f"{None if bias is None else tuple(bias.shape)}")
        s, h = student_logits.reshape(-1, vocab), hidden.detach().reshape(-1, hidden.shape[-1])
        keep = None
        if mask is not None:  # only the positions that count are computed (one device sync)
            keep = mask.reshape(-1).nonzero().squeeze(1)
            s, h = s.index_select(0, keep), h.index_select(0, keep)
        w, b = weight.detach()[:vocab], None if bias is None else bias.detach()[:vocab]
        step = _chunk(len(s), vocab, self.chunk_tokens)
        if self.reduction == "none":
            per_token = _FusedHeadDivergence.apply(s, h, w, b, self.temperature, self.divergence, None, step)
            if keep is None:
                return per_token.reshape(prefix)
            return per_token.new_zeros(prefix.numel()).index_put((keep,), per_token).reshape(prefix)
        scale = 1.0 / max(len(s), 1) if self.reduction == "batchmean" else 1.0
        return _FusedHeadDivergence.apply(s, h, w, b, self.temperature, self.divergence, scale, step)
