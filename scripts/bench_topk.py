"""Fidelity of sparse logit caches for token-level distillation: dense vs top-k vs sampled.

A small causal transformer LM (the teacher, vocabulary 8,192 by default) is trained briefly on
a word-level token corpus built from text that ships with Python (``pydoc_data.topics`` and the
standard library's top-level modules). Its outputs over a transfer set are dumped as a dense
float16 cache, top-k caches (k = 8, 32, 128) and a sampled cache (32 draws per token); the same
smaller student is then distilled from each (pure KD, alpha = 1, T = 1, same seed and batches),
and once from the labels alone for reference. Reported per cache: bytes per token on disk, dump
and read throughput, and the student's held-out cross-entropy and KL(teacher || student).

    python scripts/bench_topk.py            # full run, ~10 min on 2 CPU cores
    python scripts/bench_topk.py --quick    # small smoke run, < 1 min

Writes ``bench_topk.json`` to the current directory.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import re
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import kdcache
from kdcache import CachedTeacherDataset, dump_teacher, train_student

PAD, UNK = 0, 1
WORD = re.compile(r"[A-Za-z_]+|\d+|[^\sA-Za-z_\d]")


def build_corpus(vocab: int) -> np.ndarray:
    """Word-level token ids of Python's own docs and top-level stdlib modules (no download)."""
    import pydoc_data.topics as topics
    texts = list(topics.topics.values())
    texts += [p.read_text(errors="replace") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))]
    words = WORD.findall("\n".join(texts))
    keep = [w for w, _ in collections.Counter(words).most_common(vocab - 2)]
    index = {w: i + 2 for i, w in enumerate(keep)}
    return np.array([index.get(w, UNK) for w in words], dtype=np.int64)


class Windows(Dataset):
    """Items ``{"input_ids", "attention_mask", "labels"}`` of ``length`` tokens; one row in four is
    cut short and right-padded, so masks matter. Labels are the next tokens (-100 = ignore)."""

    def __init__(self, ids: np.ndarray, rows: int, length: int, seed: int) -> None:
        g = np.random.default_rng(seed)
        starts = g.integers(0, len(ids) - length - 1, rows)
        windows = np.stack([ids[s:s + length + 1] for s in starts])
        lengths = np.where(g.random(rows) < 0.25, g.integers(length // 4, length, rows), length)
        mask = np.arange(length)[None, :] < lengths[:, None]
        self.input_ids = torch.from_numpy(np.where(mask, windows[:, :-1], PAD))
        self.attention_mask = torch.from_numpy(mask.astype(np.int64))
        self.labels = torch.from_numpy(np.where(mask, windows[:, 1:], -100))

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


def batches(ds: Windows, size: int):
    for s in range(0, len(ds), size):
        yield ds.input_ids[s:s + size], ds.attention_mask[s:s + size], ds.labels[s:s + size]


def train_teacher(model: CausalLM, ds: Windows, steps: int, batch: int, lr: float) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(0, len(ds), (batch,), generator=g)
        logits = model(ds.input_ids[idx])["logits"]
        loss = F.cross_entropy(logits.flatten(0, 1), ds.labels[idx].flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def held_out(student: nn.Module, teacher: nn.Module, ds: Windows) -> dict[str, float]:
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


def read_throughput(ds: Windows, cache: kdcache.TeacherCache, batch: int, tokens: int) -> float:
    """Tokens/s through CachedTeacherDataset (chunk reads from disk, decode included), one pass."""
    data = CachedTeacherDataset(ds, cache, in_memory=False)
    order = data.batch_sampler(batch, shuffle=True, seed=0)
    t0 = time.perf_counter()
    for idx in order:
        data.__getitems__(idx)
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--out", default="bench_topk.json")
    ap.add_argument("--workdir", default=None, help="where caches are written (default: a temp dir, removed)")
    args = ap.parse_args()
    q = args.quick
    vocab = args.vocab or (1024 if q else 8192)
    length, transfer_rows, test_rows = (32, 192, 64) if q else (64, 1536, 256)
    teacher_cfg = dict(width=64, layers=1, heads=2) if q else dict(width=256, layers=2, heads=4)
    student_cfg = dict(width=32, layers=1, heads=2) if q else dict(width=96, layers=1, heads=2)
    teacher_steps, epochs = (40, 1) if q else (600, args.epochs or 6)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    t0 = time.perf_counter()
    ids = build_corpus(vocab)
    cut = int(len(ids) * 0.9)
    pretrain = Windows(ids[:cut], 4096 if not q else 512, length, seed=1)
    transfer = Windows(ids[:cut], transfer_rows, length, seed=2)
    test = Windows(ids[cut:], test_rows, length, seed=3)
    teacher = CausalLM(vocab, length=length, **teacher_cfg)
    teacher_loss = train_teacher(teacher, pretrain, teacher_steps, 32, 3e-3)
    print(f"corpus {len(ids)} tokens, vocab {vocab}; teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M "
          f"params, train loss {teacher_loss:.3f} after {teacher_steps} steps ({time.perf_counter() - t0:.0f} s)")
    real_tokens = int(transfer.attention_mask.sum())

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_topk-"))
    forms = [("dense", {}), ("top-8", {"topk": 8}), ("top-32", {"topk": 32}), ("top-128", {"topk": 128}),
             ("sampled-32", {"sample_k": 32})]
    rows = []
    try:
        baseline = CausalLM(vocab, length=length, **student_cfg)
        init = {k: v.clone() for k, v in baseline.state_dict().items()}
        torch.manual_seed(0)
        train_student(baseline, transfer, None, epochs=epochs, lr=3e-3, batch_size=32, progress=False, seed=0)
        rows.append({"cache": "labels only (no KD)", **held_out(baseline, teacher, test)})
        for name, options in forms:
            t = time.perf_counter()
            cache = dump_teacher(teacher, transfer, work / name, batch_size=64, progress=False, log=lambda m: None,
                                 **options)
            dump_s = time.perf_counter() - t
            sizes = cache.nbytes_on_disk()
            stored = sum(sizes[a.path] for a in cache.outputs["logits"].arrays.values())
            read = read_throughput(transfer, cache, 32, real_tokens)
            student = CausalLM(vocab, length=length, **student_cfg)
            student.load_state_dict(init)
            t = time.perf_counter()
            train_student(student, transfer, cache, epochs=epochs, lr=3e-3, batch_size=32, alpha=1.0,
                          temperature=None if "sample_k" in options else 1.0, progress=False, seed=0)
            train_s = time.perf_counter() - t
            rows.append({"cache": name, "bytes_per_token": stored / real_tokens, "dump_tokens_per_s": real_tokens / dump_s,
                         "read_tokens_per_s": read, "train_s": train_s, **held_out(student, teacher, test)})
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}))
            if name != "dense":
                shutil.rmtree(work / name)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    dense_kl = next(r["heldout_kl"] for r in rows if r["cache"] == "dense")
    for r in rows:
        r["kl_over_dense"] = r["heldout_kl"] / dense_kl
    by = {r["cache"]: r for r in rows}
    summary = {"k32_topk_kl_over_dense": by["top-32"]["kl_over_dense"],
               "k32_sampled_kl_over_dense": by["sampled-32"]["kl_over_dense"],
               "sampled_beats_topk_at_32": by["sampled-32"]["heldout_kl"] < by["top-32"]["heldout_kl"]}
    print("\n| cache | bytes/token | dump tokens/s | read tokens/s | held-out CE | held-out KL(t||s) | KL / dense |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b = f"{r['bytes_per_token']:.1f}" if "bytes_per_token" in r else "-"
        d = f"{r['dump_tokens_per_s']:,.0f}" if "dump_tokens_per_s" in r else "-"
        rd = f"{r['read_tokens_per_s']:,.0f}" if "read_tokens_per_s" in r else "-"
        print(f"| {r['cache']} | {b} | {d} | {rd} | {r['heldout_ce']:.3f} | {r['heldout_kl']:.4f} | {r['kl_over_dense']:.3f} |")
    print(json.dumps(summary))
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": torch.get_num_threads(), "torch": torch.__version__},
              "quick": q, "vocab": vocab, "length": length, "transfer_rows": transfer_rows, "real_tokens": real_tokens,
              "epochs": epochs, "teacher_steps": teacher_steps, "teacher_train_loss": teacher_loss,
              "seconds": time.perf_counter() - t0, "rows": rows, **summary}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
