"""The digits demo, all through the kdcache CLI (run it with scripts/demo.sh).

Hinton's transfer-set setting: the teacher learns from all 1,200 training labels; each student
sees the 1,200 training images with only 120 labels (12 per class). Students train
(a) on those labels alone, (b) distilled from the teacher's cached outputs, (c) distilled
online from the live teacher — same seeds, same settings, same batches.
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


def kdcache(*args: str) -> float:
    """Run one CLI command; return its wall time in seconds (exit on failure)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kdcache", *args, "--no-progress"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"demo step failed: kdcache {' '.join(args)}\n{done.stderr}")
    return time.perf_counter() - t0


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
              "--alpha", "0.9", "--device", "cpu"]

    print(f"1/4 training the teacher on 1,200 labels ({args.teacher_epochs} epochs)", flush=True)
    kdcache("train-student", "--student", f"{EX}:teacher", "--dataset", f"{EX}:train", "--eval-dataset",
            f"{EX}:test", "--epochs", str(args.teacher_epochs), "--lr", "0.001", "--device", "cpu",
            "--out", str(out / "teacher"))
    teacher_acc, teacher_s = metrics(out / "teacher")

    print("2/4 dumping its logits and hidden layer 'features' over the transfer set", flush=True)
    cache = out / "cache"
    dump_s = kdcache("dump-teacher", "--teacher", f"{EX}:teacher", "--checkpoint", str(out / "teacher" / "student.pt"),
                     "--dataset", f"{EX}:transfer", "--hidden", "features", "--out", str(cache), "--device", "cpu",
                     "--overwrite")

    rows = {"labels alone": [], "distilled from cache": [], "distilled online": []}
    print(f"3/4 training students, {args.seeds} seeds x 3 ways", flush=True)
    for seed in range(args.seeds):
        for name, extra in [("labels alone", []), ("distilled from cache", ["--cache", str(cache)]),
                            ("distilled online", ["--online-teacher", f"{EX}:teacher", "--online-teacher-checkpoint",
                                                  str(out / "teacher" / "student.pt")])]:
            run = out / f"{name.replace(' ', '-')}-{seed}"
            kdcache("train-student", *common, "--seed", str(seed), "--out", str(run), *extra)
            rows[name].append(metrics(run))

    print("4/4 results (digits test set, 597 images)\n")
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
