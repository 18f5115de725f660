"""What names a cache: the teacher's weights, the dataset and the output choices.

The fingerprint is a hash of the three, so experiments that ask for the same teacher outputs
find and reuse one cache (a cache hit), and a cache holding other outputs is never mistaken
for it.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..codecs import Codec, DenseCodec, SampledCodec, TopKCodec
from ..format import FORMAT_VERSION, CacheMeta
from ..items import fetch_batch, row_digests

if TYPE_CHECKING:
    from ..config import DumpConfig

__all__ = ["fingerprint", "weights_digest", "dataset_digest", "DIGEST_SAMPLE_ROWS", "identity_differences"]

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


def identity_differences(stored: CacheMeta, asked: CacheMeta, cfg: "DumpConfig") -> list[str]:
    """What a refused dump differs in from the cache already at its path, one phrase per field
    (``"hidden: cached features, this dump none"``).

    ``asked`` is the new dump's description before its outputs are known (teacher, dataset,
    amp, views, seed); ``cfg`` supplies the output choices. Fields the fingerprint hashes but a
    cache does not record (a ``hidden_dtype`` without hidden modules, a sparse dump's seed) can
    leave the list empty.
    """
    def hidden_dtype(meta_or_cfg: Any) -> str:
        if isinstance(meta_or_cfg, CacheMeta):
            names = meta_or_cfg.hidden_names
            return _codec_words(meta_or_cfg.outputs[names[0]].codec, None) if names else "-"
        return meta_or_cfg.hidden_dtype if meta_or_cfg.hidden else "-"

    vocab = stored.vocab.real if stored.vocab.real != stored.vocab.padded else None
    pairs = {
        "teacher weights": (stored.teacher.weights_digest, asked.teacher.weights_digest),
        "dataset": (f"{stored.dataset.length} samples, digest {stored.dataset.digest}",
                    f"{asked.dataset.length} samples, digest {asked.dataset.digest}"),
        "logits": (_codec_words(stored.logits.codec, vocab), _asked_logits(cfg)),
        "hidden": (", ".join(stored.hidden_names) or "none", ", ".join(cfg.hidden) or "none"),
        "hidden dtype": (hidden_dtype(stored), hidden_dtype(cfg)),
        "amp": (stored.amp, asked.amp),
        "views": (f"{stored.views} (seed {stored.seed})" if stored.seed is not None else "none",
                  f"{asked.views} (seed {asked.seed})" if asked.seed is not None else "none"),
        "output key": (str(stored.output_key), str(asked.output_key)),
    }
    if stored.mask_key is not None:
        pairs["mask key"] = (stored.mask_key, cfg.mask_key)
    if "-" in pairs["hidden dtype"]:  # no hidden modules on one side: "hidden" says it all
        del pairs["hidden dtype"]
    return [f"{field}: cached {old}, this dump {new}" for field, (old, new) in pairs.items() if old != new]


def _asked_logits(cfg: "DumpConfig") -> str:
    """:func:`_codec_words` of the logits a dump's settings ask for (the class count unknown)."""
    of = f" of {cfg.vocab_size}" if cfg.vocab_size is not None else ""
    if cfg.topk is not None:
        return f"top-{cfg.topk}{of}"
    if cfg.sample_k is not None:
        return f"{cfg.sample_k} samples{of} at T={cfg.sample_temperature:g} (seed {cfg.seed or 0})"
    return cfg.logits_dtype


def _codec_words(codec: Codec, vocab: int | None) -> str:
    """A stored form in a few words: ``float16``, ``top-32 of 32000`` or ``64 samples at T=1 (seed 0)``."""
    of = f" of {vocab}" if vocab is not None else ""
    if isinstance(codec, TopKCodec):
        return f"top-{codec.k}{of}"
    if isinstance(codec, SampledCodec):
        return f"{codec.n} samples{of} at T={codec.temperature:g} (seed {codec.seed})"
    assert isinstance(codec, DenseCodec)
    return codec.dtype
