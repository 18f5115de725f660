"""The zarr arrays a cache's description implies: created exactly one way, and checked (or
restored, by ``--repair``) against what that way writes, so an edited ``zarr.json`` can never
reinterpret an array's bytes."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ..format.meta import BLOCKS, ROW_DIGEST, TOKEN_BLOCKS
from .paths import inside, metadata_problem

__all__ = ["create_array", "layout_problem", "restore_metadata", "local_root", "planned_layout",
           "restore_layout", "described_group", "write_group_document"]

# the parts of an array's zarr metadata that decide what its bytes mean
_LAYOUT_KEYS = ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs",
                "storage_transformers", "zarr_format", "node_type")


def create_array(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: np.dtype, chunk_rows: int,
                 shard_rows: int | None = None) -> zarr.Array:
    """The array ``name`` of ``group`` as kdcache makes every cache array: chunked along rows only,
    crc32c on every chunk, fill value 0 (sharded, one shard per block, on object storage)."""
    root = local_root(group)
    if root is not None:  # never into a directory reached through a link
        inside(root, f"{name}/zarr.json")
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


def local_root(group: zarr.Group) -> Path | None:
    """The directory of a group on a local store (None on object storage)."""
    return Path(group.store.root) if isinstance(group.store, zarr.storage.LocalStore) else None


def layout_problem(group: zarr.Group, path: str, spec: tuple[Any, ...]) -> str | None:
    """Why array ``path``'s metadata is not what ``spec`` (shape, dtype, chunk rows, shard rows)
    makes, or None when it is. A local ``zarr.json`` is checked before zarr reads it (a FIFO
    would hang the read, a link to /dev/zero never end it)."""
    root = local_root(group)
    unsafe = metadata_problem(root, f"{path}/zarr.json") if root is not None else None
    if unsafe:
        return f"the metadata of array {path} may not be read: {unsafe}"
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
    root = local_root(group)
    if root is not None:  # never into a directory reached through a link
        inside(root, f"{path}/zarr.json", make_dirs=True)
    document = sync(_reference(*spec).store.get("a/zarr.json", prototype=default_buffer_prototype()))
    sync(group.store.set(f"{path}/zarr.json", document))


def planned_layout(meta: Any, remote: bool) -> dict[str, tuple[tuple[int, ...], np.dtype, int, int | None]]:
    """Array path -> (shape, dtype, chunk rows, shard rows) as the description ``meta`` (a
    :class:`~kdcache.format.CacheMeta`) says; ``remote``: one shard per block (object storage)."""
    shard = meta.block_rows if remote else None
    layout = {a.path: ((meta.packed.capacity if a.per_token and meta.packed else meta.rows, *a.shape), a.dtype,
                       a.chunk_rows, None if a.per_token else shard) for a in meta.data_arrays()}
    layout[ROW_DIGEST] = ((meta.rows,), np.dtype("uint64"), meta.block_rows, None)
    layout[BLOCKS] = ((meta.blocks, meta.record_fields), np.dtype("int64"), 1, None)  # a file per block
    if meta.packed is not None:  # written once, at creation: where each block's tokens go
        layout[TOKEN_BLOCKS] = ((meta.blocks, 2), np.dtype("int64"), meta.blocks, None)
    layout.update({c.path: (c.shape, c.dtype, c.chunk_rows, None) for c in meta.constant_arrays()})  # stored once
    return layout


def restore_layout(group: zarr.Group, layout: dict[str, tuple[Any, ...]]) -> tuple[zarr.Group, list[str]]:
    """Rewrite the metadata of every array of ``layout`` whose ``zarr.json`` is missing,
    unreadable or not what the layout says (its chunks are kept): the group (opened afresh when
    something was restored) and the paths restored."""
    restored = [path for path, spec in layout.items() if layout_problem(group, path, spec)]
    for path in restored:
        restore_metadata(group, path, layout[path])
    if restored:
        group = zarr.open_group(store=group.store, mode="r+", zarr_format=3)  # forget cached arrays
    return group, restored


def described_group(store: Any, attrs: dict[str, Any]) -> zarr.Group:
    """A handle on the group in ``store`` whose attributes are ``attrs``, nothing read or written:
    a cache whose own group document is unreadable, looked at as a description says it is."""
    from zarr.core.group import AsyncGroup, GroupMetadata
    from zarr.storage import StorePath

    return zarr.Group(AsyncGroup(metadata=GroupMetadata(attributes=attrs), store_path=StorePath(store)))


def write_group_document(group: zarr.Group, attrs: dict[str, Any]) -> zarr.Group:
    """Write the group document (``zarr.json``) of ``group``'s store with ``attrs``, as zarr
    writes a new group's, replacing whatever is there; the group opened afresh."""
    reference = zarr.open_group(store=zarr.storage.MemoryStore(), mode="w", zarr_format=3, attributes=attrs)
    document = sync(reference.store.get("zarr.json", prototype=default_buffer_prototype()))
    sync(group.store.set("zarr.json", document))
    return zarr.open_group(store=group.store, mode="r+", zarr_format=3)
