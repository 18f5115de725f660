"""A damaged root description is repairable, and ``--repair`` checks its dataset first (issue "A
shared cache can be trusted, round three"): ``--repair`` rebuilds an unreadable ``zarr.json``
from the dump's own description when the blocks agree with it, ``--overwrite`` removes a
recognisable cache whatever its description, and a dataset that differs from the rows about to
be written again is refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdcache import TeacherCache
from kdcache.store.identity import DIGEST_SAMPLE_ROWS

from conftest import run_cli, store_files
from test_trust import _chunk_file, _dump_cli, _one_line

ARGS = ("--hidden", "body", "--block-rows", "64")


def _raw(folder) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _break(description, how: str) -> None:
    data = description.read_bytes()
    if how == "flip":  # one bit of the fingerprint's text: valid JSON, no longer its digest
        at = data.index(b'"fingerprint": "') + len('"fingerprint": "')
        description.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:])
    else:
        description.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_repair_rebuilds_a_damaged_root_description_to_the_same_cache(tmp_path, models_file, how):
    assert _dump_cli(models_file, tmp_path / "ref", *ARGS).returncode == 0
    assert _dump_cli(models_file, tmp_path / "c", *ARGS).returncode == 0
    _break(tmp_path / "c" / "zarr.json", how)
    assert "--repair" in _one_line(run_cli("verify", str(tmp_path / "c")))
    assert "--repair" in _one_line(_dump_cli(models_file, tmp_path / "c", *ARGS))  # the rerun says how
    repaired = _dump_cli(models_file, tmp_path / "c", *ARGS, "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert "rebuilding it" in repaired.stderr
    assert store_files(tmp_path / "c") == store_files(tmp_path / "ref")
    assert run_cli("verify", str(tmp_path / "c")).returncode == 0


def test_repair_refuses_to_rebuild_a_description_from_another_teacher_and_writes_nothing(tmp_path, models_file):
    assert _dump_cli(models_file, tmp_path / "c", *ARGS).returncode == 0
    _break(tmp_path / "c" / "zarr.json", "truncate")
    before = _raw(tmp_path / "c")
    line = _one_line(_dump_cli(models_file, tmp_path / "c", *ARGS, "--teacher-kwargs", '{"seed": 3}', "--repair"))
    assert "no block" in line and "--overwrite" in line
    assert _raw(tmp_path / "c") == before


def test_overwrite_replaces_a_cache_whose_root_description_is_unreadable(tmp_path, models_file):
    assert _dump_cli(models_file, tmp_path / "c", *ARGS).returncode == 0
    _break(tmp_path / "c" / "zarr.json", "truncate")
    replaced = _dump_cli(models_file, tmp_path / "c", "--dataset-kwargs", '{"n": 50}', "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert TeacherCache.open(tmp_path / "c").rows == 50


def test_repair_with_an_edited_dataset_is_refused_before_anything_is_written(tmp_path, models_file):
    assert _dump_cli(models_file, tmp_path / "c", *ARGS).returncode == 0
    sampled = set(np.linspace(0, 299, DIGEST_SAMPLE_ROWS).round().astype(int).tolist())
    row = next(r for r in range(128, 192) if r not in sampled)  # block 2, unseen by the dataset digest
    chunk = _chunk_file(tmp_path / "c", "logits", 2)
    raw = bytearray(chunk.read_bytes())
    raw[7] ^= 0x10
    chunk.write_bytes(bytes(raw))
    before = store_files(tmp_path / "c")
    line = _one_line(_dump_cli(models_file, tmp_path / "c", *ARGS, "--dataset-kwargs",
                               json.dumps({"edit_row": row}), "--repair"))
    assert f"dataset row {row} is not the input" in line and "nothing was written" in line
    assert store_files(tmp_path / "c") == before
