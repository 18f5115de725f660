"""What names a cache: the teacher's weights, the dataset and the output choices.

The fingerprint is a hash of the three, so experiments that ask for the same teacher outputs
find and reuse one cache (a cache hit), and a cache holding other outputs is never mistaken
for it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import google_crc32c
import numpy as np
import torch
from torch import nn

from ..data.digests import row_digests
from ..data.items import fetch_batch, input_mask
from .chunkfile import crc32c

__all__ = ["fingerprint", "weights_digest", "dataset_digest", "block_digest", "constant_digest", "DIGEST_SAMPLE_ROWS",
           "FINGERPRINT_VERSION"]

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


def weights_digest(model: nn.Module) -> str:
    """blake2b over the teacher's state dict (names, dtypes, shapes and bytes), without copies."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


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
