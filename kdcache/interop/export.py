"""A top-k cache written as Parquet with Axolotl's KD columns (``kdcache export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.items import input_mask
from ..errors import KdcacheError
from ..format.sparse import TopKCodec
from ..read.dataset import CachedTeacherDataset
from ..store import TeacherCache
from ..store.location import staged

__all__ = ["export_axolotl"]


# ---- export --------------------------------------------------------------------------------------
def export_axolotl(cache: str | Path | TeacherCache, dataset: Any, out: str | Path, *, batch_size: int = 64) -> Path:
    """Write a top-k cache as Parquet with Axolotl's columns, one row per cache row: ``input_ids``,
    ``attention_mask`` and ``labels`` (the row's real tokens, labels as Axolotl shifts them), and
    ``target_token_ids``, ``target_logprobs`` (float32, the teacher's log-probabilities at T = 1),
    ``target_mask`` per position, position ``i`` holding the distribution of token ``i``
    (position 0 has none: ids 0..K-1, logprobs -inf, mask 0). ``dataset`` is the cache's inputs
    (checked against it as for training)."""
    import pyarrow.parquet as pq

    out = Path(out)
    with staged(out, "Parquet file") as partial:  # a failure half-way leaves nothing at out
        data = CachedTeacherDataset(dataset, cache, hidden=(), in_memory="no")
        codec = data.outputs["logits"].codec
        if not isinstance(codec, TopKCodec):
            raise KdcacheError(f"export writes top-k caches; this one is stored as {codec.name}")
        writer = None
        try:
            for start in range(0, len(data), batch_size):
                rows = list(range(start, min(start + batch_size, len(data))))
                inputs, labels, teacher = data.__getitems__(rows).collated
                real = input_mask(inputs, data.mask_key)
                if real is None:
                    raise KdcacheError("export needs token rows with an attention mask")
                table = _axolotl_table(inputs["input_ids"], real, labels, teacher, codec.k)
                if writer is None:
                    writer = pq.ParquetWriter(partial, table.schema)
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
