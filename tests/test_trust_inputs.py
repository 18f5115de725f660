"""Import files and output paths are untrusted input (issue "A shared cache can be trusted, round
three"): every malformed import file is one line and leaves nothing behind, imported
distributions must be distributions, an export or report that fails half-way leaves nothing at
--out, and the minor findings (a packed cache's token count, an import-export-import round
trip giving the same cache)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from kdcache import TeacherCache
from kdcache.store.identity import DIGEST_SAMPLE_ROWS

from conftest import run_cli
from test_trust import _one_line

VOCAB = 8
GOOD = {"prompt_token_ids": [1, 2, 3], "prompt_logprobs": [None, {"2": -0.1, "4": -2.5}, {"3": -0.2, "1": -1.9}]}


def _vllm(tmp_path: Path, *records: object, raw: bytes | None = None) -> Path:
    source = tmp_path / "lp.jsonl"
    source.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in records).encode())
    return source


def _import(tmp_path: Path, kind: str, source: Path) -> str:
    """One line from ``kdcache import``; nothing written at --out nor beside it."""
    line = _one_line(run_cli("import", kind, str(source), "--out", str(tmp_path / "c"), "--vocab-size", str(VOCAB),
                             timeout=120))
    assert not (tmp_path / "c").exists()
    return line


def _axolotl(tmp_path: Path, logprobs: list, ids: list | None = None, token_ids: list | None = None) -> Path:
    """A Parquet file with Axolotl's KD columns for one row of 3 tokens, K = 2."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("datasets")
    table = pa.table({"input_ids": [ids or [1, 2, 3]], "target_token_ids": [token_ids or [[0, 1], [2, 4], [3, 1]]],
                      "target_logprobs": [logprobs], "target_mask": [[[0, 0], [1, 1], [1, 1]]]})
    pq.write_table(table, tmp_path / "ax.parquet")
    return tmp_path / "ax.parquet"


NEG = float("-inf")


# 1. imported distributions must be distributions --------------------------------------------------
def test_import_refuses_log_probabilities_of_zero_everywhere(tmp_path):
    record = {**GOOD, "prompt_logprobs": [None, {"2": 0.0, "4": 0.0}, {"3": 0.0, "1": 0.0}]}
    assert "sum to 2 > 1" in _import(tmp_path, "vllm", _vllm(tmp_path, record))


def test_import_refuses_one_token_id_repeated_at_a_position(tmp_path):
    repeated = [{"token_id": 2, "logprob": -1.5, "rank": 1}, {"token_id": 2, "logprob": -1.5, "rank": 2}]
    record = {**GOOD, "prompt_logprobs": [None, repeated, {"3": -0.2, "1": -1.9}]}
    assert "appears twice" in _import(tmp_path, "vllm", _vllm(tmp_path, record))


def test_import_axolotl_refuses_a_log_probability_above_zero(tmp_path):
    source = _axolotl(tmp_path, [[NEG, NEG], [50.0, -0.1], [-0.2, -1.9]])
    assert "log-probability 50 is above 0" in _import(tmp_path, "axolotl", source)


def test_an_axolotl_log_probability_of_minus_1e10_is_a_probability_of_zero(tmp_path):
    source = _axolotl(tmp_path, [[NEG, NEG], [-1e-3, -1e10], [-0.2, -1.9]])
    made = run_cli("import", "axolotl", str(source), "--out", str(tmp_path / "c"), "--vocab-size", str(VOCAB))
    assert made.returncode == 0 and "--logits-dtype" not in made.stderr, made.stderr
    values = TeacherCache.open(tmp_path / "c").load_array("topk/values")
    assert values.min() == -1e4  # the smallest log-probability kept finite


# 2. malformed import files: one line each ---------------------------------------------------------
@pytest.mark.parametrize("ids", [[1, None, 3], [1, [2, 3], 3]])
def test_import_refuses_null_or_nested_token_ids_in_one_line(tmp_path, ids):
    assert "prompt_token_ids must hold token ids" in _import(tmp_path, "vllm", _vllm(tmp_path, {**GOOD,
                                                                                                "prompt_token_ids": ids}))


def test_import_refuses_random_bytes_as_jsonl_in_one_line(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert "lp.jsonl" in _import(tmp_path, "vllm", _vllm(tmp_path, raw=noise))


def test_import_refuses_a_directory_that_is_not_a_saved_dataset_in_one_line(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a dataset")
    assert "not a readable dataset saved with save_to_disk" in _import(tmp_path, "axolotl", tmp_path / "notes")


def test_import_refuses_a_ragged_target_logprobs_row_in_one_line(tmp_path):
    source = _axolotl(tmp_path, [[NEG, NEG], [-0.1, -2.5, -3.0], [-0.2]])
    assert "rectangular lists of numbers" in _import(tmp_path, "axolotl", source)


# 3. output paths: written whole or not at all -------------------------------------------------------
def _tokens_cache(tmp_path: Path, models_file: Path) -> Path:
    made = run_cli("dump-teacher", "--teacher", f"{models_file}:tiny_lm", "--dataset", f"{models_file}:tokens",
                   "--dataset-kwargs", '{"n": 300}', "--topk", "4", "--vocab-size", "40", "--block-rows", "64",
                   "--out", str(tmp_path / "c"), "--no-progress")
    assert made.returncode == 0, made.stderr
    return tmp_path / "c"


def test_an_export_that_fails_half_way_leaves_nothing_at_out(tmp_path, models, models_file):
    cache = _tokens_cache(tmp_path, models_file)
    sampled = set(np.linspace(0, 299, DIGEST_SAMPLE_ROWS).round().astype(int).tolist())
    row = next(r for r in range(200, 300) if r not in sampled and r % 3)  # past the first batch, unseen at open;
    # rows r % 3 != 0 are right-padded: position 0 is a real token
    edited = tmp_path / "edited.py"
    edited.write_text(f"import sys; sys.path.insert(0, {str(models_file.parent)!r})\nimport kd_models\n"
                      f"def tokens(**kw):\n    ds = kd_models.tokens(**kw)\n    ds.ids[{row}, 0] += 1\n    return ds\n")
    out = tmp_path / "x.parquet"
    line = _one_line(run_cli("export", str(cache), "--dataset", f"{edited}:tokens", "--dataset-kwargs", '{"n": 300}',
                             "--out", str(out)))
    assert f"row {row}" in line and not out.exists() and os.listdir(tmp_path).count("x.parquet") == 0
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]
    again = run_cli("export", str(cache), "--dataset", f"{models_file}:tokens", "--dataset-kwargs", '{"n": 300}',
                    "--out", str(out))
    assert again.returncode == 0 and out.is_file(), again.stderr


def test_a_bad_out_of_export_or_report_is_one_line_and_leaves_nothing(tmp_path, models, models_file):
    import kdcache
    kdcache.dump_teacher(models.teacher(), models.dataset(50), tmp_path / "c", progress=False, log=lambda m: None)
    (tmp_path / "notes.txt").write_text("keep")
    for out in (tmp_path / "notes.txt", tmp_path / "missing" / "r"):
        line = _one_line(run_cli("report", str(tmp_path / "c"), "--out", str(out)))
        assert str(out) in line
    assert (tmp_path / "notes.txt").read_text() == "keep" and not (tmp_path / "missing").exists()
    line = _one_line(run_cli("export", str(tmp_path / "c"), "--dataset", f"{models_file}:dataset",
                             "--out", str(tmp_path / "notes.txt")))
    assert "exists" in line and (tmp_path / "notes.txt").read_text() == "keep"


# 4. minor ------------------------------------------------------------------------------------------
def test_info_of_a_packed_cache_counts_its_per_token_arrays_in_tokens(tmp_path, models):
    import kdcache
    cache = kdcache.dump_teacher(models.tiny_lm(), models.tokens(n=24), tmp_path / "c", topk=4, vocab_size=40,
                                 progress=False, log=lambda m: None)
    info = run_cli("info", str(tmp_path / "c"))
    assert info.returncode == 0
    assert f"topk/values              ({cache.meta.tokens}, 4) float16  8 B/token" in info.stdout, info.stdout
    assert f"({cache.rows}, 4)" not in info.stdout


def test_import_axolotl_export_import_again_is_the_same_cache(tmp_path):
    pytest.importorskip("datasets")
    from kdcache.interop import TokenRows, export_axolotl, import_axolotl
    source = _axolotl(tmp_path, [[NEG, NEG], [-0.1053, -2.3026], [-0.0513, -2.9957]])
    first = import_axolotl(source, tmp_path / "a", vocab_size=VOCAB)
    export_axolotl(first, TokenRows([np.array([1, 2, 3])]), tmp_path / "x.parquet")
    again = import_axolotl(tmp_path / "x.parquet", tmp_path / "b", vocab_size=VOCAB)
    assert again.fingerprint == first.fingerprint
    assert np.array_equal(again.blocks_record(), first.blocks_record())
