"""Hugging Face models and datasets: hf:PATH teachers and students, hf-disk:/parquet:/jsonl: datasets
tokenized with the teacher's tokenizer, the (inputs, target) item convention, vocabulary checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import hf_helpers  # noqa: E402
from conftest import run_cli  # noqa: E402

import kdcache  # noqa: E402
from kdcache import KdcacheError  # noqa: E402
from kdcache.data.hf import load, prepare  # noqa: E402
from kdcache.models.hf import load_pretrained, load_tokenizer  # noqa: E402


def test_hf_teacher_dump_equals_the_models_own_logits(tmp_path):
    teacher_dir = hf_helpers.save_lm(tmp_path / "teacher", layers=2)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(hf_helpers.TEXTS[:20])))
    done = run_cli("dump-teacher", "--teacher", f"hf:{teacher_dir}", "--dataset", f"jsonl:{data}",
                   "--text-column", "text", "--max-length", "12", "--logits-dtype", "float32", "--batch-size", "8",
                   "--out", str(tmp_path / "cache"), "--no-progress")
    assert done.returncode == 0, done.stderr
    cache = kdcache.TeacherCache.open(tmp_path / "cache")
    tok = load_tokenizer(f"hf:{teacher_dir}")
    assert cache.meta.teacher.tokenizer is not None and cache.meta.teacher.tokenizer.size == len(tok)
    assert cache.meta.mask_key == "attention_mask" and cache.rows == 20

    # the model's own logits, row by row at each row's real length (no padding at all), against
    # the cached rows as stage two reads them (whatever the cache's layout)
    model = load_pretrained(teacher_dir)
    rows = load(f"jsonl:{data}", tokenizer=tok, text_column="text", max_length=12)
    _, _, cached = kdcache.collate(kdcache.CachedTeacherDataset(rows, cache).__getitems__(list(range(20))))
    stored = cached.logits.numpy()
    assert cached.mask.tolist() == rows[:]["attention_mask"].bool().tolist()
    for i, text in enumerate(hf_helpers.TEXTS[:20]):
        ids = tok(text, truncation=True, max_length=12, return_tensors="pt")
        with torch.no_grad():
            own = model(**ids).logits[0].numpy()
        n = own.shape[0]
        np.testing.assert_allclose(stored[i, :n], own, rtol=1e-4, atol=1e-5)
        assert not stored[i, n:].any()  # padding positions stored as zeros


def test_missing_or_non_hf_directory_is_one_clear_line(tmp_path, models_file):
    (tmp_path / "empty").mkdir()
    for spec, expected in ((f"hf:{tmp_path / 'nowhere'}", "no such directory"),
                           (f"hf:{tmp_path / 'empty'}", "not a Hugging Face model directory (no config.json)")):
        done = run_cli("dump-teacher", "--teacher", spec, "--dataset", f"{models_file}:dataset", "--out",
                       str(tmp_path / "c"))
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kdcache: error: ") and expected in lines[0], done.stderr


class _TokenPairs(torch.utils.data.Dataset):
    """Items ``(input_ids (L,), labels (L,))``: the next token, -100 past the end."""

    def __init__(self, n: int = 24, length: int = 10, vocab: int = 28) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, vocab, (n, length + 1), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.ids[i, 1:].clone()
        labels[-2:] = -100
        return self.ids[i, :-1], labels


def test_tuple_input_ids_labels_items_dump_and_train(tmp_path):
    data = _TokenPairs()
    teacher = hf_helpers.gpt2(28, seed=0)
    cache = kdcache.dump_teacher(teacher, data, tmp_path / "c", batch_size=8, progress=False)
    # the labels are the target, not a second model input: the teacher saw input_ids alone
    assert cache.outputs["logits"].shape == (10, 28)
    assert cache.meta.teacher_accuracy.labelled == 24 * 8  # labelled tokens, -100 ignored
    with torch.no_grad():
        own = teacher(data.ids[:4, :-1]).logits
    np.testing.assert_allclose(cache.read("logits", 0, 4), own.numpy(), rtol=1e-2, atol=2e-3)  # float16
    student = hf_helpers.gpt2(28, seed=1)
    result = kdcache.train_student(student, data, cache, epochs=2, batch_size=8, lr=1e-2, alpha=0.5, device="cpu",
                                   progress=False)
    assert [r["epoch"] for r in result.metrics] == [1, 2]
    assert all(np.isfinite(r["kd"]) and r["ce"] > 0 for r in result.metrics)
    assert result.metrics[1]["loss"] < result.metrics[0]["loss"]


def test_a_2_tuple_with_a_float_target_is_refused_in_one_line(tmp_path, models):
    x = torch.randn(10, 12)
    pairs = torch.utils.data.TensorDataset(x, torch.randn(10, 3))  # once taken as two inputs
    with pytest.raises(KdcacheError, match=r"is \(inputs, target\).*dict or a nested tuple"):
        kdcache.dump_teacher(models.teacher(), pairs, tmp_path / "c", progress=False)


def test_datasets_from_disk_parquet_and_jsonl_prepare_the_same_rows(tmp_path):
    tok = hf_helpers.tokenizer()
    ds = hf_helpers.text_dataset(30)
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(str(tmp_path / "disk"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_json(str(tmp_path / "d.jsonl"))
    read = {spec: load(spec, tokenizer=tok, text_column="text", max_length=9)
            for spec in (f"hf-disk:{tmp_path / 'disk'}:train", f"parquet:{tmp_path / 'd.parquet'}",
                         f"jsonl:{tmp_path / 'd.jsonl'}")}
    rows = [r[:] for r in read.values()]
    for other in rows[1:]:
        assert torch.equal(other["input_ids"], rows[0]["input_ids"])
    first = rows[0]
    assert first["input_ids"].shape == (30, 9) and set(first) == {"input_ids", "attention_mask"}
    # rows keep their real length: the mask marks it, padding is the tokenizer's pad id
    real = [len(tok(t, truncation=True, max_length=9)["input_ids"]) for t in hf_helpers.TEXTS[:30]]
    assert first["attention_mask"].sum(1).tolist() == real
    assert (first["input_ids"][first["attention_mask"] == 0] == tok.pad_token_id).all()
    with pytest.raises(KdcacheError, match="has splits .*name one"):
        load(f"hf-disk:{tmp_path / 'disk'}")
    with pytest.raises(KdcacheError, match="no such file"):
        load(f"parquet:{tmp_path / 'missing.parquet'}")


def test_a_datasets_dataset_dumps_and_reads_through_the_api(tmp_path):
    tok = hf_helpers.tokenizer()
    ds = prepare(hf_helpers.text_dataset(24), tok, text_column="text", max_length=10)
    teacher = hf_helpers.gpt2(len(tok))
    cache = kdcache.dump_teacher(teacher, ds, tmp_path / "c", tokenizer=tok, batch_size=8, progress=False)
    assert cache.meta.teacher.tokenizer.size == len(tok)
    # a plain (python-formatted) view of the same rows reads the same cache
    plain = ds.with_format(None)
    rows = kdcache.CachedTeacherDataset(plain, cache)
    inputs, labels, teacher_rows = kdcache.collate(rows.__getitems__([3, 5]))
    assert torch.equal(inputs["input_ids"], ds[[3, 5]]["input_ids"]) and labels.tolist() == [-1, -1]
    assert teacher_rows.mask.tolist() == ds[[3, 5]]["attention_mask"].bool().tolist()
    with pytest.raises(KdcacheError, match="DatasetDict has splits"):
        kdcache.dump_teacher(teacher, pytest.importorskip("datasets").DatasetDict({"train": ds}), tmp_path / "d",
                             progress=False)


def test_a_student_tokenizer_with_another_vocabulary_is_refused_in_one_line(tmp_path):
    real = len(hf_helpers.tokenizer())
    # the teacher's output layer padded past the tokenizer's vocabulary (torchtune #2119)
    teacher_dir = hf_helpers.save_lm(tmp_path / "teacher", vocab=real + 11)
    other = hf_helpers.save_lm(tmp_path / "other", seed=1, tok=hf_helpers.tokenizer(shuffle=3))
    same = hf_helpers.save_lm(tmp_path / "same", seed=1)
    hf_helpers.text_dataset(16).save_to_disk(str(tmp_path / "data"))
    common = ("--dataset", f"hf-disk:{tmp_path / 'data'}", "--text-column", "text", "--max-length", "8")
    assert run_cli("dump-teacher", "--teacher", f"hf:{teacher_dir}", *common, "--vocab-size", str(real),
                   "--out", str(tmp_path / "c"), "--no-progress").returncode == 0
    train = ("train-student", "--cache", str(tmp_path / "c"), *common, "--epochs", "1", "--batch-size", "8",
             "--device", "cpu", "--no-progress")
    refused = run_cli(*train, "--student", f"hf:{other}", "--out", str(tmp_path / "s1"))
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not the teacher's" in lines[0] and "--allow-vocab-mismatch" in lines[0]
    padded = run_cli(*train, "--student", f"hf:{same}", "--out", str(tmp_path / "s2"))
    assert padded.returncode == 0, padded.stderr
    assert json.loads(padded.stdout.splitlines()[0])["epoch"] == 1
