"""kdcache report and kdcache plot: figures of a cache and of runs, with numbers from them."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import kdcache
from kdcache import KdcacheError
from kdcache.report import cache_stats, plot_runs, read_metrics, write_report

from conftest import run_cli

PNG = b"\x89PNG\r\n\x1a\n"
VOCAB = 40  # the tiny LM's real vocabulary (its output layer has 48)


@pytest.fixture()
def dense(tmp_path, models):
    ds = models.dataset(300, unlabelled_from=200)
    cache = kdcache.dump_teacher(models.teacher(), ds, tmp_path / "dense", hidden=["body"], progress=False,
                                 teacher_info={"spec": "<script>alert(1)</script>"})
    return ds, cache


def test_report_writes_each_figure_with_its_panels(dense, tmp_path):
    ds, cache = dense
    report = write_report(cache, tmp_path / "r", ds)
    panels = {f.name: f.panels for f in report.figures}
    assert panels == {
        "confidence": ["teacher confidence (top-1 probability)", "teacher entropy, nats"],
        "calibration": [f"reliability on transfer-set rows (ECE {report.stats.calibration_error():.3f})",
                        "teacher accuracy per class"],
        "topk_mass": ["probability mass kept by the top k classes"],
        "bytes": ["bytes per row by array (82 in all)"]}  # 10 logits + 64 hidden + 8 digest
    for f in report.figures:
        assert f.path.read_bytes().startswith(PNG)
    page = report.page.read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "<script>" not in page and "&lt;script&gt;" in page  # the cache's own text is escaped


def test_report_numbers_come_from_the_cache(dense, models):
    ds, cache = dense
    stats = cache_stats(cache, ds)
    p = torch.softmax(torch.from_numpy(cache.read("logits", 0, 300)).float(), -1)
    assert stats.rows == stats.positions == 300
    np.testing.assert_allclose(np.sort(stats.confidence), np.sort(p.max(-1).values.numpy()), rtol=1e-6)
    assert stats.mass_k[0] == 1 and stats.mass_k[-1] == 5  # k = 1 .. V
    assert set(stats.mass) == {1.0, 4.0}
    for mass in stats.mass.values():
        np.testing.assert_allclose(mass[:, -1], 1.0, atol=1e-6)  # all V classes keep all the mass
        assert (np.diff(mass, axis=1) >= -1e-6).all()  # more classes never keep less
    np.testing.assert_allclose(np.sort(stats.mass[1.0][:, 0]), np.sort(stats.confidence), rtol=1e-6)
    p4 = torch.softmax(torch.from_numpy(cache.read("logits", 0, 300)).float() / 4, -1)
    np.testing.assert_allclose(np.sort(stats.mass[4.0][:, 0]), np.sort(p4.max(-1).values.numpy()), rtol=1e-6)
    # accuracy on the labelled rows is what the dump recorded in the cache
    _, _, right = stats._right()
    assert right.size == 200 and right.mean() == pytest.approx(cache.meta.teacher_accuracy.accuracy)
    assert stats.reliability()[2].sum() == 200
    assert stats.row_bytes == {"logits": 10, "hidden/body": 64, "_row_digest": 8}


def test_report_of_sparse_sequence_caches_counts_real_tokens_only(tmp_path, models):
    ds = models.tokens()
    real = int(sum(ds[i]["attention_mask"].sum() for i in range(len(ds))))
    topk = kdcache.dump_teacher(models.tiny_lm(), ds, tmp_path / "t", topk=8, vocab_size=VOCAB, progress=False)
    sampled = kdcache.dump_teacher(models.tiny_lm(), ds, tmp_path / "s", sample_k=16, vocab_size=VOCAB,
                                   progress=False)
    dense = kdcache.dump_teacher(models.tiny_lm(), ds, tmp_path / "d", vocab_size=VOCAB, progress=False)
    t = write_report(topk, tmp_path / "rt", ds)
    assert t.stats.positions == real and t.stats.labels is not None
    logits = models.tiny_lm()(**{k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ("input_ids",
                                                                                               "attention_mask")})
    z = logits["logits"][..., :VOCAB].detach()[torch.stack([ds[i]["attention_mask"] for i in range(len(ds))]).bool()]
    expected_kept = torch.softmax(z, -1).topk(8, -1).values.sum(-1).numpy()
    np.testing.assert_allclose(np.sort(t.stats.kept_mass), np.sort(expected_kept), atol=2e-3)  # float16 values
    assert {f.name: f.panels for f in t.figures}["topk_mass"] == ["mass the stored top-8 keep"]
    s = write_report(sampled, tmp_path / "rs")
    assert s.stats.positions == real and s.stats.distinct.max() <= 16
    assert {f.name: f.panels for f in s.figures}["topk_mass"] == ["distinct ids among 16 draws"]
    d = cache_stats(dense)  # padding stored as zeros is recognised without the dataset
    assert d.positions == real and d.classes == VOCAB
    np.testing.assert_allclose(np.sort(d.mass[1.0][:, 7]), np.sort(expected_kept), atol=2e-3)


def test_report_reads_a_bounded_sample(dense):
    ds, cache = dense
    stats = cache_stats(cache, max_positions=100)
    assert 0 < stats.rows <= 100 and any("of 300 rows" in note for note in stats.notes)
    with pytest.raises(KdcacheError, match="max_positions must be >= 1"):
        cache_stats(cache, max_positions=0)


def _run(tmp_path, models, name, cache, **kwargs):
    out = tmp_path / name
    kdcache.train_student(models.student(), models.dataset(300, unlabelled_from=200), cache, epochs=3,
                          eval_dataset=models.dataset(64, seed=1), out=out, progress=False, **kwargs)
    return out


def test_plot_draws_runs_side_by_side_from_their_metrics(dense, tmp_path, models):
    _, cache = dense
    eval_cache = kdcache.dump_teacher(models.teacher(), models.dataset(64, seed=1), tmp_path / "e", progress=False)
    distilled = _run(tmp_path, models, "distilled", cache, eval_cache=eval_cache)
    plain = _run(tmp_path, models, "plain", None)
    figure = plot_runs([distilled, plain], tmp_path / "runs.png")
    assert figure.path.read_bytes().startswith(PNG)
    assert figure.panels == ["eval accuracy", "eval loss", "KD term", "CE term", "top-1 agreement with the teacher",
                             "samples/s", "KL to the teacher: train vs held-out"]
    recorded = read_metrics(distilled)
    assert figure.series["eval accuracy"]["distilled"] == ([1, 2, 3], [m["eval_acc"] for m in recorded])
    assert figure.series["KL to the teacher: train vs held-out"]["distilled (held-out)"][1] == \
        [m["eval_kl"] for m in recorded]
    assert set(figure.series["KD term"]) == {"distilled"}  # plain training has no KD term and no teacher
    assert set(figure.series["top-1 agreement with the teacher"]) == {"distilled (train)", "distilled (held-out)"}
    assert set(figure.series["CE term"]) == {"distilled", "plain"}


def test_report_and_plot_from_the_command_line(dense, tmp_path, models_file):
    _, cache = dense
    report = run_cli("report", cache.path, "--out", str(tmp_path / "r"), "--dataset", f"{models_file}:dataset",
                     "--dataset-kwargs", '{"unlabelled_from": 200}')
    assert report.returncode == 0, report.stderr
    lines = report.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [str(tmp_path / "r" / n) for n in (
        "confidence.png", "calibration.png", "topk_mass.png", "bytes.png", "report.html")]
    (tmp_path / "empty").mkdir()
    refused = run_cli("plot", str(tmp_path / "empty"), "--out", str(tmp_path / "p.png"))
    assert refused.returncode == 2 and refused.stderr.startswith("kdcache: error: cannot read")
    assert len(refused.stderr.splitlines()) == 1 and not (tmp_path / "p.png").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"epoch": 1}\n[1, 2]\n')
    refused = run_cli("plot", str(bad))
    assert refused.returncode == 2 and "line 2 is not a JSON object" in refused.stderr


def test_without_matplotlib_figures_are_one_line_naming_the_extra():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from kdcache.report.canvas import new_figure\n"
            "from kdcache import KdcacheError\n"
            "try:\n    new_figure(1, 1)\nexcept KdcacheError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "figures need matplotlib: pip install 'kdcache[plot]'"
