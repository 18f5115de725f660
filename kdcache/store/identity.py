"""What names a cache: the teacher's weights, the dataset and the output choices.

The fingerprint is a hash of the three, so experiments that ask for the same teacher outputs
find and reuse one cache (a cache hit), and a cache holding other outputs is never mistaken
for it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from torch import nn

from ..format import FORMAT_VERSION
from ..items import fetch_batch, row_digests

__all__ = ["fingerprint", "weights_digest", "dataset_digest", "DIGEST_SAMPLE_ROWS"]

DIGEST_SAMPLE_ROWS = 64


def fingerprint(weights_digest: str, dataset_digest: str, choices: dict[str, Any]) -> str:
    """Name of a cache: hash of the teacher's weights, the dataset and what is stored."""
    blob = json.dumps({"format": FORMAT_VERSION, "weights": weights_digest, "dataset": dataset_digest,
                       "choices": choices}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """blake2b over the teacher's state dict (names, dtypes, shapes and bytes), without copies."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def dataset_digest(dataset: Any) -> str:
    """Length plus the input digests of up to 64 rows spread over the dataset.

    Cheap enough to check at every cache open; every row's own digest is checked as it is
    read in stage two, which catches an edit anywhere.
    """
    n = len(dataset)
    sample = np.unique(np.linspace(0, n - 1, min(n, DIGEST_SAMPLE_ROWS)).round().astype(int)).tolist()
    inputs, _ = fetch_batch(dataset, sample)
    h = hashlib.sha256(f"{n};{sample}".encode())
    h.update(row_digests(inputs).tobytes())
    return h.hexdigest()[:32]
