"""What a dump differs in from the cache already at its path, field by field, in words: what
a refused dump tells the user (the fingerprint alone says only that something differs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..format.codecs import Codec, DenseCodec
from ..format.meta import CacheMeta
from ..format.sparse import HybridCodec, SampledCodec, TopKCodec

if TYPE_CHECKING:
    from ..config import DumpConfig

__all__ = ["identity_differences"]


def identity_differences(stored: CacheMeta, asked: CacheMeta, cfg: "DumpConfig") -> list[str]:
    """What a refused dump differs in from the cache already at its path, one phrase per field
    (``"hidden: cached features, this dump none"``).

    ``asked`` is the new dump's description before its outputs are known (teacher, dataset,
    amp, views, seed); ``cfg`` supplies the output choices. Fields the fingerprint hashes but a
    cache does not record (a ``hidden_dtype`` without hidden modules, a sparse dump's seed) can
    leave the list empty.
    """
    def hidden_dtype(meta_or_cfg: "CacheMeta | DumpConfig") -> str:
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
    if cfg.topk is not None and cfg.tail_samples is not None:
        return (f"top-{cfg.topk}{of} + {cfg.tail_samples} {_drawn(cfg.sample_draws)}tail samples at "
                f"T={cfg.sample_temperature:g} (seed {cfg.seed or 0})")
    if cfg.topk is not None:
        return f"top-{cfg.topk}{of}"
    if cfg.sample_k is not None:
        return f"{cfg.sample_k} {_drawn(cfg.sample_draws)}samples{of} at T={cfg.sample_temperature:g} (seed {cfg.seed or 0})"
    return cfg.logits_dtype


def _codec_words(codec: Codec, vocab: int | None) -> str:
    """A stored form in a few words: ``float16``, ``top-32 of 32000`` or ``64 samples at T=1 (seed 0)``."""
    of = f" of {vocab}" if vocab is not None else ""
    if isinstance(codec, HybridCodec):
        return (f"top-{codec.k}{of} + {codec.n} {_drawn(codec.draws)}tail samples at T={codec.temperature:g} "
                f"(seed {codec.seed})")
    if isinstance(codec, TopKCodec):
        return f"top-{codec.k}{of}"
    if isinstance(codec, SampledCodec):
        return f"{codec.n} {_drawn(codec.draws)}samples{of} at T={codec.temperature:g} (seed {codec.seed})"
    assert isinstance(codec, DenseCodec)
    return codec.dtype


def _drawn(draws: str) -> str:
    return "" if draws == "iid" else f"{draws} "
