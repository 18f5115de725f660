"""What names a cache: the teacher's weights, the dataset and the output choices.

The fingerprint is a hash of the three, so experiments that ask for the same teacher outputs
find and reuse one cache (a cache hit), and a cache holding other outputs is never mistaken
for it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import google_crc32c
import numpy as np
import torch
from torch import nn

from ..data.digests import row_digests
from ..data.items import fetch_batch, input_mask
from .chunkfile import crc32c

__all__ = ["fingerprint", "weights_digest", "dataset_digest", "block_digest", "constant_digest", "digest_scheme",
           "same_teacher", "DIGEST_SAMPLE_ROWS", "FINGERPRINT_VERSION", "WEIGHTS_SCHEME"]

DIGEST_SAMPLE_ROWS = 64
# Changes only when the same choices would store different outputs, not with the cache format:
# a format-3 dump of the same teacher, data and choices is a cache hit on a format-2 cache.
FINGERPRINT_VERSION = 2


def fingerprint(weights_digest: str, dataset_digest: str, choices: dict[str, Any]) -> str:
    """Name of a cache: hash of the teacher's weights, the dataset and what is stored."""
    blob = json.dumps({"format": FINGERPRINT_VERSION, "weights": weights_digest, "dataset": dataset_digest,
                       "choices": choices}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def block_digest(fingerprint: str, path: str, block: int, rows: np.ndarray) -> int:
    """32-bit crc32c of a block's stored rows of one array, keyed by (cache fingerprint, array,
    block): a block copied from another cache or moved within this one no longer matches.

    It detects damage, copies and swaps, not tampering: anyone can recompute it (README
    Guarantees). Runs at ~5 GB/s, so checking a whole cache as it is loaded costs ~0.2 s/GB.
    """
    crc = google_crc32c.value(f"kdcache-block:{fingerprint}:{path}:{block}:".encode())
    return crc32c(np.ascontiguousarray(rows).reshape(-1).view(np.uint8), crc)


def constant_digest(fingerprint: str, path: str, data: np.ndarray) -> int:
    """32-bit crc32c of an array stored once (a head's weight), keyed by (cache fingerprint,
    array): as :func:`block_digest`, it detects damage and copies, not tampering."""
    crc = google_crc32c.value(f"kdcache-constant:{fingerprint}:{path}:".encode())
    return crc32c(np.ascontiguousarray(data).reshape(-1).view(np.uint8), crc)


WEIGHTS_SCHEME = "crc32c"  # the scheme new caches are named with; caches written before it used "blake2b"
WEIGHTS_SCHEMES = ("crc32c", "blake2b")
_PIECE = 256 << 10


def weights_digest(model: nn.Module, scheme: str = WEIGHTS_SCHEME,
                   offloaded: Callable[[str], torch.Tensor] | None = None) -> str:
    """The teacher's weights as one string: every state-dict entry's name, dtype, shape and bytes.

    ``scheme``:

    - ``crc32c`` (``"crc32c:"`` and 32 hex digits): the crc32c of every 256 KiB piece of each
      tensor's bytes (hardware crc32c, ~12 GB/s on one core of the 2-core box), then sha256 over
      names, dtypes, shapes and those crcs. Two teachers that differ inside one piece collide with
      probability 2**-32, in n pieces 2**-32n: an accidental match is out of reach, and a cache's
      name was never a defence against a forged cache (docs/design.md).
    - ``blake2b`` (32 hex digits, no prefix): blake2b-128 over the same records and bytes, which
      caches written before crc32c are named by (0.5-0.8 GB/s): computed only to find them.

    A tensor the model holds under two names (tied weights) is read once. Entries on the meta
    device (weights accelerate offloaded to the CPU or disk) are read through ``offloaded``
    (state-dict name -> host tensor; :func:`kdcache.models.placement.offloaded_weights`): the
    digest of a dispatched model is the digest of the same model loaded whole.
    """
    if scheme not in WEIGHTS_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(WEIGHTS_SCHEMES)}, got {scheme!r:.40}")
    legacy = hashlib.blake2b(digest_size=16) if scheme == "blake2b" else None
    h = hashlib.sha256(b"kdcache-weights:crc32c:")
    seen: dict[tuple[Any, ...], bytes] = {}  # tensors the model holds, so no address is reused meanwhile
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        held = t.device.type != "meta"
        if not held:
            if offloaded is None:
                raise ValueError(f"state entry {name!r} is on the meta device (offloaded): pass offloaded=")
            t = offloaded(name)
        record = f"{name}:{t.dtype}:{tuple(t.shape)};".encode()
        if legacy is not None:
            legacy.update(record)
            if t.numel():
                legacy.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
        crcs = seen.get(key) if held else None
        if crcs is None:
            crcs = _piece_crcs(t)
            if held:
                seen[key] = crcs
        h.update(record)
        h.update(crcs)
    if legacy is not None:
        return legacy.hexdigest()
    return f"{WEIGHTS_SCHEME}:{h.hexdigest()[:32]}"


def _piece_crcs(tensor: torch.Tensor) -> bytes:
    """The crc32c of every 256 KiB piece of a tensor's bytes, little-endian uint32s."""
    if not tensor.numel():
        return b""
    raw = tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    crcs = np.fromiter((google_crc32c.value(raw[s:s + _PIECE]) for s in range(0, raw.nbytes, _PIECE)),
                       dtype="<u4", count=-(-raw.nbytes // _PIECE))
    return crcs.tobytes()


def digest_scheme(digest: str) -> str:
    """The scheme a recorded weights digest was made with (see :func:`weights_digest`)."""
    scheme, sep, _ = digest.partition(":")
    return scheme if sep else "blake2b"


def same_teacher(a: str, b: str) -> bool | None:
    """Whether two recorded weights digests name the same weights; None when they were made
    with different schemes and so cannot tell."""
    return a == b if digest_scheme(a) == digest_scheme(b) else None


def dataset_digest(dataset: Any, mask_key: str | None = None) -> str:
    """Length plus the input digests of up to 64 rows spread over the dataset (over real tokens
    only when ``mask_key`` names the attention mask of a packed cache's inputs).

    Cheap enough to check at every cache open; every row's own digest is checked as it is
    read in stage two, which catches an edit anywhere.
    """
    n = len(dataset)
    sample = np.unique(np.linspace(0, n - 1, min(n, DIGEST_SAMPLE_ROWS)).round().astype(int)).tolist()
    inputs, _ = fetch_batch(dataset, sample)
    h = hashlib.sha256(f"{n};{sample}".encode())
    h.update(row_digests(inputs, input_mask(inputs, mask_key)).tobytes())
    return h.hexdigest()[:32]
