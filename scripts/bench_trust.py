"""What the trust checks and the small resumable blocks cost.

For an (N, 100) float16 logits cache plus an (N, 256) float16 hidden state, dumped with today's
block plan (1,024-row blocks) and with the earlier plan's 8,192-row blocks (``--block-rows``):
chunk files on disk, dump seconds, the CPU time of opening the cache into memory (every block's
digest checked) and of the digests alone, and rows/s read from disk. CPU times are thread times,
so other load on the box moves them little; wall-clock rows/s are best of 3 epochs.
Run: python scripts/bench_trust.py [--rows N]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import kdcache
from bench_read import Teacher  # the same (N, 32) -> hidden 256 -> 100 classes teacher
from kdcache import CachedTeacherDataset, TeacherCache
from kdcache.store import block_digest


def cpu_seconds(fn) -> tuple[float, object]:
    t0 = time.thread_time()
    value = fn()
    return time.thread_time() - t0, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(args.rows, 32), torch.randint(0, 100, (args.rows,)))
    print(f"machine: {platform.node()} {platform.machine()}, {torch.get_num_threads()} torch threads; "
          f"{args.rows:,} rows, logits (N,100) f16 + hidden (N,256) f16")
    with tempfile.TemporaryDirectory() as tmp:
        for plan, block_rows in (("1,024-row blocks (now)", None), ("8,192-row blocks (before)", 8192)):
            path = Path(tmp) / str(block_rows)
            t0 = time.perf_counter()
            kdcache.dump_teacher(Teacher(), ds, path, hidden=["hidden"], block_rows=block_rows, progress=False,
                                 log=lambda m: None)
            dump_s = time.perf_counter() - t0
            cache = TeacherCache.open(path)
            files = sum(1 for f in path.rglob("*") if f.is_file())
            data_bytes = sum(cache.nbytes_on_disk().values())
            load_cpu, data = cpu_seconds(lambda: CachedTeacherDataset(ds, path, in_memory=True, check_inputs=False))
            arrays = {p: data._arrays[p] for p in data._arrays}
            arrays["_row_digest"] = data.digests

            def digests() -> None:
                for p, rows in arrays.items():
                    for b in range(cache.n_blocks):
                        lo, hi = cache.block_range(b)
                        block_digest(cache.fingerprint, p, b, rows[lo:hi])
            digest_cpu, _ = cpu_seconds(digests)
            disk = CachedTeacherDataset(ds, path, in_memory=False, check_inputs=False)
            loader = disk.loader(256, shuffle=True)
            best = 0.0
            for epoch in range(3):
                loader.batch_sampler.set_epoch(epoch)
                t0 = time.perf_counter()
                n = sum(len(labels) for _, labels, _ in loader)
                best = max(best, n / (time.perf_counter() - t0))
            print(f"{plan:<27} blocks {cache.n_blocks:>4} ({cache.block_rows} rows)  files {files:>5}  "
                  f"{data_bytes / 1e6:.0f} MB  dump {dump_s:.2f} s  open into memory {load_cpu:.3f} s CPU "
                  f"(block digests {digest_cpu:.3f} s = {data_bytes / 1e9 / max(digest_cpu, 1e-9):.1f} GB/s)  "
                  f"from disk {best:,.0f} rows/s", flush=True)


if __name__ == "__main__":
    main()
