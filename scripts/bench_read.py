"""Rows/s read through CachedTeacherDataset + DataLoader, from memory and from disk.

Caches: (N, 100) float16 logits alone, and logits + a (N, 256) hidden state. Inputs are a
(N, 32) float32 TensorDataset. Also reports the cost of the per-row input digest check (on every
read, as for a dataset with its own __getitem__; TensorDataset rows are checked once) and of
crc32c checksums on raw zarr reads. Run: python scripts/bench_read.py [--rows N]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from torch import nn
from torch.utils.data import TensorDataset
from zarr.codecs import Crc32cCodec

import kdcache
from kdcache import CachedTeacherDataset


class Teacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(32, 256)
        self.head = nn.Linear(256, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x)))


def rows_per_s(data: CachedTeacherDataset, workers: int, batch_size: int, epochs: int = 3) -> float:
    loader = data.loader(batch_size, shuffle=True, num_workers=workers)
    best = 0.0
    for epoch in range(epochs):  # best of a few epochs: the first also warms page cache/workers
        loader.batch_sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        n = sum(len(labels) for _, labels, _ in loader)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def crc_cost(tmp: Path, rows: int) -> dict[str, float]:
    data = np.random.default_rng(0).standard_normal((rows, 100)).astype(np.float16)
    speeds = {}
    for name, compressors in [("plain", None), ("crc32c", [Crc32cCodec()])]:
        arr = zarr.create_array(str(tmp / f"crc-{name}"), shape=data.shape, chunks=(8192, 100), dtype="float16",
                                compressors=compressors)
        arr[:] = data
        t0 = time.perf_counter()
        for _ in range(5):
            arr[:]
        speeds[name] = 5 * data.nbytes / (time.perf_counter() - t0) / 1e6
    return {"read_mb_s_plain": speeds["plain"], "read_mb_s_crc32c": speeds["crc32c"],
            "crc32c_cost": speeds["plain"] / speeds["crc32c"] - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.rows
    ds = TensorDataset(torch.randn(n, 32), torch.randint(0, 100, (n,)))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for label, hidden in [("logits (N,100) f16", []), ("logits + hidden (N,256) f16", ["hidden"])]:
            cache = kdcache.dump_teacher(Teacher(), ds, tmp_path / label.split()[2 if hidden else 0], hidden=hidden,
                                         progress=False, log=lambda m: None)
            for where, in_memory in [("memory", True), ("disk", False)]:
                for workers in (0, 2):
                    for check in (True, False):
                        data = CachedTeacherDataset(ds, cache, in_memory=in_memory, check_inputs=check)
                        # a TensorDataset's rows are checked on first read only; time the check on
                        # every read, as for datasets with code in __getitem__
                        data._checked = None
                        speed = rows_per_s(data, workers, args.batch_size)
                        results.append({"cache": label, "from": where, "workers": workers, "input_check": check,
                                        "rows_per_s": round(speed)})
                        print(f"{label:<30} from {where:<6} workers {workers}  input check {str(check):<5} "
                              f"{speed:>10,.0f} rows/s", flush=True)
        crc = crc_cost(tmp_path, n)
    print(f"raw zarr read of (N,100) f16: {crc['read_mb_s_plain']:.0f} MB/s plain, {crc['read_mb_s_crc32c']:.0f} MB/s "
          f"with crc32c (+{100 * crc['crc32c_cost']:.0f}% time)")
    out = {"machine": f"{platform.node()} {platform.processor() or platform.machine()} "
                      f"{torch.get_num_threads()} threads", "rows": n, "batch_size": args.batch_size,
           "results": results, "crc": crc}
    Path("bench_read.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
