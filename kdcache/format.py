"""The cache description: one typed home for everything a cache's attrs record.

A cache is one zarr v3 group (see ``docs/design.md`` and README "Cache format"). Its group
attribute ``kdcache`` describes it; :class:`CacheMeta` is that description as frozen
dataclasses. :meth:`CacheMeta.to_attrs` and :meth:`CacheMeta.from_attrs` are the only code
that knows the attribute keys or older format versions, and ``from_attrs`` treats the attrs as
untrusted input: a missing field, a wrong type or an absurd size is one :class:`KdcacheError`
line, never a ``KeyError`` deep inside a reader.

Arrays of the group (a **contract**):

- ``logits`` / ``topk/*`` / ``sampled/*``  (rows, ...)  the teacher's logits, by codec
- ``hidden/<module.name>``                 (rows, ...)  one array per captured module output
- ``_row_digest``  (rows,) uint64     digest of each row's input (alignment check)
- ``_view_params`` (rows, P) float32  explicit augmentation parameters (optional)
- ``_blocks``      (blocks, 5 + A) int64  completion record: done, rows, labelled, correct, tokens,
  then (format 3) one keyed digest per array A that binds the block's bytes to (cache, array, block)

Packed sequence caches (format 3, ``packed`` in the attrs) store per-token outputs for the
positions that have a target only, on one token axis: ``(tokens, ...)`` arrays, each block's
tokens one contiguous range starting at a multiple of the token chunk, plus

- ``_spans``        (rows, 2) int32   per row: first real position with a target, and how many
- ``_token_blocks`` (blocks, 2) int64 per block: first token, tokens (checked against a crc in the attrs)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from .checked_json import MAX_DIM, JsonReader, malformed
from .codecs import Codec, DenseCodec, codec_from_params
from .errors import KdcacheError

__all__ = ["FORMAT_VERSION", "ATTR", "BLOCKS", "BLOCK_STATS", "ROW_DIGEST", "VIEW_PARAMS", "SPANS", "TOKEN_BLOCKS",
           "PackedTokens", "ArrayInfo", "OutputSpec", "TokenizerInfo", "TeacherInfo", "DatasetInfo", "Vocab",
           "TeacherAccuracy", "DumpStats", "CacheMeta", "read_meta",
           "write_meta"]

FORMAT_VERSION = 3  # 3: block digests, attrs digest; 2: multi-array codecs, tokens, vocab; reads 1 and 2
ATTR = "kdcache"
BLOCKS = "_blocks"
BLOCK_STATS = 5  # done, rows, labelled, correct, tokens (format 1: the first 4); then the block digests
ROW_DIGEST = "_row_digest"
VIEW_PARAMS = "_view_params"
SPANS = "_spans"
TOKEN_BLOCKS = "_token_blocks"

# Bounds on what a cache may claim, so a hostile or damaged description cannot make a reader
# allocate or loop without end: far above any real cache, far below what would hurt.
MAX_ROW_BYTES = 1 << 34
MAX_OBJECTS = 1 << 24  # stored chunk files (or shards) over all arrays
MAX_RECORD = 1 << 27  # int64 fields of the _blocks record (1 GB)
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


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
class OutputSpec:
    """One teacher output (``logits`` or a hidden module): its per-row shape, the codec that
    stores it and the arrays the codec writes (codec key -> :class:`ArrayInfo`)."""

    name: str
    shape: tuple[int, ...]
    codec: Codec
    arrays: Mapping[str, ArrayInfo]

    @property
    def row_bytes(self) -> int:
        return sum(a.row_bytes for a in self.arrays.values())

    @staticmethod
    def planned(name: str, codec: Codec, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...], np.dtype]]:
        """Codec key -> (array path, per-row shape, stored dtype) of an output, before chunking."""
        base = f"hidden/{name}" if name != "logits" else ("logits" if codec.name == "dense" else codec.name)
        return {key: (f"{base}/{key}" if key else base, s, d) for key, (s, d) in codec.arrays(shape).items()}


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
    def view_params(self) -> ArrayInfo | None:
        """The explicit augmentation parameters array, when the dataset records them."""
        if self.view_params_shape is None:
            return None
        return ArrayInfo(VIEW_PARAMS, self.view_params_shape, np.dtype("float32"), self.block_rows)

    @property
    def row_bytes(self) -> int:
        """Stored bytes of one row over every output (no digests, no chunk padding)."""
        return sum(o.row_bytes for o in self.outputs.values())

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

    # ---- attrs --------------------------------------------------------------------------------
    def to_attrs(self) -> dict[str, Any]:
        """The JSON object stored as the group attribute ``kdcache`` (format 2)."""
        teacher: dict[str, Any] = {}
        if self.teacher.spec is not None:
            teacher = {"spec": self.teacher.spec, "kwargs": dict(self.teacher.kwargs),
                       "checkpoint": self.teacher.checkpoint}
        dataset: dict[str, Any] = {}
        if self.dataset.spec is not None:
            dataset = {"spec": self.dataset.spec, "kwargs": dict(self.dataset.kwargs)}
        attrs: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "teacher": {**teacher, "class": self.teacher.class_name, "weights_digest": self.teacher.weights_digest,
                        **({"tokenizer": {"size": self.teacher.tokenizer.size, "digest": self.teacher.tokenizer.digest}}
                           if self.teacher.tokenizer is not None else {})},
            "dataset": {**dataset, "length": self.dataset.length, "digest": self.dataset.digest},
            "output_key": self.output_key, "amp": self.amp, "views": self.views, "seed": self.seed,
            "versions": dict(self.versions), "vocab": {"real": self.vocab.real, "padded": self.vocab.padded},
            "view_params": {"shape": list(self.view_params_shape)} if self.view_params_shape is not None else None,
            "mask_key": self.mask_key, "format_version": self.format_version, "rows": self.rows,
            "block_rows": self.block_rows, "blocks": self.blocks, "complete": self.complete,
            "outputs": {name: _output_attrs(o) for name, o in self.outputs.items()}}
        if self.dump is not None:
            attrs["dump"] = self.dump.to_attrs()
        if self.teacher_accuracy is not None:
            acc = self.teacher_accuracy
            attrs["teacher_accuracy"] = {"labelled": acc.labelled, "correct": acc.correct, "accuracy": acc.accuracy}
        if self.tokens is not None:
            attrs["tokens"] = self.tokens
        if self.packed is not None:
            p = self.packed
            attrs["packed"] = {"outputs": list(p.outputs), "chunk": p.chunk, "capacity": p.capacity,
                               "blocks_crc": p.blocks_crc}
        if self.source is not None:
            attrs["source"] = dict(self.source)
        if self.format_version >= 3:
            attrs["block_digests"] = list(self.bound)
            attrs["attrs_digest"] = _attrs_digest(attrs)
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Any, where: str) -> "CacheMeta":
        """Parse and check the group attribute ``kdcache`` of the cache at ``where``.

        Raises:
            KdcacheError: one line naming the first field that is missing, of the wrong type or
                out of range, or a version newer than this kdcache reads.
        """
        if not isinstance(attrs, dict):
            raise KdcacheError(f"{where} is a zarr group but not a kdcache cache (no '{ATTR}' attrs)")
        r = JsonReader(attrs, where)
        version = attrs.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise KdcacheError(f"{where} was written by a newer kdcache (cache format {version}, this one reads "
                               f"<= {FORMAT_VERSION}); upgrade kdcache")
        version = r.count("format_version", low=1, high=FORMAT_VERSION)
        if version >= 3 and r.text("attrs_digest") != _attrs_digest(attrs):
            raise malformed(where, "its attrs do not match their digest: they were edited or damaged")
        fingerprint = r.text("fingerprint")
        if not _FINGERPRINT.fullmatch(fingerprint):
            raise malformed(where, f"fingerprint {fingerprint!r:.40} is not 16 hex digits")
        rows = r.count("rows", low=1)
        block_rows = r.count("block_rows", low=1)
        if r.count("blocks", low=1) != -(-rows // block_rows):
            raise malformed(where, f"blocks is not rows / block_rows rounded up ({rows} / {block_rows})")
        t, d = r.obj("teacher"), r.obj("dataset")
        tok = t.obj("tokenizer", optional=True)
        teacher = TeacherInfo(weights_digest=t.text("weights_digest"), class_name=t.text("class"),
                              spec=t.text("spec", optional=True), kwargs=t.mapping("kwargs", optional=True),
                              checkpoint=t.text("checkpoint", optional=True),
                              tokenizer=TokenizerInfo(tok.count("size", low=1, high=MAX_DIM), tok.text("digest"))
                              if tok else None)
        dataset = DatasetInfo(length=d.count("length", low=1), digest=d.text("digest"),
                              spec=d.text("spec", optional=True), kwargs=d.mapping("kwargs", optional=True))
        views = r.count("views", low=1, high=1 << 20, optional=True) or 1
        if dataset.length * views != rows:
            raise malformed(where, f"rows ({rows}) is not dataset.length x views ({dataset.length} x {views})")
        outputs_attrs = r.mapping("outputs")
        if "logits" not in outputs_attrs:
            raise malformed(where, "field outputs.logits is missing")
        packed = _packed_from_attrs(r, outputs_attrs)
        outputs = {name: _output_from_attrs(name, o, r, block_rows,
                                            packed.chunk if packed and name in packed.outputs else None)
                   for name, o in outputs_attrs.items()}
        if sum(o.row_bytes for o in outputs.values()) > MAX_ROW_BYTES:
            raise malformed(where, "one row would take more than 16 GB")
        logits = outputs["logits"]
        classes = logits.shape[-1] if logits.shape else 1
        v = r.obj("vocab", optional=True)
        vocab = Vocab(v.count("real", low=1, high=MAX_DIM), v.count("padded", low=1, high=MAX_DIM)) if v else \
            Vocab(classes, classes)  # format 1: no padded vocabularies
        if vocab.padded != classes or vocab.real > vocab.padded:
            raise malformed(where, f"vocab {vocab.real}/{vocab.padded} does not fit logits of {classes} classes")
        sparse_vocab = getattr(logits.codec, "vocab", None)  # ids beyond the real vocabulary would reach gather
        if sparse_vocab is not None and sparse_vocab != vocab.real:
            raise malformed(where, f"the logits codec's vocabulary ({sparse_vocab}) is not the real one ({vocab.real})")
        vp = r.obj("view_params", optional=True)
        acc = r.obj("teacher_accuracy", optional=True)
        dump = r.obj("dump", optional=True)
        meta = cls(
            fingerprint=fingerprint, teacher=teacher, dataset=dataset, outputs=outputs, rows=rows,
            block_rows=block_rows, amp=r.text("amp"), versions={k: str(v) for k, v in r.mapping("versions").items()},
            vocab=vocab, output_key=r.text("output_key", optional=True), mask_key=r.text("mask_key", optional=True),
            views=views, seed=r.count("seed", low=-(1 << 63), high=(1 << 64) - 1, optional=True),
            view_params_shape=vp.shape("shape") if vp else None, complete=r.flag("complete"),
            tokens=r.count("tokens", optional=True),
            teacher_accuracy=TeacherAccuracy(acc.count("labelled"), acc.count("correct")) if acc else None,
            dump=_dump_from_attrs(dump) if dump else None, format_version=version, packed=packed,
            source=r.mapping("source", optional=True) or None)
        if meta.views > 1 and meta.seed is None:
            raise malformed(where, "a cache of several views must record their seed")
        if packed is not None and meta.mask_key is None:
            raise malformed(where, "a packed cache must record its mask key")
        objects = sum(-(-(packed.capacity if a.per_token and packed else rows) // a.chunk_rows)
                      for a in meta.data_arrays()) + meta.blocks
        if objects > MAX_OBJECTS or meta.blocks * (BLOCK_STATS + len(meta.data_arrays())) > MAX_RECORD:
            raise malformed(where, f"{objects} chunk files of {meta.blocks} blocks is beyond what kdcache writes")
        if version >= 3:
            bound = r.value.get("block_digests")
            expected = [a.path for a in meta.data_arrays()]
            if bound != expected:
                raise malformed(where, f"block_digests lists {bound!r:.80}, the arrays are {expected}")
            meta = replace(meta, bound=tuple(expected))
        return meta


def _attrs_digest(attrs: dict[str, Any]) -> str:
    """A digest of the description itself: any edit or bit flip of it is refused, not trusted."""
    body = {k: v for k, v in attrs.items() if k != "attrs_digest"}
    try:
        text = json.dumps(body, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):  # NaN/inf or a non-JSON value: matches no digest
        return "unserialisable"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_meta(group: Any, where: str) -> CacheMeta:
    """The description of the cache whose zarr group is ``group``."""
    return CacheMeta.from_attrs(group.attrs.get(ATTR), where)


def write_meta(group: Any, meta: CacheMeta) -> None:
    """Store ``meta`` as the group attribute ``kdcache`` (zarr writes ``zarr.json`` whole)."""
    group.attrs[ATTR] = meta.to_attrs()


def _output_attrs(o: OutputSpec) -> dict[str, Any]:
    primary = next(iter(o.arrays.values()))
    # "dtype", "path", "stored_dtype" and "chunk_rows" of the first array are format 1's fields,
    # kept for readers of that format; "dtype" is the dense dtype, and "float16" for other codecs
    dtype = o.codec.dtype if isinstance(o.codec, DenseCodec) else "float16"
    return {"shape": list(o.shape), "codec": o.codec.params(), "dtype": dtype, "path": primary.path,
            "stored_dtype": str(primary.dtype), "chunk_rows": primary.chunk_rows,
            "arrays": {key: {"path": a.path, "shape": list(a.shape), "stored_dtype": str(a.dtype),
                             "chunk_rows": a.chunk_rows} for key, a in o.arrays.items()}}


def _packed_from_attrs(r: JsonReader, outputs: dict[str, Any]) -> PackedTokens | None:
    p = r.obj("packed", optional=True)
    if p is None:
        return None
    names = p.value.get("outputs")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n in outputs for n in names):
        raise malformed(r.where, f"packed.outputs {names!r:.80} are not outputs of the cache")
    return PackedTokens(tuple(names), p.count("chunk", low=1, high=1 << 24), p.count("capacity"),
                        p.count("blocks_crc", high=(1 << 32) - 1))


def _output_from_attrs(name: str, value: Any, parent: JsonReader, block_rows: int,
                       token_chunk: int | None = None) -> OutputSpec:
    """An output as recorded; its arrays must be exactly those its codec writes (per token,
    without the output's token axis, when ``token_chunk`` says it is packed)."""
    where = parent.where
    o = JsonReader(value, where, f"outputs.{name}.")
    if name != "logits" and (not name or len(name) > 512 or name.startswith(("/", ".")) or ".." in name):
        raise malformed(where, f"output name {name!r:.60} is not a module name")
    shape = o.shape("shape")
    if "codec" in o.value:
        codec = codec_from_params(o.mapping("codec"), f"{where}: outputs.{name}.codec")
    else:  # format 1: one dense array
        dtype = o.text("dtype")
        codec = codec_from_params({"name": "dense", "dtype": dtype}, f"{where}: outputs.{name}")
    if codec.name != "dense" and (name != "logits" or not shape):
        raise malformed(where, f"output {name} is stored as {codec.name}, which needs logits with a class axis")
    recorded = o.mapping("arrays", optional=True) or {
        "": {"path": o.text("path"), "shape": list(shape), "stored_dtype": o.text("stored_dtype"),
             "chunk_rows": o.value.get("chunk_rows")}}
    expected = OutputSpec.planned(name, codec, shape)
    if set(recorded) != set(expected):
        raise malformed(where, f"outputs.{name}.arrays are {sorted(recorded)}, its codec writes {sorted(expected)}")
    if token_chunk is not None and len(shape) < 2:
        raise malformed(where, f"packed output {name} has no token axis (shape {list(shape)})")
    arrays = {}
    for key, (path, row_shape, dtype) in expected.items():
        if token_chunk is not None:
            row_shape = row_shape[1:]  # stored per token
        a = JsonReader(recorded[key], where, f"outputs.{name}.arrays.{key or 'dense'}.")
        if a.text("path") != path or a.shape("shape") != row_shape or a.text("stored_dtype") != str(dtype):
            raise malformed(where, f"array {a.value.get('path')!r:.60} of output {name} is not the "
                               f"{path} {row_shape} {dtype} its codec writes")
        if token_chunk is not None:
            if a.count("chunk_rows", low=1, high=1 << 24) != token_chunk:
                raise malformed(where, f"{path} chunks are not the packed token chunk of {token_chunk}")
            arrays[key] = ArrayInfo(path, row_shape, dtype, token_chunk, per_token=True)
            continue
        chunk_rows = a.count("chunk_rows", low=1, high=block_rows)
        if block_rows % chunk_rows:
            raise malformed(where, f"{path} chunks of {chunk_rows} rows do not divide blocks of {block_rows}")
        arrays[key] = ArrayInfo(path, row_shape, dtype, chunk_rows)
    return OutputSpec(name, shape, codec, arrays)


def _dump_from_attrs(d: JsonReader) -> DumpStats:
    ints = ("rows", "tokens", "processes", "batch_size", "num_workers")
    floats = ("seconds", "rows_per_s", "tokens_per_s", "mb_per_s")
    return DumpStats(**{k: d.count(k, optional=True) for k in ints}, **{k: d.number(k, optional=True) for k in floats},
                     device=d.text("device", optional=True))
