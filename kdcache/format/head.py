"""The head codec: the input of the teacher's output layer per position, from which stage two
computes the teacher's dense logits exactly (``h @ W.T + b``), at any temperature.

A causal LM's logits are a linear map of its last hidden state (after the final norm): storing
``h`` (``hidden`` values per position, float16: 2 bytes each) and the layer's ``W`` (V, H) and ``b``
(V,) once keeps the whole distribution, no tail to guess, in ``2 H`` bytes per token where dense
float16 logits take ``2 V`` (~30x less for H = 4,096, V = 128k). ``int8`` stores ``h`` rounded to
127 levels of its largest magnitude, with that scale (float32) per position: ``H + 4`` bytes.

The layer's weights are the codec's *constants*: arrays stored once per cache, not per row
(:class:`~kdcache.format.meta.ConstantArray`), each with its own digest. Decoding gives
:class:`~kdcache.losses.targets.HeadTargets` without the layer; the reader attaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import KdcacheError, option
from ..losses.targets import HeadTargets
from .codecs import DTYPES, _as_tensor, _nonfinite, _to_numpy

__all__ = ["HeadCodec", "HEAD_DTYPES"]

HEAD_DTYPES = ("float16", "int8")


@dataclass(frozen=True)
class HeadCodec:
    """The ``hidden`` inputs of the teacher's output layer per position, in ``dtype`` (float16, or
    int8 with a float32 scale per position); the layer's weight (V, ``hidden``) and, when ``bias``,
    its bias (V,) stored once in ``weight_dtype`` (the layer's own: float32, float16 or bfloat16).
    ``vocab`` is the real vocabulary; the logits' class axis is the layer's V (padded or not)."""

    hidden: int
    vocab: int
    dtype: str = "float16"
    weight_dtype: str = "float32"
    bias: bool = True
    name: ClassVar[str] = "head"

    def __post_init__(self) -> None:
        if not 1 <= self.hidden <= 1 << 20 or not 1 <= self.vocab <= 1 << 31:
            raise KdcacheError(f"a head of width {self.hidden} over {self.vocab} classes is out of range")
        if self.dtype not in HEAD_DTYPES:
            raise KdcacheError(f"{option('head_dtype')} must be one of {', '.join(HEAD_DTYPES)}, got {self.dtype!r:.40}")
        if self.weight_dtype not in DTYPES:
            raise KdcacheError(f"the head's weight dtype {self.weight_dtype!r:.40} is not one of {', '.join(DTYPES)}")

    def params(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "vocab": self.vocab, "dtype": self.dtype, "weight_dtype": self.weight_dtype,
                "bias": self.bias, "name": self.name}

    def arrays(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per row of logits of ``shape`` (*P, V): the hidden inputs (*P, H) (and int8's scales (*P,))."""
        prefix = shape[:-1]
        if self.dtype == "int8":
            return {"hidden": ((*prefix, self.hidden), np.dtype("int8")), "scale": (prefix, np.dtype("float32"))}
        return {"hidden": ((*prefix, self.hidden), np.dtype("float16"))}

    def constants(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Stored once, for logits of ``shape`` (*P, V): the layer's weight (V, H) and bias (V,)."""
        stored = DTYPES[self.weight_dtype][1]
        return {"weight": ((shape[-1], self.hidden), stored), **({"bias": ((shape[-1],), stored)} if self.bias else {})}

    def encode(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The output layer's *input* (B, *P, H), any float dtype -> the stored arrays, same device."""
        h = output.detach()
        if self.dtype == "float16":
            return {"hidden": h.to(torch.float16)}
        h = h.float()
        scale = h.abs().amax(-1) / 127
        q = (h / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)).round().clamp(-127, 127)
        return {"hidden": q.to(torch.int8), "scale": scale}

    def to_numpy(self, host: torch.Tensor) -> np.ndarray:
        return _to_numpy(host)

    def decode(self, stored: dict[str, np.ndarray | torch.Tensor], dtype: torch.dtype | None = torch.float32,
               ) -> HeadTargets:
        """Stored rows -> :class:`HeadTargets` with ``hidden`` (B, *P, H) in ``dtype`` (None: float16)
        and no layer (the reader attaches the cache's)."""
        hidden = _as_tensor(stored["hidden"])
        if self.dtype == "int8":
            hidden = hidden.float() * _as_tensor(stored["scale"]).float().unsqueeze(-1)
            dtype = dtype or torch.float16
        return HeadTargets(hidden=hidden if dtype is None else hidden.to(dtype))

    def nonfinite_rows(self, key: str, stored: np.ndarray) -> np.ndarray | None:
        if key == "scale":
            return _nonfinite(stored, "float32")
        return _nonfinite(stored, "float16") if self.dtype == "float16" else None
