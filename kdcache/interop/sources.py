"""Teacher log-probabilities as they come: vLLM ``prompt_logprobs`` (JSONL or Parquet) and
Axolotl's KD columns, read row by row into kdcache's alignment (:class:`ImportedRow`), every
value checked; and :class:`TokenRows`, the token rows a student reads beside such a cache."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import KdcacheError, option

__all__ = ["ImportedRow", "TokenRows", "vllm_rows", "axolotl_rows", "records", "load_hf", "MASK_KEY"]


MASK_KEY = "attention_mask"
LOGPROB_FLOOR = -1e4  # exp(-1e4) is 0 in any float; float16 holds it
ROUNDING = 1e-3  # a log-probability may exceed 0, and kept probabilities 1, by this much (float rounding)
MAX_LINE = 1 << 28  # characters of one JSONL record: a 32k-token prompt with 20 logprobs a position is ~40 MB


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


def records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
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
            for number, line in enumerate(iter(lambda: f.readline(MAX_LINE + 1), ""), 1):
                if len(line) > MAX_LINE:
                    raise _bad(f"{path} line {number}", f"longer than {MAX_LINE} characters")
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise KdcacheError(f"{path} line {number} is not JSON ({err.msg}); is the file truncated?") from None
                    if not isinstance(record, dict):
                        raise _bad(f"{path} line {number}", "not a JSON object")
                    yield f"{path} line {number}", record
    except UnicodeDecodeError as err:
        raise _bad(str(path), f"it is not UTF-8 text (byte {err.start} of a line)") from None
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


def vllm_rows(path: Path, topk: int | None, vocab: int) -> tuple[int, Callable[[], Iterator[ImportedRow]]]:
    """K and a re-iterable source of rows (the file is read twice: to size, then to write)."""
    smallest = None
    for where, record in records(path):
        positions = record.get("prompt_logprobs") or []
        if not isinstance(positions, list):
            raise _bad(where, "prompt_logprobs must be a list with one entry per prompt token")
        for position in positions[1:]:
            if position is not None:
                count = len(_entries(position, where))
                smallest = count if smallest is None else min(smallest, count)
    if smallest is None:
        raise KdcacheError(f"{path} holds no prompt_logprobs; ask vLLM for them (SamplingParams(prompt_logprobs=K))")
    k = topk or smallest  # vLLM adds the prompt's own token to a position's top-k when it is not in it

    def rows() -> Iterator[ImportedRow]:
        for where, record in records(path):
            ids, positions = record.get("prompt_token_ids"), record.get("prompt_logprobs")
            if not isinstance(ids, list) or not isinstance(positions, list) or len(positions) != len(ids) or not ids:
                raise _bad(where, "prompt_token_ids and prompt_logprobs must be lists of the same, non-zero length")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise _bad(where, "prompt_token_ids must hold token ids (integers), not null, lists or text")
            token_ids = np.zeros((len(ids) - 1, k), np.int64)
            logprobs = np.zeros((len(ids) - 1, k), np.float32)
            for p, position in enumerate(positions[1:]):
                if position is None:
                    raise _bad(where, f"position {p + 1} has no logprobs")
                entries = sorted(_entries(position, where), key=lambda e: (e[2] if e[2] is not None else 0, -e[1]))
                if len(entries) < k:
                    raise _bad(where, f"position {p + 1} has {len(entries)} logprobs, fewer than {option('topk', k)}")
                kept = sorted(entries, key=lambda e: -e[1])[:k] if entries[0][2] is None else entries[:k]
                token_ids[p] = [e[0] for e in kept]
                logprobs[p] = [e[1] for e in kept]
            yield _checked_row(np.asarray(ids, dtype=np.int64), 0, token_ids, logprobs, vocab, where)
    return k, rows


def _checked_row(ids: np.ndarray, first: int, token_ids: np.ndarray, logprobs: np.ndarray, vocab: int,
                 where: str) -> ImportedRow:
    if ids.ndim != 1 or ids.min(initial=0) < 0 or ids.max(initial=0) >= vocab:
        raise KdcacheError(f"{where}: token ids must lie in [0, {vocab}) ({option('vocab_size', vocab)})")
    if len(token_ids) and (token_ids.min() < 0 or token_ids.max() >= vocab):
        raise KdcacheError(f"{where}: target token ids must lie in [0, {vocab}) ({option('vocab_size', vocab)})")
    if first + len(token_ids) > len(ids):
        raise KdcacheError(f"{where}: {len(token_ids)} target positions from position {first} do not fit "
                           f"{len(ids)} tokens")
    _check_distributions(token_ids, logprobs, first, where)
    # a probability of 0 (-inf, or any float below float16's range) is stored as the smallest logprob kept finite
    return ImportedRow(ids, first, token_ids, np.clip(logprobs, LOGPROB_FLOOR, 0.0))


def _check_distributions(token_ids: np.ndarray, logprobs: np.ndarray, first: int, where: str) -> None:
    """Each position's kept entries must be part of one distribution: log-probabilities <= 0 and
    kept probabilities summing to <= 1 (within float rounding), no id twice."""
    if not len(logprobs):
        return
    if np.isnan(logprobs).any():
        raise KdcacheError(f"{where}: a log-probability is NaN")
    high = np.flatnonzero(logprobs.max(1) > ROUNDING)
    if high.size:
        raise KdcacheError(f"{where} position {first + int(high[0]) + 1}: log-probability "
                           f"{float(logprobs[high[0]].max()):g} is above 0, not a log-probability")
    with np.errstate(divide="ignore", over="ignore"):
        mass = np.exp(np.logaddexp.reduce(logprobs.astype(np.float64), axis=1))
    over = np.flatnonzero(mass > 1 + ROUNDING)
    if over.size:
        raise KdcacheError(f"{where} position {first + int(over[0]) + 1}: the kept probabilities sum to "
                           f"{float(mass[over[0]]):.4g} > 1, not one distribution's")
    ordered = np.sort(token_ids, axis=1)
    twice = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(1))
    if twice.size:
        raise KdcacheError(f"{where} position {first + int(twice[0]) + 1}: a token id appears twice among its "
                           "log-probabilities")


def axolotl_rows(data: Any, vocab: int) -> tuple[int, Callable[[], Iterator[ImportedRow]]]:
    """K and the rows of a dataset with Axolotl's ``input_ids``, ``target_token_ids``,
    ``target_logprobs`` (and ``target_mask``) columns."""
    missing = [c for c in ("input_ids", "target_token_ids", "target_logprobs") if c not in data.column_names]
    if missing:
        raise KdcacheError(f"the dataset has no {missing[0]!r} column (it has {data.column_names}); "
                           "import axolotl needs Axolotl's KD columns")
    first_row = data[0]["target_logprobs"] if data.num_rows else None
    k = len(next((p for p in first_row if isinstance(p, list) and p), [])) if isinstance(first_row, list) else 0
    if not k:
        raise KdcacheError("the dataset's first row has no target log-probabilities (a list of K per position)")

    def rows() -> Iterator[ImportedRow]:
        for n, record in enumerate(data):
            where = f"dataset row {n}"
            try:
                ids = np.asarray(record["input_ids"], dtype=np.int64)
                lp = np.asarray(record["target_logprobs"], dtype=np.float64)
                tid = np.asarray(record["target_token_ids"], dtype=np.int64)
            except (TypeError, ValueError, OverflowError):  # ragged, null or text where numbers belong
                raise KdcacheError(f"{where}: input_ids, target_token_ids and target_logprobs must be rectangular "
                                   f"lists of numbers (one list of {k} per token)") from None
            if lp.shape != tid.shape or lp.ndim != 2 or len(lp) != len(ids) or lp.shape[1] != k:
                raise KdcacheError(f"{where}: target_logprobs {lp.shape} and target_token_ids {tid.shape} must both "
                                   f"be ({len(ids)}, {k})")
            if np.isnan(lp).any():
                raise KdcacheError(f"{where}: a target log-probability is NaN")
            has = ~np.isneginf(lp).all(1)  # placeholders are -inf
            if "target_mask" in record:
                has &= np.asarray(record["target_mask"]).reshape(len(ids), -1).any(1)
            positions = np.flatnonzero(has)
            if len(positions) and (positions[0] == 0 or len(positions) != positions[-1] - positions[0] + 1):
                raise KdcacheError(f"{where}: the positions with targets must be one run after position 0")
            first = int(positions[0]) - 1 if len(positions) else 0
            yield _checked_row(ids, first, tid[positions], lp[positions].astype(np.float32), vocab, where)
    return k, rows


def load_hf(path: Path) -> Any:
    try:
        import datasets
    except ImportError:
        raise KdcacheError("reading a Hugging Face dataset needs the datasets package: pip install 'kdcache[hf]'") from None
    if path.suffix != ".parquet" and not path.is_dir():
        raise KdcacheError(f"{path} is neither a Parquet file nor a directory saved with save_to_disk")
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" bars are not kdcache's to print
    try:
        if path.suffix == ".parquet":
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets and pyarrow report a foreign or damaged file in many types
        what = "Parquet file" if path.suffix == ".parquet" else "dataset saved with save_to_disk"
        raise KdcacheError(f"{path} is not a readable {what} ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}"[:300] + ")") from None
    finally:
        if shown:
            datasets.enable_progress_bars()
    return loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
