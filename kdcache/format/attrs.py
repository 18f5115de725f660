"""The cache description as JSON: :class:`~kdcache.format.meta.CacheMeta` written to and parsed
from the group attribute ``kdcache``. The only code that knows the attribute keys or older format
versions; parsing treats the attrs as untrusted input (bounded sizes, one line per bad field).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace
from typing import Any

from ..errors import KdcacheError
from .checked_json import MAX_DIM, JsonReader, malformed
from .codecs import Codec, DenseCodec
from .draws import DRAWS
from .head import HeadCodec
from .meta import (ATTR, BLOCK_STATS, FORMAT_VERSION, ArrayInfo, CacheMeta, ConstantArray, DatasetInfo, DumpStats,
                   OutputSpec, PackedTokens, TeacherAccuracy, TeacherInfo, TokenizerInfo, Vocab)
from .sparse import HybridCodec, SampledCodec, TopKCodec

__all__ = ["meta_to_attrs", "meta_from_attrs", "read_meta", "write_meta", "MAX_ROW_BYTES", "MAX_OBJECTS", "MAX_RECORD",
           "codec_from_params"]

# Bounds on what a cache may claim, so a hostile or damaged description cannot make a reader
# allocate or loop without end: far above any real cache, far below what would hurt.
MAX_ROW_BYTES = 1 << 34
MAX_OBJECTS = 1 << 24  # stored chunk files (or shards) over all arrays
MAX_RECORD = 1 << 27  # int64 fields of the _blocks record (1 GB)
MAX_CONSTANT_BYTES = 1 << 37  # what a codec stores once (an output layer): 128 GB
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


def meta_to_attrs(self: CacheMeta) -> dict[str, Any]:
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


def meta_from_attrs(attrs: Any, where: str) -> CacheMeta:
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
    meta = CacheMeta(
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
                  for a in meta.data_arrays()) + meta.blocks + sum(-(-c.shape[0] // c.chunk_rows)
                                                                   for c in meta.constant_arrays())
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
                             "chunk_rows": a.chunk_rows} for key, a in o.arrays.items()},
            **({"constants": {key: {"path": c.path, "shape": list(c.shape), "stored_dtype": str(c.dtype),
                                    "chunk_rows": c.chunk_rows, "digest": c.digest} for key, c in o.constants.items()}}
               if o.constants else {})}


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
    return OutputSpec(name, shape, codec, arrays, _constants_from_attrs(o, name, codec, shape))


def _constants_from_attrs(o: JsonReader, name: str, codec: Codec, shape: tuple[int, ...]) -> dict[str, ConstantArray]:
    """The arrays an output's codec stores once, exactly as it writes them, with their digests."""
    where = o.where
    recorded = o.mapping("constants", optional=True) or {}
    expected = OutputSpec.planned_constants(name, codec, shape)
    if set(recorded) != set(expected):
        raise malformed(where, f"outputs.{name}.constants are {sorted(recorded)}, its codec stores {sorted(expected)}")
    constants = {}
    for key, (path, whole, dtype) in expected.items():
        c = JsonReader(recorded[key], where, f"outputs.{name}.constants.{key}.")
        if c.text("path") != path or c.shape("shape") != whole or c.text("stored_dtype") != str(dtype):
            raise malformed(where, f"constant {c.value.get('path')!r:.60} of output {name} is not the "
                               f"{path} {whole} {dtype} its codec stores")
        constants[key] = ConstantArray(path, whole, dtype, c.count("chunk_rows", low=1, high=max(1, whole[0])),
                                       c.count("digest", high=(1 << 32) - 1))
    if sum(c.nbytes for c in constants.values()) > MAX_CONSTANT_BYTES:
        raise malformed(where, f"the constants of output {name} would take more than 128 GB")
    return constants


def _dump_from_attrs(d: JsonReader) -> DumpStats:
    ints = ("rows", "tokens", "processes", "batch_size", "num_workers")
    floats = ("seconds", "rows_per_s", "tokens_per_s", "mb_per_s")
    return DumpStats(**{k: d.count(k, optional=True) for k in ints}, **{k: d.number(k, optional=True) for k in floats},
                     device=d.text("device", optional=True))


_CODECS: dict[str, type] = {"dense": DenseCodec, "topk": TopKCodec, "sampled": SampledCodec, "hybrid": HybridCodec,
                            "head": HeadCodec}
_PARAM_TYPES: dict[str, dict[str, type | tuple[type, ...]]] = {
    "dense": {"dtype": str}, "topk": {"k": int, "vocab": int},
    "sampled": {"n": int, "vocab": int, "temperature": (int, float), "seed": int},
    "hybrid": {"k": int, "n": int, "vocab": int, "temperature": (int, float), "seed": int},
    "head": {"hidden": int, "vocab": int, "dtype": str, "weight_dtype": str, "bias": bool}}


_OPTIONAL_PARAMS: dict[str, dict[str, type]] = {"sampled": {"draws": str}, "hybrid": {"draws": str}}


def codec_from_params(params: Any, where: str) -> Codec:
    """The codec recorded in a cache (``params()`` of a codec), checked field by field."""
    if not isinstance(params, dict) or params.get("name") not in _CODECS:
        name = params.get("name") if isinstance(params, dict) else params
        raise KdcacheError(f"{where}: unknown output codec {name!r:.40}; upgrade kdcache, or dump the cache again")
    name = params["name"]
    optional = _OPTIONAL_PARAMS.get(name, {})
    values = {k: v for k, v in params.items() if k not in ("name", "index_bits")}
    expected = {**_PARAM_TYPES[name], **{k: t for k, t in optional.items() if k in values}}
    if set(values) != set(expected):
        raise KdcacheError(f"{where}: codec {name} has parameters {sorted(values)}, expected {sorted(expected)}")
    for key, kind in expected.items():
        if (isinstance(values[key], bool) and kind is not bool) or not isinstance(values[key], kind):
            raise KdcacheError(f"{where}: codec parameter {key} = {values[key]!r:.40} has the wrong type")
    if "draws" in values and values["draws"] not in DRAWS[1:]:  # iid is recorded by leaving it out
        raise KdcacheError(f"{where}: codec parameter draws {values['draws']!r:.40} is not one of "
                           f"{', '.join(DRAWS[1:])}; upgrade kdcache, or dump the cache again")
    if "vocab" in values and not 1 <= values["vocab"] <= 1 << 31:
        raise KdcacheError(f"{where}: codec vocabulary {values['vocab']} is out of range")
    try:
        codec = _CODECS[name](**values)
    except KdcacheError as err:
        raise KdcacheError(f"{where}: {err}") from None
    if "index_bits" in params and params["index_bits"] != codec.params()["index_bits"]:
        raise KdcacheError(f"{where}: codec index_bits {params['index_bits']!r:.20} does not fit its vocabulary")
    return codec
