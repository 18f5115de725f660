"""The store's direct chunk writer lays files out exactly as zarr does, and zarr reads them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

import kdcache
from kdcache import KdcacheError, TeacherCache
from kdcache.store import BLOCKS, ROW_DIGEST
from kdcache.store.chunkfile import ChunkFileWriter, crc32c
from kdcache.store.layout import chunk_key


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()
            and f.name != "zarr.json"}


@pytest.mark.parametrize("dtype,io", [("float16", "o_direct"), ("float32", "buffered"), ("bfloat16", "o_direct")])
def test_direct_chunk_files_equal_zarr_written_ones(tmp_path, models, dtype, io, monkeypatch):
    """Chunk files written by kdcache (O_DIRECT from an aligned buffer and cut to size, or
    buffered) are byte for byte what zarr writes."""
    monkeypatch.setattr(ChunkFileWriter, "min_direct_bytes", 0)  # every chunk, however small
    monkeypatch.setenv("KDCACHE_DIRECT_IO", "1" if io == "o_direct" else "0")
    # 300 rows with 128-row chunks: the last chunk is an edge chunk, padded
    cache = kdcache.dump_teacher(models.teacher(), models.dataset(300), tmp_path / "direct", hidden=["body"],
                                 logits_dtype=dtype, block_rows=128, progress=False)
    via_zarr = zarr.open_group(str(tmp_path / "via-zarr"), mode="w", zarr_format=3)
    for path in cache.array_paths():
        source = cache.group[path]
        TeacherCache._create_array(via_zarr, path, source.shape, source.dtype, source.chunks[0])
        via_zarr[path][:] = source[:]
    for path in cache.array_paths():
        direct = _files(tmp_path / "direct" / path)
        assert direct and direct == _files(tmp_path / "via-zarr" / path), path
    assert {ROW_DIGEST, BLOCKS} <= set(cache.array_paths())
    assert not list((tmp_path / "direct").rglob("*.partial"))


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_filesystem_refusing_o_direct_falls_back_to_buffered_writes(tmp_path, monkeypatch):
    import errno

    import numpy as np
    real_open = os.open

    def refusing_open(path, flags, *args):  # what tmpfs and some FUSE filesystems answer
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    writer = ChunkFileWriter(direct=True)
    monkeypatch.setattr(os, "open", refusing_open)
    rows = np.arange(3 << 20, dtype=np.uint8).reshape(-1, 1024)
    writer.write(tmp_path / "a" / "c0", rows)
    data = (tmp_path / "a" / "c0").read_bytes()
    assert data[:-4] == rows.tobytes() and len(data) == rows.nbytes + 4
    assert writer.direct is False and not list(tmp_path.rglob("*.partial"))


def test_direct_reads_equal_zarr_reads_for_any_row_range(tmp_path, models):
    cache = kdcache.dump_teacher(models.teacher(), models.dataset(300), tmp_path / "c", hidden=["body"], block_rows=128,
                                 progress=False)
    for path in cache.array_paths()[:-1]:  # every array of rows (the _blocks record is read whole)
        rows = cache.group[path].shape[0]
        for start, stop in [(0, rows), (0, 1), (5, 133), (128, 256), (250, rows)]:
            if start < rows:
                np.testing.assert_array_equal(cache.read_array(path, start, min(stop, rows)),
                                              cache.group[path][start:min(stop, rows)])


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_chunk_file_is_refused_on_a_direct_read(tmp_path, models, damage):
    cache = kdcache.dump_teacher(models.teacher(), models.dataset(300), tmp_path / "c", block_rows=128, progress=False)
    chunk = tmp_path / "c" / chunk_key("logits", cache.group["logits"].ndim, 1)
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[10] ^= 0xFF
    else:
        data = data[:-100]
    chunk.write_bytes(bytes(data))
    with pytest.raises(KdcacheError, match=r"logits rows 128..255: chunk file .* (checksum|bytes)"):
        TeacherCache.open(tmp_path / "c").read("logits", 128, 256)


def test_crc32c_in_pieces_equals_google_crc32c():
    import google_crc32c
    for n in (0, 1, 1000, 256 << 10, (256 << 10) + 7, 3 << 20):
        raw = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
        assert crc32c(raw) == google_crc32c.value(raw.tobytes())
