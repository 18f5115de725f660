"""The zarr arrays a cache's description implies: created exactly one way, and checked (or
restored, by ``--repair``) against what that way writes, so an edited ``zarr.json`` can never
reinterpret an array's bytes."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

__all__ = ["create_array", "layout_problem", "restore_metadata"]

# the parts of an array's zarr metadata that decide what its bytes mean
_LAYOUT_KEYS = ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs",
                "storage_transformers", "zarr_format", "node_type")


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: np.dtype, chunk_rows: int,
                 shard_rows: int | None = None) -> zarr.Array:
    """The array ``name`` of ``group`` as kdcache makes every cache array: chunked along rows only,
    crc32c on every chunk, fill value 0 (sharded, one shard per block, on object storage)."""
    shards = (shard_rows, *shape[1:]) if shard_rows and shard_rows > chunk_rows else None
    return group.create_array(name, shape=shape, chunks=(chunk_rows, *shape[1:]), shards=shards, dtype=dtype,
                              fill_value=0, compressors=[Crc32cCodec()], config={"write_empty_chunks": True},
                              overwrite=True)


@functools.lru_cache(maxsize=256)
def _reference(shape: tuple[int, ...], dtype: np.dtype, chunk_rows: int, shard: int | None) -> zarr.Array:
    """An empty array named ``a`` made in memory exactly as kdcache makes such an array: its
    metadata is what the cache's must be."""
    group = zarr.open_group(store=zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    return create_array(group, "a", shape, dtype, chunk_rows, shard)


def layout_problem(group: zarr.Group, path: str, spec: tuple[Any, ...]) -> str | None:
    """Why array ``path``'s metadata is not what ``spec`` (shape, dtype, chunk rows, shard rows)
    makes, or None when it is."""
    try:
        found = group[path].metadata.to_dict()
    except Exception as err:  # untrusted JSON parsed by zarr: any failure is damage
        return f"the metadata of array {path} is missing or unreadable ({type(err).__name__})"
    expected = _reference(*spec).metadata.to_dict()
    bad = [k for k in _LAYOUT_KEYS if found.get(k) != expected.get(k)]
    if bad:
        return (f"array {path}'s {bad[0]} is {found.get(bad[0])!r:.80}, its description says "
                f"{expected.get(bad[0])!r:.80}")
    return None


def restore_metadata(group: zarr.Group, path: str, spec: tuple[Any, ...]) -> None:
    """Write array ``path``'s ``zarr.json`` as ``spec`` makes it (its chunks are kept)."""
    document = sync(_reference(*spec).store.get("a/zarr.json", prototype=default_buffer_prototype()))
    sync(group.store.set(f"{path}/zarr.json", document))
