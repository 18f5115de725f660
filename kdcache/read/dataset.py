"""Stage two's data: a dataset that zips inputs, labels and cached teacher outputs.

Reads are batched: ``__getitems__`` fetches a whole batch of rows from memory (when the
arrays fit ``memory_budget``; held as :class:`~kdcache.read.resident.ResidentTargets` on the host or
the GPU) or from whole chunks kept in a small per-process cache, so no zarr read happens per
row. The store is opened lazily in each DataLoader worker. Targets held in memory are gathered
in the training process: :meth:`CachedTeacherDataset.loader`'s workers send only inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..data.digests import row_digests
from ..data.items import as_rows, fetch_batch, input_mask
from ..errors import KdcacheError, option
from ..format.meta import SPANS
from ..format.packing import place_tokens, row_token_starts, target_mask, token_indices
from ..losses.targets import TeacherTargets
from ..store import TeacherCache, dataset_digest, dump_in_progress, is_remote
from .batch import TeacherBatch, collate
from .blocks import BlockReader
from .head import output_layer
from .replay import replay_mismatches, replay_source
from .resident import GatheringLoader, InputRows, ResidentTargets, TeacherRows, holding_device, in_memory_choice
from .sampler import ChunkShuffleBatchSampler

__all__ = ["CachedTeacherDataset", "TeacherBatch", "TeacherTargets", "TeacherRows", "ChunkShuffleBatchSampler",
           "collate", "open_complete_cache", "replay_mismatches"]

DEFAULT_MEMORY_BUDGET = 4 << 30
_VIEW_MISMATCH = ("the dataset changed, or its transform draws from a generator kdcache does not seed (draw from "
                  "torch, numpy.random or random); kdcache verify --replay N checks a cache")
WINDOW_BYTES = 256 << 20


def open_complete_cache(cache: TeacherCache | str | Path) -> TeacherCache:
    """Open a cache for reading; refuse, in one line, one that is not finished."""
    path = cache.path if isinstance(cache, TeacherCache) else str(cache)
    try:
        opened = TeacherCache.open(path)
    except KdcacheError:
        _refuse_if_being_written(path)  # a dump creating the store has not written its attrs yet
        raise
    if not opened.complete:
        _refuse_if_being_written(path)
        raise KdcacheError(f"cache {path} is incomplete (its dump stopped early); rerun the same "
                           "kdcache dump-teacher command to resume it")
    return opened


def _refuse_if_being_written(path: str) -> None:
    holder = dump_in_progress(path)
    if holder:
        raise KdcacheError(f"cache {path} is still being written (dump in progress: {holder}); wait for it to finish")


class CachedTeacherDataset(Dataset):
    """Item ``i`` is ``(inputs, label, teacher)`` from row ``i`` of the cache: batches
    (``__getitems__``, :meth:`loader`) carry a :class:`TeacherTargets` with ``logits`` and
    ``hidden`` (``teacher["logits"]`` works too), single items a plain dict of the same.

    Args:
        dataset: the same dataset the cache was dumped from (same length, same inputs).
        cache: a :class:`TeacherCache` or its path. It must be complete.
        hidden: which hidden outputs to read (default: all in the cache; ``()`` for none).
        in_memory: ``"auto"`` holds the arrays in memory when they fit ``memory_budget`` bytes.
        check_inputs: compare each row's input digest with the one recorded at dump time,
            so a reordered, edited or transformed dataset is refused before a wrong target is
            used. Set False only for a deliberately different input (``--allow-input-mismatch``).
            Rows of a plain ``TensorDataset`` (fixed tensors, no transform) are checked on their
            first read in each process; rows of any other dataset on every read.
        chunk_cache_bytes: bytes of decoded chunks kept per process when reading from disk.
        dtype: dtype of the teacher tensors returned; None keeps the stored dtype (float16 or
            bfloat16: half the bytes to move, convert on the accelerator).
        device: where the arrays are held when in memory: ``"cpu"`` (host memory) or a CUDA
            device, where batches are then gathered with no host copy. With ``device_budget``
            the arrays go to the CUDA device only if they fit that share of its free memory
            (else host memory, as ``in_memory`` says); without it they always do.
        view: for a cache of K augmentation views per sample, which view item ``i`` is after
            :meth:`set_epoch` ``(e)``: ``"cycle"`` -> ``(e + view_offset) % K``, ``"random"`` -> a
            view drawn from ``(seed, e, i)``. The input is regenerated with that view's seed, so it
            is bit-identical to the teacher's (checked by its digest).

    Item ``i`` is sample ``i``: ``len(self)`` is the number of samples, not of cache rows. The
    teacher's logits are a tensor for dense outputs, :class:`~kdcache.losses.targets.TopKTargets`
    (``values``, ``indices``, ``logsumexp``) for top-k, :class:`~kdcache.losses.targets.SampledTargets`
    (``ids``, ``counts``) for sampled, :class:`~kdcache.losses.targets.HybridTargets` (``logprobs``,
    ``indices``, ``tail``) for hybrid and :class:`~kdcache.losses.targets.HeadTargets` (``hidden``, the
    teacher's output layer ``head``) for head ones; sequence caches add ``mask`` (True = real token).

    Raises:
        KdcacheError: the cache is incomplete or damaged, or the dataset does not match it.
    """

    def __init__(self, dataset: Any, cache: TeacherCache | str | Path, *, hidden: Sequence[str] | None = None,
                 in_memory: bool | str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 check_inputs: bool = True, chunk_cache_bytes: int = 2 * WINDOW_BYTES,
                 dtype: torch.dtype | None = torch.float32, view: str = "cycle", view_offset: int = 0,
                 device: str | torch.device = "cpu", device_budget: float | None = None) -> None:
        opened = open_complete_cache(cache)
        dataset = as_rows(dataset)
        self.dataset, self.path, self.check_inputs, self.dtype = dataset, opened.path, check_inputs, dtype
        self.meta = opened.meta
        if view not in ("cycle", "random"):
            raise KdcacheError(f"view must be 'cycle' or 'random', got {view!r}")
        self.views, self.view, self.view_offset, self.epoch = opened.views, view, int(view_offset), 0
        self._random_views: np.ndarray | None = None
        self.source = replay_source(dataset, opened)
        if opened.view_params is not None and not self.source.explicit:
            raise KdcacheError(f"cache {opened.path} stores explicit augmentation parameters but the dataset has no "
                               "sample_params/apply_params methods: use the dataset the cache was dumped from")
        n = len(dataset)
        if n * opened.views != opened.rows:
            raise KdcacheError(f"the dataset has {n} rows but cache {opened.path} has {opened.rows // opened.views}: "
                               "use the dataset the cache was dumped from, or dump this one")
        # a packed cache digests real tokens only (padding is not part of the input it recorded)
        self.digest_mask = opened.meta.mask_key if opened.meta.packed is not None else None
        if check_inputs and dataset_digest(self.source, self.digest_mask) != opened.meta.dataset.digest:
            if opened.seed is not None:
                raise KdcacheError(f"the views regenerated from their seeds differ from the ones cache {opened.path} was "
                                   f"dumped from: {_VIEW_MISMATCH}")
            raise KdcacheError(f"the dataset's content differs from the one cache {opened.path} was dumped from "
                               "(input digest mismatch): use that dataset, or dump this one")
        names = opened.hidden_names if hidden is None else list(hidden)
        unknown = [h for h in names if h not in opened.outputs or h == "logits"]
        if unknown:
            raise KdcacheError(f"cache {opened.path} holds no hidden output {unknown[0]!r}; it has {opened.hidden_names}")
        self.hidden = tuple(names)
        self.outputs = {name: opened.outputs[name] for name in ("logits", *self.hidden)}
        self.arrays = {a.path: a for o in self.outputs.values() for a in o.arrays.values()}
        self.mask_key = opened.meta.mask_key
        opened.check_chunks()  # every chunk file there, of its size: what is read next is bounded by the disk
        self.digests = opened.row_digests()
        # a TensorDataset row cannot change short of an in-place write: check it once
        self._checked = np.zeros(opened.rows, bool) if type(self.source) is TensorDataset else None
        lengths = {p: opened.length(a) for p, a in self.arrays.items()}  # rows, or tokens of a packed array
        need = sum(lengths[p] * a.row_bytes for p, a in self.arrays.items())
        wanted = in_memory_choice(in_memory)
        holder = holding_device(device, device_budget, need, wanted)
        self.in_memory = (holder.type != "cpu" or need <= memory_budget) if wanted == "auto" else wanted == "yes"
        self.rows, self.block_rows = opened.rows, opened.block_rows
        self.packed = opened.meta.packed
        if self.packed is not None:  # where each row's stored tokens start on the token axis
            self.spans = opened.load_array(SPANS)
            self.token_blocks = opened.token_blocks()
            self.token_start = row_token_starts(self.spans[:, 1], self.token_blocks[:, 0], self.block_rows)
        self.head = output_layer(opened)  # a head cache's layer: read once, checked, shared by every batch
        self.blocks = BlockReader(opened, self.arrays, chunk_cache_bytes,
                                  (self.spans, self.token_start, self.token_blocks) if self.packed is not None else None)
        self._row_bytes = need // max(opened.rows, 1)
        self.resident = (ResidentTargets(self.outputs, self.blocks.read, lengths, holder) if self.in_memory
                         else None)

    # targets held on a GPU cannot cross processes: a process without them reads blocks
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.resident is not None and self.resident.device.type != "cpu":
            state.update(resident=None, in_memory=False)
        return state

    def __len__(self) -> int:
        return len(self.digests) // self.views

    @property
    def worker_context(self) -> str | None:
        """DataLoader ``multiprocessing_context`` safe for this dataset: workers that read an
        object-store cache must not inherit the parent's fsspec event loop (docs/design.md)."""
        return "forkserver" if is_remote(self.path) and not self.in_memory else None

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's augmentation view (as ``DistributedSampler.set_epoch``). DataLoader
        workers see it when they start: use ``persistent_workers=False`` (as :meth:`loader` does)."""
        self.epoch = int(epoch)
        self._random_views = None

    def _epoch_views(self) -> np.ndarray:
        """The seeded random view of every sample this epoch (drawn once per epoch)."""
        if self._random_views is None:
            self._random_views = np.random.default_rng([int(self.meta.seed or 0), self.epoch, 0x5EED]).integers(
                0, self.views, len(self))
        return self._random_views

    def cache_rows(self, indices: np.ndarray) -> np.ndarray:
        """Cache rows of samples ``indices`` at the current epoch's view."""
        if self.views == 1:
            return indices
        if self.view == "cycle":
            view = np.full(len(indices), (self.epoch + self.view_offset) % self.views)
        else:
            view = self._epoch_views()[indices]
        return indices * self.views + view

    @property
    def window_rows(self) -> int:
        """Rows whose chunks fit the chunk cache: the shuffle window when reading from disk."""
        row_bytes = sum(o.row_bytes for o in self.outputs.values())
        return max(self.block_rows, self.blocks.cache_bytes // 2 // max(row_bytes, 1) // self.block_rows * self.block_rows)

    def read_ahead(self, rows: np.ndarray) -> None:
        """Start reading, in the background, the blocks that samples ``rows`` (the next shuffle
        window) need and the block cache lacks: the disk works while the current window trains.
        The sampler of :meth:`batch_sampler` calls it where batches are read in this process."""
        if self.resident is not None or self.blocks.cache_bytes < 2 * len(rows) * self._row_bytes:
            return  # nothing to read, or no room to hold the window beside the current one
        self.blocks.read_ahead(self.cache_rows(np.asarray(rows, dtype=np.int64)))

    def _teacher_rows(self, name: str, idx: np.ndarray) -> Any:
        spec = self.outputs[name]
        return spec.codec.decode({key: self.blocks.take(a.path, idx) for key, a in spec.arrays.items()}, self.dtype)

    def _per_token(self, name: str) -> bool:
        return self.packed is not None and name in self.packed.outputs

    def _inputs(self, indices: Sequence[int]) -> tuple[Any, torch.Tensor, TeacherRows]:
        """A batch's inputs and labels, checked against the digests recorded at dump time, and
        its cache rows (with the sequence mask): everything but the targets."""
        samples = np.asarray(indices, dtype=np.int64)
        if samples.size and (samples.min() < 0 or samples.max() >= len(self)):
            raise IndexError(f"row index out of range for a cache of {len(self)} rows")
        idx = self.cache_rows(samples)
        inputs, labels = fetch_batch(self.source, idx)
        mask = input_mask(inputs, self.mask_key)
        if self.check_inputs and (self._checked is None or not self._checked[idx].all()):
            bad = np.flatnonzero(row_digests(inputs, mask if self.digest_mask else None) != self.digests[idx])
            if bad.size:
                if self.meta.seed is not None:
                    sample, view = divmod(int(idx[bad[0]]), self.views)
                    raise KdcacheError(f"view {view} of sample {sample} is not the input the teacher saw at dump time "
                                       f"({bad.size} of {idx.size} rows in this batch differ): {_VIEW_MISMATCH}")
                raise KdcacheError(f"dataset row {int(idx[bad[0]])} is not the input the teacher saw at dump time "
                                   f"({bad.size} of {idx.size} rows in this batch differ): the dataset was edited, "
                                   f"reordered or transformed; use the dumped dataset, or pass "
                                   f"{option('allow_input_mismatch', True)} if the difference is deliberate")
            if self._checked is not None:
                self._checked[idx] = True
        if self.packed is not None:  # the real positions that have a target (all of a dump's)
            mask = target_mask(mask, torch.from_numpy(self.spans[idx]))
        # sequences: True where a position counts, False for padding
        return inputs, labels, TeacherRows(torch.from_numpy(idx), mask)

    def gather(self, rows: TeacherRows) -> TeacherTargets:
        """The targets of a batch's cache ``rows``: gathered from the arrays held in memory (on
        their device), else read from the store's chunks."""
        idx = rows.rows.numpy()

        def output(name: str) -> Any:
            per_token = self._per_token(name)
            if self.resident is not None:
                at = torch.from_numpy(token_indices(idx, self.spans, self.token_start)) if per_token else rows.rows
                got = self.resident.gather(name, at, self.dtype)
            else:
                got = self._teacher_rows(name, idx)
            # a packed output's tokens go back to the batch's positions that have a target
            got = place_tokens(got, rows.mask.to(self.device)) if per_token else got
            return replace(got, head=self.head) if name == "logits" and self.head is not None else got

        mask = rows.mask.to(self.device, non_blocking=True) if rows.mask is not None else None
        return TeacherTargets(logits=output("logits"), hidden={h: output(h) for h in self.hidden}, mask=mask)

    @property
    def device(self) -> torch.device:
        """Where batches' targets are: the held arrays' device, else the host."""
        return self.resident.device if self.resident is not None else torch.device("cpu")

    def precompute(self, temperature: float) -> "CachedTeacherDataset":
        """Hold the teacher side of the dense KD term at ``temperature`` instead of the logits:
        batches then carry :class:`~kdcache.losses.targets.SoftTargets` (the teacher's probabilities
        and ``sum p log p`` per row), which ``KLDivLoss(temperature)`` takes in place of the
        logits and no longer recomputes every step. Computed once, in place (memory: 4 bytes
        more per row, per position for sequences). Needs the arrays held in memory."""
        if self.resident is None:
            raise KdcacheError(f"cache {self.path} is read from disk: precomputing the teacher's probabilities "
                               "needs it in memory (in_memory=True, or a larger memory_budget)")
        self.resident.precompute(float(temperature), self.meta.vocab.real)
        return self

    def input_rows(self) -> "InputRows":
        """This dataset without its targets, for DataLoader workers: batches carry
        :class:`TeacherRows`, which :meth:`gather` turns into targets in the training process."""
        return InputRows(self)

    def __getitems__(self, indices: Sequence[int]) -> TeacherBatch:
        inputs, labels, rows = self._inputs(indices)
        return TeacherBatch(inputs, labels, self.gather(rows))

    def __getitem__(self, i: int) -> tuple[Any, int, dict[str, Any]]:
        return self.__getitems__([i])[0]

    def batch_sampler(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                      rank: int = 0, world: int = 1, read_ahead: bool = False) -> ChunkShuffleBatchSampler:
        """A shuffling batch sampler that suits how this dataset reads (memory or chunks); ``rank``
        of ``world`` takes its DDP share of the batches. ``read_ahead``: this process reads the
        batches (no DataLoader workers), so the sampler has it read each next window's chunks
        while the current window's batches train."""
        on_epoch = self.set_epoch if self.views > 1 else None
        if self.in_memory:
            return ChunkShuffleBatchSampler(len(self), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                            on_epoch=on_epoch, rank=rank, world=world)
        unit = max(1, self.block_rows // self.views)  # samples whose rows share a block
        return ChunkShuffleBatchSampler(len(self), batch_size, shuffle=shuffle, seed=seed, unit_rows=unit,
                                        window_units=max(1, self.window_rows // self.block_rows), drop_last=drop_last,
                                        on_epoch=on_epoch, rank=rank, world=world,
                                        on_window=self.read_ahead if read_ahead else None)

    def loader(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
               drop_last: bool = False, pin_memory: bool = False, **kwargs: Any) -> "DataLoader | GatheringLoader":
        """A DataLoader yielding ``(inputs, labels, teacher)`` batches; call ``set_epoch`` on its
        ``batch_sampler`` each epoch. With the targets held in memory, its workers send only
        inputs and the targets are gathered in this process (on their device)."""
        data: Dataset = self.input_rows() if self.resident is not None else self
        loader = DataLoader(data, batch_sampler=self.batch_sampler(batch_size, shuffle=shuffle, seed=seed,
                                                                   drop_last=drop_last, read_ahead=num_workers == 0),
                            collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory,
                            worker_init_fn=_limit_zarr_threads if num_workers else None,
                            persistent_workers=num_workers > 0 and self.views == 1,
                            multiprocessing_context=self.worker_context if num_workers else None, **kwargs)
        return GatheringLoader(loader, self) if self.resident is not None else loader


def _limit_zarr_threads(worker_id: int) -> None:
    """Each worker reads its own batches: keep zarr's own pools small so workers don't oversubscribe."""
    zarr.config.set({"threading.max_workers": 2, "async.concurrency": 4})
