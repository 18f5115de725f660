"""The store's direct chunk writer lays files out exactly as zarr does, and zarr reads them."""

from __future__ import annotations

from pathlib import Path

import pytest
import zarr

import kdcache
from kdcache import TeacherCache
from kdcache.store import BLOCKS, ROW_DIGEST


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()
            and f.name != "zarr.json"}


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_direct_chunk_files_equal_zarr_written_ones(tmp_path, models, dtype):
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
