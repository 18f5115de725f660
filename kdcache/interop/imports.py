"""Imported teacher log-probabilities written as a packed top-k cache (``kdcache import``): the
rows read by :mod:`.sources`, digested as :class:`~.sources.TokenRows` gives them to a student,
stored through stage one's block writer."""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from ..data.digests import row_digests
from ..data.items import fetch_batch, input_mask
from ..dump.writer import BlockWriter, EncodedBatch, software_versions
from ..errors import KdcacheError, option
from ..format.meta import (SPANS, ArrayInfo, CacheMeta, DatasetInfo, DumpStats, OutputSpec, PackedTokens, TeacherInfo,
                           Vocab)
from ..format.packing import place_blocks
from ..format.sparse import TopKCodec, pack_ids
from ..store import DumpLock, TeacherCache, dataset_digest, fingerprint, plan_blocks
from ..store.location import exists, refuse_file
from .sources import MASK_KEY, ImportedRow, TokenRows, axolotl_rows, load_hf, records, vllm_rows

__all__ = ["import_vllm", "import_axolotl", "vllm_inputs", "axolotl_inputs"]


# ---- writing a cache ----------------------------------------------------------------------------
def _write_cache(rows: Callable[[], Iterator[ImportedRow]], k: int, vocab: int, out: str | Path, source: dict[str, Any],
                 *, overwrite: bool, batch_size: int, log: Callable[[str], None]) -> TeacherCache:
    """A packed top-k cache of ``rows``, with the inputs as :class:`TokenRows` digest them, named
    by what it stores: the same targets from any file (an export imported again) are the same
    cache."""
    content = hashlib.blake2b(digest_size=16)
    first_pass = []
    for r in rows():
        first_pass.append((r.ids, r.first, len(r.token_ids)))
        for part in (r.ids, np.int64(r.first), r.token_ids, r.logprobs.astype(np.float16)):  # as stored
            content.update(np.ascontiguousarray(part).tobytes())
    source_digest = content.hexdigest()
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
    refuse_file(path, f"choose another {option('out')}")
    with DumpLock(path):
        if exists(path):
            existing = TeacherCache.open(path)
            if existing.fingerprint == fp and existing.complete and not overwrite:
                log(f"cache hit: {path}")
                return existing
            if not overwrite:
                raise KdcacheError(f"{path} holds another cache; choose another {option('out')} or pass "
                                   f"{option('overwrite', True)}")
            from ..store import remove_cache
            remove_cache(path)
        elif path.is_dir() and any(path.iterdir()):
            raise KdcacheError(f"{path} exists and is not a kdcache cache; choose another {option('out')}")
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
    k, rows = vllm_rows(path, topk, vocab_size)
    source = {"format": "vllm", "file": str(path), "normalized": "vocabulary", "k": k}
    return _write_cache(rows, k, vocab_size, out, source, overwrite=overwrite, batch_size=batch_size, log=log)


def import_axolotl(data: Any, out: str | Path, *, vocab_size: int, overwrite: bool = False, batch_size: int = 64,
                   log: Callable[[str], None] = lambda m: None) -> TeacherCache:
    """Build a packed top-k cache from a dataset with Axolotl's KD columns (``input_ids``,
    ``target_token_ids``, ``target_logprobs``, ``target_mask``): a ``datasets.Dataset``, a
    directory saved with ``save_to_disk``, or a Parquet file."""
    name = None
    if isinstance(data, (str, Path)):
        name = str(data)
        data = load_hf(Path(data))
    k, rows = axolotl_rows(data, vocab_size)
    source = {"format": "axolotl", "file": name, "normalized": "kept", "k": k}
    return _write_cache(rows, k, vocab_size, out, source, overwrite=overwrite, batch_size=batch_size, log=log)


def vllm_inputs(path: str) -> TokenRows:
    """The student's dataset for a cache imported from a vLLM file: its prompts as token rows."""
    return TokenRows([np.asarray(r["prompt_token_ids"], np.int64) for _, r in records(Path(path))])


def axolotl_inputs(path: str) -> TokenRows:
    """The student's dataset for a cache imported from an Axolotl dataset: its ``input_ids``."""
    return TokenRows([np.asarray(ids, np.int64) for ids in load_hf(Path(path))["input_ids"]])


