"""The demo pipeline end to end in miniature, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_demo_pipeline_runs_end_to_end_in_miniature(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--seeds", "2", "--epochs", "3",
                           "--teacher-epochs", "3", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    table = done.stdout
    for row in ["teacher 64-512-512-10", "labels alone", "distilled from cache", "distilled online"]:
        assert row in table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0.5 < summary["teacher"]["acc"] <= 1.0
    assert all(0.0 <= summary[k]["acc"] <= 1.0 for k in ("labels alone", "distilled from cache", "distilled online"))
    # the cache was written once and is complete
    recorded = json.loads((tmp_path / "cache" / "zarr.json").read_text())["attributes"]["kdcache"]
    assert recorded["complete"] and recorded["rows"] == 1200 and "features" in recorded["outputs"]
    # it says what it is doing at each step, each run as it finishes, and draws the cache and the runs
    assert [line[:4] for line in table.splitlines() if line[:1].isdigit()] == ["1/5 ", "2/5 ", "3/5 ", "4/5 ", "5/5 "]
    assert sum("% " in line and "seed " in line for line in table.splitlines()) == 2 * 3
    for figure in ["report/confidence.png", "report/calibration.png", "report/topk_mass.png", "report/bytes.png",
                   "report/report.html", "runs.png"]:
        assert (tmp_path / figure).is_file() and figure in table
    # runs are paired by seed: the cached and the online student start from the same weights
    first = [json.loads((tmp_path / f"{way}-0" / "metrics.jsonl").read_text().splitlines()[0])
             for way in ("distilled-from-cache", "distilled-online")]
    assert abs(first[0]["kd"] - first[1]["kd"]) < 1e-2 * first[1]["kd"]
