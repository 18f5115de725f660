"""Start-up cost of the command line: wall time of `kdcache --help` and `import kdcache.cli`,
and which heavy modules the CLI imports before it parses.

    python scripts/bench_cli.py [--repeats 20]

Prints the median and the best of N runs of each, each in a fresh interpreter, beside an empty
interpreter (the floor) and `import torch` (what the CLI no longer pays at start-up), and the
machine's load average: on a shared box every figure scales with it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time


def timed(args: list[str], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"python {platform.python_version()} on {platform.machine()} ({os.cpu_count()} cores, load average "
          f"{load:.1f}), {args.repeats} runs each, fresh interpreter")
    for what, command in [("python -c pass (floor)", [sys.executable, "-c", "pass"]),
                          ("kdcache --help", [sys.executable, "-m", "kdcache", "--help"]),
                          ("import kdcache.cli", [sys.executable, "-c", "import kdcache.cli"]),
                          ("import torch (yardstick)", [sys.executable, "-c", "import torch"])]:
        times = timed(command, args.repeats)
        print(f"{what:<26} median {statistics.median(times):.3f} s  best {min(times):.3f} s")
    loaded = subprocess.run([sys.executable, "-c", "import sys, kdcache.cli; print(sorted(m for m in "
                             "('torch', 'zarr', 'numpy', 'matplotlib') if m in sys.modules))"],
                            check=True, capture_output=True, text=True).stdout.strip()
    print(f"heavy modules imported by kdcache.cli: {loaded}")


if __name__ == "__main__":
    main()
