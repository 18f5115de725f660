"""Dump and read against the disk's own rate, measured in the same run on the same file system.

A near-free teacher (one Linear layer, 8 -> C) over N rows: its float16 logits are all there is
to store, so the dump runs at what kdcache's write path allows. Each repeat measures, back to back:
  - the disk: a file of the cache's size written and read with O_DIRECT in 64 MB blocks (dd's
    ``oflag=direct``/``iflag=direct``), in the same directory as the caches;
  - the teacher alone over the dump's batches (what a dump could cost at best besides writing);
  - kdcache.dump_teacher: GB/s of stored bytes over the dump's loop time;
  - reading the cache back from disk (``in_memory=False``, shuffled batches of --batch-size rows,
    the page cache dropped for its files first): GB/s of target bytes and rows/s.
Ratios are taken within each repeat (dump / disk write, read / disk read), then the median;
every repeat's ratios are printed. CPU seconds per GB (all threads of this process) are printed
too: the cost load on a shared machine moves least.
    python scripts/bench_io.py            # 1,000,000 x 1,000 float16 (2.0 GB), 3 repeats
    python scripts/bench_io.py --quick    # 250,000 x 1,000 (0.5 GB), 2 repeats
Writes bench_io.json.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

import kdcache
from kdcache import CachedTeacherDataset

BLOCK = 64 << 20


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def disk_rates(directory: Path, nbytes: int) -> tuple[float, float]:
    """(write GB/s, read GB/s) of ``nbytes`` in 64 MB O_DIRECT blocks, as dd measures them."""
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(1 << 20) * (BLOCK >> 20))
    path = directory / "disk-probe"
    blocks = max(1, nbytes // BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    t0 = time.perf_counter()
    for _ in range(blocks):
        os.write(fd, buf)
    os.fsync(fd)
    write = blocks * BLOCK / (time.perf_counter() - t0) / 1e9
    os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    t0 = time.perf_counter()
    while os.readv(fd, [buf]) > 0:
        pass
    read = blocks * BLOCK / (time.perf_counter() - t0) / 1e9
    os.close(fd)
    path.unlink()
    return write, read


def drop_page_cache(directory: Path) -> None:
    """Evict the files under ``directory`` from the page cache, so reads come from the disk."""
    for f in directory.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def teacher_seconds(teacher: nn.Module, ds: TensorDataset, batch: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(ds), batch):
            teacher(ds.tensors[0][start:start + batch])
    return time.perf_counter() - t0


def read_pass(ds: TensorDataset, cache: Any, batch: int) -> tuple[float, float, float]:
    """(seconds, CPU seconds, rows) of one shuffled epoch read from disk, targets only touched."""
    drop_page_cache(Path(cache.path))
    data = CachedTeacherDataset(ds, cache, in_memory=False, dtype=None)
    loader = data.loader(batch, shuffle=True)
    c0, t0 = cpu_seconds(), time.perf_counter()
    rows = 0
    for _, labels, _ in loader:
        rows += len(labels)
    return time.perf_counter() - t0, cpu_seconds() - c0, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--dir", default=".", help="where the caches and the disk probe go (the file system measured)")
    args = parser.parse_args()
    rows = args.rows or (250_000 if args.quick else 1_000_000)
    repeats = args.repeats or (2 if args.quick else 3)
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(rows, 8), torch.randint(0, args.classes, (rows,)))
    teacher = nn.Linear(8, args.classes).eval()
    nbytes = rows * args.classes * 2
    load = os.getloadavg()
    machine = f"{platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"{rows:,} x {args.classes:,} float16 ({nbytes / 1e9:.2f} GB), batch {args.batch_size}, {machine}; "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        where = Path(tmp)
        teacher_seconds(teacher, ds, args.batch_size)  # warm-up
        for r in range(repeats):
            disk_write, disk_read = disk_rates(where, nbytes)
            alone = teacher_seconds(teacher, ds, args.batch_size)
            c0 = cpu_seconds()
            cache = kdcache.dump_teacher(teacher, ds, where / "cache", overwrite=True, progress=False,
                                         batch_size=args.batch_size, log=lambda m: None)
            dump_cpu = cpu_seconds() - c0
            dump_s = cache.meta.dump.seconds
            read_s, read_cpu, read_rows = read_pass(ds, cache, args.batch_size)
            run = {"disk_write_gb_s": disk_write, "disk_read_gb_s": disk_read, "teacher_alone_s": alone,
                   "dump_s": dump_s, "dump_gb_s": nbytes / dump_s / 1e9, "dump_cpu_s_per_gb": dump_cpu / (nbytes / 1e9),
                   "read_s": read_s, "read_gb_s": nbytes / read_s / 1e9, "read_rows_s": read_rows / read_s,
                   "read_cpu_s_per_gb": read_cpu / (nbytes / 1e9)}
            run["dump_over_disk_write"] = run["dump_gb_s"] / disk_write
            run["read_over_disk_read"] = run["read_gb_s"] / disk_read
            runs.append(run)
            print(f"repeat {r + 1}: disk write {disk_write:.2f} GB/s read {disk_read:.2f} GB/s | teacher alone "
                  f"{alone:.2f} s | dump {dump_s:.2f} s = {run['dump_gb_s']:.2f} GB/s = {run['dump_over_disk_write']:.2f} "
                  f"x disk ({run['dump_cpu_s_per_gb']:.2f} CPU s/GB) | read {run['read_gb_s']:.2f} GB/s = "
                  f"{run['read_over_disk_read']:.2f} x disk, {run['read_rows_s']:,.0f} rows/s "
                  f"({run['read_cpu_s_per_gb']:.2f} CPU s/GB)", flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    end = os.getloadavg()
    dumps = " ".join(f"{r['dump_over_disk_write']:.2f}" for r in runs)
    reads = " ".join(f"{r['read_over_disk_read']:.2f}" for r in runs)
    print(f"median of {repeats}: dump / disk write {med['dump_over_disk_write']:.2f} (repeats {dumps}), read / disk "
          f"read {med['read_over_disk_read']:.2f} (repeats {reads}); load average at the end "
          f"{end[0]:.2f} {end[1]:.2f} {end[2]:.2f}")
    Path("bench_io.json").write_text(json.dumps({"rows": rows, "classes": args.classes, "bytes": nbytes,
                                                 "batch_size": args.batch_size, "machine": machine,
                                                 "load_before_after": [load, end], "median": med, "repeats": runs},
                                                indent=2) + "\n")


if __name__ == "__main__":
    main()
