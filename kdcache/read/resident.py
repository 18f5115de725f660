"""Teacher targets held whole in memory or on the training device, gathered there by index.

A cache that fits is read once into tensors on ``device`` (host memory, or the GPU with
``--cache-device``) and each batch's rows are gathered by index in the process that trains
(``index_select`` on a GPU, numpy's take on the host): on a GPU no host gather and no pinned copy, and with DataLoader workers nothing of the
targets is pickled between processes, since workers send only the inputs and the batch's cache
rows (:class:`TeacherRows`). Dense logits can be replaced by the teacher side of the KD term at
the run's temperature (:meth:`ResidentTargets.precompute`), computed once instead of every step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..errors import KdcacheError
from ..format.codecs import DenseCodec
from ..format.meta import ArrayInfo, OutputSpec
from ..losses.targets import SoftTargets, TeacherTargets, map_tensors, teacher_side
from .batch import TeacherBatch

__all__ = ["ResidentTargets", "TeacherRows", "InputRows", "GatheringLoader", "DEVICE_BUDGET", "fits_device",
           "holding_device", "in_memory_choice"]

DEVICE_BUDGET = 0.25  # share of a GPU's free memory the targets may take under --cache-device auto
LOAD_BYTES = 64 << 20  # bytes of rows read from the store at a time when loading
WORK_BYTES = 16 << 20  # float32 work space of the precomputation, per piece of rows


@dataclass(frozen=True)
class TeacherRows:
    """A batch's cache rows (int64 (B,)) and sequence mask ((B, L) bool or None): what a
    DataLoader worker sends in place of the batch's targets, gathered where the step runs."""

    rows: torch.Tensor
    mask: torch.Tensor | None = None


def fits_device(nbytes: int, device: torch.device, budget: float = DEVICE_BUDGET) -> bool:
    """True when ``nbytes`` fit ``budget`` times the free memory of CUDA ``device`` now."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= budget * free


def _tensor(stored: np.ndarray, logical_bfloat16: bool) -> torch.Tensor:
    """A stored array as a tensor without copying where possible: bfloat16 bits as bfloat16,
    other uint16 arrays (counts) widened to int32, since torch gathers no uint16."""
    if stored.dtype == np.uint16:
        if logical_bfloat16:
            return torch.from_numpy(np.ascontiguousarray(stored).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(stored.astype(np.int32))
    return torch.from_numpy(np.ascontiguousarray(stored))


def _take(array: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of ``array``: ``index_select`` on a GPU; on the host numpy's take, which
    runs on the calling thread (torch's parallel index_select of float16 rows took 0.1-0.9 ms
    instead of 4 us per 256 x 256 batch when the 2-core box was loaded: its OpenMP threads
    wait for cores that other processes hold)."""
    if array.device.type != "cpu":
        return array.index_select(0, rows)
    bits = array.view(torch.int16) if array.dtype == torch.bfloat16 else array
    taken = torch.from_numpy(bits.numpy()[rows.numpy()])
    return taken.view(torch.bfloat16) if array.dtype == torch.bfloat16 else taken


class ResidentTargets:
    """The arrays of ``outputs`` (name -> spec), ``lengths[path]`` rows each (tokens, for a
    packed cache's per-token arrays), held on ``device``.

    ``read(path, start, stop)`` gives stored rows as numpy (the dataset's one read function);
    each array is filled ``LOAD_BYTES`` at a time, so a GPU's copy never passes through a
    second whole copy in host memory.
    """

    def __init__(self, outputs: dict[str, OutputSpec], read: Callable[[str, int, int], np.ndarray],
                 lengths: dict[str, int], device: torch.device) -> None:
        self.outputs, self.device, self.lengths = outputs, device, lengths
        self.arrays: dict[str, torch.Tensor] = {}
        for name, spec in outputs.items():
            bf16 = isinstance(spec.codec, DenseCodec) and spec.codec.dtype == "bfloat16"
            for a in spec.arrays.values():
                self.arrays[a.path] = self._load(read, a, bf16)
        self.soft: SoftTargets | None = None  # the logits' teacher side, once precomputed

    def _load(self, read: Callable[[str, int, int], np.ndarray], info: ArrayInfo, bf16: bool) -> torch.Tensor:
        """The whole array on ``self.device``, read ``LOAD_BYTES`` at a time (host memory holds
        one piece besides the result, on any device)."""
        step, length = max(1, LOAD_BYTES // max(1, info.row_bytes)), self.lengths[info.path]
        out: torch.Tensor | None = None
        for start in range(0, length, step):
            piece = _tensor(read(info.path, start, min(start + step, length)), bf16)
            if out is None:
                out = torch.empty((length, *piece.shape[1:]), dtype=piece.dtype, device=self.device)
            out[start:start + len(piece)].copy_(piece)
        assert out is not None
        return out

    @property
    def nbytes(self) -> int:
        held = sum(t.numel() * t.element_size() for t in self.arrays.values())
        return held + (self.soft.neg_entropy.numel() * 4 if self.soft is not None else 0)

    def precompute(self, temperature: float, vocab: int) -> None:
        """Replace the dense logits by :class:`SoftTargets` at ``temperature`` over the first
        ``vocab`` classes, in place: the probabilities overwrite the logits (float16; float32
        for a float32 cache; a bfloat16 cache's bytes are reused for float16), and the
        per-row ``sum p log p`` costs 4 bytes per row (per position for sequences). The work
        goes ``WORK_BYTES`` of float32 at a time."""
        if self.soft is not None:
            if self.soft.temperature != temperature:
                raise KdcacheError(f"the teacher's probabilities are held at temperature {self.soft.temperature:g}; "
                                   f"open the cache again to train at {temperature:g}")
            return
        spec = self.outputs["logits"]
        if not isinstance(spec.codec, DenseCodec):
            raise KdcacheError(f"only dense logits can be precomputed; this cache stores {spec.codec.name}")
        logits = self.arrays[spec.arrays[""].path]
        width = torch.float32 if logits.dtype == torch.float32 else torch.float16
        probs = logits if logits.dtype == width else logits.view(width)  # same bytes, rewritten in place
        neg_entropy = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
        per_row = max(1, int(np.prod(logits.shape[1:], dtype=np.int64)) * 4)
        step = max(1, WORK_BYTES // per_row)
        with torch.no_grad():
            for start in range(0, len(logits), step):
                log_p, p = teacher_side(logits[start:start + step, ..., :vocab], temperature)
                neg_entropy[start:start + step] = (p * log_p).sum(-1)
                probs[start:start + step, ..., :vocab] = p.to(width)
        self.soft = SoftTargets(probs[..., :vocab], neg_entropy, float(temperature))

    def gather(self, name: str, rows: torch.Tensor, dtype: torch.dtype | None) -> Any:
        """Output ``name``'s rows ``rows`` (int64 on any device), decoded by its codec, on
        ``self.device``: a tensor in ``dtype`` (None keeps the stored width), TopKTargets,
        SampledTargets, HybridTargets, or SoftTargets once the logits are precomputed."""
        rows = rows.to(self.device, non_blocking=True)
        if name == "logits" and self.soft is not None:
            return SoftTargets(_take(self.soft.probs, rows), _take(self.soft.neg_entropy, rows), self.soft.temperature)
        spec = self.outputs[name]
        return spec.codec.decode({key: _take(self.arrays[a.path], rows) for key, a in spec.arrays.items()}, dtype)


BY_VALUE_BYTES = 1 << 20  # a worker sends smaller tensors inside its pickle, not through shared memory


def _by_value(tensor: torch.Tensor) -> Any:
    small = tensor.numel() * tensor.element_size() <= BY_VALUE_BYTES and tensor.dtype != torch.bfloat16
    return tensor.numpy() if small and not tensor.requires_grad else tensor


def _to_wire(batch: Any) -> Any:
    """A worker's batch for the trip to the main process: tensors of up to ``BY_VALUE_BYTES`` as
    numpy arrays, which pickle by value. torch sends every tensor through its own shared-memory
    file (a file, a descriptor passed over a socket, a mapping: ~0.3 ms each on the 2-core box),
    which made a batch of small tensors cost more than its bytes."""
    return map_tensors(batch, _by_value)


def _from_wire(batch: Any) -> Any:
    """Inverse of :func:`_to_wire`, in the main process (numpy arrays back to tensors, no copy)."""
    return map_tensors(batch, torch.from_numpy, leaf=np.ndarray)


class InputRows(Dataset):
    """A :class:`CachedTeacherDataset` without its targets: batches ``(inputs, labels,
    TeacherRows)``, checked against the recorded digests, for DataLoader workers to send (small
    tensors by value). It never touches the targets, and pickles (spawn, forkserver) without
    them. Read it through :class:`GatheringLoader`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __getstate__(self) -> dict[str, Any]:
        held = copy.copy(self.dataset)
        held.resident = None
        return {"dataset": held}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: Sequence[int]) -> TeacherBatch:
        inputs, labels, rows = self.dataset._inputs(indices)
        if get_worker_info() is not None:
            inputs, labels, rows = _to_wire((inputs, labels, rows))
        return TeacherBatch(inputs, labels, rows)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])[0]


class GatheringLoader:
    """Iterates a DataLoader of :class:`InputRows` and gathers each batch's targets here, from
    ``dataset``'s arrays held in memory: ``(inputs, labels, TeacherTargets)`` batches, the
    targets on the arrays' device."""

    def __init__(self, loader: DataLoader, dataset: Any) -> None:
        self.loader, self.dataset = loader, dataset

    @property
    def batch_sampler(self) -> Any:
        return self.loader.batch_sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor, TeacherTargets]]:
        wired = self.loader.num_workers > 0
        # the DataLoader pins what its workers send; the targets are gathered here, after it: pin
        # them too when it pins (and a GPU is there to copy them to), so .to(cuda, non_blocking=True)
        # does not wait for the copy
        pin = self.loader.pin_memory and torch.cuda.is_available()
        for batch in self.loader:
            inputs, labels, rows = _from_wire(batch) if wired else batch
            targets = self.dataset.gather(rows)
            yield inputs, labels, map_tensors(targets, _pinned) if pin else targets


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A host tensor in pinned memory (a copy); a tensor on a device as it is."""
    return tensor.pin_memory() if tensor.device.type == "cpu" and not tensor.is_pinned() else tensor


def holding_device(device: str | torch.device, budget: float | None, need: int, in_memory: str) -> torch.device:
    """Where arrays held in memory live: a CUDA ``device`` when asked (and, with a ``budget``,
    when ``need`` bytes fit that share of its free memory), else the host."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise KdcacheError(f"cache device {device} is not a visible CUDA device; use cpu")
    if budget is not None:
        return dev if in_memory != "no" and fits_device(need, dev, budget) else torch.device("cpu")
    if in_memory == "no":
        raise KdcacheError(f"holding the cache on {device} puts it in memory: leave in_memory at auto or yes")
    return dev


def in_memory_choice(value: bool | str) -> str:
    """``in_memory`` as "auto", "yes" or "no" (True/False accepted); anything else is a mistake,
    not a truthy string."""
    if value is True or value is False:
        return "yes" if value else "no"
    if value in ("auto", "yes", "no"):
        return str(value)
    raise KdcacheError(f"in_memory must be True, False, 'auto', 'yes' or 'no', got {value!r}")
