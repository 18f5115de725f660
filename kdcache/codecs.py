"""Output codecs: how one teacher output is encoded on the dump side and decoded on the read side.

Each codec keeps both directions side by side so the round trip is tested in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import KdcacheError

__all__ = ["DenseCodec", "DTYPES"]

# logical dtype -> (torch dtype on the wire, numpy dtype on disk)
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("float32")),
    "float16": (torch.float16, np.dtype("float16")),
    # bfloat16 is not a zarr dtype: its bits are stored as uint16 (DESIGN.md).
    "bfloat16": (torch.bfloat16, np.dtype("uint16")),
}


@dataclass(frozen=True)
class DenseCodec:
    """Every value of the output, one row per sample, in ``dtype`` (float32|float16|bfloat16).

    ``encode`` runs on the teacher's device (so the device-to-host copy moves the stored
    width, not float32); ``to_numpy`` turns that host tensor into the on-disk array;
    ``decode`` turns stored rows back into float32 tensors.
    """

    dtype: str = "float16"
    name: str = "dense"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise KdcacheError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @property
    def stored_dtype(self) -> np.dtype:
        return DTYPES[self.dtype][1]

    def encode(self, output: torch.Tensor) -> torch.Tensor:
        """Teacher output (B, ...) any float dtype -> (B, ...) in the storage width, same device."""
        out = output.detach().to(DTYPES[self.dtype][0])
        return out.view(torch.int16) if self.dtype == "bfloat16" else out

    def to_numpy(self, host: torch.Tensor) -> np.ndarray:
        array = host.numpy()
        return array.view(np.uint16) if self.dtype == "bfloat16" else array

    def to_tensor(self, stored: np.ndarray) -> torch.Tensor:
        """Stored rows (B, ...) -> a tensor of the logical dtype, without copying."""
        if self.dtype == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(stored).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.asarray(stored))

    def decode(self, stored: np.ndarray) -> torch.Tensor:
        """Stored rows (B, ...) -> float32 tensor (B, ...)."""
        return self.to_tensor(stored).float()

    def nonfinite_rows(self, stored: np.ndarray) -> np.ndarray:
        """(B,) bool: rows holding a NaN or inf, read off the exponent bits (~10 GB/s)."""
        if self.dtype == "float32":
            bits, exponent = stored.view(np.uint32), np.uint32(0x7F800000)
        else:
            bits = stored.view(np.uint16)
            exponent = np.uint16(0x7C00 if self.dtype == "float16" else 0x7F80)
        return ((bits & exponent) == exponent).reshape(len(stored), -1).any(axis=1)
