"""Teacher log-probabilities in and out: vLLM's ``prompt_logprobs`` and Axolotl's KD columns.

Inference engines produce an LLM teacher's top-k log-probabilities per prompt position (vLLM's
``prompt_logprobs``); trainers that cache them (Axolotl, DistillKit) consume them as dataset
columns. :func:`import_vllm` and :func:`import_axolotl` turn either into a packed kdcache top-k
cache, and :func:`export_axolotl` writes a kdcache top-k cache as Parquet with Axolotl's columns.

Alignment. kdcache stores, at position ``p`` of a row, the teacher's distribution *after* token
``p`` (the logits a causal LM returns there). vLLM and Axolotl store at position ``i`` the
distribution *of* token ``i`` (position 0 has none). So kdcache position ``p`` is their
position ``p + 1``; the distribution after a row's last token is in neither, so an imported row
has targets at its first ``L - 1`` real positions and an exported row loses the last one.

Imported targets are stored as they come: the K log-probabilities as the top-k ``values``
(float16) with ``logsumexp`` 0. vLLM normalises over the full vocabulary (the tail mass is
``1 - sum p``); Axolotl renormalises over the K kept ids (no tail). The cache's ``source``
records which, where the targets came from, and ``kdcache info`` shows it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from .codecs import TopKCodec, pack_ids
from .dataset import CachedTeacherDataset
from .errors import KdcacheError
from .format import SPANS, ArrayInfo, CacheMeta, DatasetInfo, DumpStats, OutputSpec, PackedTokens, TeacherInfo, Vocab
from .items import fetch_batch, input_mask, row_digests
from .packing import place_blocks
from .store import DumpLock, TeacherCache, dataset_digest, fingerprint, plan_blocks
from .store.location import exists, refuse_file
from .writer import BlockWriter, EncodedBatch, software_versions

__all__ = ["TokenRows", "ImportedRow", "import_vllm", "import_axolotl", "export_axolotl", "vllm_inputs",
           "axolotl_inputs"]

MASK_KEY = "attention_mask"
LOGPROB_FLOOR = -1e4  # exp(-1e4) is 0 in any float; float16 holds it


@dataclass(frozen=True)
class ImportedRow:
    """One row of teacher log-probabilities in kdcache's alignment: ``ids`` (L,) the row's tokens;
    ``first`` the first real position with a target; ``token_ids``/``logprobs`` (T, K), the
    targets of positions ``first .. first + T - 1``."""

    ids: np.ndarray
    first: int
    token_ids: np.ndarray
    logprobs: np.ndarray


class TokenRows(Dataset):
    """Token rows as a dataset: item ``i`` is ``{"input_ids", "attention_mask", "labels"}``, right-
    padded to the longest row (``labels`` the next token, -100 where there is none), as the
    student reads them. kdcache digests real tokens only, so any padding reads the same cache."""

    def __init__(self, rows: list[np.ndarray]) -> None:
        self.rows = [np.asarray(r, dtype=np.int64) for r in rows]
        self.length = max((len(r) for r in self.rows), default=0)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[i]
        ids = torch.zeros(self.length, dtype=torch.long)
        ids[:len(row)] = torch.from_numpy(row)
        mask = torch.zeros(self.length, dtype=torch.long)
        mask[:len(row)] = 1
        labels = torch.full((self.length,), -100, dtype=torch.long)
        labels[:len(row) - 1] = ids[1:len(row)]
        return {"input_ids": ids, MASK_KEY: mask, "labels": labels}


# ---- reading the sources ----------------------------------------------------------------------
def _bad(where: str, what: str) -> KdcacheError:
    return KdcacheError(f"{where}: {what}; is it vLLM prompt_logprobs output (one JSON object per line with "
                        "prompt_token_ids and prompt_logprobs)?")


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for each row of a JSONL or Parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.ParquetFile(path)
            for batch in table.iter_batches(batch_size=256):
                for n, record in enumerate(batch.to_pylist()):
                    yield f"{path} row {n}", record
        except Exception as err:  # pyarrow reports a truncated or foreign file in several types
            raise KdcacheError(f"{path} is not a readable Parquet file ({type(err).__name__}: {err}"[:200] + ")") from None
        return
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise KdcacheError(f"{path} line {number} is not JSON ({err.msg}); is the file truncated?") from None
                    if not isinstance(record, dict):
                        raise _bad(f"{path} line {number}", "not a JSON object")
                    yield f"{path} line {number}", record
    except OSError as err:
        raise KdcacheError(f"cannot read {path}: {err.strerror}") from None


def _entries(position: Any, where: str) -> list[tuple[int, float, int | None]]:
    """One vLLM position as ``(token id, logprob, rank or None)``: a mapping id -> logprob or
    id -> {"logprob", "rank"}, or a list of {"token_id", "logprob", "rank"}."""
    if isinstance(position, dict):
        items = position.items()
    elif isinstance(position, list):
        items = [(e.get("token_id"), e) if isinstance(e, dict) else (None, e) for e in position]
    else:
        raise _bad(where, f"a position is a {type(position).__name__}, not a mapping of token id to logprob")
    out = []
    for key, value in items:
        try:
            token = int(key)
            logprob = float(value["logprob"] if isinstance(value, dict) else value)
            rank = value.get("rank") if isinstance(value, dict) else None
        except (TypeError, ValueError, KeyError):
            raise _bad(where, f"entry {key!r:.30}: {value!r:.60} is not a token id with a logprob") from None
        if math.isnan(logprob) or logprob > 1e-3:
            raise _bad(where, f"token {token} has logprob {logprob}, not a log-probability")
        # a probability of 0 (-inf) is stored as the smallest float16 logprob kdcache keeps finite
        out.append((token, max(min(logprob, 0.0), LOGPROB_FLOOR), rank if isinstance(rank, int) else None))
    return out


def _vllm_rows(path: Path, topk: int | None, vocab: int) -> tuple[int, Callable[[], Iterator[ImportedRow]]]:
    """K and a re-iterable source of rows (the file is read twice: to size, then to write)."""
    smallest = None
    for where, record in _records(path):
        for position in (record.get("prompt_logprobs") or [])[1:]:
            if position is not None:
                count = len(_entries(position, where))
                smallest = count if smallest is None else min(smallest, count)
    if smallest is None:
        raise KdcacheError(f"{path} holds no prompt_logprobs; ask vLLM for them (SamplingParams(prompt_logprobs=K))")
    k = topk or smallest  # vLLM adds the prompt's own token to a position's top-k when it is not in it

    def rows() -> Iterator[ImportedRow]:
        for where, record in _records(path):
            ids, positions = record.get("prompt_token_ids"), record.get("prompt_logprobs")
            if not isinstance(ids, list) or not isinstance(positions, list) or len(positions) != len(ids) or not ids:
                raise _bad(where, "prompt_token_ids and prompt_logprobs must be lists of the same, non-zero length")
            token_ids = np.zeros((len(ids) - 1, k), np.int64)
            logprobs = np.zeros((len(ids) - 1, k), np.float32)
            for p, position in enumerate(positions[1:]):
                if position is None:
                    raise _bad(where, f"position {p + 1} has no logprobs")
                entries = sorted(_entries(position, where), key=lambda e: (e[2] if e[2] is not None else 0, -e[1]))
                if len(entries) < k:
                    raise _bad(where, f"position {p + 1} has {len(entries)} logprobs, fewer than --topk {k}")
                kept = sorted(entries, key=lambda e: -e[1])[:k] if entries[0][2] is None else entries[:k]
                token_ids[p] = [e[0] for e in kept]
                logprobs[p] = [e[1] for e in kept]
            yield _checked_row(np.asarray(ids, dtype=np.int64), 0, token_ids, logprobs, vocab, where)
    return k, rows


def _checked_row(ids: np.ndarray, first: int, token_ids: np.ndarray, logprobs: np.ndarray, vocab: int,
                 where: str) -> ImportedRow:
    if ids.ndim != 1 or ids.min(initial=0) < 0 or ids.max(initial=0) >= vocab:
        raise KdcacheError(f"{where}: token ids must lie in [0, {vocab}) (--vocab-size)")
    if len(token_ids) and (token_ids.min() < 0 or token_ids.max() >= vocab):
        raise KdcacheError(f"{where}: target token ids must lie in [0, {vocab}) (--vocab-size)")
    if first + len(token_ids) > len(ids):
        raise KdcacheError(f"{where}: {len(token_ids)} target positions from position {first} do not fit "
                           f"{len(ids)} tokens")
    return ImportedRow(ids, first, token_ids, logprobs)


def _axolotl_rows(data: Any, vocab: int) -> tuple[int, Callable[[], Iterator[ImportedRow]]]:
    """K and the rows of a dataset with Axolotl's ``input_ids``, ``target_token_ids``,
    ``target_logprobs`` (and ``target_mask``) columns."""
    missing = [c for c in ("input_ids", "target_token_ids", "target_logprobs") if c not in data.column_names]
    if missing:
        raise KdcacheError(f"the dataset has no {missing[0]!r} column (it has {data.column_names}); "
                           "import axolotl needs Axolotl's KD columns")
    first_row = data[0]["target_logprobs"]
    k = len(next((p for p in first_row if p), []))
    if not k:
        raise KdcacheError("the dataset's first row has no target log-probabilities")

    def rows() -> Iterator[ImportedRow]:
        for n, record in enumerate(data):
            where = f"dataset row {n}"
            ids = np.asarray(record["input_ids"], dtype=np.int64)
            lp = np.asarray(record["target_logprobs"], dtype=np.float32)
            tid = np.asarray(record["target_token_ids"], dtype=np.int64)
            if lp.shape != tid.shape or lp.ndim != 2 or len(lp) != len(ids) or lp.shape[1] != k:
                raise KdcacheError(f"{where}: target_logprobs {lp.shape} and target_token_ids {tid.shape} must both "
                                   f"be ({len(ids)}, {k})")
            has = np.isfinite(lp).all(1)  # placeholders are -inf
            if "target_mask" in record:
                has &= np.asarray(record["target_mask"]).reshape(len(ids), -1).any(1)
            positions = np.flatnonzero(has)
            if len(positions) and (positions[0] == 0 or len(positions) != positions[-1] - positions[0] + 1):
                raise KdcacheError(f"{where}: the positions with targets must be one run after position 0")
            first = int(positions[0]) - 1 if len(positions) else 0
            yield _checked_row(ids, first, tid[positions], lp[positions], vocab, where)
    return k, rows


# ---- writing a cache ----------------------------------------------------------------------------
def _write_cache(rows: Callable[[], Iterator[ImportedRow]], k: int, vocab: int, out: str | Path, source: dict[str, Any],
                 source_digest: str, *, overwrite: bool, batch_size: int,
                 log: Callable[[str], None]) -> TeacherCache:
    """A packed top-k cache of ``rows``, with the inputs as :class:`TokenRows` digest them."""
    first_pass = [(r.ids, r.first, len(r.token_ids)) for r in rows()]
    inputs = TokenRows([ids for ids, _, _ in first_pass])
    counts = np.array([t for _, _, t in first_pass], np.int64)
    codec = TopKCodec(k, vocab)
    planned = OutputSpec.planned("logits", codec, (inputs.length, vocab))
    token_bytes = sum(int(np.prod(s[1:], dtype=np.int64)) * d.itemsize for _, s, d in planned.values())
    block_rows, _ = plan_blocks({"tokens": max(1, int(token_bytes * counts.mean()))}, len(inputs))
    chunk, placed, crc = place_blocks(counts, block_rows, token_bytes)
    capacity = int(placed[-1, 0] + -(-placed[-1, 1] // chunk) * chunk)
    data_digest = dataset_digest(inputs, MASK_KEY)
    fp = fingerprint(source_digest, data_digest, {"import": source["format"], "topk": k, "vocab_size": vocab})
    meta = CacheMeta(
        fingerprint=fp, teacher=TeacherInfo(weights_digest=source_digest, class_name=f"imported {source['format']}",
                                            spec=source.get("file")),
        dataset=DatasetInfo(length=len(inputs), digest=data_digest), rows=len(inputs), block_rows=block_rows,
        amp="none", versions=software_versions(), vocab=Vocab(vocab, vocab), mask_key=MASK_KEY,
        outputs={"logits": OutputSpec("logits", (inputs.length, vocab), codec, {
            key: ArrayInfo(p, s[1:], d, chunk, per_token=True) for key, (p, s, d) in planned.items()})},
        packed=PackedTokens(("logits",), chunk, capacity, crc), source=source)
    meta = replace(meta, bound=tuple(a.path for a in meta.data_arrays()))
    path: Any = Path(out)
    refuse_file(path, "choose another --out")
    with DumpLock(path):
        if exists(path):
            existing = TeacherCache.open(path)
            if existing.fingerprint == fp and existing.complete and not overwrite:
                log(f"cache hit: {path}")
                return existing
            if not overwrite:
                raise KdcacheError(f"{path} holds another cache; choose another --out or pass --overwrite")
            from .store import remove_cache
            remove_cache(path)
        elif path.is_dir() and any(path.iterdir()):
            raise KdcacheError(f"{path} exists and is not a kdcache cache; choose another --out")
        cache = TeacherCache.create(path, meta)
        cache.write_token_blocks(placed)
        t0 = time.perf_counter()
        writer = BlockWriter(cache, threads=2, allow_nonfinite=False)
        try:
            _fill(writer, cache, rows(), inputs, codec, batch_size)
        finally:
            writer.close()
        seconds = max(time.perf_counter() - t0, 1e-9)
        cache.finalize(DumpStats(seconds=round(seconds, 3), rows=len(inputs), rows_per_s=round(len(inputs) / seconds, 1),
                                 tokens=int(counts.sum()), tokens_per_s=round(int(counts.sum()) / seconds, 1),
                                 processes=1, device="cpu", batch_size=batch_size, num_workers=0))
    log(f"wrote {path}")
    return TeacherCache.open(path)


def _fill(writer: BlockWriter, cache: TeacherCache, rows: Iterable[ImportedRow], inputs: TokenRows, codec: TopKCodec,
          batch_size: int) -> None:
    """Hand the writer the imported rows in batches that never straddle a block."""
    paths = {key: a.path for key, a in cache.meta.logits.arrays.items()}
    batch: list[ImportedRow] = []
    start = 0
    for row in rows:
        batch.append(row)
        end = start + len(batch)
        if len(batch) == batch_size or end % cache.block_rows == 0 or end == cache.rows:
            ids = torch.from_numpy(np.concatenate([r.token_ids for r in batch]))
            values = torch.from_numpy(np.concatenate([r.logprobs for r in batch])).half()
            encoded = {paths["values"]: values, paths["indices"]: pack_ids(ids, codec.bits),
                       paths["logsumexp"]: torch.zeros(len(ids), dtype=torch.float32),
                       SPANS: torch.tensor([[r.first, len(r.token_ids)] for r in batch], dtype=torch.int32)}
            model_inputs, labels = fetch_batch(inputs, range(start, end))
            digests = row_digests(model_inputs, input_mask(model_inputs, MASK_KEY))
            writer.put(EncodedBatch(start, encoded, None, labels, digests, int(len(ids))))
            start, batch = end, []


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_vllm(path: str | Path, out: str | Path, *, vocab_size: int, topk: int | None = None,
                overwrite: bool = False, batch_size: int = 64,
                log: Callable[[str], None] = lambda m: None) -> TeacherCache:
    """Build a packed top-k cache from vLLM ``prompt_logprobs`` output (JSONL, one request per
    line: ``prompt_token_ids`` and ``prompt_logprobs``; or Parquet with those columns).

    Args:
        path: the file. Each position maps token ids to logprobs (or to ``{"logprob", "rank"}``).
        out: the cache directory to write.
        vocab_size: the teacher's vocabulary (every id must be below it).
        topk: K kept per position (default: the fewest entries any position has; the prompt's own
            token, which vLLM adds when it is outside the top-k, is dropped).
    """
    path = Path(path)
    if not path.is_file():
        raise KdcacheError(f"{path} does not exist")
    k, rows = _vllm_rows(path, topk, vocab_size)
    source = {"format": "vllm", "file": str(path), "normalized": "vocabulary", "k": k}
    return _write_cache(rows, k, vocab_size, out, source, _file_digest(path), overwrite=overwrite,
                        batch_size=batch_size, log=log)


def import_axolotl(data: Any, out: str | Path, *, vocab_size: int, overwrite: bool = False, batch_size: int = 64,
                   log: Callable[[str], None] = lambda m: None) -> TeacherCache:
    """Build a packed top-k cache from a dataset with Axolotl's KD columns (``input_ids``,
    ``target_token_ids``, ``target_logprobs``, ``target_mask``): a ``datasets.Dataset``, a
    directory saved with ``save_to_disk``, or a Parquet file."""
    name = None
    if isinstance(data, (str, Path)):
        name = str(data)
        data = _load_hf(Path(data))
    k, rows = _axolotl_rows(data, vocab_size)
    fingerprint_of = getattr(data, "_fingerprint", None) or hashlib.blake2b(
        json.dumps([data.num_rows, data.column_names]).encode(), digest_size=16).hexdigest()
    source = {"format": "axolotl", "file": name, "normalized": "kept", "k": k}
    return _write_cache(rows, k, vocab_size, out, source, str(fingerprint_of)[:32], overwrite=overwrite,
                        batch_size=batch_size, log=log)


def _load_hf(path: Path) -> Any:
    try:
        import datasets
    except ImportError:
        raise KdcacheError("reading a Hugging Face dataset needs the datasets package: pip install 'kdcache[hf]'") from None
    if path.suffix == ".parquet":
        return datasets.load_dataset("parquet", data_files=str(path), split="train")
    if not path.is_dir():
        raise KdcacheError(f"{path} is neither a Parquet file nor a directory saved with save_to_disk")
    loaded = datasets.load_from_disk(str(path))
    return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded


def vllm_inputs(path: str) -> TokenRows:
    """The student's dataset for a cache imported from a vLLM file: its prompts as token rows."""
    return TokenRows([np.asarray(r["prompt_token_ids"], np.int64) for _, r in _records(Path(path))])


def axolotl_inputs(path: str) -> TokenRows:
    """The student's dataset for a cache imported from an Axolotl dataset: its ``input_ids``."""
    return TokenRows([np.asarray(ids, np.int64) for ids in _load_hf(Path(path))["input_ids"]])


# ---- export --------------------------------------------------------------------------------------
def export_axolotl(cache: str | Path | TeacherCache, dataset: Any, out: str | Path, *, batch_size: int = 64) -> Path:
    """Write a top-k cache as Parquet with Axolotl's columns, one row per cache row: ``input_ids``,
    ``attention_mask`` and ``labels`` (the row's real tokens, labels as Axolotl shifts them), and
    ``target_token_ids``, ``target_logprobs`` (float32, the teacher's log-probabilities at T = 1),
    ``target_mask`` per position, position ``i`` holding the distribution of token ``i``
    (position 0 has none: ids 0..K-1, logprobs -inf, mask 0). ``dataset`` is the cache's inputs
    (checked against it as for training)."""
    import pyarrow.parquet as pq

    data = CachedTeacherDataset(dataset, cache, hidden=(), in_memory="no")
    codec = data.outputs["logits"].codec
    if not isinstance(codec, TopKCodec):
        raise KdcacheError(f"export writes top-k caches; this one is stored as {codec.name}")
    k = codec.k
    writer = None
    out = Path(out)
    try:
        for start in range(0, len(data), batch_size):
            inputs, labels, teacher = data.__getitems__(list(range(start, min(start + batch_size, len(data))))).collated
            real = input_mask(inputs, data.mask_key)
            if real is None:
                raise KdcacheError("export needs token rows with an attention mask")
            table = _axolotl_table(inputs["input_ids"], real, labels, teacher, k)
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return out


def _axolotl_table(ids: torch.Tensor, real: torch.Tensor, labels: torch.Tensor, teacher: Any, k: int) -> Any:
    import pyarrow as pa

    logprobs = (teacher.logits.values.float() - teacher.logits.logsumexp.float().unsqueeze(-1)).numpy()
    token_ids = teacher.logits.indices.numpy()
    has = teacher.mask.numpy()
    columns: dict[str, list[Any]] = {c: [] for c in ("input_ids", "attention_mask", "labels", "target_token_ids",
                                                     "target_logprobs", "target_mask")}
    for i in range(len(ids)):
        where = np.flatnonzero(real[i].numpy())
        n = len(where)
        lp = np.full((n, k), -np.inf, np.float32)
        tid = np.tile(np.arange(k, dtype=np.int64), (n, 1))
        tm = np.zeros((n, k), np.int8)
        targets = np.flatnonzero(has[i][where[:-1]])  # kdcache position p is Axolotl's p + 1
        lp[targets + 1], tid[targets + 1], tm[targets + 1] = logprobs[i][where[targets]], token_ids[i][where[targets]], 1
        row_labels = labels[i].numpy()[where] if labels.ndim == 2 else np.full(n, -100)
        columns["input_ids"].append(ids[i].numpy()[where].tolist())
        columns["attention_mask"].append([1] * n)
        columns["labels"].append([-100] + row_labels[:-1].tolist())  # Axolotl's labels are the tokens themselves
        columns["target_token_ids"].append(tid.tolist())
        columns["target_logprobs"].append(lp.tolist())
        columns["target_mask"].append(tm.tolist())
    return pa.table(columns)
