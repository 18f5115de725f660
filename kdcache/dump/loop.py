"""The teacher over a dump's blocks: batches that never straddle a block, prepared and digested by a
DataLoader, the forward under ``inference_mode`` (autocast on CUDA), each output encoded on the
device by its codec and copied to pinned host memory without blocking, and the
:class:`~kdcache.dump.writer.BlockWriter` assembling and writing whole blocks on other threads."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import DumpConfig
from ..data.digests import row_digests
from ..data.items import collate_items, fetch_batch, input_mask
from ..data.views import ViewedDataset
from ..errors import KdcacheError
from ..format.codecs import Codec
from ..format.meta import SPANS
from ..models.capture import HiddenCapture
from ..models.forward import autocast, call_model, move_inputs, select_output
from ..store import TeacherCache, fault_point
from .head import HeadInput
from .writer import BlockWriter, EncodedBatch

__all__ = ["run_blocks", "forward", "digest_mask", "encode_output", "RealTokens"]


class _Batches(torch.utils.data.Dataset):
    """Item i is batch i of the dump: (first row, inputs, labels, input digests, explicit view
    parameters or None, the flat indices (N,) int64 of its real positions in its (B, L) attention
    mask or None). Made on the host (in DataLoader workers, when there are any), and pinned there
    on CUDA, so that nothing of it needs the device to wait."""

    def __init__(self, dataset: Any, batches: Sequence[tuple[int, int]], digest_mask: str | None,
                 mask_key: str | None) -> None:
        self.dataset, self.batches, self.digest_mask, self.mask_key = dataset, list(batches), digest_mask, mask_key

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[int, Any, torch.Tensor, np.ndarray, torch.Tensor | None, torch.Tensor | None]:
        start, stop = self.batches[i]
        params = None
        if isinstance(self.dataset, ViewedDataset) and self.dataset.explicit:  # parameters drawn once, kept
            items, params = self.dataset.drawn_items(range(start, stop))
            inputs, labels = collate_items(items, range(start, stop))
        else:
            inputs, labels = fetch_batch(self.dataset, range(start, stop))
        mask = input_mask(inputs, self.mask_key)
        real = mask.reshape(-1).nonzero().squeeze(1) if mask is not None else None
        return start, inputs, labels, row_digests(inputs, input_mask(inputs, self.digest_mask)), params, real


def plan_batches(cache: TeacherCache, blocks: Sequence[int], batch_size: int) -> list[tuple[int, int]]:
    """Batches of rows that never straddle a block, so each block fills from its own batches."""
    batches = []
    for block in blocks:
        start, stop = cache.block_range(block)
        batches += [(s, min(s + batch_size, stop)) for s in range(start, stop, batch_size)]
    return batches


def forward(teacher: nn.Module, capture: HiddenCapture, inputs: Any, output_key: str | None, amp: str,
            dev: torch.device, head: HeadInput | None = None) -> dict[str, torch.Tensor]:
    """The teacher's logits and captured outputs for ``inputs``; with ``head``, the logits are
    checked to be that layer's output on the input it keeps (a head cache stores that input)."""
    with torch.inference_mode(), autocast(amp, dev):
        try:
            output = call_model(teacher, inputs)
        except KdcacheError:
            raise
        except (RuntimeError, TypeError, ValueError) as err:
            raise KdcacheError(f"the teacher failed on a batch of the dataset ({type(err).__name__}: "
                               f"{str(err).splitlines()[0]}); do the dataset's inputs fit the teacher?") from None
        outputs = {"logits": select_output(output, output_key), **capture.take()}
        if head is not None:
            head.check(outputs["logits"])
        return outputs


def zero_padding(arrays: dict[str, torch.Tensor], mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Store padding positions (mask 0) as zeros: never as real tokens."""
    if mask is None:
        return arrays
    return {k: (v.masked_fill(~mask.view(*mask.shape, *([1] * (v.ndim - 2))), 0)
                if v.ndim >= 2 and tuple(v.shape[:2]) == tuple(mask.shape) else v) for k, v in arrays.items()}


@dataclass(frozen=True)
class RealTokens:
    """A batch's real positions on the device: flat indices into its (B, L) positions, and the
    cache row and the position of each, all (N,) int64."""

    shape: tuple[int, int]
    index: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def of(cls, real: torch.Tensor, mask: torch.Tensor, start: int, dev: torch.device) -> "RealTokens":
        """From the host's flat indices ``real`` of the True positions of ``mask`` (B, L)."""
        index = real.to(dev, non_blocking=dev.type == "cuda")
        length = mask.shape[1]
        return cls(tuple(mask.shape), index, index // length + start, index % length)


def encode_output(codec: Codec, output: torch.Tensor, rows: torch.Tensor, real: RealTokens | None,
                  dev_mask: torch.Tensor | None, per_token: bool) -> dict[str, torch.Tensor]:
    """One teacher output of a batch encoded on its device: a (B, L, ...) output of a sequence
    batch at its real tokens only (N, ...) when ``per_token`` (packed), else back at their
    positions with zeros at padding; any other output whole.

    A sequence output is gathered at the real tokens before it is encoded, by a codec's
    ``encode_tokens`` (no work spent on padding), else encoded whole and gathered after. The
    gather uses indices made on the host, so its size needs nothing from the device (a boolean
    mask index would wait for it)."""
    if real is None or output.ndim < 3 or tuple(output.shape[:2]) != real.shape:
        return zero_padding(codec.encode(output, rows), dev_mask)
    if hasattr(codec, "encode_tokens"):
        tokens = output.reshape(-1, *output.shape[2:]).index_select(0, real.index)
        encoded = codec.encode_tokens(tokens, real.rows, real.positions)
    else:
        encoded = {key: v.reshape(-1, *v.shape[2:]).index_select(0, real.index)
                   for key, v in codec.encode(output, rows).items()}
    if per_token:
        return encoded
    positions = real.shape[0] * real.shape[1]
    return {key: v.new_zeros((positions, *v.shape[1:])).index_copy_(0, real.index, v).view(*real.shape, *v.shape[1:])
            for key, v in encoded.items()}


def run_blocks(teacher: nn.Module, dataset: Any, cache: TeacherCache, todo: list[int], cfg: DumpConfig, amp: str,
               dev: torch.device, progress: bool, every_rank: Sequence[int] = ()) -> dict[str, Any]:
    """Run the teacher over blocks ``todo`` and write them; this process's share of the stats.
    The progress bar counts the rows of ``every_rank``'s blocks (all processes'), advancing by
    this process's rows scaled to that total: ranks run in step, and only one prints."""
    batches = plan_batches(cache, todo, cfg.batch_size)
    cuda = dev.type == "cuda"
    loader = DataLoader(_Batches(dataset, batches, digest_mask(cfg), cache.meta.mask_key), batch_size=None, shuffle=False,
                        num_workers=cfg.num_workers, pin_memory=cuda, prefetch_factor=4 if cfg.num_workers else None)
    writer = BlockWriter(cache, cfg.writer_threads, cfg.allow_nonfinite)
    mask_key, packed = cache.meta.mask_key, cache.meta.packed
    logits_spec = cache.outputs["logits"]
    positions = int(np.prod(logits_spec.shape[:-1], dtype=np.int64)) if len(logits_spec.shape) > 1 else 1
    total = sum(b - a for a, b in batches)
    everyone = sum(stop - start for start, stop in map(cache.block_range, every_rank)) or total
    bar = tqdm(total=everyone, unit="rows", unit_scale=True, desc="dump-teacher", disable=not progress,
               dynamic_ncols=True)
    scale = everyone / max(total, 1)
    t0 = time.perf_counter()
    tokens_done = 0
    try:
        with HiddenCapture(teacher, cfg.hidden) as capture, HeadInput.optional(teacher, cfg.head) as head:
            for start, inputs, labels, digests, params, real in loader:
                n = len(digests)
                mask = input_mask(inputs, mask_key)
                tokens = len(real) if real is not None else n * positions
                on_device = move_inputs(inputs, dev, non_blocking=cuda)
                outputs = forward(teacher, capture, on_device, cfg.output_key, amp, dev, head)
                rows = torch.arange(start, start + n, device=dev)
                dev_mask = input_mask(on_device, mask_key)
                at = RealTokens.of(real, mask, start, dev) if real is not None else None
                host = {}
                for name, t in outputs.items():
                    spec = cache.outputs[name]
                    per_token = packed is not None and name in packed.outputs
                    # a packed output's token axis may differ from batch to batch: only real tokens are kept
                    expected = (n, *(t.shape[1:2] if per_token else ()), *spec.shape[1 if per_token else 0:])
                    if tuple(t.shape) != expected:
                        raise KdcacheError(f"teacher output {name!r} for rows {start}.. has shape {tuple(t.shape[1:])}, "
                                           f"earlier rows {spec.shape}: dataset items must all have one shape")
                    # encode on the device, then copy to pinned memory (the caching host allocator's,
                    # reused batch after batch) without blocking the next forward
                    stored = head.take() if head is not None and name == "logits" else t
                    encoded = encode_output(spec.codec, stored, rows, at, dev_mask, per_token)
                    host.update({spec.arrays[key].path: v.to("cpu", non_blocking=cuda) for key, v in encoded.items()})
                if packed is not None:  # every real position of a dumped row has a target
                    host[SPANS] = torch.stack([torch.zeros_like(mask[:, 0], dtype=torch.int32),
                                               mask.sum(1, dtype=torch.int32)], 1)
                logits = outputs["logits"]
                predicted = (logits.argmax(dim=-1).to("cpu", non_blocking=cuda)
                             if logits.ndim >= 2 and tuple(logits.shape[:-1]) == tuple(labels.shape) else None)
                copied = torch.cuda.Event() if cuda else None
                if copied is not None:
                    copied.record()
                if params is not None:
                    host[cache.view_params.path] = params
                writer.put(EncodedBatch(start, host, predicted, labels, digests, tokens, copied))
                fault_point("batch")
                tokens_done += tokens
                bar.update(n * scale)
    finally:
        bar.close()
        writer.close()
    return {"seconds": time.perf_counter() - t0, "rows": total, "tokens": tokens_done,
            "bytes": writer.bytes_written}


def digest_mask(cfg: DumpConfig) -> str | None:
    """The mask key row digests see: a packed cache digests real tokens only."""
    return cfg.mask_key if cfg.layout == "packed" else None
