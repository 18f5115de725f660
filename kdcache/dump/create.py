"""A new cache planned from the teacher itself: a forward pass on two rows gives every output's
shape, the codecs give the stored arrays, the attention masks the packed token layout, and the
row sizes the write blocks and chunks; then the empty store is created (with a head cache's
output layer, the one thing it stores once)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import DumpConfig
from ..data.items import fetch_batch, input_mask
from ..data.views import ViewedDataset
from ..errors import KdcacheError, option
from ..format.meta import ArrayInfo, CacheMeta, OutputSpec, PackedTokens, Vocab
from ..format.packing import place_blocks, token_counts
from ..models.capture import HiddenCapture
from ..models.forward import move_inputs
from ..store import TeacherCache, plan_blocks
from ..store.constants import planned_constant, write_constants
from .head import HeadInput, layer_arrays
from .loop import forward

__all__ = ["create_cache", "plan_cache", "choose_layout"]


def choose_layout(dataset: Any, cfg: DumpConfig) -> str:
    """``packed`` (only real tokens stored) for sequences with an attention mask, unless asked
    otherwise; ``padded`` (fixed positions, padding stored as zeros) for everything else."""
    if cfg.layout != "auto":
        return cfg.layout
    base = dataset.dataset if isinstance(dataset, ViewedDataset) else dataset  # no view drawn to look
    inputs, _ = fetch_batch(base, [0])
    return "packed" if input_mask(inputs, cfg.mask_key) is not None else "padded"


def create_cache(teacher: nn.Module, dataset: Any, path: Any, meta: CacheMeta, cfg: DumpConfig,
                 dev: torch.device) -> TeacherCache:
    """Learn the output shapes from a forward pass on two rows, then create the empty store."""
    planned, placed, stored_once = plan_cache(teacher, dataset, meta, cfg, dev)
    cache = TeacherCache.create(path, planned)
    if placed is not None:
        cache.write_token_blocks(placed)
    write_constants(cache, stored_once)
    return cache


def plan_cache(teacher: nn.Module, dataset: Any, meta: CacheMeta, cfg: DumpConfig,
               dev: torch.device) -> tuple[CacheMeta, np.ndarray | None, dict[str, np.ndarray]]:
    """The full description of this dump's cache (``meta`` with its outputs, blocks and layout,
    from a forward pass on two rows); for a packed cache, where each block's tokens go; for a
    head cache, the arrays stored once (path -> array). The
    same teacher, data and settings always plan the same (``--repair`` rebuilds a damaged
    description from it)."""
    probe_rows = list(range(min(2, len(dataset))))
    inputs, _ = fetch_batch(dataset, probe_rows)
    view_params = None
    if isinstance(dataset, ViewedDataset) and dataset.explicit:
        view_params = tuple(dataset.draw_params(0).shape)
    with HiddenCapture(teacher, cfg.hidden) as capture, HeadInput.optional(teacher, cfg.head) as head:
        outputs = forward(teacher, capture, move_inputs(inputs, dev), cfg.output_key, meta.amp, dev, head)
    planned = []
    for name, t in outputs.items():
        if t.ndim == 0 or t.shape[0] != len(probe_rows):
            raise KdcacheError(f"teacher output {name!r} has shape {tuple(t.shape)} for a batch of "
                               f"{len(probe_rows)}: its first axis must be the batch")
        if not t.is_floating_point():
            raise KdcacheError(f"teacher output {name!r} is {t.dtype}, not floating point")
        if name == "logits" and t.ndim == 1 and cfg.sparse:
            raise KdcacheError(f"{option('topk')}/{option('sample_k')} need logits with a class axis, (B, C) or (B, L, V)")
        codec = cfg.codec(name, int(t.shape[-1]) if t.ndim > 1 else 1, head.layer if head is not None else None)
        shape = tuple(t.shape[1:])
        planned.append((name, shape, codec, OutputSpec.planned(name, codec, shape)))
    mask = input_mask(inputs, cfg.mask_key)
    if cfg.layout == "packed" and mask is None:
        raise KdcacheError(f"{option('layout', 'packed')} needs dict inputs with an attention mask (inputs[{cfg.mask_key!r}])")
    # packed: outputs with the mask's token axis are stored per real token
    per_token = {name for name, t in outputs.items()
                 if cfg.layout == "packed" and t.ndim >= 3 and tuple(t.shape[:2]) == tuple(mask.shape)}
    counts = token_counts(dataset, cfg.mask_key, cfg.batch_size) if per_token else None
    mean_tokens = float(counts.mean()) if counts is not None else 0.0
    row_bytes = {p: int(np.prod(s[1:] if name in per_token else s, dtype=np.int64)) * d.itemsize
                 * (mean_tokens if name in per_token else 1)
                 for name, _, _, paths in planned for p, s, d in paths.values()}
    block_rows, chunks = plan_blocks({p: max(1, round(b)) for p, b in row_bytes.items()}, len(dataset), cfg.block_rows)
    packed, placed = None, None
    if per_token:
        token_bytes = max(int(np.prod(s[1:], dtype=np.int64)) * d.itemsize
                          for name, _, _, paths in planned if name in per_token for _, s, d in paths.values())
        chunk, placed, crc = place_blocks(counts, block_rows, token_bytes)
        capacity = int(placed[-1, 0] + -(-placed[-1, 1] // chunk) * chunk)
        packed = PackedTokens(tuple(n for n, *_ in planned if n in per_token), chunk, capacity, crc)
    logits = outputs["logits"]
    classes = int(logits.shape[-1]) if logits.ndim > 1 else 1
    meta = replace(meta, block_rows=block_rows, vocab=Vocab(cfg.vocab_size or classes, classes),
                   view_params_shape=view_params, mask_key=cfg.mask_key if mask is not None else None, packed=packed,
                   outputs={name: OutputSpec(name, shape, codec, {
                       key: (ArrayInfo(p, s[1:], d, packed.chunk, per_token=True) if name in per_token
                             else ArrayInfo(p, s, d, chunks[p])) for key, (p, s, d) in paths.items()})
                       for name, shape, codec, paths in planned})
    stored_once = {}
    if head is not None:  # the output layer, stored once, the digest of each array in the description
        spec, layer = meta.outputs["logits"], layer_arrays(head.layer)
        planned_once = OutputSpec.planned_constants("logits", spec.codec, spec.shape)
        constants = {key: planned_constant(meta.fingerprint, p, layer[key]) for key, (p, _, _) in planned_once.items()}
        meta = replace(meta, outputs={**meta.outputs, "logits": replace(spec, constants=constants)})
        stored_once = {c.path: layer[key] for key, c in constants.items()}
    return replace(meta, bound=tuple(a.path for a in meta.data_arrays())), placed, stored_once
