"""Fidelity of sparse logit caches for token-level distillation: dense vs top-k vs sampled vs hybrid.

A small causal transformer LM (the teacher, vocabulary 8,192 words) is trained briefly on text
that ships with Python. The transfer and held-out sets are *documents* of very different
lengths — each ``pydoc`` topic and each top-level block (module preamble, def, class) of the
standard library's top-level modules, from 2 to thousands of words — one document a row, cut at
``--length`` and right-padded, as instruction and chat data are. The teacher's outputs over the
transfer set are dumped as a dense float16 cache and as each sparse form; the same smaller
student is distilled from each (pure KD, alpha = 1, T = 1, same initial weights, seed and
batches) and once from the labels alone. Reported per cache: bytes per real token on disk and
read tokens/s in the padded and the packed layout (the students train from the packed one),
what the same codec takes per token at V = 32,000 (the budget: 128 bytes), and the
student's held-out cross-entropy and KL(teacher || student) per real token, also as a ratio to
the dense-cache student's (the target: within 1.02).

    python scripts/bench_topk.py            # the measurement (see README for its size and time)
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
BUDGET_VOCAB, BUDGET_BYTES = 32_000, 128


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


def budget_bytes(cache: kdcache.TeacherCache) -> float:
    """Bytes per token position the cache's logits codec takes at V = 32,000 (from its own
    ``arrays()``): the issue's budget is 128."""
    codec = cache.meta.logits.codec
    at = dataclasses.replace(codec, vocab=BUDGET_VOCAB) if hasattr(codec, "vocab") else codec
    arrays = at.arrays((1, BUDGET_VOCAB))
    return float(sum(int(np.prod(shape[1:])) * dtype.itemsize for shape, dtype in arrays.values()))


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
    "dense": {}, "top-8": {"topk": 8}, "top-32": {"topk": 32}, "top-128": {"topk": 128},
    "sampled-32": {"sample_k": 32}, "sampled-44": {"sample_k": 44},
    "hybrid-16+32": {"topk": 16, "tail_samples": 32}, "hybrid-8+48": {"topk": 8, "tail_samples": 48},
    "sampled-32-sys": {"sample_k": 32, "sample_draws": "systematic"},
    "sampled-44-sys": {"sample_k": 44, "sample_draws": "systematic"},
    "hybrid-16+32-sys": {"topk": 16, "tail_samples": 32, "sample_draws": "systematic"},
    "hybrid-8+48-sys": {"topk": 8, "tail_samples": 48, "sample_draws": "systematic"},
}
DEFAULT_FORMS = "dense,top-32,sampled-44,hybrid-8+48,hybrid-8+48-sys"


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
    args = ap.parse_args()
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
            padded = dump_teacher(teacher, transfer, work / f"{len(rows)}-padded", batch_size=64, progress=False,
                                  log=lambda m: None, layout="padded", **options)
            storage = storage_columns(transfer, {"padded": padded, "packed": cache}, real_tokens, 32)
            shutil.rmtree(work / f"{len(rows)}-padded")
            student = CausalLM(vocab, length=length, **student_cfg)
            student.load_state_dict(init)
            t = time.perf_counter()
            train_student(student, transfer, cache, epochs=epochs, lr=3e-3, batch_size=32, alpha=1.0,
                          temperature=None if {"sample_k", "tail_samples"} & set(options) else 1.0, progress=False,
                          seed=0)
            rows.append({"cache": name, "bytes_per_token_32k": budget_bytes(cache), **storage,
                         "dump_tokens_per_s": real_tokens / dump_s, "train_s": time.perf_counter() - t,
                         **held_out(student, teacher, test)})
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
            shutil.rmtree(work / str(len(rows) - 1))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report(rows, args.out, {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "quick": q, "vocab": vocab, "length": length, "transfer_rows": len(transfer), "real_tokens": real_tokens,
        "positions": transfer.attention_mask.numel(), "epochs": epochs, "teacher_steps": teacher_steps,
        "teacher_train_loss": teacher_loss, "seconds": time.perf_counter() - t0})


def report(rows: list[dict[str, Any]], out: str, run: dict[str, Any]) -> None:
    """Print the table and which forms meet the target; write everything to ``out``."""
    dense_kl = next(r["heldout_kl"] for r in rows if r["cache"] == "dense")
    for r in rows:
        r["kl_over_dense"] = r["heldout_kl"] / dense_kl
    met = [r["cache"] for r in rows if r.get("bytes_per_token_32k", 1e9) <= BUDGET_BYTES and r["kl_over_dense"] <= 1.02]
    print(f"\n{run['real_tokens']:,} real tokens in {run['transfer_rows']:,} rows of {run['length']}, "
          f"{run['epochs']} epochs, V = {run['vocab']:,}\n")
    print("| cache | B/token at V=32k | B/real token on disk: padded / packed | read tokens/s: padded / packed "
          "| held-out CE | held-out KL(t\\|\\|s) | KL / dense |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        stored = "packed_bytes_per_token" in r
        cols = [f"{r['bytes_per_token_32k']:,.0f}" if "bytes_per_token_32k" in r else "-",
                f"{r['padded_bytes_per_token']:,.1f} / {r['packed_bytes_per_token']:,.1f}" if stored else "-",
                f"{r['padded_read_tokens_per_s']:,.0f} / {r['packed_read_tokens_per_s']:,.0f}" if stored else "-"]
        print(f"| {r['cache']} | {' | '.join(cols)} | {r['heldout_ce']:.3f} | {r['heldout_kl']:.4f} "
              f"| {r['kl_over_dense']:.3f} |")
    print(f"\nwithin 2% of dense at <= {BUDGET_BYTES} B/token (V=32k): {', '.join(met) or 'none'}")
    result = {**run, "rows": rows, "meets_target": met}
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} ({run['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
