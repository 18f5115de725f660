"""The digits demo, all through the kdcache CLI (run it with scripts/demo.sh).

Hinton's transfer-set setting: the teacher learns from all 1,200 training labels; each student
sees the 1,200 training images with only 120 labels (12 per class). Students train
(a) on those labels alone, (b) distilled from the teacher's cached outputs, (c) distilled
online from the live teacher — same settings and batches, paired by seed (a seed fixes a
student's initial weights and its batches). Then `kdcache report` draws the cache and
`kdcache plot` seed 0's three runs (demo-out/report/, demo-out/runs.png).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

EX = "kdcache.examples.digits"


def kdcache(*args: str, bar: bool = True) -> tuple[float, str]:
    """Run one CLI command (its progress bar, if it has one, off); return (wall time in seconds,
    its stdout) and pass its warnings on (exit on failure)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kdcache", *args, *(["--no-progress"] if bar else [])],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"demo step failed: kdcache {' '.join(args)}\n{done.stderr}")
    for line in done.stderr.splitlines():
        if line.startswith("kdcache: warning:"):
            print(f"      {line}", flush=True)
    return time.perf_counter() - t0, done.stdout


def metrics(run: Path) -> tuple[float, float]:
    """(final eval accuracy, training seconds summed over epochs) of one run."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return lines[-1]["eval_acc"], sum(line["seconds"] for line in lines)


def fmt(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean = statistics.mean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--teacher-epochs", type=int, default=30)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    common = ["--dataset", f"{EX}:transfer", "--eval-dataset", f"{EX}:test", "--student", f"{EX}:student",
              "--epochs", str(args.epochs), "--batch-size", "64", "--lr", "0.01", "--temperature", "4",
              "--alpha", "0.9", "--device", "cpu", "--overwrite"]  # a second demo replaces the first one's runs

    print(f"1/5 training the teacher on 1,200 labels ({args.teacher_epochs} epochs)", flush=True)
    teacher_wall, _ = kdcache("train-student", "--student", f"{EX}:teacher", "--dataset", f"{EX}:train",
                              "--eval-dataset", f"{EX}:test", "--epochs", str(args.teacher_epochs), "--lr", "0.001",
                              "--device", "cpu", "--out", str(out / "teacher"), "--overwrite")
    teacher_acc, teacher_s = metrics(out / "teacher")
    print(f"    teacher: {100 * teacher_acc:.1f}% test accuracy ({teacher_wall:.1f} s)", flush=True)

    print("2/5 dumping its logits and hidden layer 'features' over the transfer set, and its logits over the test "
          "set (for --eval-cache)", flush=True)
    cache, eval_cache = out / "cache", out / "test-cache"
    checkpoint = ["--checkpoint", str(out / "teacher" / "student.pt")]
    dump_s, _ = kdcache("dump-teacher", "--teacher", f"{EX}:teacher", *checkpoint, "--dataset", f"{EX}:transfer",
                        "--hidden", "features", "--out", str(cache), "--device", "cpu", "--overwrite")
    kdcache("dump-teacher", "--teacher", f"{EX}:teacher", *checkpoint, "--dataset", f"{EX}:test", "--out",
            str(eval_cache), "--device", "cpu", "--overwrite")
    print(f"    {cache}: 1,200 rows in {dump_s:.1f} s", flush=True)

    rows: dict[str, list[tuple[float, float]]] = {"labels alone": [], "distilled from cache": [],
                                                   "distilled online": []}
    ways = [("labels alone", []),
            ("distilled from cache", ["--cache", str(cache), "--eval-cache", str(eval_cache)]),
            ("distilled online", ["--online-teacher", f"{EX}:teacher", "--online-teacher-checkpoint",
                                  str(out / "teacher" / "student.pt")])]
    print(f"3/5 training students, {args.seeds} seeds x 3 ways ({args.epochs} epochs each)", flush=True)
    for seed in range(args.seeds):
        for name, extra in ways:
            run = out / f"{name.replace(' ', '-')}-{seed}"
            kdcache("train-student", *common, "--seed", str(seed), "--out", str(run), *extra)
            rows[name].append(metrics(run))
            acc, seconds = rows[name][-1]
            print(f"    seed {seed}  {name:<22} {100 * acc:5.1f}%  ({seconds:.2f} s of training)", flush=True)

    print("4/5 figures: kdcache report (the cache) and kdcache plot (seed 0's three runs)", flush=True)
    _, drawn = kdcache("report", str(cache), "--dataset", f"{EX}:transfer", "--out", str(out / "report"), bar=False)
    _, plotted = kdcache("plot", *(str(out / f"{name.replace(' ', '-')}-0") for name, _ in ways), "--out",
                         str(out / "runs.png"), bar=False)
    for line in (drawn + plotted).splitlines():
        print(f"    {line.split('  ')[0]}", flush=True)

    print("5/5 results (digits test set, 597 images)\n")
    print("| model | test accuracy % (mean ± std) | training wall time s (mean ± std) |")
    print("|---|---|---|")
    print(f"| teacher 64-512-512-10, 1,200 labels | {100 * teacher_acc:.1f} | {teacher_s:.2f} |")
    for name, values in rows.items():
        accs, secs = [v[0] for v in values], [v[1] for v in values]
        print(f"| student 64-16-10, {name} (120 labels) | {fmt(accs, 100)} | {fmt(secs, 1, 2)} |")
    print(f"\nseeds {args.seeds}, {args.epochs} epochs per student; one dump-teacher run "
          f"(1,200 rows, incl. start-up): {dump_s:.1f} s; whole demo {time.perf_counter() - started:.0f} s")
    summary = {name: {"acc": statistics.mean(v[0] for v in values), "seconds": statistics.mean(v[1] for v in values)}
               for name, values in rows.items()}
    summary["teacher"] = {"acc": teacher_acc, "seconds": teacher_s}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
