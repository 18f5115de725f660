"""Stage one for a language-model teacher: dump / inference, tokens/s, bytes per token, cache hit.

A GPT-2-shaped causal LM (transformers' ``GPT2LMHeadModel`` built from a config, random weights)
over ragged token rows (right-padded, one attention mask a row). For each cache form (top-k,
hybrid top-k + systematic tail draws, sampled) the dump is timed against the teacher's own
inference over the same batches and input pipeline, where inference includes the
``log_softmax`` and ``topk`` that any top-k cache must compute, so the ratio says what kdcache
adds. The two run back to back in each repeat; every ratio is taken within a repeat, then the
median over repeats (each repeat is printed).

Figures: inference s and real tokens/s; dump wall s (the whole ``dump_teacher`` call: weights
and dataset digests, the layout pass, the creation, the loop, the finish) and the seconds inside
the dump loop; ``dump / inference`` both ways; bytes per real token on disk; and the cache-hit
time of a second ``dump_teacher`` call with the GPT-2-small-shaped teacher (537 MB of weights),
dominated by the weights digest.

    python scripts/bench_llm.py --quick     # CPU, a 2-layer model, under 2 minutes
    python scripts/bench_llm.py             # full size (12 layers, width 768, V = 32,000), on the GPU when present

Writes ``bench_llm.json`` to the current directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import kdcache  # noqa: E402
from kdcache.models.forward import move_inputs  # noqa: E402
from kdcache.models.placement import offloaded_weights  # noqa: E402
from kdcache.store.identity import weights_digest  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    # a small model for CPUs: the forward still dominates, as it does for a real teacher
    "quick": dict(layers=2, width=256, heads=4, vocab=8192, rows=64, min_len=16, max_len=128, batch=16, k=32),
    # the GPT-2-small shape over >= 1M real tokens
    "full": dict(layers=12, width=768, heads=12, vocab=32_000, rows=2_688, min_len=256, max_len=512, batch=32, k=32),
}
HIT_SHAPE = dict(layers=12, width=768, heads=12, vocab=32_000, max_len=512)  # 537 MB of weights in its state dict


def gpt2(layers: int, width: int, heads: int, vocab: int, max_len: int, **_: Any) -> torch.nn.Module:
    """A GPT-2 LM head model of this shape with random weights (seed 0), eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=max_len,
                        use_cache=False)
    return GPT2LMHeadModel(config).eval()


class RaggedRows(Dataset):
    """``rows`` token rows of ``min_len``..``max_len`` real tokens (uniform, seed 0), right-padded
    to ``max_len``: items ``{"input_ids", "attention_mask"}``; whole batches by ``__getitems__``."""

    def __init__(self, rows: int, min_len: int, max_len: int, vocab: int, **_: Any) -> None:
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(min_len, max_len + 1, (rows,), generator=g)
        self.mask = (torch.arange(max_len).view(1, -1) < lengths.view(-1, 1)).long()
        self.ids = torch.randint(0, vocab, (rows, max_len), generator=g) * self.mask

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def real_tokens(self) -> int:
        return int(self.mask.sum())

    def __getitems__(self, rows: list[int]) -> list[dict[str, torch.Tensor]]:
        return [{"input_ids": self.ids[i], "attention_mask": self.mask[i]} for i in rows]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]


class _Batches(Dataset):
    """Batch i of the rows as one dict of tensors, read as kdcache's dump reads them."""

    def __init__(self, data: RaggedRows, batch: int) -> None:
        self.data, self.batch = data, batch

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rows = slice(i * self.batch, (i + 1) * self.batch)
        return {"input_ids": self.data.ids[rows], "attention_mask": self.data.mask[rows]}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def inference_seconds(teacher: torch.nn.Module, data: RaggedRows, batch: int, k: int, dev: torch.device,
                      ) -> tuple[float, float]:
    """The teacher alone over the dump's batches: forward, ``log_softmax`` and ``topk(k)`` of every
    position (what any top-k cache must compute), results dropped. (wall s, process CPU s)."""
    cuda = dev.type == "cuda"
    loader = DataLoader(_Batches(data, batch), batch_size=None, pin_memory=cuda)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode(), amp:
        for inputs in loader:
            logits = teacher(**move_inputs(inputs, dev, non_blocking=cuda)).logits
            torch.log_softmax(logits.float(), -1).topk(k, -1)
    sync(dev)
    return time.perf_counter() - t0, time.process_time() - c0


FORMS: dict[str, dict[str, Any]] = {
    "top-k": {},
    "hybrid": {"tail_samples": 48, "sample_draws": "systematic"},  # top-8 head + 48 systematic tail draws
    "sampled": {},
}


def form_settings(form: str, k: int) -> dict[str, Any]:
    if form == "top-k":
        return {"topk": k}
    if form == "hybrid":
        return {"topk": 8, **FORMS["hybrid"]}
    return {"sample_k": k}


def dump_once(teacher: torch.nn.Module, data: RaggedRows, out: Path, form: str, shape: dict[str, Any],
              dev: torch.device) -> tuple[float, float, kdcache.TeacherCache]:
    """Wall and process CPU seconds of one whole ``dump_teacher`` call (a fresh cache), and the cache."""
    sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    cache = kdcache.dump_teacher(teacher, data, out, batch_size=shape["batch"], device=str(dev),
                                 progress=False, log=lambda m: None, **form_settings(form, shape["k"]))
    sync(dev)
    return time.perf_counter() - t0, time.process_time() - c0, cache


def cache_hit_seconds(tmp: Path, dev: torch.device, repeats: int) -> dict[str, Any]:
    """A second ``dump_teacher`` call of the GPT-2-small-shaped teacher over 8 rows: a cache hit,
    whose cost is the weights and dataset digests and opening the cache."""
    teacher = gpt2(**HIT_SHAPE).to(dev)
    weights = sum(t.numel() * t.element_size() for t in teacher.state_dict().values())
    data = RaggedRows(8, 16, 32, HIT_SHAPE["vocab"])
    kdcache.dump_teacher(teacher, data, tmp / "hit", topk=8, device=str(dev), progress=False, log=lambda m: None)
    seconds = []
    for _ in range(repeats):
        said: list[str] = []
        sync(dev)
        t0 = time.perf_counter()
        kdcache.dump_teacher(teacher, data, tmp / "hit", topk=8, device=str(dev), progress=False, log=said.append)
        seconds.append(time.perf_counter() - t0)
        assert said and said[0].startswith("cache hit"), said
    digest = []
    for _ in range(repeats):  # the weights digest alone, the bulk of a hit
        t0 = time.perf_counter()
        weights_digest(teacher, offloaded=offloaded_weights(teacher))
        digest.append(time.perf_counter() - t0)
    return {"weights_mb": weights / 1e6, "seconds": seconds, "median_s": statistics.median(seconds),
            "digest_s": digest, "digest_gb_per_s": weights / 1e9 / statistics.median(digest)}


def machine(dev: torch.device) -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    cpu = f"{platform.machine()} {os.cpu_count()} cores ({model}), {torch.get_num_threads()} torch threads"
    return f"{torch.cuda.get_device_name(dev)}, {cpu}" if dev.type == "cuda" else f"CPU only, {cpu}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, a 2-layer model, under 2 minutes")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--no-hit", action="store_true", help="skip the cache-hit figure")
    args = parser.parse_args()
    dev = torch.device(args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda"))
    shape = SHAPES["quick" if args.quick else "full"]
    load = os.getloadavg()
    print(f"{machine(dev)}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    teacher = gpt2(**shape).to(dev)
    data = RaggedRows(**shape)
    tokens = data.real_tokens
    print(f"teacher: GPT-2 shape, {shape['layers']} layers, width {shape['width']}, V = {shape['vocab']:,}; "
          f"{len(data)} rows of {shape['min_len']}-{shape['max_len']} tokens ({tokens:,} real tokens, "
          f"{tokens / data.mask.numel():.0%} of positions), batch {shape['batch']}, "
          f"{'bf16 autocast' if dev.type == 'cuda' else 'float32'}")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        inference_seconds(teacher, data, shape["batch"], shape["k"], dev)  # warm-up: lazy init, thread pools
        for form in args.forms.split(","):
            infer, wall, loop, infer_cpu, dump_cpu = [], [], [], [], []
            cache = None
            for r in range(args.repeats):
                seconds, cpu = inference_seconds(teacher, data, shape["batch"], shape["k"], dev)
                infer.append(seconds)
                infer_cpu.append(cpu)
                if cache is not None:
                    shutil.rmtree(cache.path)
                seconds, cpu, cache = dump_once(teacher, data, tmp / f"{form}-{r}", form, shape, dev)
                wall.append(seconds)
                dump_cpu.append(cpu)
                loop.append(cache.meta.dump.seconds)
            assert cache is not None
            on_disk = sum(cache.nbytes_on_disk().values())
            r = {"inference_s": infer, "dump_wall_s": wall, "dump_loop_s": loop,
                 "dump_over_inference": [i / w for i, w in zip(infer, wall)],
                 "loop_over_inference": [i / w for i, w in zip(infer, loop)],
                 "inference_cpu_s": infer_cpu, "dump_cpu_s": dump_cpu,
                 "cpu_dump_over_inference": [i / d for i, d in zip(infer_cpu, dump_cpu)],
                 "bytes_per_token": on_disk / tokens}
            med = {key: statistics.median(v) for key, v in r.items() if isinstance(v, list)}
            r["median"] = med
            results[form] = r
            print(f"[{form}] inference {med['inference_s']:.3f} s ({tokens / med['inference_s']:,.0f} tokens/s); dump wall "
                  f"{med['dump_wall_s']:.3f} s ({tokens / med['dump_wall_s']:,.0f} tokens/s), loop {med['dump_loop_s']:.3f} s; "
                  f"dump / inference {med['dump_over_inference']:.3f} (repeats "
                  f"{' '.join(f'{v:.3f}' for v in r['dump_over_inference'])}), loop / inference "
                  f"{med['loop_over_inference']:.3f}; in process CPU time {med['cpu_dump_over_inference']:.3f}; "
                  f"{r['bytes_per_token']:.1f} bytes / real token")
        hit = None if args.no_hit else cache_hit_seconds(tmp, dev, max(3, args.repeats))
        if hit is not None:
            print(f"[cache hit] GPT-2-small-shaped teacher, {hit['weights_mb']:.0f} MB of weights: "
                  f"{hit['median_s']:.3f} s (median of {' '.join(f'{s:.3f}' for s in hit['seconds'])}); the weights "
                  f"digest alone {statistics.median(hit['digest_s']):.3f} s, {hit['digest_gb_per_s']:.1f} GB/s")
    end = os.getloadavg()
    summary = {"machine": machine(dev), "shape": shape, "real_tokens": tokens, "forms": results, "cache_hit": hit,
               "load_before_after": [load, end], "mode": "quick" if args.quick else "full", "repeats": args.repeats}
    Path("bench_llm.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"load average at the end {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}\nwrote bench_llm.json")


if __name__ == "__main__":
    main()
