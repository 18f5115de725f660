"""Teacher log-probabilities from vLLM and Axolotl into kdcache, and kdcache top-k caches out to Axolotl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import kdcache
from kdcache import CachedTeacherDataset, TeacherCache
from kdcache.interop import TokenRows, export_axolotl, import_axolotl, import_vllm, vllm_inputs

from conftest import run_cli

K, VOCAB = 5, 40


def _teacher_rows(models, n: int = 20) -> list[tuple[np.ndarray, np.ndarray]]:
    """(real token ids (L,), the teacher's log-softmax after each token (L, VOCAB)) per row."""
    ds, lm = models.tokens(n=n), models.tiny_lm()
    rows = []
    for i in range(n):
        item = ds[i]
        ids = item["input_ids"][item["attention_mask"].bool()]
        with torch.no_grad():
            logits = lm(ids[None])["logits"][0, :, :VOCAB]
        rows.append((ids.numpy(), torch.log_softmax(logits.double(), -1).numpy()))
    return rows


def _vllm_file(path: Path, rows, k: int = K) -> Path:
    """vLLM's prompt_logprobs as a user would save them: position i maps token id -> {logprob,
    rank} for the top-k of the distribution *of* token i, plus token i itself when outside them."""
    with open(path, "w") as f:
        for ids, logprobs in rows:
            positions: list = [None]
            for i in range(1, len(ids)):
                lp = logprobs[i - 1]
                order = np.argsort(-lp)
                entry = {str(int(t)): {"logprob": float(lp[t]), "rank": r + 1} for r, t in enumerate(order[:k])}
                own = int(ids[i])
                entry.setdefault(str(own), {"logprob": float(lp[own]), "rank": int(np.flatnonzero(order == own)[0]) + 1})
                positions.append(entry)
            f.write(json.dumps({"prompt_token_ids": ids.tolist(), "prompt_logprobs": positions}) + "\n")
    return path


def _targets(cache, inputs):
    batch = CachedTeacherDataset(inputs, cache).__getitems__(list(range(len(inputs)))).collated
    return batch[0], batch[2]


def test_vllm_prompt_logprobs_import_as_the_teachers_top_k_at_each_position(tmp_path, models):
    rows = _teacher_rows(models)
    source = _vllm_file(tmp_path / "lp.jsonl", rows)
    cache = import_vllm(source, tmp_path / "c", vocab_size=VOCAB)
    assert cache.meta.source == {"format": "vllm", "file": str(source), "normalized": "vocabulary", "k": K}
    assert cache.meta.packed is not None and cache.meta.logits.codec.k == K  # the prompt's own extra entry dropped
    inputs, teacher = _targets(cache, vllm_inputs(str(source)))
    for i, (ids, logprobs) in enumerate(rows):
        L = len(ids)
        assert teacher.mask[i, :L - 1].all() and not teacher.mask[i, L - 1:].any()  # none after the last token
        want_ids = np.argsort(-logprobs[:L - 1], axis=1)[:, :K]
        assert np.array_equal(teacher.logits.indices[i, :L - 1].numpy(), want_ids)
        want = np.take_along_axis(logprobs[:L - 1], want_ids, 1)
        np.testing.assert_allclose(teacher.logits.values[i, :L - 1].numpy(), want, atol=2e-2, rtol=1e-3)
        assert not teacher.logits.logsumexp[i].any()  # normalised over the vocabulary: logsumexp 0
    again = import_vllm(source, tmp_path / "c", vocab_size=VOCAB)
    assert again.fingerprint == cache.fingerprint


def test_an_imported_cache_trains_a_student_and_says_where_it_came_from(tmp_path, models, models_file):
    source = _vllm_file(tmp_path / "lp.jsonl", _teacher_rows(models))
    made = run_cli("import", "vllm", str(source), "--vocab-size", str(VOCAB), "--out", str(tmp_path / "c"))
    assert made.returncode == 0, made.stderr
    info = run_cli("info", str(tmp_path / "c"))
    assert "imported from vllm" in info.stdout and "normalised over the vocabulary" in info.stdout, info.stdout
    student = models.tiny_lm(width=8, padded=VOCAB, seed=2)
    result = kdcache.train_student(student, vllm_inputs(str(source)), tmp_path / "c", epochs=2, batch_size=8,
                                   alpha=1.0, temperature=1.0, progress=False)
    assert np.isfinite(result.final["kd"]) and result.final["kd"] > 0


@pytest.mark.parametrize("damage,message", [
    (lambda text: text[: len(text) // 2], "is not JSON"),
    (lambda text: text.replace('"rank": 1}', '"rank": 1, "x": [}', 1), "is not JSON"),
    (lambda text: text.replace('"prompt_token_ids"', '"ids"', 1), "prompt_token_ids and prompt_logprobs"),
    (lambda text: text.replace('"logprob": -', '"logprob": ', 1), "not a log-probability"),
])
def test_a_truncated_or_malformed_import_file_is_one_line(tmp_path, models, damage, message):
    source = _vllm_file(tmp_path / "lp.jsonl", _teacher_rows(models, n=4))
    source.write_text(damage(source.read_text()))
    result = run_cli("import", "vllm", str(source), "--vocab-size", str(VOCAB), "--out", str(tmp_path / "c"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    too_small = run_cli("import", "vllm", str(_vllm_file(tmp_path / "ok.jsonl", _teacher_rows(models, n=2))),
                        "--vocab-size", "10", "--out", str(tmp_path / "d"))
    assert too_small.returncode == 2 and "--vocab-size" in too_small.stderr


def _axolotl_dataset(rows, k: int = K):
    """Axolotl's KD columns: position i holds the distribution of token i (renormalised over the
    K kept ids), position 0 a placeholder."""
    datasets = pytest.importorskip("datasets")
    columns: dict[str, list] = {c: [] for c in ("input_ids", "attention_mask", "labels", "target_token_ids",
                                                "target_logprobs", "target_mask")}
    for ids, logprobs in rows:
        L = len(ids)
        tid = [list(range(k))] + [np.argsort(-logprobs[i - 1])[:k].tolist() for i in range(1, L)]
        lp = [[-np.inf] * k]
        for i in range(1, L):
            kept = logprobs[i - 1][tid[i]]
            lp.append((kept - np.log(np.exp(kept).sum())).astype(np.float32).tolist())
        columns["input_ids"].append(ids.tolist())
        columns["attention_mask"].append([1] * L)
        columns["labels"].append(ids.tolist())
        columns["target_token_ids"].append(tid)
        columns["target_logprobs"].append(lp)
        columns["target_mask"].append([[0] * k] + [[1] * k] * (L - 1))
    return datasets.Dataset.from_dict(columns)


def test_axolotl_columns_import_and_export_round_trips_losslessly(tmp_path, models):
    datasets = pytest.importorskip("datasets")
    rows = _teacher_rows(models)
    ax = _axolotl_dataset(rows)
    cache = import_axolotl(ax, tmp_path / "c", vocab_size=VOCAB)
    assert cache.meta.source["normalized"] == "kept"
    inputs = TokenRows([ids for ids, _ in rows])
    _, teacher = _targets(cache, inputs)
    for i, (ids, _) in enumerate(rows):
        L = len(ids)
        got = teacher.logits.values[i, :L - 1].float().numpy()
        np.testing.assert_allclose(got, np.asarray(ax[i]["target_logprobs"][1:]), atol=2e-3, rtol=1e-3)
        assert np.array_equal(teacher.logits.indices[i, :L - 1].numpy(), np.asarray(ax[i]["target_token_ids"][1:]))
    first = export_axolotl(cache, inputs, tmp_path / "a.parquet")
    exported = datasets.load_dataset("parquet", data_files=str(first), split="train")
    assert exported.column_names == ax.column_names and exported.num_rows == ax.num_rows
    for column in ("input_ids", "attention_mask", "target_token_ids", "target_mask"):
        assert exported[column] == [[int(v) if not isinstance(v, list) else [int(x) for x in v] for v in row]
                                    for row in ax[column]], column
    # the first token is never a target of a causal LM: its label is -100
    assert exported["labels"] == [[-100] + row[1:] for row in ax["labels"]]
    back = import_axolotl(tmp_path / "a.parquet", tmp_path / "back", vocab_size=VOCAB)
    _, again = _targets(back, inputs)
    for key in ("values", "indices", "logsumexp"):
        assert torch.equal(again.logits[key], teacher.logits[key]), key  # lossless
    assert torch.equal(again.mask, teacher.mask)
    second = export_axolotl(back, inputs, tmp_path / "b.parquet")
    assert datasets.load_dataset("parquet", data_files=str(second), split="train")["target_logprobs"] == \
        exported["target_logprobs"]


def test_a_dumped_top_k_cache_exports_for_axolotl(tmp_path, models, models_file):
    pytest.importorskip("datasets")
    ds = models.tokens(n=20)
    cache = kdcache.dump_teacher(models.tiny_lm(), ds, tmp_path / "c", topk=K, vocab_size=VOCAB, progress=False,
                                 log=lambda m: None)
    out = run_cli("export", str(tmp_path / "c"), "--dataset", f"{models_file}:tokens", "--dataset-kwargs",
                  '{"n": 20}', "--out", str(tmp_path / "x.parquet"))
    assert out.returncode == 0, out.stderr
    back = import_axolotl(tmp_path / "x.parquet", tmp_path / "back", vocab_size=VOCAB)
    rows = TokenRows([ds[i]["input_ids"][ds[i]["attention_mask"].bool()].numpy() for i in range(20)])
    _, original = _targets(cache, ds)
    _, imported = _targets(back, rows)
    for i in range(20):
        real = ds[i]["attention_mask"].bool()
        L = int(real.sum())
        want = original.logits.values[i][real][:L - 1].float() - original.logits.logsumexp[i][real][:L - 1, None]
        torch.testing.assert_close(imported.logits.values[i, :L - 1].float(), want, atol=2e-2, rtol=1e-3)
        assert torch.equal(imported.logits.indices[i, :L - 1], original.logits.indices[i][real][:L - 1])
    wrong = run_cli("export", str(tmp_path / "c"), "--dataset", f"{models_file}:tokens", "--dataset-kwargs",
                    '{"n": 20, "seed": 9}', "--out", str(tmp_path / "y.parquet"))
    assert wrong.returncode == 2 and "differs" in wrong.stderr and not (tmp_path / "y.parquet").exists()
    assert TeacherCache.open(tmp_path / "c").complete
