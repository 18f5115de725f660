"""A head cache's dump side (``--head MODULE``): the teacher's output layer, the input it receives on
every forward (a forward pre-hook), the check that the teacher's logits are that layer's output,
and the layer's weights, stored once.

The check runs on every batch the dump stores: a teacher whose logits are not ``h @ W.T + b``
(a logit soft-cap, a final scale, a bias the module does not hold, logits of some other module) is
refused in one line naming what differs, before a wrong target is written.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import KdcacheError, option
from ..models.capture import check_module_names

__all__ = ["HeadInput", "output_layer", "layer_arrays"]


def output_layer(teacher: nn.Module, name: str) -> nn.Linear:
    """The module ``name`` of ``teacher``, which must be a ``torch.nn.Linear``."""
    check_module_names(teacher, [name])
    layer = teacher.get_submodule(name)
    if not isinstance(layer, nn.Linear):
        raise KdcacheError(f"{option('head', name)} is a {type(layer).__name__}, not a torch.nn.Linear: name the "
                           "teacher's output layer (e.g. lm_head)")
    return layer


def layer_arrays(layer: nn.Linear) -> dict[str, np.ndarray]:
    """The layer's weight (V, H) and bias (V,) as stored (bfloat16 as its bits, uint16)."""
    def stored(t: torch.Tensor) -> np.ndarray:
        t = t.detach().cpu().contiguous()
        return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    return {"weight": stored(layer.weight), **({"bias": stored(layer.bias)} if layer.bias is not None else {})}


class _PreHook:
    """A picklable forward pre-hook keeping the first positional input of its module."""

    def __init__(self, kept: dict[str, torch.Tensor]) -> None:
        self.kept = kept

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            raise KdcacheError(f"{option('head')}'s module was called without a tensor input")
        self.kept["input"] = args[0]


class HeadInput:
    """Context manager keeping the input of the teacher's output layer ``name`` on each forward;
    :meth:`check` compares the teacher's logits with that layer applied to it (call it in the
    forward's own autocast), :meth:`take` gives the input and forgets it."""

    def __init__(self, teacher: nn.Module, name: str) -> None:
        self.name, self.layer = name, output_layer(teacher, name)
        self.kept: dict[str, torch.Tensor] = {}
        self._handle: Any = None

    @staticmethod
    def optional(teacher: nn.Module, name: str | None) -> Any:
        """``HeadInput(teacher, name)``, or a context giving None when ``name`` is None."""
        return HeadInput(teacher, name) if name is not None else contextlib.nullcontext()

    def __enter__(self) -> "HeadInput":
        self._handle = self.layer.register_forward_pre_hook(_PreHook(self.kept))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def take(self) -> torch.Tensor:
        if "input" not in self.kept:
            raise KdcacheError(f"{option('head', self.name)} was not called in the teacher's forward pass; name the "
                               "module whose output the logits are")
        return self.kept.pop("input")

    def check(self, logits: torch.Tensor) -> None:
        """Refuse ``logits`` that are not this layer's output on its last input, in one line."""
        h = self.take()
        self.kept["input"] = h  # kept for the encoder
        linear = torch.nn.functional.linear(h, self.layer.weight, self.layer.bias)
        if linear.shape != logits.shape:
            raise KdcacheError(f"the teacher's logits {tuple(logits.shape)} are not the output {tuple(linear.shape)} of "
                               f"{option('head', self.name)}; name the module whose output the logits are")
        z, y = logits.detach().float(), linear.float()
        tol = 1e-5 if linear.dtype in (torch.float32, torch.float64) else 2 * torch.finfo(linear.dtype).eps
        if ((z - y).abs() <= tol * (1 + y.abs().amax(-1, keepdim=True))).all():
            return
        raise KdcacheError(f"the teacher's logits are not the output h @ W.T + b of {option('head', self.name)}: "
                           f"{_difference(z, y)}; a head cache would train on other targets, so dump the logits "
                           f"(dense, {option('topk')} or {option('tail_samples')}) instead")


def _difference(z: torch.Tensor, y: torch.Tensor) -> str:
    """What turns the layer's output ``y`` into the logits ``z``, in words: the transform (a scale,
    a soft-cap, a bias) that fits them best, when one fits."""
    z, y = z.reshape(-1, z.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    near = 1e-3 * (1 + float(y.abs().max()))
    scale = float((z * y).sum() / (y * y).sum().clamp_min(1e-30))
    fits = [(float((z - scale * y).abs().max()), f"they are {scale:.4g} times it (a final scale)")]
    cap = _soft_cap(z, y)
    if cap is not None:
        fits.append((float((z - cap * torch.tanh(y / cap)).abs().max()),
                     f"they are soft-capped, about {cap:.3g} * tanh(logits / {cap:.3g})"))
    if len(z) > 1:
        offset = (z - y).mean(0)
        fits.append((float((z - y - offset).abs().max()),
                     f"they add a bias the module does not hold (up to {float(offset.abs().max()):.3g})"))
    residual, words = min(fits)
    return words if residual <= near else f"they differ from it by up to {float((z - y).abs().max()):.3g}"


def _soft_cap(z: torch.Tensor, y: torch.Tensor) -> float | None:
    """The cap ``c`` with ``c * tanh(y / c) = z`` at the largest ``|y|`` (bisection), when ``z``
    is smaller there with the same sign; else None."""
    at = int(y.abs().argmax())
    y0, z0 = float(y.reshape(-1)[at]), float(z.reshape(-1)[at])
    if y0 == 0 or z0 * y0 <= 0 or abs(z0) >= abs(y0):
        return None
    lo, hi = 1e-6, 1e9  # c * tanh(|y0| / c) grows from 0 to |y0| with c
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if mid * math.tanh(abs(y0) / mid) < abs(z0) else (lo, mid)
    return (lo * hi) ** 0.5
