"""The sparse codecs for large vocabularies (LLM token logits): what the K most likely classes
and N draws from the teacher keep of a distribution, encoded on the teacher's device and decoded
into the targets of the sparse KD losses (:mod:`kdcache.losses.sparse`).

- :class:`TopKCodec` — the K largest logits, their ids, the row's logsumexp.
- :class:`SampledCodec` — N ids drawn from the teacher, as unique ids + counts.
- :class:`HybridCodec` — the K most likely classes exactly, plus N draws from the rest.

Class ids are bit-packed in the fewest bits that hold the vocabulary (:func:`pack_ids`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..errors import KdcacheError, option
from ..losses.sparse import kept_mass_excess
from ..losses.targets import HybridTargets, SampledTargets, TopKTargets
from .codecs import _as_tensor, _nonfinite, _to_numpy, by_pieces
from .draws import DRAWS, draw_ids, draw_uniforms

__all__ = ["TopKCodec", "SampledCodec", "HybridCodec", "pack_ids", "unpack_ids", "index_bits", "ids_problem"]


def index_bits(vocab: int) -> int:
    """Fewest bits that hold every class id in ``range(vocab)``."""
    return max(1, (vocab - 1).bit_length())


@lru_cache(maxsize=64)
def _pack_plan(k: int, bits: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Where each of the 32-bit words of ``k`` packed ids takes its bits from: ``(id index per
    (word, slot) flattened, left shifts, right shifts, masks)`` as (words, slots) int64 on
    ``device``. A word holds pieces of at most ``ceil(32 / bits) + 1`` ids; an id lands in its
    word shifted left (it starts inside the word) or right (it started in the word before)."""
    words, slots = -(-k * bits // 32), -(-32 // bits) + 1
    # made on the device itself: a tensor sent there from the host would make the host wait
    word = torch.arange(words, device=device).view(-1, 1)
    index = (32 * word) // bits + torch.arange(slots, device=device).view(1, -1)
    shift = index * bits - 32 * word  # where the id's bit 0 lands in the word (negative: before it)
    used = (index < k) & (shift < 32) & (shift + bits > 0)
    return index.clamp_max(k - 1).reshape(-1), shift.clamp_min(0), (-shift).clamp_min(0), used.long() * 0xFFFFFFFF


def pack_ids(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., K) integer ids < 2**bits -> (..., ceil(K*bits/8)) uint8, little-endian bit order:
    id i holds bits ``i*bits .. (i+1)*bits - 1`` of the row's bit string, bit j of the string is
    bit ``j % 8`` of byte ``j // 8``.

    Built as 32-bit words in int64 (no value reaches the sign bit), on the ids' device, with no
    host data sent there: each word gathers the ids it holds pieces of and shifts them into place;
    the words' little-endian bytes are the packed bytes (every platform torch runs on is
    little-endian)."""
    k = ids.shape[-1]
    index, left, right, mask = _pack_plan(k, bits, ids.device)
    words = ids.long().index_select(-1, index).view(*ids.shape[:-1], *left.shape)
    packed = (((words << left) >> right) & mask).sum(-1)  # (..., words): one 32-bit word each
    nbytes = -(-k * bits // 8)
    return packed.view(torch.uint8).view(*packed.shape, 8)[..., :4].flatten(-2)[..., :nbytes]


def unpack_ids(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_ids`: (..., nbytes) uint8 -> (..., K) int64."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    flat = ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :k * bits]
    weights = torch.ones(bits, dtype=torch.int64, device=packed.device) << torch.arange(bits, device=packed.device)
    return (flat.view(*flat.shape[:-1], k, bits).long() * weights).sum(-1)


def ids_problem(packed: np.ndarray, k: int, bits: int, vocab: int) -> str | None:
    """Why stored bit-packed ids (..., ceil(k*bits/8)) uint8 are not class ids < ``vocab``, or
    None. Unpacked a slice at a time (unpacking costs 64 bytes per packed byte)."""
    if vocab >= 1 << bits or packed.size == 0:  # every id the bits can hold is a class
        return None
    flat = packed.reshape(-1, packed.shape[-1])
    step = max(1, (8 << 20) // max(flat.shape[1] * 64, 1))
    top = max(int(unpack_ids(torch.from_numpy(np.ascontiguousarray(flat[i:i + step])), k, bits).max())
              for i in range(0, len(flat), step))
    return f"holds class id {top}, beyond the {vocab}-class vocabulary" if top >= vocab else None


def _mass_problem(values: np.ndarray, logsumexp: np.ndarray, padded: bool) -> str | None:
    """Why stored (…, K) values with their logsumexp are not a distribution's kept part (their
    probabilities sum to more than 1 beyond float16 rounding), or None. ``padded``: all-zero
    positions are the padding a padded sequence cache stores, not targets."""
    v, lse = torch.from_numpy(values.astype(np.float32)), torch.from_numpy(logsumexp.astype(np.float32))
    excess, tolerance = kept_mass_excess(v, lse)
    bad = excess > tolerance
    if padded:
        bad &= (v != 0).any(-1) | (lse != 0)
    if bool(bad.any()):
        return (f"holds kept probabilities summing to {float(excess[bad].max().exp()):.4g} > 1 at {int(bad.sum())} "
                "positions: not a distribution")
    return None


def _check_vocab(k: int, vocab: int, what: str) -> None:
    if k < 1:
        raise KdcacheError(f"{what} must be >= 1, got {k}")
    if vocab < 1:
        raise KdcacheError(f"vocabulary size must be >= 1, got {vocab}")


def _check_draws(draws: str) -> None:
    if draws not in DRAWS:
        raise KdcacheError(f"{option('sample_draws')} must be one of {', '.join(DRAWS)}, got {draws!r:.40}")


def _draws_param(draws: str) -> dict[str, str]:
    """The draws scheme among a codec's parameters: recorded only when not ``iid``, so caches
    written before the scheme existed read (and fingerprint) as they did."""
    return {} if draws == "iid" else {"draws": draws}


@dataclass(frozen=True)
class TopKCodec:
    """The K largest logits per position, their ids (bit-packed) and the row's logsumexp.

    ``vocab`` is the real vocabulary: columns at and beyond it (a padded output layer) are
    dropped before top-k and logsumexp, so the stored distribution is over real classes only.
    """

    k: int
    vocab: int
    name: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        _check_vocab(self.k, self.vocab, option("topk"))
        if self.k > self.vocab:
            raise KdcacheError(f"{option('topk', self.k)} is larger than the vocabulary ({self.vocab} classes)")

    @property
    def bits(self) -> int:
        return index_bits(self.vocab)

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "vocab": self.vocab, "name": self.name, "index_bits": self.bits}

    def arrays(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        prefix = shape[:-1]
        return {"values": ((*prefix, self.k), np.dtype("float16")),
                "indices": ((*prefix, math.ceil(self.k * self.bits / 8)), np.dtype("uint8")),
                "logsumexp": (prefix, np.dtype("float32"))}

    def encode(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        prefix = output.shape[:-1]
        flat = by_pieces(self._encode, output.detach().reshape(-1, output.shape[-1]))
        return {key: v.view(*prefix, *v.shape[1:]) for key, v in flat.items()}

    def encode_tokens(self, output: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                      ) -> dict[str, torch.Tensor]:
        """Logits of N tokens (N, V) -> their arrays (N, ...), as :meth:`encode` stores them."""
        return by_pieces(self._encode, output.detach())

    def _encode(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        z = logits[:, :self.vocab].float()
        values, ids = z.topk(self.k, dim=-1)
        return {"values": values.half(), "indices": pack_ids(ids, self.bits), "logsumexp": z.logsumexp(-1)}

    def to_numpy(self, host: torch.Tensor) -> np.ndarray:
        return _to_numpy(host)

    def decode(self, stored: dict[str, np.ndarray | torch.Tensor], dtype: torch.dtype | None = torch.float32,
               ) -> TopKTargets:
        values = _as_tensor(stored["values"])
        return TopKTargets(values=values if dtype is None else values.to(dtype),
                           indices=unpack_ids(_as_tensor(stored["indices"]), self.k, self.bits),
                           logsumexp=_as_tensor(stored["logsumexp"]))

    def nonfinite_rows(self, key: str, stored: np.ndarray) -> np.ndarray | None:
        return _nonfinite(stored, "float16" if key == "values" else "float32") if key != "indices" else None

    def stored_problem(self, key: str, stored: np.ndarray, other: Callable[[str], np.ndarray],
                       padded: bool) -> str | None:
        """Why a block of stored array ``key`` cannot be this codec's (ids beyond the vocabulary,
        kept probabilities over 1), or None; ``other(key)`` is the same block of another array."""
        if key == "indices":
            return ids_problem(stored, self.k, self.bits, self.vocab)
        return _mass_problem(stored, other("logsumexp"), padded) if key == "values" else None


@dataclass(frozen=True)
class SampledCodec:
    """N ids drawn with replacement from ``softmax(logits[..., :vocab] / temperature)`` per
    position, stored as up to N unique ids (bit-packed) with their counts (count 0 = unused).

    The draws are a pure function of (seed, row, position): a resumed or multi-process dump
    stores the same samples. ``counts / N`` is an unbiased estimate of the teacher's
    distribution at ``temperature``, hence of the KD gradient (Anshumann et al., 2025), with
    ``draws="iid"`` (independent draws) or ``"systematic"`` (N evenly spaced quantiles from one
    uniform: lower variance; see :mod:`kdcache.format.draws`).
    """

    n: int
    vocab: int
    temperature: float = 1.0
    seed: int = 0
    draws: str = "iid"
    name: ClassVar[str] = "sampled"

    def __post_init__(self) -> None:
        _check_vocab(self.n, self.vocab, option("sample_k"))
        if self.n > 65535:
            raise KdcacheError(f"{option('sample_k')} must be <= 65535, got {self.n}")
        if not 0 < self.temperature < math.inf:
            raise KdcacheError(f"{option('sample_temperature')} must be a finite number > 0, got {self.temperature}")
        _check_draws(self.draws)

    @property
    def bits(self) -> int:
        return index_bits(self.vocab)

    @property
    def count_dtype(self) -> np.dtype:
        return np.dtype("uint8") if self.n <= 255 else np.dtype("uint16")

    def params(self) -> dict[str, Any]:
        return {"n": self.n, "vocab": self.vocab, "temperature": self.temperature, "seed": self.seed,
                **_draws_param(self.draws), "name": self.name, "index_bits": self.bits}

    def arrays(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        prefix = shape[:-1]
        return {"ids": ((*prefix, math.ceil(self.n * self.bits / 8)), np.dtype("uint8")),
                "counts": ((*prefix, self.n), self.count_dtype)}

    def encode(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if rows is None:
            raise ValueError("SampledCodec.encode needs the cache rows of the batch (its seeds)")
        b, prefix = output.shape[0], output.shape[:-1]
        z = output.detach().reshape(b, -1, output.shape[-1])
        u = draw_uniforms(self.draws, self.seed, rows.to(z.device), z.shape[1], self.n)
        flat = self._encode(z.reshape(-1, z.shape[-1]), u.reshape(-1, self.n))
        return {key: v.view(*prefix, -1) for key, v in flat.items()}

    def encode_tokens(self, output: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                      ) -> dict[str, torch.Tensor]:
        """Logits of N tokens (N, V) at cache rows ``rows`` and positions ``positions`` (N,) ->
        their arrays (N, ...): the draws :meth:`encode` makes at those positions."""
        z = output.detach()
        return self._encode(z, draw_uniforms(self.draws, self.seed, rows.to(z.device), positions.to(z.device), self.n))

    def _encode(self, logits: torch.Tensor, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """(M, V) logits and (M, N) uniforms -> unique drawn ids (packed) and their counts."""
        ids = draw_ids(logits[:, :self.vocab], u, self.temperature)
        ordered = ids.sort(dim=-1).values
        new = torch.ones_like(ordered, dtype=torch.bool)
        new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
        slot = new.long().cumsum(-1) - 1
        unique = torch.zeros_like(ordered).scatter_(-1, slot, ordered)
        counts = torch.zeros_like(ordered).scatter_add_(-1, slot, torch.ones_like(ordered))
        return {"ids": pack_ids(unique, self.bits), "counts": counts.to(torch.uint8 if self.n <= 255 else torch.int32)}

    def to_numpy(self, host: torch.Tensor) -> np.ndarray:
        array = host.numpy()
        return array.astype(np.uint16) if array.dtype == np.int32 else array

    def decode(self, stored: dict[str, np.ndarray | torch.Tensor], dtype: torch.dtype | None = torch.float32,
               ) -> SampledTargets:
        counts = stored["counts"]
        counts = (counts.float() if isinstance(counts, torch.Tensor)
                  else torch.from_numpy(np.asarray(counts).astype(np.float32)))
        return SampledTargets(ids=unpack_ids(_as_tensor(stored["ids"]), self.n, self.bits), counts=counts)

    def nonfinite_rows(self, key: str, stored: np.ndarray) -> np.ndarray | None:
        return None

    def stored_problem(self, key: str, stored: np.ndarray, other: Callable[[str], np.ndarray],
                       padded: bool) -> str | None:
        """Why a block of stored array ``key`` cannot be this codec's: ids beyond the vocabulary,
        or counts that are not the recorded N draws (0 draws only at a padded cache's padding)."""
        if key == "ids":
            return ids_problem(stored, self.n, self.bits, self.vocab)
        drawn = stored.sum(-1, dtype=np.int64)
        bad = (drawn != self.n) & ((drawn != 0) | (not padded))
        if bad.any():
            return (f"holds draw counts adding up to {int(drawn[bad].flat[0])} at {int(bad.sum())} positions, not the "
                    f"{self.n} draws recorded")
        return None


@dataclass(frozen=True)
class HybridCodec:
    """The K most likely classes exactly, and N draws from the rest: top-k without its bias.

    Per position, at the sampling ``temperature`` T: the K largest classes' log-probabilities
    ``log softmax(logits / T)`` (float16, so the tail mass ``1 - sum`` is within float16 rounding
    of the head's: ~3e-4 at K = 16), their ids, and
    N ids drawn with replacement from the teacher's distribution over the other classes
    (renormalised), sorted, each standing for ``tail mass / N``. Head ids and tail draws are
    bit-packed. The decoded distribution is exact on the head and an unbiased estimate of the
    tail, where top-k folds the tail into one bucket (the bias Anshumann et al., 2025, blame for
    top-k's gap to dense KD) and plain sampling spends its draws, and its variance, on the head.
    Draws are a pure function of (seed, row, position, draw), ``iid`` or ``systematic`` as for
    :class:`SampledCodec`.
    """

    k: int
    n: int
    vocab: int
    temperature: float = 1.0
    seed: int = 0
    draws: str = "iid"
    name: ClassVar[str] = "hybrid"

    def __post_init__(self) -> None:
        _check_vocab(self.k, self.vocab, option("topk"))
        if self.k >= self.vocab:
            raise KdcacheError(f"{option('topk', self.k)} leaves no tail of the {self.vocab}-class vocabulary to sample: "
                               f"leave out {option('tail_samples')}")
        if not 1 <= self.n <= 65535:
            raise KdcacheError(f"{option('tail_samples')} must be within [1, 65535], got {self.n}")
        if not 0 < self.temperature < math.inf:
            raise KdcacheError(f"{option('sample_temperature')} must be a finite number > 0, got {self.temperature}")
        _check_draws(self.draws)

    @property
    def bits(self) -> int:
        return index_bits(self.vocab)

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "n": self.n, "vocab": self.vocab, "temperature": self.temperature, "seed": self.seed,
                **_draws_param(self.draws), "name": self.name, "index_bits": self.bits}

    def arrays(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        prefix = shape[:-1]
        return {"logprobs": ((*prefix, self.k), np.dtype("float16")),
                "indices": ((*prefix, math.ceil(self.k * self.bits / 8)), np.dtype("uint8")),
                "tail": ((*prefix, math.ceil(self.n * self.bits / 8)), np.dtype("uint8"))}

    def encode(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if rows is None:
            raise ValueError("HybridCodec.encode needs the cache rows of the batch (its seeds)")
        b, prefix = output.shape[0], output.shape[:-1]
        z = output.detach().reshape(b, -1, output.shape[-1])
        u = draw_uniforms(self.draws, self.seed, rows.to(z.device), z.shape[1], self.n)
        flat = by_pieces(self._encode, z.reshape(-1, z.shape[-1]), u.reshape(-1, self.n))
        return {key: v.view(*prefix, -1) for key, v in flat.items()}

    def encode_tokens(self, output: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                      ) -> dict[str, torch.Tensor]:
        """Logits of N tokens (N, V) at cache rows ``rows`` and positions ``positions`` (N,) ->
        their arrays (N, ...): the head and the tail draws :meth:`encode` makes there."""
        z = output.detach()
        u = draw_uniforms(self.draws, self.seed, rows.to(z.device), positions.to(z.device), self.n)
        return by_pieces(self._encode, z, u)

    def _encode(self, logits: torch.Tensor, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """(M, V) logits and (M, N) uniforms -> head log-probabilities, head ids and tail draws."""
        z = logits[:, :self.vocab].float()
        values, head = z.topk(self.k, dim=-1)
        # float16's finite range: a head class of probability 0 (exp underflow) is stored as -1e4, not -inf
        t = self.temperature  # x / 1.0 is x: at T = 1 no scaled copy of the logits is made
        scaled, top = (z, values) if t == 1.0 else (z / t, values / t)
        logprobs = (top - scaled.logsumexp(-1, keepdim=True)).clamp_min(-1e4)
        tail = draw_ids(z, u, self.temperature, exclude=head).sort(dim=-1).values
        return {"logprobs": logprobs.half(), "indices": pack_ids(head, self.bits), "tail": pack_ids(tail, self.bits)}

    def to_numpy(self, host: torch.Tensor) -> np.ndarray:
        return _to_numpy(host)

    def decode(self, stored: dict[str, np.ndarray], dtype: torch.dtype | None = torch.float32) -> HybridTargets:
        logprobs = _as_tensor(stored["logprobs"])  # numpy from disk, or tensors held on a device
        return HybridTargets(logprobs=logprobs if dtype is None else logprobs.to(dtype),
                             indices=unpack_ids(_as_tensor(stored["indices"]), self.k, self.bits),
                             tail=unpack_ids(_as_tensor(stored["tail"]), self.n, self.bits))

    def nonfinite_rows(self, key: str, stored: np.ndarray) -> np.ndarray | None:
        return _nonfinite(stored, "float16") if key == "logprobs" else None

    def stored_problem(self, key: str, stored: np.ndarray, other: Callable[[str], np.ndarray],
                       padded: bool) -> str | None:
        """Why a block of stored array ``key`` cannot be this codec's (ids beyond the vocabulary,
        head probabilities over 1), or None."""
        if key == "logprobs":
            return _mass_problem(stored, np.zeros(stored.shape[:-1], np.float32), padded)
        return ids_problem(stored, self.k if key == "indices" else self.n, self.bits, self.vocab)
