"""Output codecs: how one teacher output is encoded on the dump side and decoded on the read side.

A codec turns a teacher output of per-row shape ``(*P, V)`` into one or more stored arrays,
each with one row per cache row, and back. Both directions sit side by side so the round trip
is tested in one place.

- :class:`DenseCodec` — every value, float16/float32/bfloat16 (one array). Here.
- the sparse codecs for large vocabularies, in :mod:`.sparse`:
  :class:`TopKCodec` — per position the K largest logits (float16), their class ids packed in
  the fewest bits that hold the vocabulary, and the row's log-partition (float32), so the kept
  classes' exact probabilities and the tail mass are known.
- :class:`SampledCodec` — Random-Sampling KD (Anshumann et al., 2025): N class ids drawn with
  replacement from ``softmax(logits / T)``, seeded per row, stored as unique ids plus counts.
- :class:`HybridCodec` — the K most likely classes' exact log-probabilities and ids, plus N draws
  from the remaining classes: exact on the head, unbiased on the tail.

Encoding runs on the teacher's device so the device-to-host copy moves the stored width. A
codec with ``encode_tokens`` also encodes chosen positions alone (the real tokens of a batch of
sequences, gathered first): padding costs no encoding, and the stored bytes are those ``encode``
gives at the same positions.
Decoding gives what the KD loss takes (:mod:`kdcache.losses.targets`): a tensor of logits (dense), or
``TopKTargets`` / ``SampledTargets`` / ``HybridTargets``, whose fields are the keyword arguments
of ``TopKKLDivLoss`` / ``SampledKLDivLoss`` / ``HybridKLDivLoss``.
A cache records each codec by its parameters; :func:`kdcache.format.attrs.codec_from_params`
reads them back, checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import numpy as np
import torch

from ..errors import KdcacheError

__all__ = ["Codec", "DenseCodec", "DTYPES", "by_pieces", "CPU_PIECE_VALUES"]

# logical dtype -> (torch dtype on the wire, numpy dtype on disk)
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("float32")),
    "float16": (torch.float16, np.dtype("float16")),
    # bfloat16 is not a zarr dtype: its bits are stored as uint16 (docs/design.md).
    "bfloat16": (torch.bfloat16, np.dtype("uint16")),
}


# dtype -> (unsigned view, signed view, exponent bits): NaN/inf are the values whose exponent bits
# are all set
_FLOAT_BITS = {"float32": (np.uint32, np.int32, 0x7F800000), "float16": (np.uint16, np.int16, 0x7C00),
               "bfloat16": (np.uint16, np.int16, 0x7F80)}


def _nonfinite(stored: np.ndarray, dtype: str) -> np.ndarray:
    """(B,) bool: rows holding a NaN or inf, read off the exponent bits.

    Checked first with two max reductions over the raw bits and no temporary (~10 GB/s): the
    largest signed value reaches ``exponent`` only for a positive NaN/inf, and the largest
    unsigned one reaches ``sign | exponent`` only for a negative one. Rows are located only when
    that finds one."""
    unsigned, signed, exponent = _FLOAT_BITS[dtype]
    flat = np.ascontiguousarray(stored).reshape(len(stored), -1)
    if flat.size == 0:
        return np.zeros(len(stored), bool)
    sign = 1 << (8 * np.dtype(unsigned).itemsize - 1)
    if flat.view(signed).max() < exponent and flat.view(unsigned).max() < (sign | exponent):
        return np.zeros(len(stored), bool)
    bits = flat.view(unsigned)
    return ((bits & unsigned(exponent)) == unsigned(exponent)).any(axis=1)


# On a CPU a codec's passes over the logits (top-k, logsumexp, the draws' softmax) run on pieces of
# rows of ~2 MB of float32, which stay in the core's cache from one pass to the next and reuse the
# allocator's memory: 1.75x faster than whole batches for top-32 of V = 8,192 on the 2-core box. A
# GPU gets whole batches. Every row's result is the same either way.
CPU_PIECE_VALUES = 1 << 19


def by_pieces(encode: Callable[..., dict[str, torch.Tensor]], *rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``encode(*rows)`` for tensors of one row count (M, ...), row-wise, run on pieces of rows on
    a CPU and their results (each (M, ...)) concatenated; one call elsewhere."""
    first = rows[0]
    step = max(1, CPU_PIECE_VALUES // max(1, first[0].numel())) if len(first) else 1
    if first.device.type != "cpu" or len(first) <= step:
        return encode(*rows)
    parts = [encode(*(r[s:s + step] for r in rows)) for s in range(0, len(first), step)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _as_tensor(stored: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Stored rows as a tensor: numpy arrays without copying, tensors (rows held on a device) as they are."""
    return stored if isinstance(stored, torch.Tensor) else torch.from_numpy(np.asarray(stored))


def _to_numpy(host: torch.Tensor) -> np.ndarray:
    array = host.numpy()
    return array.view(np.uint16) if array.dtype == np.int16 else array


class Codec(Protocol):
    """How one teacher output is stored: ``encode`` on the dump side, ``decode`` on the read side."""

    name: ClassVar[str]

    def params(self) -> dict[str, Any]:
        """The codec's parameters as recorded in the cache (``name`` included)."""

    def arrays(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Stored arrays for an output of per-row ``shape``: key -> (per-row shape, numpy dtype)."""

    def encode(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Teacher output (B, ...) -> the stored arrays (key -> tensor), on the output's device."""

    def to_numpy(self, host: torch.Tensor) -> np.ndarray:
        """One encoded array, on the host, as the numpy array that is stored."""

    # optional: encode_tokens(output (N, ..., V), rows (N,), positions (N,)) -> the arrays (N, ...)
    # that encode gives at those rows' positions (see DenseCodec.encode_tokens)

    def decode(self, stored: dict[str, np.ndarray | torch.Tensor], dtype: torch.dtype | None = torch.float32) -> Any:
        """Stored rows (key -> numpy array, or a tensor of rows held on a device) -> the loss's
        teacher argument(s), on the rows' device."""

    def nonfinite_rows(self, key: str, stored: np.ndarray) -> np.ndarray | None:
        """(B,) bool: rows of array ``key`` holding NaN/inf, or None where it holds no floats."""


@dataclass(frozen=True)
class DenseCodec:
    """Every value of the output, one row per sample, in ``dtype`` (float32|float16|bfloat16)."""

    dtype: str = "float16"
    name: ClassVar[str] = "dense"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise KdcacheError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")

    @property
    def stored_dtype(self) -> np.dtype:
        return DTYPES[self.dtype][1]

    def params(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "name": self.name}

    def arrays(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Stored arrays for an output of per-row ``shape``: key -> (per-row shape, numpy dtype)."""
        return {"": (shape, self.stored_dtype)}

    def encode(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Teacher output (B, ...) any float dtype -> the stored arrays, same device."""
        out = output.detach().to(DTYPES[self.dtype][0])
        return {"": out.view(torch.int16) if self.dtype == "bfloat16" else out}

    def encode_tokens(self, output: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                      ) -> dict[str, torch.Tensor]:
        """Output values of N tokens (N, ...), at cache rows ``rows`` (N,) and sequence positions
        ``positions`` (N,) -> the arrays ``encode`` stores at those positions, (N, ...)."""
        return self.encode(output)

    def to_numpy(self, host: torch.Tensor) -> np.ndarray:
        return _to_numpy(host)

    def to_tensor(self, stored: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Stored rows (B, ...) -> a tensor of the logical dtype, without copying (a tensor is
        already in it)."""
        if isinstance(stored, torch.Tensor):
            return stored
        if self.dtype == "bfloat16":
            return torch.from_numpy(np.ascontiguousarray(stored).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.asarray(stored))

    def decode(self, stored: dict[str, np.ndarray | torch.Tensor] | np.ndarray, dtype: torch.dtype | None = torch.float32,
               ) -> torch.Tensor:
        """Stored rows (``{"": array}`` or the array) -> tensor (B, ...) in ``dtype`` (None keeps
        the stored width)."""
        rows = self.to_tensor(stored[""] if isinstance(stored, dict) else stored)
        return rows if dtype is None else rows.to(dtype)

    def nonfinite_rows(self, key: str, stored: np.ndarray) -> np.ndarray | None:
        return _nonfinite(stored, self.dtype)


