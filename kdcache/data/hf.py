"""Datasets through 🤗 ``datasets``: ``hf-disk:PATH[:SPLIT]``, ``parquet:PATH`` and ``jsonl:PATH``
specs, text columns tokenized with the teacher's tokenizer, rows padded to one length.

A cache stores a fixed token axis per row, and every row's input digest is computed over
batched inputs, so token rows of real (variable) length are padded to one length before they
are ever batched: :func:`pad_rows` is the one place that happens. What :func:`prepare` returns
reads as torch tensors, one dict per row: the numeric columns (``label``/``labels`` are the
target, the rest the model's inputs); string columns are not inputs and are left out.
``datasets`` is imported only when it is used (the ``kdcache[hf]`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import KdcacheError, option

__all__ = ["DATA_PREFIXES", "is_data_spec", "is_hf_dataset", "load", "prepare", "pad_rows"]

DATA_PREFIXES = ("hf-disk:", "parquet:", "jsonl:")
LABEL_COLUMNS = ("label", "labels")
IGNORED_LABEL = -100  # Hugging Face's ignored token label


def is_data_spec(spec: Any) -> bool:
    """True for ``hf-disk:``, ``parquet:`` and ``jsonl:`` specs."""
    return isinstance(spec, str) and spec.startswith(DATA_PREFIXES)


def is_hf_dataset(obj: Any) -> bool:
    """A ``datasets.Dataset`` or ``DatasetDict`` (told apart without importing ``datasets``)."""
    return type(obj).__module__.split(".")[0] == "datasets" and hasattr(obj, "column_names")


def _datasets() -> Any:
    try:
        import datasets  # noqa: PLC0415
    except ImportError:
        raise KdcacheError("hf-disk:/parquet:/jsonl: datasets need the datasets package: pip install 'kdcache[hf]'") \
            from None
    return datasets


def _split(data: Any, split: str | None, where: str) -> Any:
    if not isinstance(data, _datasets().DatasetDict):
        if split is not None:
            raise KdcacheError(f"{where} is one dataset, not a DatasetDict with split {split!r}")
        return data
    names = list(data)
    if split is None and len(names) == 1:
        split = names[0]
    if split not in data:
        raise KdcacheError(f"{where} has splits {names}: name one, e.g. hf-disk:PATH:{names[0] if names else 'train'}")
    return data[split]


def load(spec: str, *, tokenizer: Any = None, text_column: str | None = None, max_length: int | None = None) -> Any:
    """The dataset a ``hf-disk:PATH[:SPLIT]``, ``parquet:FILE`` or ``jsonl:FILE`` spec names, prepared
    by :func:`prepare` (tokenized when ``text_column`` is given)."""
    kind, _, rest = spec.partition(":")
    datasets = _datasets()
    if kind == "hf-disk":
        path, split = Path(rest), None
        if not path.exists() and ":" in rest:
            head, _, split = rest.rpartition(":")
            path = Path(head)
        if not path.is_dir():
            raise KdcacheError(f"dataset {spec}: no such directory (save one with Dataset.save_to_disk)")
        try:
            data = datasets.load_from_disk(str(path), keep_in_memory=False)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise KdcacheError(f"dataset {spec}: not a saved datasets directory ({str(err).splitlines()[0]})") from None
        data = _split(data, split, f"dataset {spec}")
    else:
        path = Path(rest)
        if not path.is_file():
            raise KdcacheError(f"dataset {spec}: no such file")
        try:
            reader = datasets.Dataset.from_parquet if kind == "parquet" else datasets.Dataset.from_json
            data = reader(str(path), keep_in_memory=True)
        except Exception as err:  # pyarrow and json errors have no common base
            raise KdcacheError(f"dataset {spec} cannot be read as {kind}: {type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}") from None
    return prepare(data, tokenizer, text_column=text_column, max_length=max_length)


def prepare(dataset: Any, tokenizer: Any = None, *, text_column: str | None = None,
            max_length: int | None = None) -> Any:
    """A ``datasets.Dataset`` as kdcache reads it: ``text_column`` tokenized with ``tokenizer``
    (truncated to ``max_length``; ``map(batched=True)``), token rows padded to ``max_length`` by
    :func:`pad_rows`, and its numeric columns formatted as torch tensors.

    Stage one and stage two must prepare the dataset the same way: the cache checks every
    row's input digest.
    """
    datasets = _datasets()
    if isinstance(dataset, datasets.DatasetDict):
        raise KdcacheError(f"a DatasetDict has splits {list(dataset)}: pass one split, e.g. dataset[{list(dataset)[0]!r}]")
    if max_length is not None and max_length < 1:
        raise KdcacheError(f"max_length must be >= 1, got {max_length}")
    if text_column is not None:
        dataset = _tokenize(dataset, tokenizer, text_column, max_length)
    if max_length is not None:
        pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        dataset = pad_rows(dataset, max_length, pad_id if isinstance(pad_id, int) else 0)
    columns = [name for name, feature in dataset.features.items() if _numeric(feature)]
    if not [c for c in columns if c not in LABEL_COLUMNS]:
        raise KdcacheError(f"the dataset has no numeric input columns (columns {dataset.column_names}); tokenize its "
                           f"text with {option('text_column')}")
    return dataset.with_format("torch", columns=columns)


def _numeric(feature: Any) -> bool:
    """A column of numbers or (nested) lists of numbers."""
    while hasattr(feature, "feature") and not hasattr(feature, "dtype"):  # List / Sequence / Array
        feature = feature.feature
    if isinstance(feature, (list, tuple)) and len(feature) == 1:
        return _numeric(feature[0])
    dtype = getattr(feature, "dtype", None)
    return isinstance(dtype, str) and dtype.startswith(("int", "uint", "float", "bool"))


def _tokenize(dataset: Any, tokenizer: Any, text_column: str, max_length: int | None) -> Any:
    if tokenizer is None:
        raise KdcacheError(f"{option('text_column', text_column)}: no tokenizer to tokenize it with; pass "
                           f"{option('tokenizer')} (a directory saved with save_pretrained, beside an hf: model or not)")
    if text_column not in dataset.column_names:
        raise KdcacheError(f"{option('text_column', text_column)} is not a column of the dataset (it has "
                           f"{dataset.column_names})")

    def tokenize(batch: dict[str, list[Any]]) -> Any:
        texts = batch[text_column]
        if not all(isinstance(t, str) for t in texts):
            raise KdcacheError(f"{option('text_column', text_column)} holds {type(texts[0]).__name__} values, not text")
        return tokenizer(texts, truncation=max_length is not None, max_length=max_length)

    keep = set(LABEL_COLUMNS)
    return dataset.map(tokenize, batched=True, remove_columns=[c for c in dataset.column_names if c not in keep],
                       desc="tokenize", load_from_cache_file=False, keep_in_memory=True)


def pad_rows(dataset: Any, length: int, pad_id: int = 0) -> Any:
    """Every list column padded to ``length`` (``input_ids`` with ``pad_id``, ``labels`` with -100,
    the rest with 0) and an ``attention_mask`` of the real tokens added when there is none.

    The one place token rows are padded (a packed variable-length layout would replace it).
    A row longer than ``length`` is refused: truncate when tokenizing.
    """
    sequence_columns = [name for name, feature in dataset.features.items()
                        if hasattr(feature, "feature") and _numeric(feature)]
    if not sequence_columns:
        return dataset
    add_mask = "input_ids" in sequence_columns and "attention_mask" not in dataset.column_names

    def pad(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out = {}
        for name in sequence_columns:
            fill = pad_id if name == "input_ids" else IGNORED_LABEL if name in LABEL_COLUMNS else 0
            rows = batch[name]
            longest = max((len(r) for r in rows), default=0)
            if longest > length:
                raise KdcacheError(f"column {name!r} has a row of {longest} tokens, more than {option('max_length', length)}: "
                                   f"truncate it when tokenizing (kdcache does with {option('text_column')})")
            out[name] = [list(r) + [fill] * (length - len(r)) for r in rows]
        if add_mask:
            out["attention_mask"] = [[1] * len(r) + [0] * (length - len(r)) for r in batch["input_ids"]]
        return out

    return dataset.map(pad, batched=True, desc="pad", load_from_cache_file=False, keep_in_memory=True)
