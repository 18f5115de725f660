"""Fidelity of logit caches for token-level distillation: dense vs head vs top-k vs sampled vs hybrid.

A small causal transformer LM (the teacher, vocabulary 8,192 words) is trained briefly on text
that ships with Python. The transfer and held-out sets are *documents* of very different
lengths — each ``pydoc`` topic and each top-level block (module preamble, def, class) of the
standard library's top-level modules, from 2 to thousands of words — one document a row, cut at
``--length`` and right-padded, as instruction and chat data are. The teacher's outputs over the
transfer set are dumped as a dense float16 cache, as a head cache (the input of the teacher's output
layer per token, the layer once: ``head``, ``head-int8``) and as each sparse form; the same smaller
student is distilled from each (pure KD, alpha = 1, T = 1, same initial weights, seed and
batches) and once from the labels alone. Reported per cache: bytes per real token on disk and
read tokens/s in the padded and the packed layout (the students train from the packed one),
the same bytes after zstd (level 3, per block: what compressing stored values would save),
what the same codec takes per token at V = 32,000 and 128,000 (the budget: 128 bytes at 32k;
a head cache takes 2 x the teacher's width whatever V), and the student's held-out
cross-entropy and KL(teacher || student) per real token, also as a ratio to the dense-cache
student's (the target: within 1.02). Forms ending ``-x2`` are dumped with two views of each
row (``--views 2``): the draws differ between the views and epoch e trains on view e % 2, a
stored pool of draws of which each epoch uses a different half. A last table times one KD
step (loss forward + backward) of each form's loss at V = 8k, 32k and 128k.

    python scripts/bench_topk.py            # the measurement (see docs/head-caches.md for its size and time)
    python scripts/bench_topk.py --quick    # a few minutes: a smoke run, not a measurement

Writes ``bench_topk.json`` to the current directory.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import platform
import re
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import kdcache
from kdcache import CachedTeacherDataset, dump_teacher, train_student

PAD, UNK = 0, 1
WORD = re.compile(r"[A-Za-z_]+|\d+|[^\sA-Za-z_\d]")
BLOCK = re.compile(r"\n(?=(?:def|class|async def) )")  # a module splits before each top-level def/class
BUDGET_VOCAB, BUDGET_BYTES, LARGE_VOCAB = 32_000, 128, 128_000


def documents(vocab: int) -> list[np.ndarray]:
    """Word-level token ids of Python's own documents, in a fixed shuffled order: each pydoc
    topic and each top-level block of the standard library's top-level modules (no download)."""
    import pydoc_data.topics as topics
    texts = list(topics.topics.values())
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts += BLOCK.split(path.read_text(errors="replace"))
    words = [WORD.findall(text) for text in texts]
    keep = [w for w, _ in collections.Counter(w for doc in words for w in doc).most_common(vocab - 2)]
    index = {w: i + 2 for i, w in enumerate(keep)}
    docs = [np.array([index.get(w, UNK) for w in doc], dtype=np.int64) for doc in words if len(doc) >= 2]
    order = np.random.default_rng(0).permutation(len(docs))
    return [docs[i] for i in order]


class Documents(Dataset):
    """One document a row: items ``{"input_ids", "attention_mask", "labels"}`` of ``length``
    positions, the document's first ``length`` tokens then padding; labels are the next tokens
    (-100 where there is none)."""

    def __init__(self, docs: list[np.ndarray], length: int) -> None:
        rows = len(docs)
        ids = np.full((rows, length + 1), PAD, dtype=np.int64)
        real = np.zeros(rows, dtype=np.int64)
        for i, doc in enumerate(docs):
            cut = doc[:length + 1]
            ids[i, :len(cut)] = cut
            real[i] = min(len(doc), length)
        pos = np.arange(length)[None, :]
        mask = pos < real[:, None]
        self.input_ids = torch.from_numpy(np.where(mask, ids[:, :-1], PAD))
        self.attention_mask = torch.from_numpy(mask.astype(np.int64))
        self.labels = torch.from_numpy(np.where(pos + 1 < np.minimum(np.array([len(d) for d in docs]), length + 1)[:, None],
                                                ids[:, 1:], -100))

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        return [self[i] for i in indices]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


class CausalLM(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, heads: int, length: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(length, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        n = input_ids.shape[1]
        h = self.embed(input_ids) + self.pos[:n]
        h = self.blocks(h, mask=self.causal[:n, :n], is_causal=True)
        return {"logits": self.head(self.norm(h))}


def train_teacher(model: CausalLM, text: np.ndarray, steps: int, batch: int, length: int, lr: float) -> float:
    """Next-token training on random windows of the running text of every document but the held-out ones."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    windows = torch.from_numpy(text)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        starts = torch.randint(0, len(text) - length - 1, (batch,), generator=g)
        rows = torch.stack([windows[s:s + length + 1] for s in starts.tolist()])
        logits = model(rows[:, :-1])["logits"]
        loss = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def batches(ds: Documents, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    for s in range(0, len(ds), size):
        yield ds.input_ids[s:s + size], ds.attention_mask[s:s + size], ds.labels[s:s + size]


@torch.no_grad()
def held_out(student: nn.Module, teacher: nn.Module, ds: Documents) -> dict[str, float]:
    """Per real token: the student's cross-entropy on the true next token and KL(teacher || student)."""
    student.eval()
    ce = kl = 0.0
    tokens = labelled = 0
    for ids, mask, labels in batches(ds, 64):
        s = F.log_softmax(student(ids)["logits"].float(), -1)
        t = F.log_softmax(teacher(ids)["logits"].float(), -1)
        real = mask.bool()
        kl += float((t.exp() * (t - s)).sum(-1)[real].sum())
        tokens += int(real.sum())
        keep = labels >= 0
        ce += float(F.nll_loss(s[keep], labels[keep], reduction="sum"))
        labelled += int(keep.sum())
    return {"heldout_ce": ce / labelled, "heldout_kl": kl / tokens}


def budget_bytes(cache: kdcache.TeacherCache, vocab: int = BUDGET_VOCAB) -> float:
    """Bytes per token position the cache's logits codec takes at vocabulary ``vocab`` (from its
    own ``arrays()``), times its views: the issue's budget is 128 at V = 32,000. A head cache's
    layer, stored once, is not per token."""
    codec = cache.meta.logits.codec
    at = dataclasses.replace(codec, vocab=vocab) if hasattr(codec, "vocab") else codec
    arrays = at.arrays((1, vocab))
    return float(sum(int(np.prod(shape[1:])) * dtype.itemsize for shape, dtype in arrays.values())) * cache.views


def zstd_bytes(cache: kdcache.TeacherCache, real_tokens: int) -> float:
    """Bytes per real token of the cache's logits arrays, each block compressed by zstd (level 3)."""
    from numcodecs import Zstd
    zstd, total = Zstd(level=3), 0
    for a in cache.meta.logits.arrays.values():
        for block in range(cache.n_blocks):
            total += len(zstd.encode(np.ascontiguousarray(cache.load_block(a.path, block))))
    return total / real_tokens


def storage_columns(ds: Documents, caches: dict[str, kdcache.TeacherCache], real_tokens: int, batch: int,
                    ) -> dict[str, float]:
    """Per layout (``padded``, ``packed``): bytes on disk per real token of the cache's logits
    arrays and read tokens/s through ``CachedTeacherDataset`` from disk (chunk reads, digest
    check, decode and padding to the batch included; one shuffled pass)."""
    out = {}
    for layout, cache in caches.items():
        sizes = cache.nbytes_on_disk()
        stored = sum(sizes[a.path] for a in cache.outputs["logits"].arrays.values())
        data = CachedTeacherDataset(ds, cache, in_memory=False)
        t0 = time.perf_counter()
        for idx in data.batch_sampler(batch, shuffle=True, seed=0):
            data.__getitems__(idx)
        out[f"{layout}_bytes_per_token"] = stored / real_tokens
        out[f"{layout}_read_tokens_per_s"] = real_tokens / (time.perf_counter() - t0)
    return out


# name -> dump_teacher options; "dense" is the reference every KL ratio is taken to
FORMS: dict[str, dict[str, Any]] = {
    "dense": {}, "head": {"head": "head"}, "head-int8": {"head": "head", "head_dtype": "int8"},
    "top-8": {"topk": 8}, "top-32": {"topk": 32}, "top-128": {"topk": 128},
    "sampled-32": {"sample_k": 32}, "sampled-44": {"sample_k": 44},
    "hybrid-16+32": {"topk": 16, "tail_samples": 32}, "hybrid-8+48": {"topk": 8, "tail_samples": 48},
    "sampled-32-sys": {"sample_k": 32, "sample_draws": "systematic"},
    "sampled-44-sys": {"sample_k": 44, "sample_draws": "systematic"},
    "hybrid-16+32-sys": {"topk": 16, "tail_samples": 32, "sample_draws": "systematic"},
    "hybrid-8+48-sys": {"topk": 8, "tail_samples": 48, "sample_draws": "systematic"},
    "hybrid-4+56-sys": {"topk": 4, "tail_samples": 56, "sample_draws": "systematic"},
    # a stored pool of draws, a different half each epoch (same bytes as 44 / 8 + 32 draws used every epoch)
    "sampled-22-sys-x2": {"sample_k": 22, "sample_draws": "systematic", "views": 2},
    "hybrid-8+16-sys-x2": {"topk": 8, "tail_samples": 16, "sample_draws": "systematic", "views": 2},
}
DEFAULT_FORMS = "dense,head,head-int8,top-32,hybrid-8+48-sys,sampled-44-sys,sampled-22-sys-x2,hybrid-8+16-sys-x2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--length", type=int, default=None, help="positions per row (documents are cut there)")
    ap.add_argument("--transfer-docs", type=int, default=None, help="documents in the transfer set")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--forms", default=DEFAULT_FORMS, help=f"caches to compare, of: {', '.join(FORMS)}")
    ap.add_argument("--out", default="bench_topk.json")
    ap.add_argument("--workdir", default=None, help="where caches are written (default: a temp dir, removed)")
    ap.add_argument("--no-padded", action="store_true", help="skip the padded dumps (and their storage columns)")
    ap.add_argument("--steps-only", action="store_true", help="only the KD step times")
    args = ap.parse_args()
    if args.steps_only:
        print_step_times(step_times(args.quick))
        return
    q = args.quick
    forms = ["dense"] + [f for f in args.forms.split(",") if f != "dense"]
    if not set(forms) <= set(FORMS):
        ap.error(f"--forms: unknown {sorted(set(forms) - set(FORMS))}; known: {', '.join(FORMS)}")
    vocab = args.vocab or (2048 if q else 8192)
    length = args.length or (64 if q else 128)
    transfer_docs, test_docs = args.transfer_docs or (384 if q else 1400), 96 if q else 256
    teacher_cfg = dict(width=64, layers=1, heads=2) if q else dict(width=256, layers=2, heads=4)
    student_cfg = dict(width=32, layers=1, heads=2) if q else dict(width=96, layers=1, heads=2)
    teacher_steps, epochs = (60, 2) if q else (400, args.epochs or 8)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    t0 = time.perf_counter()
    docs = documents(vocab)
    test = Documents(docs[:test_docs], length)
    train_docs = docs[test_docs:test_docs + transfer_docs]
    transfer = Documents(train_docs, length)
    teacher = CausalLM(vocab, length=length, **teacher_cfg)
    teacher_loss = train_teacher(teacher, np.concatenate(docs[test_docs:]), teacher_steps, 32, length, 3e-3)
    real_tokens = int(transfer.attention_mask.sum())
    lengths = transfer.attention_mask.sum(1).numpy()
    print(f"{len(docs)} documents, vocab {vocab}; transfer {len(transfer)} rows of {length} positions, {real_tokens} "
          f"real tokens ({real_tokens / transfer.attention_mask.numel():.0%}; per row 10/50/90%: "
          f"{np.percentile(lengths, [10, 50, 90]).astype(int).tolist()}); teacher "
          f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M params, train loss {teacher_loss:.3f} after "
          f"{teacher_steps} steps ({time.perf_counter() - t0:.0f} s)", flush=True)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_topk-"))
    rows = []
    try:
        baseline = CausalLM(vocab, length=length, **student_cfg)
        init = {k: v.clone() for k, v in baseline.state_dict().items()}
        train_student(baseline, transfer, None, epochs=epochs, lr=3e-3, batch_size=32, progress=False, seed=0)
        rows.append({"cache": "labels only (no KD)", **held_out(baseline, teacher, test)})
        for name in forms:
            options = FORMS[name]
            t = time.perf_counter()
            cache = dump_teacher(teacher, transfer, work / str(len(rows)), batch_size=64, progress=False,
                                 log=lambda m: None, **options)  # packed: the default for inputs with a mask
            dump_s = time.perf_counter() - t
            layouts = {"packed": cache}
            if not args.no_padded:
                layouts["padded"] = dump_teacher(teacher, transfer, work / f"{len(rows)}-padded", batch_size=64,
                                                 progress=False, log=lambda m: None, layout="padded", **options)
            storage = storage_columns(transfer, layouts, real_tokens, 32)
            storage["zstd_bytes_per_token"] = zstd_bytes(cache, real_tokens)
            storage["stored_once_bytes"] = sum(c.nbytes for c in cache.meta.constant_arrays())
            shutil.rmtree(work / f"{len(rows)}-padded", ignore_errors=True)
            student = CausalLM(vocab, length=length, **student_cfg)
            student.load_state_dict(init)
            t = time.perf_counter()
            train_student(student, transfer, cache, epochs=epochs, lr=3e-3, batch_size=32, alpha=1.0,
                          temperature=None if {"sample_k", "tail_samples"} & set(options) else 1.0, progress=False,
                          seed=0)
            rows.append({"cache": name, "bytes_per_token_32k": budget_bytes(cache),
                         "bytes_per_token_128k": budget_bytes(cache, LARGE_VOCAB), **storage,
                         "dump_tokens_per_s": real_tokens / dump_s, "train_s": time.perf_counter() - t,
                         **held_out(student, teacher, test)})
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
            shutil.rmtree(work / str(len(rows) - 1))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    steps = step_times(q)
    report(rows, args.out, {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "quick": q, "vocab": vocab, "length": length, "transfer_rows": len(transfer), "real_tokens": real_tokens,
        "positions": transfer.attention_mask.numel(), "epochs": epochs, "teacher_steps": teacher_steps,
        "teacher_train_loss": teacher_loss, "seconds": time.perf_counter() - t0, "step_times": steps})


def step_times(quick: bool, width: int = 256, repeats: int = 5) -> list[dict[str, Any]]:
    """Seconds per KD step (loss forward + backward, T = 1) of each form's loss on random logits,
    ``tokens`` positions, at V = 8k, 32k and 128k: dense logits (float16, the teacher side computed
    every step), dense precomputed (SoftTargets: the teacher's softmax held), top-32, hybrid 8 + 48,
    and the head form's fused loss (teacher width ``width``). One thread, best of ``repeats``."""
    from kdcache.losses import HybridKLDivLoss, KLDivLoss, TopKKLDivLoss
    from kdcache.losses.head import HeadKDLoss
    from kdcache.losses.targets import SoftTargets, teacher_side

    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: a shared box's second one is not reliably there
    for vocab in ((2048, 8192) if quick else (8192, 32_000, 128_000)):
        tokens = 256 if quick else max(256, (1 << 29) // (vocab * 4 * 4))  # ~0.5 GB of float32 logits at most
        g = torch.Generator().manual_seed(0)
        s = torch.randn(tokens, vocab, generator=g)
        hidden, weight = torch.randn(tokens, width, generator=g), torch.randn(vocab, width, generator=g) / width ** 0.5
        t = (hidden @ weight.T).half()
        log_p, p = teacher_side(t, 1.0)
        soft = SoftTargets(p.half(), (p * log_p).sum(-1), 1.0)
        values, indices = t.float().topk(48, -1)
        lse = t.float().logsumexp(-1)
        tail = torch.randint(0, vocab, (tokens, 48), generator=g)
        losses = {"dense": lambda x: KLDivLoss(1.0)(x, t),
                  "dense precomputed": lambda x: KLDivLoss(1.0)(x, soft),
                  "top-32": lambda x: TopKKLDivLoss(1.0)(x, values[:, :32].half(), indices[:, :32], lse),
                  "hybrid-8+48": lambda x: HybridKLDivLoss(1.0)(x, (values[:, :8] - lse[:, None]).half(),
                                                               indices[:, :8], tail),
                  "head": lambda x: HeadKDLoss(1.0)(x, hidden.half(), weight)}
        row: dict[str, Any] = {"vocab": vocab, "tokens": tokens}
        for name, loss in losses.items():
            best = float("inf")
            for _ in range(repeats):
                x = s.clone().requires_grad_()
                start = time.perf_counter()
                loss(x).backward()
                best = min(best, time.perf_counter() - start)
            row[name] = best / tokens * 1e6  # microseconds per token
        out.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    torch.set_num_threads(threads)
    return out


def print_step_times(steps: list[dict[str, Any]]) -> None:
    names = [k for k in steps[0] if k not in ("vocab", "tokens")]
    print("\n| V | tokens | " + " | ".join(f"{n} (us/token)" for n in names) + " | head / dense |")
    print("|---" * (len(names) + 3) + "|")
    for r in steps:
        print(f"| {r['vocab']:,} | {r['tokens']:,} | " + " | ".join(f"{r[n]:.2f}" for n in names)
              + f" | {r['head'] / r['dense']:.2f} |")


def report(rows: list[dict[str, Any]], out: str, run: dict[str, Any]) -> None:
    """Print the tables and which forms meet the targets; write everything to ``out``."""
    dense_kl = next(r["heldout_kl"] for r in rows if r["cache"] == "dense")
    for r in rows:
        r["kl_over_dense"] = r["heldout_kl"] / dense_kl
    met = [r["cache"] for r in rows if r.get("bytes_per_token_32k", 1e9) <= BUDGET_BYTES and r["kl_over_dense"] <= 1.02]
    print(f"\n{run['real_tokens']:,} real tokens in {run['transfer_rows']:,} rows of {run['length']}, "
          f"{run['epochs']} epochs, V = {run['vocab']:,}\n")
    print("| cache | B/token at V=32k / 128k | B/real token on disk: padded / packed / packed+zstd | stored once "
          "| read tokens/s: padded / packed | held-out CE | held-out KL(t\\|\\|s) | KL / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        def pair(key: str, fmt: str) -> str:
            return " / ".join(format(r[f"{layout}_{key}"], fmt) if f"{layout}_{key}" in r else "-"
                              for layout in ("padded", "packed"))
        stored = "packed_bytes_per_token" in r
        cols = [f"{r['bytes_per_token_32k']:,.0f} / {r['bytes_per_token_128k']:,.0f}" if "bytes_per_token_32k" in r
                else "-",
                f"{pair('bytes_per_token', ',.1f')} / {r['zstd_bytes_per_token']:,.1f}" if stored else "-",
                f"{r['stored_once_bytes'] / 1e6:.1f} MB" if r.get("stored_once_bytes") else "-",
                pair("read_tokens_per_s", ",.0f") if stored else "-"]
        print(f"| {r['cache']} | {' | '.join(cols)} | {r['heldout_ce']:.3f} | {r['heldout_kl']:.4f} "
              f"| {r['kl_over_dense']:.3f} |")
    print(f"\nwithin 2% of dense at <= {BUDGET_BYTES} B/token (V=32k): {', '.join(met) or 'none'}")
    print_step_times(run["step_times"])
    result = {**run, "rows": rows, "meets_target": met}
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({run['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
