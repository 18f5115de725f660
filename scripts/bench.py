"""Cached KD vs plain training vs online KD, and dump vs inference: the cost of distillation.

Same student, data, batch size and steps for every mode; modes run back to back in each repeat;
ratios are taken within a repeat, then the median over repeats.
    python scripts/bench.py --quick     # CPU, small models, under 2 minutes
    python scripts/bench.py             # full size, on the GPU when present
Prints a table and writes bench.json (cached_over_plain, online_over_cached,
ideal_online_over_cached, dump_over_infer, dump_over_infer_hidden, peak_mem_cached_over_plain,
bytes_per_row, machine, and the same per model pair).
"""

from __future__ import annotations

import argparse
import copy
import json
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
from kdcache.dataset import ChunkShuffleBatchSampler, collate
from kdcache.items import fetch_batch, move_inputs
from kdcache.train import _LabelledRows


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


def epoch_seconds(mode: str, pair: dict[str, Any], ds: TensorDataset, cache: Any, teacher: nn.Module,
                  dev: torch.device, epochs: int = 2) -> float:
    """Seconds of the last of ``epochs`` epochs of kdcache.train_student in ``mode``."""
    torch.manual_seed(0)
    student = pair["student"]()
    kwargs: dict[str, Any] = {"plain": {}, "cached": {"cache": cache}, "online": {"teacher": teacher},
                              "kd_floor": {"teacher": FreeTeacher(pair.get("classes", 100)).to(dev)}}[mode]
    result = kdcache.train_student(student, ds, epochs=epochs, batch_size=pair["batch"], lr=1e-3, device=str(dev),
                                   num_workers=WORKERS, progress=False, **kwargs)
    return result.metrics[-1]["seconds"]


def modelopt_epoch_seconds(pair: dict[str, Any], ds: TensorDataset, teacher: nn.Module, dev: torch.device,
                           epochs: int = 2) -> float:
    """The peer row: online KD through NVIDIA ModelOpt's ``mtd.convert`` meta-model, set up as
    kdcache's online mode (T=4, KD weight 0.9, batchmean KL x T^2, AdamW 1e-3, the same batches,
    bf16 autocast on CUDA). Seconds of the last epoch."""
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
    loader = torch.utils.data.DataLoader(_LabelledRows(ds), batch_sampler=sampler, collate_fn=collate,
                                         num_workers=WORKERS, pin_memory=dev.type == "cuda")
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else nullcontext
    model.train()
    seconds = 0.0
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
        seconds = time.perf_counter() - t0
    return seconds


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
    epoch_seconds(mode, pair, ds, cache if mode == "cached" else None, teacher, dev, epochs=1)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return json.dumps({"peak": peak})


def dataset(pair: dict[str, Any]) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(pair["rows"], *pair["shape"], generator=g),
                         torch.randint(0, 100, (pair["rows"],), generator=g))


def bench_pair(name: str, pair: dict[str, Any], quick: bool, dev: torch.device, repeats: int, tmp: Path) -> dict[str, Any]:
    ds = dataset(pair)
    torch.manual_seed(0)
    teacher = pair["teacher"]().to(dev).eval()
    quiet = {"progress": False, "log": lambda m: None, "device": dev, "batch_size": pair["batch"], "num_workers": WORKERS}
    # 2. dump vs inference, interleaved
    infer, dump, dump_h = [], [], []
    caches: dict[str, Any] = {}
    infer_seconds(teacher, ds, pair["batch"], dev)  # warm-up: lazy init, autotuning, thread pools
    for r in range(repeats):
        infer.append(infer_seconds(teacher, ds, pair["batch"], dev))
        caches["logits"] = kdcache.dump_teacher(teacher, ds, tmp / f"{name}-logits", overwrite=True, **quiet)
        dump.append(caches["logits"].meta.dump.seconds)
        caches["hidden"] = kdcache.dump_teacher(teacher, ds, tmp / f"{name}-hidden", hidden=pair["hidden"],
                                                overwrite=True, **quiet)
        dump_h.append(caches["hidden"].meta.dump.seconds)
    # 1. epochs: plain / cached / online, interleaved; the teacher forward alone for the ideal
    times: dict[str, list[float]] = {"plain": [], "cached": [], "online": [], "kd_floor": [], "teacher_fwd": []}
    if HAVE_MODELOPT:
        times["modelopt"] = []
    for r in range(repeats):
        for mode in ("plain", "cached", "online", "kd_floor"):
            times[mode].append(epoch_seconds(mode, pair, ds, caches["logits"], teacher, dev))
        if HAVE_MODELOPT:
            times["modelopt"].append(modelopt_epoch_seconds(pair, ds, teacher, dev))
        times["teacher_fwd"].append(infer_seconds(teacher, ds, pair["batch"], dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    # ratios are taken within each repeat (the modes ran back to back), then the median: a shared
    # machine's slow drift moves both sides of a pair and cancels out
    paired = {
        "cached_over_plain": [c / p for c, p in zip(times["cached"], times["plain"])],
        "online_over_cached": [o / c for o, c in zip(times["online"], times["cached"])],
        "ideal_online_over_cached": [(c + f) / c for c, f in zip(times["cached"], times["teacher_fwd"])],
        "kd_floor_over_plain": [k / p for k, p in zip(times["kd_floor"], times["plain"])],
        "cached_over_kd_floor": [c / k for c, k in zip(times["cached"], times["kd_floor"])],
        "dump_over_infer": [i / d for i, d in zip(infer, dump)],
        "dump_over_infer_hidden": [i / d for i, d in zip(infer, dump_h)],
    }
    if HAVE_MODELOPT:
        paired["modelopt_over_cached"] = [m / c for m, c in zip(times["modelopt"], times["cached"])]
        paired["modelopt_over_online"] = [m / o for m, o in zip(times["modelopt"], times["online"])]
    # the cache's own per-batch work in stage two, in CPU time: reading its rows vs the plain path's
    step = student_step(pair, ds, dev)
    fetch = {"plain": fetch_us(_LabelledRows(ds), len(ds), pair["batch"], step),
             "cached": fetch_us(kdcache.CachedTeacherDataset(ds, caches["logits"], dtype=None), len(ds), pair["batch"],
                                step)}
    steps = -(-len(ds) // pair["batch"])
    # 3. peak memory per mode; 4. bytes on disk per row
    mem = {mode: peak_memory(mode, name, quick, caches["logits"].path, dev) for mode in ("plain", "cached", "online")}
    sizes = caches["hidden"].nbytes_on_disk()
    rows = caches["hidden"].rows
    return {
        "rows": pair["rows"], "batch_size": pair["batch"],
        "epoch_s": med, "epoch_s_min": {k: min(v) for k, v in times.items()},
        **{key: statistics.median(values) for key, values in paired.items()},
        "cached_over_plain_spread": [min(paired["cached_over_plain"]), max(paired["cached_over_plain"])],
        "cached_over_plain_best": min(times["cached"]) / min(times["plain"]),
        "fetch_us_per_batch": fetch,
        "cache_read_share_of_plain_step": (fetch["cached"] - fetch["plain"]) / (med["plain"] / steps * 1e6),
        "infer_s": statistics.median(infer), "dump_s": statistics.median(dump), "dump_hidden_s": statistics.median(dump_h),
        "dump_rows_per_s": pair["rows"] / statistics.median(dump),
        "peak_mem_bytes": mem, "peak_mem_cached_over_plain": mem["cached"] / mem["plain"],
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
    cpu = f"{platform.machine()} {torch.get_num_threads()} torch threads"
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)}, {cpu}"
    return f"CPU only, {cpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, small models, under 2 minutes")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=None)
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
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.pairs.split(","):
            results[name] = bench_pair(name, pairs(args.quick)[name], args.quick, dev, repeats, Path(tmp))
            r = results[name]
            print(f"\n[{name}] {r['rows']} rows, batch {r['batch_size']}, {WORKERS} loader workers, median of {repeats}, "
                  f"{machine(dev)}")
            print(f"  epoch s: plain {r['epoch_s']['plain']:.3f}  cached KD {r['epoch_s']['cached']:.3f}  "
                  f"online KD {r['epoch_s']['online']:.3f}  teacher fwd alone {r['epoch_s']['teacher_fwd']:.3f}")
            lo, hi = r["cached_over_plain_spread"]
            print(f"  cached_over_plain {r['cached_over_plain']:.3f} (repeats {lo:.3f}-{hi:.3f}; best epochs "
                  f"{r['cached_over_plain_best']:.3f})  online_over_cached {r['online_over_cached']:.3f}  "
                  f"(ideal {r['ideal_online_over_cached']:.3f}, reached {r['online_over_cached'] / r['ideal_online_over_cached']:.3f})")
            if HAVE_MODELOPT:
                print(f"  peer: ModelOpt mtd.convert online KD {r['epoch_s']['modelopt']:.3f} s: "
                      f"modelopt / cached {r['modelopt_over_cached']:.3f}  modelopt / kdcache online "
                      f"{r['modelopt_over_online']:.3f}")
            f = r["fetch_us_per_batch"]
            print(f"  reading a batch (CPU time): plain {f['plain']:.0f} us, cached {f['cached']:.0f} us: the cache adds "
                  f"{100 * r['cache_read_share_of_plain_step']:.2f}% of a plain step")
            print(f"  KD floor (online KD, free teacher) / plain {r['kd_floor_over_plain']:.3f}  cached / KD floor "
                  f"{r['cached_over_kd_floor']:.3f}")
            print(f"  dump_over_infer {r['dump_over_infer']:.3f} (logits)  {r['dump_over_infer_hidden']:.3f} (+2 hidden)  "
                  f"dump {r['dump_rows_per_s']:,.0f} rows/s")
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
    summary.update({"machine": machine(dev), "mode": "quick" if args.quick else "full", "repeats": repeats,
                    "loader_workers": WORKERS,
                    "peer": peer, "pairs": results, "dump_processes": procs})
    Path("bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{peer}\nwrote bench.json")


if __name__ == "__main__":
    main()
