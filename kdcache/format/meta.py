"""The cache description: one typed home for everything a cache's attrs record.

A cache is one zarr v3 group (see ``docs/design.md`` and ``docs/format.md``). Its group
attribute ``kdcache`` describes it; :class:`CacheMeta` is that description as frozen
dataclasses. :meth:`CacheMeta.to_attrs` and :meth:`CacheMeta.from_attrs` (:mod:`.attrs`) are the only
code that knows the attribute keys or older format versions, and ``from_attrs`` treats the attrs as
untrusted input: a missing field, a wrong type or an absurd size is one :class:`KdcacheError`
line, never a ``KeyError`` deep inside a reader.

Arrays of the group (a **contract**):

- ``logits`` / ``topk/*`` / ``sampled/*``  (rows, ...)  the teacher's logits, by codec
- ``hidden/<module.name>``                 (rows, ...)  one array per captured module output
- ``_row_digest``  (rows,) uint64     digest of each row's input (alignment check)
- ``_view_params`` (rows, P) float32  explicit augmentation parameters (optional)
- ``_blocks``      (blocks, 5 + A) int64  completion record: done, rows, labelled, correct, tokens,
  then (format 3) one keyed digest per array A that binds the block's bytes to (cache, array, block)
- ``head/weight``, ``head/bias``: a codec's *constants*, stored once (not per row), each with the
  digest of its bytes recorded in the description (:class:`ConstantArray`)

Packed sequence caches (format 3, ``packed`` in the attrs) store per-token outputs for the
positions that have a target only, on one token axis: ``(tokens, ...)`` arrays, each block's
tokens one contiguous range starting at a multiple of the token chunk, plus

- ``_spans``        (rows, 2) int32   per row: first real position with a target, and how many
- ``_token_blocks`` (blocks, 2) int64 per block: first token, tokens (checked against a crc in the attrs)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from .codecs import Codec

__all__ = ["FORMAT_VERSION", "ATTR", "BLOCKS", "BLOCK_STATS", "ROW_DIGEST", "VIEW_PARAMS", "SPANS", "TOKEN_BLOCKS",
           "PackedTokens", "ArrayInfo", "ConstantArray", "OutputSpec", "TokenizerInfo", "TeacherInfo", "DatasetInfo", "Vocab",
           "TeacherAccuracy", "DumpStats", "CacheMeta"]

FORMAT_VERSION = 3  # 3: block digests, attrs digest; 2: multi-array codecs, tokens, vocab; reads 1 and 2
ATTR = "kdcache"
BLOCKS = "_blocks"
BLOCK_STATS = 5  # done, rows, labelled, correct, tokens (format 1: the first 4); then the block digests
ROW_DIGEST = "_row_digest"
VIEW_PARAMS = "_view_params"
SPANS = "_spans"
TOKEN_BLOCKS = "_token_blocks"
CHANCE_FACTOR = 1.5  # a teacher no better than this times a uniform guess is reported as untrained
# an output key naming a hidden state or an embedding: the cache holds a regression target, not logits
REGRESSION_KEY = re.compile(r"hidden|embed|pool|state|feature", re.IGNORECASE)


@dataclass(frozen=True)
class ArrayInfo:
    """One stored array: its path in the group, shape per row (per token, for a packed per-token
    array), stored dtype and rows (tokens) per chunk."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int
    per_token: bool = False

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ConstantArray:
    """An array a codec stores once per cache (a head's weight and bias): its path, whole shape,
    stored dtype, rows per chunk, and ``digest``, the crc32c of its bytes keyed by (cache, path),
    recorded in the description and checked whenever it is read."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int
    digest: int

    @property
    def row(self) -> ArrayInfo:
        """The array as rows (its first axis), as the chunk readers and writers see arrays."""
        return ArrayInfo(self.path, self.shape[1:], self.dtype, self.chunk_rows)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class OutputSpec:
    """One teacher output (``logits`` or a hidden module): its per-row shape, the codec that
    stores it, the arrays the codec writes (codec key -> :class:`ArrayInfo`) and those it stores
    once (codec key -> :class:`ConstantArray`; a head cache's layer)."""

    name: str
    shape: tuple[int, ...]
    codec: Codec
    arrays: Mapping[str, ArrayInfo]
    constants: Mapping[str, ConstantArray] = field(default_factory=dict)

    @property
    def row_bytes(self) -> int:
        return sum(a.row_bytes for a in self.arrays.values())

    @property
    def form(self) -> str:
        """How it is stored, in words: ``float16``, ``top-8``, ``64 samples``, ``top-8 + 48 tail samples``."""
        p = self.codec.params()
        words = {"topk": f"top-{p.get('k')}", "sampled": f"{p.get('n')} samples", "head": f"head {p.get('dtype')}",
                 "hybrid": f"top-{p.get('k')} + {p.get('n')} tail samples"}
        return words.get(self.codec.name, p.get("dtype", ""))

    @staticmethod
    def planned(name: str, codec: Codec, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...], np.dtype]]:
        """Codec key -> (array path, per-row shape, stored dtype) of an output, before chunking."""
        base = f"hidden/{name}" if name != "logits" else ("logits" if codec.name == "dense" else codec.name)
        return {key: (f"{base}/{key}" if key else base, s, d) for key, (s, d) in codec.arrays(shape).items()}

    @staticmethod
    def planned_constants(name: str, codec: Codec, shape: tuple[int, ...],
                          ) -> dict[str, tuple[str, tuple[int, ...], np.dtype]]:
        """Codec key -> (array path, whole shape, stored dtype) of what the codec stores once."""
        constants = getattr(codec, "constants", None)
        return {key: (f"{codec.name}/{key}", s, d) for key, (s, d) in constants(shape).items()} if constants else {}


@dataclass(frozen=True)
class PackedTokens:
    """The packed layout: which outputs are stored per real token, the token chunk (every
    block's token range starts at a multiple of it), the token axis' length, and the crc32c of
    the ``_token_blocks`` array that places each block on it."""

    outputs: tuple[str, ...]
    chunk: int
    capacity: int
    blocks_crc: int


@dataclass(frozen=True)
class TokenizerInfo:
    """The teacher's tokenizer vocabulary: its size and a digest of its token -> id map, so a
    student whose tokenizer maps ids to other tokens can be refused without the teacher."""

    size: int
    digest: str


@dataclass(frozen=True)
class TeacherInfo:
    """Which teacher wrote the cache. ``spec``/``kwargs``/``checkpoint`` are provenance, shown
    to people and never imported or called; ``tokenizer`` is recorded when the dump had one."""

    weights_digest: str
    class_name: str
    spec: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    tokenizer: TokenizerInfo | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """The transfer set: length in samples, sampled digest, and its spec as provenance."""

    length: int
    digest: str
    spec: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Vocab:
    """The teacher's real vocabulary (class count) and its output layer's (padded) width."""

    real: int
    padded: int


@dataclass(frozen=True)
class TeacherAccuracy:
    """The teacher's accuracy on the transfer set's labelled rows (tokens for sequences)."""

    labelled: int
    correct: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def at_chance(self, classes: int) -> bool:
        """At most 1.5x the accuracy of a uniform guess over ``classes`` on at least 10 labelled
        rows: the teacher is most likely untrained (its checkpoint forgotten)."""
        accuracy = self.accuracy
        return self.labelled >= 10 and accuracy is not None and accuracy <= CHANCE_FACTOR / max(classes, 1)


@dataclass(frozen=True)
class DumpStats:
    """How the dump ran (informational; format 1 caches record fewer fields)."""

    seconds: float | None = None
    rows: int | None = None
    rows_per_s: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    mb_per_s: float | None = None
    processes: int | None = None
    device: str | None = None
    batch_size: int | None = None
    num_workers: int | None = None

    def to_attrs(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class CacheMeta:
    """Everything a cache records about itself (the group attribute ``kdcache``)."""

    fingerprint: str
    teacher: TeacherInfo
    dataset: DatasetInfo
    outputs: Mapping[str, OutputSpec]
    rows: int
    block_rows: int
    amp: str
    versions: Mapping[str, str]
    vocab: Vocab
    output_key: str | None = None
    mask_key: str | None = None
    views: int = 1
    seed: int | None = None
    view_params_shape: tuple[int, ...] | None = None
    complete: bool = False
    tokens: int | None = None
    teacher_accuracy: TeacherAccuracy | None = None
    dump: DumpStats | None = None
    format_version: int = FORMAT_VERSION
    bound: tuple[str, ...] = ()  # arrays whose block digests follow the stats in _blocks (format 3)
    packed: PackedTokens | None = None
    source: Mapping[str, Any] | None = None  # where imported targets came from (``kdcache import``)

    @property
    def blocks(self) -> int:
        return -(-self.rows // self.block_rows)

    @property
    def logits(self) -> OutputSpec:
        return self.outputs["logits"]

    @property
    def hidden_names(self) -> list[str]:
        return [n for n in self.outputs if n != "logits"]

    @property
    def regression(self) -> bool:
        """True when the primary output is a regression target, not logits over classes: a dense
        output picked by an ``output_key`` that names a hidden state or an embedding
        (``last_hidden_state``, ``pooler_output``, ``embedding``...). Its last axis is then
        dimensions, trained with an mse or cosine objective, and it has no class accuracy."""
        return (self.output_key is not None and self.logits.codec.name == "dense"
                and REGRESSION_KEY.search(self.output_key) is not None and "logit" not in self.output_key.lower())

    @property
    def teacher_at_chance(self) -> bool:
        """The teacher's recorded accuracy on the labelled rows is at chance (logits only)."""
        return (not self.regression and self.teacher_accuracy is not None
                and self.teacher_accuracy.at_chance(self.vocab.real))

    @property
    def view_params(self) -> ArrayInfo | None:
        """The explicit augmentation parameters array, when the dataset records them."""
        if self.view_params_shape is None:
            return None
        return ArrayInfo(VIEW_PARAMS, self.view_params_shape, np.dtype("float32"), self.block_rows)

    @property
    def row_bytes(self) -> int:
        """Stored bytes of one row over every output (no digests, no chunk padding)."""
        return sum(o.row_bytes for o in self.outputs.values())

    def constant_arrays(self) -> list[ConstantArray]:
        """Every array stored once (written at creation, not block by block)."""
        return [c for o in self.outputs.values() for c in o.constants.values()]

    def data_arrays(self) -> list[ArrayInfo]:
        """Every array written block by block: the outputs' (per row, or per token when packed),
        the row digests, the packed spans, the view parameters (in this order, which is the
        order of the block digests)."""
        arrays = [a for o in self.outputs.values() for a in o.arrays.values()]
        arrays.append(ArrayInfo(ROW_DIGEST, (), np.dtype("uint64"), self.block_rows))
        if self.packed is not None:
            arrays.append(ArrayInfo(SPANS, (2,), np.dtype("int32"), self.block_rows))
        if self.view_params is not None:
            arrays.append(self.view_params)
        return arrays

    @property
    def record_fields(self) -> int:
        """Columns of the ``_blocks`` record: the stats, then one digest per bound array."""
        return BLOCK_STATS + len(self.bound) if self.format_version >= 3 else (BLOCK_STATS if self.format_version == 2 else 4)

    def finished(self, *, dump: DumpStats, accuracy: TeacherAccuracy, tokens: int) -> "CacheMeta":
        return replace(self, dump=dump, teacher_accuracy=accuracy, tokens=tokens, complete=True)

    # ---- attrs: written and parsed in .attrs, the only code that knows their keys ----------------
    def to_attrs(self) -> dict[str, Any]:
        """The JSON object stored as the group attribute ``kdcache``."""
        from .attrs import meta_to_attrs
        return meta_to_attrs(self)

    @classmethod
    def from_attrs(cls, attrs: Any, where: str) -> "CacheMeta":
        """Parse and check the group attribute ``kdcache`` of the cache at ``where``.

        Raises:
            KdcacheError: one line naming the first field that is missing, of the wrong type or
                out of range, or a version newer than this kdcache reads.
        """
        from .attrs import meta_from_attrs
        return meta_from_attrs(attrs, where)


