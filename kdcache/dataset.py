"""Stage two's data: a dataset that zips inputs, labels and cached teacher outputs.

Reads are batched: ``__getitems__`` fetches a whole batch of rows from memory (when the
arrays fit ``memory_budget``) or from whole chunks kept in a small per-process cache, so no
zarr read happens per row. The store is opened lazily in each DataLoader worker.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, default_collate

from .targets import TeacherTargets
from .errors import KdcacheError, option
from .format import SPANS, VIEW_PARAMS
from .items import as_rows, fetch_batch, input_mask, row_digests
from .packing import row_token_starts, scatter_tokens, target_mask
from .store import TeacherCache, dataset_digest, dump_in_progress, is_remote
from .views import ViewedDataset

__all__ = ["CachedTeacherDataset", "TeacherBatch", "TeacherTargets", "ChunkShuffleBatchSampler", "collate",
           "open_complete_cache", "replay_mismatches"]

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


class TeacherBatch(Sequence):
    """A batch as :func:`collate` returns it, also usable as a list of per-row items.

    ``collated`` is ``(inputs, labels, teacher)`` with batched tensors (``teacher`` a
    :class:`TeacherTargets`, or None for plain training); indexing gives row ``i`` as
    ``(inputs_i, label_i, teacher_i)`` with plain dicts, so torch's ``default_collate`` works too.
    """

    def __init__(self, inputs: Any, labels: torch.Tensor, teacher: TeacherTargets | None) -> None:
        self.collated = (inputs, labels, teacher)

    def __len__(self) -> int:
        return len(self.collated[1])

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        inputs, labels, teacher = self.collated
        return (_row(inputs, i), (int(labels[i]) if labels.ndim == 1 else labels[i]),
                _row(teacher.as_dict(), i) if teacher is not None else {})


def _row(value: Any, i: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[i]
    if isinstance(value, dict):
        return {k: _row(v, i) for k, v in value.items()}
    return type(value)(_row(v, i) for v in value)


def collate(batch: Any) -> tuple[Any, torch.Tensor, Any]:
    """DataLoader ``collate_fn``: ``(inputs, labels, teacher)`` without per-row work (``teacher``
    a :class:`TeacherTargets`; batches of single rows are collated by ``default_collate``)."""
    if isinstance(batch, TeacherBatch):
        return batch.collated
    return tuple(default_collate(list(batch)))  # type: ignore[return-value]


class ChunkShuffleBatchSampler(Sampler[list[int]]):
    """Shuffled batches that read few chunks: blocks of ``unit_rows`` rows are shuffled, then
    rows are shuffled within windows of ``window_units`` blocks and cut into batches.

    With ``unit_rows=None`` it is a plain shuffle of all rows. ``set_epoch(e)`` reseeds it as
    ``DistributedSampler`` does; the order depends on (seed, epoch) only. With ``world`` > 1,
    rank ``rank`` takes batches ``rank, rank + world, ...`` (the last ``< world`` are dropped).
    """

    def __init__(self, rows: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 unit_rows: int | None = None, window_units: int = 1, drop_last: bool = False,
                 on_epoch: Callable[[int], None] | None = None, rank: int = 0, world: int = 1) -> None:
        if batch_size < 1:
            raise KdcacheError(f"batch size must be >= 1, got {batch_size}")
        self.rows, self.batch_size, self.shuffle, self.seed = rows, batch_size, shuffle, seed
        self.unit_rows, self.window_units, self.drop_last = unit_rows, max(1, window_units), drop_last
        self.epoch, self.on_epoch, self.rank, self.world = 0, on_epoch, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.on_epoch is not None:  # e.g. the dataset's augmentation view
            self.on_epoch(epoch)

    def order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.rows)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.unit_rows is None or self.unit_rows >= self.rows:
            return rng.permutation(self.rows)
        starts = rng.permutation(np.arange(0, self.rows, self.unit_rows))
        parts = []
        for w in range(0, len(starts), self.window_units):
            window = np.concatenate([np.arange(s, min(s + self.unit_rows, self.rows)) for s in starts[w:w + self.window_units]])
            parts.append(rng.permutation(window))
        return np.concatenate(parts)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        starts = range(0, len(order), self.batch_size)
        # under DDP every rank takes every world-th batch (whole batches keep chunk locality),
        # and all ranks take the same number of steps
        for start in list(starts)[self.rank:len(self) * self.world:self.world]:
            yield order[start:start + self.batch_size].tolist()

    def __len__(self) -> int:
        batches = self.rows // self.batch_size if self.drop_last else -(-self.rows // self.batch_size)
        return batches // self.world


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
        view: for a cache of K augmentation views per sample, which view item ``i`` is after
            :meth:`set_epoch` ``(e)``: ``"cycle"`` -> ``(e + view_offset) % K``, ``"random"`` -> a
            view drawn from ``(seed, e, i)``. The input is regenerated with that view's seed, so it
            is bit-identical to the teacher's (checked by its digest).

    Item ``i`` is sample ``i``: ``len(self)`` is the number of samples, not of cache rows. The
    teacher's logits are a tensor for dense outputs, :class:`~kdcache.codecs.TopKTargets`
    (``values``, ``indices``, ``logsumexp``) for top-k and :class:`~kdcache.codecs.SampledTargets`
    (``ids``, ``counts``) for sampled ones; sequence caches add ``mask`` (True = real token).

    Raises:
        KdcacheError: the cache is incomplete or damaged, or the dataset does not match it.
    """

    def __init__(self, dataset: Any, cache: TeacherCache | str | Path, *, hidden: Sequence[str] | None = None,
                 in_memory: bool | str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 check_inputs: bool = True, chunk_cache_bytes: int = 2 * WINDOW_BYTES,
                 dtype: torch.dtype | None = torch.float32, view: str = "cycle", view_offset: int = 0) -> None:
        opened = open_complete_cache(cache)
        dataset = as_rows(dataset)
        self.dataset, self.path, self.check_inputs, self.dtype = dataset, opened.path, check_inputs, dtype
        self.meta = opened.meta
        if view not in ("cycle", "random"):
            raise KdcacheError(f"view must be 'cycle' or 'random', got {view!r}")
        self.views, self.view, self.view_offset, self.epoch = opened.views, view, int(view_offset), 0
        self._random_views: np.ndarray | None = None
        self.source = _replay_source(dataset, opened)
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
        need = sum(opened.length(a) * a.row_bytes for a in self.arrays.values())
        wanted = _in_memory(in_memory)
        self.in_memory = need <= memory_budget if wanted == "auto" else wanted == "yes"
        self.rows, self.block_rows = opened.rows, opened.block_rows
        self.packed = opened.meta.packed
        if self.packed is not None:  # where each row's stored tokens start on the token axis
            self.spans = opened.load_array(SPANS)
            self.token_blocks = opened.token_blocks()
            self.token_start = row_token_starts(self.spans[:, 1], self.token_blocks[:, 0], self.block_rows)
        self._arrays = {p: opened.load_array(p) for p in self.arrays} if self.in_memory else None
        self._chunk_cache_bytes = chunk_cache_bytes
        self._chunks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._chunk_bytes = 0
        self._handle: TeacherCache | None = None
        self._pid = -1

    # the zarr handle is opened per process (DataLoader workers), never pickled
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_handle=None, _pid=-1, _chunks=OrderedDict(), _chunk_bytes=0)
        return state

    def _cache(self) -> TeacherCache:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = TeacherCache.open(self.path), os.getpid()
            self._chunks.clear()
            self._chunk_bytes = 0
        return self._handle

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
        return max(self.block_rows, self._chunk_cache_bytes // 2 // max(row_bytes, 1) // self.block_rows * self.block_rows)

    def _block(self, path: str, block: int) -> np.ndarray:
        """Rows of one write block of one array, read whole and checked (never a fill value), kept
        in a small per-process LRU."""
        key = (path, block)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        data = self._cache().load_block(path, block)
        self._chunks[key] = data
        self._chunk_bytes += data.nbytes
        while self._chunk_bytes > self._chunk_cache_bytes and len(self._chunks) > 1:
            _, old = self._chunks.popitem(last=False)
            self._chunk_bytes -= old.nbytes
        return data

    def _rows(self, path: str, idx: np.ndarray) -> np.ndarray:
        """Stored rows ``idx`` of a row array; of a packed per-token array, the stored tokens of
        rows ``idx``, one row after the other."""
        spec = self.arrays[path]
        if spec.per_token:
            counts = self.spans[idx, 1].astype(np.int64)
            starts = self.token_start[idx]
            idx = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
            block_ids = np.searchsorted(self.token_blocks[:, 0], idx, side="right") - 1
            offsets = self.token_blocks[:, 0]
        else:
            block_ids = idx // self.block_rows
            offsets = np.arange(0, self.rows, self.block_rows)
        if self._arrays is not None:
            return self._arrays[path][idx]
        out = np.empty((len(idx), *spec.shape), spec.dtype)
        for b in np.unique(block_ids):
            mask = block_ids == b
            out[mask] = self._block(path, int(b))[idx[mask] - offsets[b]]
        return out

    def _teacher_rows(self, name: str, idx: np.ndarray, targets: torch.Tensor | None) -> Any:
        """Decoded teacher rows of output ``name``; a packed output's tokens placed at the batch's
        positions that have a target (``targets``, (B, L))."""
        spec = self.outputs[name]
        stored = {key: self._rows(a.path, idx) for key, a in spec.arrays.items()}
        if self.packed is not None and name in self.packed.outputs:
            assert targets is not None
            stored = {key: scatter_tokens(rows, targets) for key, rows in stored.items()}
        return spec.codec.decode(stored, self.dtype)

    def __getitems__(self, indices: Sequence[int]) -> TeacherBatch:
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
                                   f"reordered or transformed; use the dumped dataset, or pass {option('allow_input_mismatch', True)} "
                                   "if the difference is deliberate")
            if self._checked is not None:
                self._checked[idx] = True
        if self.packed is not None:  # the real positions that have a target (all of a dump's)
            mask = target_mask(mask, torch.from_numpy(self.spans[idx]))
        teacher = TeacherTargets(logits=self._teacher_rows("logits", idx, mask),
                                 hidden={h: self._teacher_rows(h, idx, mask) for h in self.hidden},
                                 mask=mask)  # sequences: True where a position counts, False for padding
        return TeacherBatch(inputs, labels, teacher)

    def __getitem__(self, i: int) -> tuple[Any, int, dict[str, Any]]:
        return self.__getitems__([i])[0]

    def batch_sampler(self, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                      drop_last: bool = False, rank: int = 0, world: int = 1) -> ChunkShuffleBatchSampler:
        """A shuffling batch sampler that suits how this dataset reads (memory or chunks); ``rank``
        of ``world`` takes its DDP share of the batches."""
        on_epoch = self.set_epoch if self.views > 1 else None
        if self.in_memory:
            return ChunkShuffleBatchSampler(len(self), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                            on_epoch=on_epoch, rank=rank, world=world)
        unit = max(1, self.block_rows // self.views)  # samples whose rows share a block
        return ChunkShuffleBatchSampler(len(self), batch_size, shuffle=shuffle, seed=seed, unit_rows=unit,
                                        window_units=max(1, self.window_rows // self.block_rows), drop_last=drop_last,
                                        on_epoch=on_epoch, rank=rank, world=world)

    def loader(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
               drop_last: bool = False, pin_memory: bool = False, **kwargs: Any) -> DataLoader:
        """A DataLoader yielding ``(inputs, labels, teacher)`` batches; call ``set_epoch`` on its
        ``batch_sampler`` each epoch."""
        return DataLoader(self, batch_sampler=self.batch_sampler(batch_size, shuffle=shuffle, seed=seed,
                                                                 drop_last=drop_last),
                          collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory,
                          worker_init_fn=_limit_zarr_threads if num_workers else None,
                          persistent_workers=num_workers > 0 and self.views == 1,
                          multiprocessing_context=self.worker_context if num_workers else None, **kwargs)


def _in_memory(value: bool | str) -> str:
    """``in_memory`` as "auto", "yes" or "no" (True/False accepted); anything else is a mistake,
    not a truthy string."""
    if value is True or value is False:
        return "yes" if value else "no"
    if value in ("auto", "yes", "no"):
        return str(value)
    raise KdcacheError(f"in_memory must be True, False, 'auto', 'yes' or 'no', got {value!r}")


def _limit_zarr_threads(worker_id: int) -> None:
    """Each worker reads its own batches: keep zarr's own pools small so workers don't oversubscribe."""
    zarr.config.set({"threading.max_workers": 2, "async.concurrency": 4})


def _replay_source(dataset: Any, opened: TeacherCache) -> Any:
    """What produces the cache's rows from ``dataset``: itself, or its seeded (sample, view)
    rows, replayed from the stored augmentation parameters when the cache has them."""
    if opened.seed is None:
        return dataset
    params = opened.read_array(VIEW_PARAMS, 0, opened.rows) if opened.view_params is not None else None
    return ViewedDataset(dataset, opened.views, opened.seed, params)


def replay_mismatches(dataset: Any, cache: TeacherCache | str | Path, n: int, *, seed: int = 0,
                      batch_size: int = 256) -> tuple[list[int], int]:
    """Regenerate ``n`` random rows' inputs (each view's transform under its recorded seed, no
    teacher) and compare their digests with those recorded at dump time.

    Returns ``(rows that differ, rows checked)``: a nondeterministic transform, an edited
    dataset or a changed RNG shows up as rows that differ.
    """
    opened = TeacherCache.open(cache.path if isinstance(cache, TeacherCache) else cache)
    source = _replay_source(dataset, opened)
    if len(source) != opened.rows:
        raise KdcacheError(f"the dataset gives {len(source)} rows but cache {opened.path} has {opened.rows}: "
                           "use the dataset the cache was dumped from")
    rows = np.sort(np.random.default_rng(seed).choice(opened.rows, size=min(n, opened.rows), replace=False))
    recorded = opened.row_digests()
    bad: list[int] = []
    mask_key = opened.meta.mask_key if opened.meta.packed is not None else None
    for s in range(0, len(rows), batch_size):
        part = rows[s:s + batch_size]
        inputs, _ = fetch_batch(source, part.tolist())
        bad += part[row_digests(inputs, input_mask(inputs, mask_key)) != recorded[part]].tolist()
    return bad, len(rows)
