"""Consistent teacher under augmentation, on the bundled digits (Beyer et al.'s "patient and
consistent" point, FKD's fix).

The teacher (64-512-512-10) trains on all 1,200 labelled training images, randomly shifted by up
to one pixel and noised on every read (``kdcache.examples.digits:augmented_train``). Students
(64-16-10) see the same 1,200 images with 120 labels, augmented the same way, and distil:

- **K=8 consistent views**: ``dump-teacher --views 8`` caches the teacher's outputs for 8 seeded
  views per image; epoch e replays view e % 8 bit for bit, so inputs and targets always match.
- **first view's targets**: the cache holds one view per image, but the student's inputs are
  fresh random augmentations (what a per-sample logit cache without views gives): targets
  belong to another input than the one trained on.
- **labels alone**: the same augmented inputs, the 120 labels only.

Same seeds, settings and batches; accuracy on the clean 597-image test set, 5 seeds.

    python scripts/demo_views.py          # ~2 min on 2 CPU cores; writes demo-out/views.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdcache import dump_teacher, train_student
from kdcache.train import evaluate
from kdcache.examples import digits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("demo-out") / "views.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    common = dict(eval_dataset=digits.test(), epochs=args.epochs, batch_size=64, lr=0.01, temperature=4.0,
                  alpha=0.9, device="cpu", progress=False)

    torch.manual_seed(0)
    teacher = digits.teacher()
    train_student(teacher, digits.augmented_train(), None, eval_dataset=digits.test(), epochs=30, lr=1e-3,
                  device="cpu", progress=False)
    teacher_acc = evaluate(teacher, digits.test(), device="cpu")["eval_acc"]
    print(f"teacher trained on augmented digits: test accuracy {100 * teacher_acc:.1f}%", flush=True)

    with tempfile.TemporaryDirectory() as work:
        silent = dict(progress=False, log=lambda m: None, device="cpu")
        consistent = dump_teacher(teacher, digits.augmented_transfer(), Path(work) / "k8", views=args.views, seed=0,
                                  **silent)
        first_view = dump_teacher(teacher, digits.augmented_transfer(), Path(work) / "k1", views=1, seed=0, **silent)
        runs: dict[str, list[float]] = {f"K={args.views} consistent views": [], "first view's targets, fresh inputs": [],
                                        "labels alone": []}
        for seed in range(args.seeds):
            for name, data, cache, extra in [
                    (f"K={args.views} consistent views", digits.augmented_transfer(), consistent, {}),
                    ("first view's targets, fresh inputs", digits.augmented_transfer(fresh=True), first_view,
                     {"allow_input_mismatch": True}),
                    ("labels alone", digits.augmented_transfer(), None, {})]:
                torch.manual_seed(seed)
                result = train_student(digits.student(), data, cache, seed=seed, **common, **extra)
                runs[name].append(result.final["eval_acc"])
            print(f"seed {seed}: " + ", ".join(f"{k} {100 * v[-1]:.1f}" for k, v in runs.items()), flush=True)

    print(f"\n| student 64-16-10, augmented inputs, 120 labels | test accuracy % (mean ± std over {args.seeds} seeds) |")
    print("|---|---|")
    for name, accs in runs.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {name} | {100 * statistics.mean(accs):.1f} ± {100 * std:.1f} |")
    print(f"\nteacher {100 * teacher_acc:.1f}%; {args.epochs} epochs per student; whole run {time.perf_counter() - t0:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"teacher_acc": teacher_acc, "views": args.views, "epochs": args.epochs,
                                    "runs": runs, "seconds": time.perf_counter() - t0}, indent=2) + "\n")


if __name__ == "__main__":
    main()
