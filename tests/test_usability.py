"""The mistakes a new user makes, and the caches they bring: an embedding teacher through the CLI,
a forgotten --checkpoint, a cache root given as a cache, errors that name the caller's options."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import kdcache
from kdcache import KdcacheError

from conftest import run_cli

EX = "kdcache.examples.digits"


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """The demo's teacher after 5 epochs (far above chance), and its state dict on disk."""
    from kdcache.examples import digits

    teacher = digits.trained_teacher(checkpoint=None, epochs=5)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    return teacher, path


def _bert(path: Path, tok, layers: int, seed: int) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, pad_token_id=0)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_an_embedding_teacher_trains_a_student_from_the_cli_with_objective_mse(tmp_path):
    pytest.importorskip("transformers")
    import hf_helpers

    tok = hf_helpers.tokenizer()
    _bert(tmp_path / "teacher", tok, layers=2, seed=0)
    _bert(tmp_path / "student", tok, layers=1, seed=1)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in hf_helpers.TEXTS))
    data = ["--dataset", "jsonl:t.jsonl", "--text-column", "text", "--max-length", "12"]
    dumped = run_cli("dump-teacher", "--teacher", "hf:teacher", "--hf-class", "AutoModel", "--output-key",
                     "last_hidden_state", *data, "--out", "emb", "--no-progress", cwd=tmp_path)
    assert dumped.returncode == 0, dumped.stderr
    info = run_cli("info", "emb", cwd=tmp_path)
    assert "logits: output last_hidden_state, 16 dims (a regression target" in info.stdout, info.stdout
    assert "classes" not in info.stdout

    student = ["train-student", "--student", "hf:student", "--hf-class", "AutoModel", *data, "--cache", "emb",
               "--epochs", "3", "--lr", "0.01", "--no-progress"]
    refused = run_cli(*student, "--out", "kl", cwd=tmp_path)  # the default objective compares logits
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "kdcache: error: this cache holds a regression target (an embedding or hidden state, not logits): distil it "
        "with --objective mse or --objective cosine")
    assert not (tmp_path / "kl").exists()
    trained = run_cli(*student, "--objective", "mse", "--output-key", "last_hidden_state", "--out", "mse",
                      cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    epochs = [json.loads(line) for line in (tmp_path / "mse" / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert epochs[-1]["train_kl"] < 0.7 * epochs[0]["train_kl"]  # the student's states move toward the teacher's
    assert "agree" not in epochs[-1] and epochs[-1]["ce"] == 0.0  # no classes: no agreement, no labels' term

    pytest.importorskip("matplotlib")
    from kdcache.report import write_report

    report = write_report(kdcache.TeacherCache(tmp_path / "emb"), tmp_path / "report")
    assert {f.name: f.panels for f in report.figures} == {
        "norms": ["teacher output norms (16 dims)", "cosine similarity of the outputs"],
        "bytes": ["bytes per row by array (40 in all)"]}  # 16 float16 dims per token + 8 digest
    assert abs(float(report.stats.norms.mean()) - 4.0) < 0.1  # a LayerNorm output: norm sqrt(16)


def test_a_forgotten_checkpoint_warns_in_one_line_and_info_and_ls_show_it(tmp_path, digits_teacher):
    # the digits teacher as built, its checkpoint forgotten (seeded: an untrained net's accuracy varies with its
    # draw, 0.06-0.14 over seeds 0-5; seed 0's is 0.10, at chance)
    (tmp_path / "forgot.py").write_text("import torch\nfrom kdcache.examples import digits\n\n\ndef teacher():\n"
                                        "    torch.manual_seed(0)\n    return digits.teacher()\n")
    untrained = run_cli("dump-teacher", "--teacher", "forgot.py:teacher", "--dataset", f"{EX}:transfer", "--out",
                        "store/untrained", "--no-progress", cwd=tmp_path)
    assert untrained.returncode == 0, untrained.stderr
    warned = [line for line in untrained.stderr.splitlines() if line.startswith("kdcache: warning:")]
    assert len(warned) == 1 and "is at chance on the transfer set's labelled rows" in warned[0]
    assert warned[0].endswith("did you forget --checkpoint? An untrained teacher has nothing to teach")

    checkpoint = digits_teacher[1]
    trained = run_cli("dump-teacher", "--teacher", f"{EX}:teacher", "--checkpoint", str(checkpoint), "--dataset",
                      f"{EX}:transfer", "--out", "store/trained", "--no-progress", cwd=tmp_path)
    assert trained.returncode == 0 and "warning" not in trained.stderr, trained.stderr

    info = run_cli("info", "store/untrained", cwd=tmp_path).stdout
    assert "checkpoint   none" in info and "AT CHANCE" in info
    accuracy = kdcache.TeacherCache(tmp_path / "store" / "trained").meta.teacher_accuracy
    assert accuracy.labelled == 120 and accuracy.accuracy > 0.8
    listed = run_cli("ls", "store", cwd=tmp_path).stdout.splitlines()
    assert len(listed) == 2 and listed[0] != listed[1]
    assert f"checkpoint {checkpoint}  accuracy {accuracy.accuracy:.4f} ({accuracy.correct}/120)" in listed[0]
    assert "checkpoint none  accuracy" in listed[1] and "AT CHANCE" in listed[1]

    from kdcache.dump.teacher import UntrainedTeacherWarning
    from kdcache.examples import digits
    with pytest.warns(UntrainedTeacherWarning, match="did you forget to load its trained weights"):
        kdcache.dump_teacher(digits.teacher(), digits.transfer(), tmp_path / "py", progress=False)


def test_a_cache_root_given_as_a_cache_names_the_caches_in_it(tmp_path, models_file):
    dumped = run_cli("dump-teacher", "--teacher", f"{models_file}:teacher", "--dataset", f"{models_file}:dataset",
                     "--cache-root", "root", "--no-progress", cwd=tmp_path)
    cache = dumped.stdout.strip().splitlines()[-1]
    refused = run_cli("train-student", "--student", f"{models_file}:student", "--dataset", f"{models_file}:dataset",
                      "--cache", "root", "--out", "run", "--no-progress", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"kdcache: error: root is a cache root, not a cache: it holds {cache}; give one of them (kdcache ls root "
        "describes each)")
    assert not (tmp_path / "run").exists()
    opened = kdcache.TeacherCache(tmp_path / cache)  # as TeacherCache.open does
    assert opened.rows == 300 and opened.complete


def test_an_eval_cache_of_another_dataset_names_the_flag(tmp_path, models_file):
    spec = f"{models_file}:"
    for out, kwargs in (("train", "{}"), ("held", '{"n": 64, "seed": 9}')):
        assert run_cli("dump-teacher", "--teacher", spec + "teacher", "--dataset", spec + "dataset",
                       "--dataset-kwargs", kwargs, "--out", out, "--no-progress", cwd=tmp_path).returncode == 0
    refused = run_cli("train-student", "--student", spec + "student", "--dataset", spec + "dataset", "--cache",
                      "train", "--eval-dataset", spec + "dataset", "--eval-cache", "held", "--out", "run",
                      "--no-progress", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith(
        "kdcache: error: --eval-cache with --eval-dataset: the dataset has 300 rows but cache held has 64"), \
        refused.stderr


def test_report_draws_calibration_on_the_held_out_cache(tmp_path, digits_teacher):
    pytest.importorskip("matplotlib")
    from kdcache.examples import digits
    from kdcache.report import write_report

    teacher = digits_teacher[0]
    cache = kdcache.dump_teacher(teacher, digits.transfer(), tmp_path / "c", progress=False)
    held = kdcache.dump_teacher(teacher, digits.test(), tmp_path / "t", progress=False)
    on_own = write_report(cache, tmp_path / "own", digits.transfer())
    report = write_report(cache, tmp_path / "r", digits.transfer(), eval_cache=held, eval_dataset=digits.test())
    panels = {f.name: f.panels for f in report.figures}
    ece = report.held_out.calibration_error()
    assert panels["calibration"][0] == f"reliability on held-out rows (ECE {ece:.3f})"
    assert report.held_out.labelled().sum() == 597  # every test image, not the 120 labelled transfer rows
    assert on_own.stats.labelled().sum() == 120
    assert "calibration drawn on the transfer set" in on_own.page.read_text()
    assert "calibration drawn on the transfer set" not in report.page.read_text()
    with pytest.raises(KdcacheError, match="eval_cache needs eval_dataset"):
        write_report(cache, tmp_path / "x", eval_cache=held)


def test_layout_is_a_dump_teacher_flag(tmp_path, models_file):
    spec = f"{models_file}:"
    for layout in ("packed", "padded"):
        done = run_cli("dump-teacher", "--teacher", spec + "tiny_lm", "--dataset", spec + "tokens", "--layout", layout,
                       "--out", layout, "--no-progress", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert kdcache.TeacherCache.open(tmp_path / "packed").meta.packed is not None
    assert kdcache.TeacherCache.open(tmp_path / "padded").meta.packed is None


def test_export_reads_a_text_dataset_with_its_own_options(tmp_path):
    pytest.importorskip("pyarrow")
    pytest.importorskip("transformers")
    import hf_helpers

    hf_helpers.save_lm(tmp_path / "lm")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in hf_helpers.TEXTS[:16]))
    text = ["--text-column", "text", "--max-length", "12"]
    assert run_cli("dump-teacher", "--teacher", "hf:lm", "--dataset", "jsonl:t.jsonl", *text, "--topk", "4", "--out",
                   "c", "--no-progress", cwd=tmp_path).returncode == 0
    refused = run_cli("export", "c", "--dataset", "jsonl:t.jsonl", "--out", "c.parquet", cwd=tmp_path)
    assert refused.returncode == 2 and "tokenize its text with --text-column" in refused.stderr
    assert "--text-column" in run_cli("export", "--help").stdout  # an option export has
    exported = run_cli("export", "c", "--dataset", "jsonl:t.jsonl", *text, "--tokenizer", "lm", "--out", "c.parquet",
                       cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "c.parquet").stat().st_size > 0


def test_kdtrainer_errors_name_python_arguments(tmp_path):
    pytest.importorskip("transformers")
    import hf_helpers
    from transformers import TrainingArguments

    from kdcache.data.hf import pad_rows
    from kdcache.integrations.hf import KDTrainer

    tok = hf_helpers.tokenizer()
    ds = pad_rows(hf_helpers.text_dataset(16).map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"]),
                  12, 0)
    cache = kdcache.dump_teacher(hf_helpers.gpt2(len(tok)), ds, tmp_path / "c", topk=4, progress=False)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    with pytest.raises(KdcacheError) as err:
        KDTrainer(model=hf_helpers.gpt2(len(tok), seed=1), args=args, train_dataset=ds, kd_cache=cache,
                  objective="mse")
    assert str(err.value) == ("a topk cache holds logits: distil it with a divergence (objective='kl', reverse_kl or jsd), "
                              "not mse")
    with pytest.raises(KdcacheError, match=r"^hints 'h' must look like"):
        KDTrainer(model=hf_helpers.gpt2(len(tok), seed=1), args=args, train_dataset=ds, kd_cache=cache, hints=["h"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on the way
        KDTrainer(model=hf_helpers.gpt2(len(tok), seed=1), args=args, train_dataset=ds, kd_cache=cache)
