"""Cached KD vs plain training vs online KD, and dump vs inference: the cost of distillation.

Same student, data, batch size and steps for every mode; modes run back to back in each repeat;
ratios are taken within a repeat, then the median over repeats (every repeat's ratio is printed).
Modes: plain (labels only), cached (KD from the cache, teacher softmax every step), cached
(precomputed) (the teacher side held at T, kdcache's default), online, KD floor (online KD with
a free teacher), and ModelOpt's online KD where importable. Each mode trains enough epochs that
the measured ones (all but the first) take --min-seconds (10 s full, 1 s quick) in plain mode.
    python scripts/bench.py --quick     # CPU, small models, a few minutes
    python scripts/bench.py             # full size, on the GPU when present
Prints a table and writes bench.json (cached_over_plain, online_over_cached,
ideal_online_over_cached, dump_over_infer, dump_over_infer_hidden (the dump loop's seconds),
dump_wall_over_infer, dump_wall_over_infer_hidden (the whole dump_teacher call), peak_mem_cached_over_plain,
bytes_per_row, machine, load, and the same per model pair with every repeat's ratios).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import kdcache
from kdcache.read import ChunkShuffleBatchSampler, collate
from kdcache.data.items import fetch_batch
from kdcache.models.forward import move_inputs
from kdcache.train.evaluate import LabelledRows


# ---- model pairs (torchvision-free) -------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: ``blocks`` per stage, widths ``w, 2w, 4w, 8w``."""

    def __init__(self, width: int = 64, blocks: int = 2, classes: int = 100) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i in range(4):
            cout = width * 2 ** i
            layers.append(nn.Sequential(*[Block(cin if j == 0 else cout, cout, 2 if (i and j == 0) else 1)
                                          for j in range(blocks)]))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.head(x.mean((2, 3)))


class SmallCNN(nn.Module):
    def __init__(self, width: int = 32, classes: int = 100) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, 1, 1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, 1, 1), nn.BatchNorm2d(4 * width), nn.ReLU())
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-2], sizes[-1]))


def pairs(quick: bool) -> dict[str, dict[str, Any]]:
    if quick:
        return {
            "cnn": dict(teacher=lambda: ResNet(16, 1), student=lambda: SmallCNN(16), shape=(3, 32, 32), rows=1024,
                        hidden=["layer3", "layer4"], batch=128),
            "mlp": dict(teacher=lambda: mlp([512, 2048, 2048, 100]), student=lambda: mlp([512, 512, 100]),
                        shape=(512,), rows=8192, hidden=["1", "3"], batch=256),
        }
    return {
        "cnn": dict(teacher=lambda: ResNet(64, 3), student=lambda: SmallCNN(32), shape=(3, 32, 32), rows=50_000,
                    hidden=["layer3", "layer4"], batch=256),
        "mlp": dict(teacher=lambda: mlp([1024, 8192, 8192, 8192, 1000]), student=lambda: mlp([1024, 1024, 1000]),
                    shape=(1024,), rows=200_000, hidden=["1", "3"], batch=1024, classes=1000),
    }


# ---- measurements ---------------------------------------------------------------------------
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


class _InputBatches(torch.utils.data.Dataset):
    """Batch i of the inputs, read as kdcache's dump reads them (for inference alone)."""

    def __init__(self, ds: TensorDataset, batch: int) -> None:
        self.ds, self.batch = ds, batch

    def __len__(self) -> int:
        return -(-len(self.ds) // self.batch)

    def __getitem__(self, i: int) -> Any:
        return fetch_batch(self.ds, range(i * self.batch, min((i + 1) * self.batch, len(self.ds))))[0]


def infer_seconds(teacher: nn.Module, ds: TensorDataset, batch: int, dev: torch.device) -> float:
    """Teacher inference alone over the dump's batches and input pipeline, outputs discarded."""
    teacher = teacher.to(dev).eval()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
    pin = dev.type == "cuda"
    loader = torch.utils.data.DataLoader(_InputBatches(ds, batch), batch_size=None, num_workers=WORKERS,
                                         pin_memory=pin, prefetch_factor=4 if WORKERS else None)
    sync(dev)
    t0 = time.perf_counter()
    with torch.inference_mode(), amp:
        for x in loader:
            teacher(move_inputs(x, dev, non_blocking=pin))
    sync(dev)
    return time.perf_counter() - t0


WORKERS = 0
try:
    import modelopt.torch.distill  # noqa: F401
    HAVE_MODELOPT = True
except ImportError:  # not a kdcache dependency; the peer row runs where it is installed
    HAVE_MODELOPT = False


class FreeTeacher(nn.Module):
    """A teacher that costs nothing: the same logits (a fixed random row) for every input. Online
    KD with it is the floor of any KD — the KD term itself, without reading or running a teacher."""

    def __init__(self, classes: int = 100) -> None:
        super().__init__()
        self.register_buffer("row", torch.randn(classes, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.row.expand(x.shape[0], -1)


MODES = ("plain", "cached", "cached_pre", "online", "kd_floor")
LABELS = {"plain": "plain", "cached": "cached KD", "cached_pre": "cached KD (precomputed)", "online": "online KD",
          "kd_floor": "KD floor"}


def mode_kwargs(mode: str, pair: dict[str, Any], cache: Any, teacher: nn.Module, dev: torch.device) -> dict[str, Any]:
    return {"plain": {}, "cached": {"cache": cache, "precompute": False}, "cached_pre": {"cache": cache},
            "online": {"teacher": teacher},
            "kd_floor": {"teacher": FreeTeacher(pair.get("classes", 100)).to(dev)}}[mode]


def epoch_seconds(mode: str, pair: dict[str, Any], ds: TensorDataset, cache: Any, teacher: nn.Module,
                  dev: torch.device, epochs: int = 2) -> float:
    """Mean seconds of epochs 2..``epochs`` of kdcache.train_student in ``mode`` (the first
    warms up: lazy init, autotuning, page faults)."""
    torch.manual_seed(0)
    student = pair["student"]()
    result = kdcache.train_student(student, ds, epochs=epochs, batch_size=pair["batch"], lr=1e-3, device=str(dev),
                                   num_workers=WORKERS, progress=False, **mode_kwargs(mode, pair, cache, teacher, dev))
    measured = result.metrics[1:] or result.metrics
    return sum(m["seconds"] for m in measured) / len(measured)


def epoch_cpu_seconds(mode: str, pair: dict[str, Any], ds: TensorDataset, cache: Any, teacher: nn.Module,
                      epochs: int = 3) -> float:
    """CPU seconds of one epoch on one torch thread (the main thread's time, loader workers 0):
    ``(time of epochs+1 epochs - time of 1) / epochs``, so set-up cancels. Load on the machine
    barely moves it, unlike wall time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spent = []
        for n in (1, epochs + 1):
            torch.manual_seed(0)
            student = pair["student"]()
            t0 = time.thread_time()
            kdcache.train_student(student, ds, epochs=n, batch_size=pair["batch"], lr=1e-3, device="cpu",
                                  progress=False, **mode_kwargs(mode, pair, cache, teacher, torch.device("cpu")))
            spent.append(time.thread_time() - t0)
        return (spent[1] - spent[0]) / epochs
    finally:
        torch.set_num_threads(threads)


def modelopt_epoch_seconds(pair: dict[str, Any], ds: TensorDataset, teacher: nn.Module, dev: torch.device,
                           epochs: int = 2) -> float:
    """The peer row: online KD through NVIDIA ModelOpt's ``mtd.convert`` meta-model, set up as
    kdcache's online mode (T=4, KD weight 0.9, batchmean KL x T^2, AdamW 1e-3, the same batches,
    bf16 autocast on CUDA). Mean seconds of epochs 2..``epochs``."""
    import modelopt.torch.distill as mtd
    torch.manual_seed(0)
    with warnings.catch_warnings():  # "weights do not sum to 1.0": the rest goes to the student loss, as here
        warnings.simplefilter("ignore", UserWarning)
        config = {"teacher_model": (_given, (copy.deepcopy(teacher),)),  # a copy: ModelOpt hooks its teacher
                  "criterion": mtd.LogitsDistillationLoss(temperature=4.0, reduction="batchmean"),
                  "loss_balancer": mtd.StaticLossBalancer(kd_loss_weight=0.9)}
        # ModelOpt adds the teacher as a child module, which nn.Sequential.forward would run: wrap it
        model = mtd.convert(_Wrapped(pair["student"]().to(dev)), mode=[("kd_loss", config)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sampler = ChunkShuffleBatchSampler(len(ds), pair["batch"], shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(LabelledRows(ds), batch_sampler=sampler, collate_fn=collate,
                                         num_workers=WORKERS, pin_memory=dev.type == "cuda")
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else nullcontext
    model.train()
    seconds = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        sync(dev)
        t0 = time.perf_counter()
        for x, y, _ in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with amp():
                out = model(x)
            loss = model.compute_kd_loss(student_loss=F.cross_entropy(out.float(), y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(dev)
        seconds.append(time.perf_counter() - t0)
    measured = seconds[1:] or seconds  # the first epoch warms up, as in epoch_seconds
    return sum(measured) / len(measured)


def fetch_us(data: Any, rows: int, batch: int, between: Any) -> float:
    """CPU microseconds per batch of ``data.__getitems__`` (thread time, best of 10 passes over 16
    shuffled batches), with ``between()`` — one training step of the student — run after each
    read so the read finds the CPU caches as a training loop leaves them: what stage two's reading
    costs, free of the machine's wall-clock noise."""
    batches = [np.random.default_rng(i).permutation(rows)[:batch].tolist() for i in range(16)]
    for b in batches:  # first reads: a TensorDataset's rows are digest-checked once
        data.__getitems__(b)
    best = float("inf")
    for _ in range(10):
        spent = 0.0
        for b in batches:
            t0 = time.thread_time()
            data.__getitems__(b)
            spent += time.thread_time() - t0
            between()
        best = min(best, spent / len(batches))
    return best * 1e6


def student_step(pair: dict[str, Any], ds: TensorDataset, dev: torch.device) -> Any:
    """One plain training step of the pair's student on a fixed batch, as a callable."""
    student = pair["student"]().to(dev)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    x, y = (t[:pair["batch"]].to(dev) for t in ds.tensors)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(student(x), y).backward()
        optimizer.step()
        sync(dev)
    return step


def _given(module: nn.Module) -> nn.Module:
    return module


class _Wrapped(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def peak_memory(mode: str, pair_name: str, quick: bool, cache: str, dev: torch.device) -> float:
    """Peak accelerator bytes (CUDA) or peak process RSS (CPU, in a fresh process) of one mode."""
    if dev.type == "cuda":
        return float(json.loads(_mem_probe(mode, pair_name, quick, cache, dev))["peak"])
    out = subprocess.run([sys.executable, __file__, "--mem-probe", mode, "--pair", pair_name, "--cache", cache,
                          "--device", str(dev), "--workers", str(WORKERS)] + (["--quick"] if quick else []),
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak"])


def _mem_probe(mode: str, pair_name: str, quick: bool, cache: str, dev: torch.device) -> str:
    pair = pairs(quick)[pair_name]
    ds = dataset(pair)
    teacher = pair["teacher"]() if mode == "online" else None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    epoch_seconds(mode, pair, ds, cache if mode.startswith("cached") else None, teacher, dev, epochs=1)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return json.dumps({"peak": peak})


def dataset(pair: dict[str, Any]) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(pair["rows"], *pair["shape"], generator=g),
                         torch.randint(0, 100, (pair["rows"],), generator=g))


def bench_pair(name: str, pair: dict[str, Any], quick: bool, dev: torch.device, repeats: int, tmp: Path,
               min_seconds: float) -> dict[str, Any]:
    ds = dataset(pair)
    torch.manual_seed(0)
    teacher = pair["teacher"]().to(dev).eval()
    quiet = {"progress": False, "log": lambda m: None, "device": str(dev), "batch_size": pair["batch"], "num_workers": WORKERS}
    # 2. dump vs inference, interleaved
    infer, dump, dump_h, wall, wall_h = [], [], [], [], []
    caches: dict[str, Any] = {}
    infer_seconds(teacher, ds, pair["batch"], dev)  # warm-up: lazy init, autotuning, thread pools
    for r in range(repeats):
        infer.append(infer_seconds(teacher, ds, pair["batch"], dev))
        t0 = time.perf_counter()  # the whole call (digests, creation, the loop, the finish): wall
        caches["logits"] = kdcache.dump_teacher(teacher, ds, tmp / f"{name}-logits", overwrite=True, **quiet)
        wall.append(time.perf_counter() - t0)
        dump.append(caches["logits"].meta.dump.seconds)  # the dump loop alone
        t0 = time.perf_counter()
        caches["hidden"] = kdcache.dump_teacher(teacher, ds, tmp / f"{name}-hidden", hidden=pair["hidden"],
                                                overwrite=True, **quiet)
        wall_h.append(time.perf_counter() - t0)
        dump_h.append(caches["hidden"].meta.dump.seconds)
    # 1. epochs: every mode, interleaved; the teacher forward alone for the ideal. Enough epochs that
    # the measured ones take min_seconds in plain mode (the fastest)
    first = epoch_seconds("plain", pair, ds, None, teacher, dev, epochs=2)  # the second epoch, warm
    epochs = 1 + max(1, math.ceil(min_seconds / max(first, 1e-6)))
    times: dict[str, list[float]] = {mode: [] for mode in (*MODES, "teacher_fwd")}
    if HAVE_MODELOPT:
        times["modelopt"] = []
    for r in range(repeats):
        for mode in MODES:
            times[mode].append(epoch_seconds(mode, pair, ds, caches["logits"], teacher, dev, epochs))
        if HAVE_MODELOPT:
            times["modelopt"].append(modelopt_epoch_seconds(pair, ds, teacher, dev, epochs))
        times["teacher_fwd"].append(infer_seconds(teacher, ds, pair["batch"], dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    # ratios are taken within each repeat (the modes ran back to back), then the median: a shared
    # machine's slow drift moves both sides of a pair and cancels out
    paired = {
        "cached_over_plain": [c / p for c, p in zip(times["cached"], times["plain"])],
        "cached_pre_over_plain": [c / p for c, p in zip(times["cached_pre"], times["plain"])],
        "online_over_cached": [o / c for o, c in zip(times["online"], times["cached_pre"])],
        "ideal_online_over_cached": [(c + f) / c for c, f in zip(times["cached_pre"], times["teacher_fwd"])],
        "kd_floor_over_plain": [k / p for k, p in zip(times["kd_floor"], times["plain"])],
        "cached_over_kd_floor": [c / k for c, k in zip(times["cached"], times["kd_floor"])],
        "cached_pre_over_kd_floor": [c / k for c, k in zip(times["cached_pre"], times["kd_floor"])],
        "cached_pre_over_cached": [c / k for c, k in zip(times["cached_pre"], times["cached"])],
        "dump_over_infer": [i / d for i, d in zip(infer, dump)],
        "dump_over_infer_hidden": [i / d for i, d in zip(infer, dump_h)],
        "dump_wall_over_infer": [i / d for i, d in zip(infer, wall)],
        "dump_wall_over_infer_hidden": [i / d for i, d in zip(infer, wall_h)],
    }
    if HAVE_MODELOPT:
        paired["modelopt_over_cached"] = [m / c for m, c in zip(times["modelopt"], times["cached_pre"])]
        paired["modelopt_over_online"] = [m / o for m, o in zip(times["modelopt"], times["online"])]
    # the same epochs in CPU time on one thread: what load on a shared machine cannot move
    cpu = {mode: epoch_cpu_seconds(mode, pair, ds, caches["logits"], teacher)
           for mode in ("plain", "cached", "cached_pre", "kd_floor")} if dev.type == "cpu" else {}
    # the cache's own per-batch work in stage two, in CPU time: reading its rows vs the plain path's
    step = student_step(pair, ds, dev)
    fetch = {"plain": fetch_us(LabelledRows(ds), len(ds), pair["batch"], step),
             "cached": fetch_us(kdcache.CachedTeacherDataset(ds, caches["logits"], dtype=None), len(ds), pair["batch"],
                                step)}
    steps = -(-len(ds) // pair["batch"])
    # 3. peak memory per mode; 4. bytes on disk per row
    mem = {mode: peak_memory(mode, name, quick, caches["logits"].path, dev) for mode in ("plain", "cached_pre", "online")}
    sizes = caches["hidden"].nbytes_on_disk()
    rows = caches["hidden"].rows
    return {
        "rows": pair["rows"], "batch_size": pair["batch"], "epochs": epochs,
        "epoch_s": med, "epoch_s_min": {k: min(v) for k, v in times.items()},
        **{key: statistics.median(values) for key, values in paired.items()},
        "paired": paired, "epoch_s_all": times,
        "cpu_epoch_s": cpu, "cpu_over_plain": {m: v / cpu["plain"] for m, v in cpu.items()} if cpu else {},
        "cached_over_plain_spread": [min(paired["cached_over_plain"]), max(paired["cached_over_plain"])],
        "cached_over_plain_best": min(times["cached"]) / min(times["plain"]),
        "fetch_us_per_batch": fetch,
        "cache_read_share_of_plain_step": (fetch["cached"] - fetch["plain"]) / (med["plain"] / steps * 1e6),
        "infer_s": statistics.median(infer), "dump_s": statistics.median(dump), "dump_hidden_s": statistics.median(dump_h),
        "dump_rows_per_s": pair["rows"] / statistics.median(dump),
        "peak_mem_bytes": mem, "peak_mem_cached_over_plain": mem["cached_pre"] / mem["plain"],
        "peak_mem_online_over_plain": mem["online"] / mem["plain"],
        "bytes_per_row": {path: size / rows for path, size in sizes.items()},
    }


def spec_teacher(pair: str = "cnn", quick: bool = True) -> nn.Module:
    """Spec for the CLI (``scripts/bench.py:spec_teacher``): the pair's teacher, seed 0."""
    torch.manual_seed(0)
    return pairs(quick)[pair]["teacher"]()


def spec_data(pair: str = "cnn", quick: bool = True, rows: int | None = None) -> TensorDataset:
    p = dict(pairs(quick)[pair])
    if rows:
        p["rows"] = rows
    return dataset(p)


def bench_dump_processes(quick: bool, dev: torch.device, tmp: Path) -> dict[str, Any]:
    """dump-teacher over the same data from 1 process and from 2 under torchrun (gloo on CPU):
    rows/s from each cache's own dump record (start-up excluded) and wall seconds."""
    here = Path(__file__).resolve()
    rows = 8192 if quick else 50_000
    common = ["-m", "kdcache", "dump-teacher", "--teacher", f"{here}:spec_teacher", "--dataset", f"{here}:spec_data",
              "--teacher-kwargs", json.dumps({"quick": quick}), "--dataset-kwargs", json.dumps({"quick": quick, "rows": rows}),
              "--hidden", "layer3", "--hidden", "layer4", "--no-progress", "--device", str(dev.type)]
    out: dict[str, Any] = {"rows": rows}
    for procs in (1, 2):
        launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
                                     if procs > 1 else [])
        cache = tmp / f"procs{procs}"
        t0 = time.perf_counter()
        done = subprocess.run(launch + common + ["--out", str(cache)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"dump with {procs} processes failed:\n{done.stderr[-2000:]}")
        wall = time.perf_counter() - t0
        stats = kdcache.TeacherCache.open(cache).meta.dump
        out[f"procs_{procs}"] = {"rows_per_s": stats.rows_per_s, "dump_s": stats.seconds, "wall_s": round(wall, 2)}
    out["two_over_one"] = out["procs_2"]["rows_per_s"] / out["procs_1"]["rows_per_s"]
    return out


def machine(dev: torch.device) -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    cpu = f"{platform.machine()} {os.cpu_count()} cores ({model}), {torch.get_num_threads()} torch threads"
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)}, {cpu}"
    return f"CPU only, {cpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, small models, under 2 minutes")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="measured epochs per mode take at least this long in plain mode [10 full, 1 quick]")
    parser.add_argument("--pairs", default="cnn,mlp")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers for every training mode (default 0 quick, 4 full)")
    parser.add_argument("--no-dump-procs", action="store_true", help="skip the 1 vs 2 process dump (torchrun) figure")
    parser.add_argument("--mem-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pair", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dev = torch.device(args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda"))
    global WORKERS
    WORKERS = args.workers if args.workers is not None else (0 if args.quick else 4)
    if args.mem_probe:
        print(_mem_probe(args.mem_probe, args.pair, args.quick, args.cache, dev))
        return
    repeats = args.repeats or 5
    if HAVE_MODELOPT:
        import modelopt
        peer = f"peer: nvidia-modelopt {modelopt.__version__} (mtd.convert online KD) run on every pair"
    else:
        peer = "nvidia-modelopt not importable: no peer row"
    results: dict[str, Any] = {}
    load_at_start = os.getloadavg()
    print(f"{machine(dev)}; load average at start {load_at_start[0]:.2f} {load_at_start[1]:.2f} {load_at_start[2]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.pairs.split(","):
            results[name] = bench_pair(name, pairs(args.quick)[name], args.quick, dev, repeats, Path(tmp),
                                       args.min_seconds if args.min_seconds is not None else (1.0 if args.quick else 10.0))
            r = results[name]
            print(f"\n[{name}] {r['rows']} rows, batch {r['batch_size']}, {WORKERS} loader workers, {r['epochs'] - 1} "
                  f"measured epochs per mode, median of {repeats} repeats, {machine(dev)}")
            print("  epoch s: " + "  ".join(f"{LABELS.get(k, k)} {r['epoch_s'][k]:.3f}" for k in (*MODES, "teacher_fwd")))
            for key, values in r["paired"].items():
                print(f"  {key:<28} {r[key]:.3f}  (repeats: {' '.join(f'{v:.3f}' for v in values)}; "
                      f"spread {min(values):.3f}-{max(values):.3f})")
            print(f"  online_over_cached reached {r['online_over_cached'] / r['ideal_online_over_cached']:.3f} of its ideal")
            if r["cpu_over_plain"]:
                print("  epoch CPU time, 1 torch thread (ms): " + "  ".join(
                    f"{LABELS[k]} {1e3 * v:.1f} ({r['cpu_over_plain'][k]:.3f} x plain)" for k, v in r["cpu_epoch_s"].items()))
            f = r["fetch_us_per_batch"]
            print(f"  reading a batch (CPU time): plain {f['plain']:.0f} us, cached {f['cached']:.0f} us: the cache adds "
                  f"{100 * r['cache_read_share_of_plain_step']:.2f}% of a plain step")
            print(f"  dump {r['dump_rows_per_s']:,.0f} rows/s")
            print(f"  peak mem cached/plain {r['peak_mem_cached_over_plain']:.3f}  online/plain {r['peak_mem_online_over_plain']:.3f}")
            print("  bytes/row: " + ", ".join(f"{k} {v:,.0f}" for k, v in r["bytes_per_row"].items()))
        procs = None
        if not args.no_dump_procs and dev.type == "cpu":
            procs = bench_dump_processes(args.quick, dev, Path(tmp))
            print(f"\n[dump processes] CNN teacher + 2 hidden, {procs['rows']} rows, {machine(dev)}: "
                  f"1 process {procs['procs_1']['rows_per_s']:,.0f} rows/s, 2 processes (torchrun, gloo) "
                  f"{procs['procs_2']['rows_per_s']:,.0f} rows/s: x{procs['two_over_one']:.2f}")
    main_pair = results.get("cnn") or next(iter(results.values()))
    summary = {key: main_pair[key] for key in ("cached_over_plain", "online_over_cached", "ideal_online_over_cached",
                                               "dump_over_infer", "dump_over_infer_hidden",
                                               "peak_mem_cached_over_plain", "bytes_per_row")}
    summary.update({"machine": machine(dev), "load_before_after": [load_at_start, os.getloadavg()],
                    "mode": "quick" if args.quick else "full", "repeats": repeats,
                    "loader_workers": WORKERS,
                    "peer": peer, "pairs": results, "dump_processes": procs})
    Path("bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    end = os.getloadavg()
    print(f"\n{peer}\nload average at the end {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}\nwrote bench.json")


if __name__ == "__main__":
    main()
