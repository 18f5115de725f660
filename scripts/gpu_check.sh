#!/usr/bin/env bash
# The GPU check in one command: tests/test_cuda.py, scripts/bench.py (full size, 2 repeats, 3 s
# minimum) and scripts/bench_llm.py (full size), then every figure against its target, within
# 8 minutes on one NVIDIA H100/H200.
#
#     bash scripts/gpu_check.sh            # from the repository root or anywhere
#
# The machine needs python 3.12 with torch (CUDA), transformers, accelerate, typer and tqdm; zarr
# and its own dependencies usually are not there, and such a machine may have no package
# registry. Bring them as wheels in .whl/ (git ignores it), downloaded where a registry is:
#
#     pip download --dest .whl --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
#         --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
#         pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
#
# This script installs them without dependencies into /tmp/site (nothing of the machine's own
# Python changes) and puts /tmp/site and this checkout first on PYTHONPATH. Each step has its own
# time limit (seconds below); a step that fails or runs out is reported and the others still run.
# Writes bench.json and bench_llm.json here; prints the summary table last.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=/tmp/site
if compgen -G ".whl/*.whl" > /dev/null; then
    python -m pip install --quiet --no-deps --no-index --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
python -c "import torch, zarr, kdcache; assert torch.cuda.is_available(), 'no CUDA device visible'; \
print('torch', torch.__version__, 'zarr', zarr.__version__, 'kdcache', kdcache.__version__, torch.cuda.get_device_name())" \
    || exit 1

status=0
step() {  # step NAME SECONDS COMMAND...: run it under its time limit, say how it ended
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name (limit ${limit} s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ' (ran out of time)')"
    [ $rc -eq 0 ] || status=1
}

# the disk's own sequential write rate where the benches write (tempfile: $TMPDIR), 2 GB direct
DISK_DIR=${TMPDIR:-/tmp}
step "disk write rate ($DISK_DIR)" 30 bash -c "dd if=/dev/zero of='$DISK_DIR/kdcache-dd' bs=16M count=128 \
    oflag=direct conv=fsync 2>&1 | tail -1 | tee /tmp/kdcache-dd.txt; rm -f '$DISK_DIR/kdcache-dd'"
step "tests/test_cuda.py" 80 python -m pytest -q tests/test_cuda.py
step "scripts/bench.py (full, 2 repeats, 3 s)" 230 python scripts/bench.py --repeats 2 --min-seconds 3
step "scripts/bench_llm.py (full)" 120 python scripts/bench_llm.py --repeats 2

echo; echo "=== summary: figure, measured, target"
python - <<'EOF'
import json, re
from pathlib import Path

def row(name, value, target):
    shown = "not measured" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
    print(f"  {name:<58} {shown:>14}   {target}")

bench = json.loads(Path("bench.json").read_text()) if Path("bench.json").is_file() else {"pairs": {}}
llm = json.loads(Path("bench_llm.json").read_text()) if Path("bench_llm.json").is_file() else {"forms": {}}
dd = Path("/tmp/kdcache-dd.txt").read_text() if Path("/tmp/kdcache-dd.txt").is_file() else ""
rate = re.search(r"([\d.]+) ([GM])B/s", dd)
disk = float(rate.group(1)) * (1000 if rate.group(2) == "G" else 1) if rate else None
print(f"machine: {bench.get('machine') or llm.get('machine')}; disk write {disk} MB/s")
for pair, target in (("cnn", 0.95), ("mlp", 0.9)):
    r = bench["pairs"].get(pair) or {}
    row(f"{pair.upper()} dump / inference, logits (whole call; loop {r.get('dump_over_infer', 0):.3f})",
        r.get("dump_wall_over_infer"), f">= {target}")
    hidden = r.get("dump_wall_over_infer_hidden")
    written = sum(r.get("bytes_per_row", {}).values()) * r.get("rows", 0) / 1e6
    mb_s = written / r["dump_hidden_s"] if r.get("dump_hidden_s") else None
    row(f"{pair.upper()} + 2 hidden: dump / inference (whole call; loop {r.get('dump_over_infer_hidden', 0):.3f})",
        hidden, ">= 0.85")
    row(f"{pair.upper()} + 2 hidden: MB/s written / disk MB/s ({written:,.0f} MB)",
        mb_s / disk if mb_s and disk else None, ">= 0.8 where the disk is the limit")
    row(f"{pair.upper()} stage two: cached / plain", r.get("cached_over_plain"), "<= 1.05 (MLP)")
    row(f"{pair.upper()} stage two: cached precomputed / cached", r.get("cached_pre_over_cached"), "< 1 where used")
    row(f"{pair.upper()} ModelOpt online / cached", r.get("modelopt_over_cached"), "(peer)")
    peak = r.get("peak_mem_bytes") or {}
    held = r.get("bytes_per_row", {}).get("logits", 0) * r.get("rows", 0)
    if peak:
        row(f"{pair.upper()} peak GPU MB cached - (plain + held targets {held / 1e6:,.0f} MB)",
            (peak["cached_pre"] - peak["plain"] - held) / 1e6, "<= 0")
for form, r in llm.get("forms", {}).items():
    m = r["median"]
    tokens = llm["real_tokens"]
    row(f"GPT-2 {form}: dump / inference (wall; loop {m['loop_over_inference']:.3f})", m["dump_over_inference"],
        ">= 0.9 over >= 1M real tokens" + ("" if tokens >= 1_000_000 else f" (only {tokens:,})"))
    row(f"GPT-2 {form}: dump tokens/s; inference tokens/s",
        f"{tokens / m['dump_wall_s']:,.0f}; {tokens / m['inference_s']:,.0f}", "")
    row(f"GPT-2 {form}: bytes / real token", round(r["bytes_per_token"], 1), "")
hit = llm.get("cache_hit")
row("cache hit, GPT-2-small-shaped teacher (s)", hit and hit["median_s"], "<= 0.25")
EOF
exit $status
