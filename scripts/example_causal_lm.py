"""Causal-LM distillation through the Hugging Face path: hf: teacher -> top-32 cache -> KDTrainer.

1. A byte-level BPE tokenizer and a GPT-2-architecture teacher (transformers, built from a config)
   are trained briefly on text that ships with Python (``pydoc_data.topics`` and the docstrings of
   the standard library's modules), and saved with ``save_pretrained``.
2. ``kdcache dump-teacher --teacher hf:DIR --dataset jsonl:transfer.jsonl --text-column text
   --max-length 64 --topk 32`` caches the teacher's top-32 logits over the transfer set.
3. A smaller GPT-2 student is trained with ``KDTrainer`` from the cache, and with the plain
   ``transformers.Trainer`` on the labels alone (same seed, steps and batches); both are scored on
   held-out text: next-token cross-entropy and KL(teacher || student) per real token.

    python scripts/example_causal_lm.py            # ~10 min on 2 shared CPU cores
    python scripts/example_causal_lm.py --quick    # seconds: a smoke run

Writes ``example_causal_lm.json`` to ``--out`` (default ``example-causal-lm/``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
from tokenizers import ByteLevelBPETokenizer  # noqa: E402
from transformers import (DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel,  # noqa: E402
                          PreTrainedTokenizerFast, Trainer, TrainingArguments)

from kdcache.data.hf import prepare  # noqa: E402
from kdcache.integrations.hf import KDTrainer  # noqa: E402

MAX_LENGTH = 64


def python_texts() -> list[str]:
    """Paragraphs of Python's own documentation and module docstrings (no download)."""
    import pydoc_data.topics as topics

    texts = [p for t in topics.topics.values() for p in t.split("\n\n")]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts += doc.split("\n\n")
    texts = [" ".join(t.split()) for t in texts]
    return [t for t in texts if len(t) >= 80]


def build_tokenizer(texts: list[str], vocab: int, out: Path) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab, min_frequency=2, special_tokens=["<pad>", "<eos>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, pad_token="<pad>", eos_token="<eos>")
    tok.save_pretrained(out)
    return tok


def gpt2(vocab: int, layers: int, width: int, heads: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=MAX_LENGTH, n_embd=width, n_layer=layers,
                                      n_head=heads, bos_token_id=1, eos_token_id=1, pad_token_id=0))


def train_teacher(model: GPT2LMHeadModel, rows: datasets.Dataset, steps: int, batch: int) -> float:
    """Plain next-token training; returns seconds."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(rows), (batch,), generator=g).tolist()
        b = rows[idx]
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def heldout(student: GPT2LMHeadModel, teacher: GPT2LMHeadModel, rows: datasets.Dataset) -> dict[str, float]:
    """Next-token CE and KL(teacher || student) per real token over ``rows``."""
    student.eval()
    ce = kl = 0.0
    tokens = predicted = 0
    for s in range(0, len(rows), 64):
        b = rows[s:s + 64]
        ids, mask = b["input_ids"], b["attention_mask"].bool()
        s_logp = F.log_softmax(student(input_ids=ids, attention_mask=b["attention_mask"]).logits.float(), -1)
        t_logp = F.log_softmax(teacher(input_ids=ids, attention_mask=b["attention_mask"]).logits.float(), -1)
        kl += float(((t_logp.exp() * (t_logp - s_logp)).sum(-1) * mask).sum())
        tokens += int(mask.sum())
        target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        ce += float(F.cross_entropy(s_logp[:, :-1].reshape(-1, s_logp.shape[-1]), target.reshape(-1), ignore_index=-100,
                                    reduction="sum"))
        predicted += int((target >= 0).sum())
    return {"heldout_ce": ce / predicted, "heldout_kl": kl / tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("example-causal-lm"))
    a = parser.parse_args()
    q = a.quick
    cfg = dict(vocab=512 if q else 4096, transfer=256 if q else 4000, heldout=64 if q else 500,
               teacher_steps=20 if q else 600, student_epochs=1 if q else 2)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    texts = python_texts()
    random.Random(0).shuffle(texts)
    held, rest = texts[:cfg["heldout"]], texts[cfg["heldout"]:]
    teacher_dir = out / "teacher"
    tok = build_tokenizer(rest, cfg["vocab"], teacher_dir)
    corpus = prepare(datasets.Dataset.from_dict({"text": rest}), tok, text_column="text", max_length=MAX_LENGTH)
    teacher = gpt2(len(tok), layers=3, width=192, heads=4, seed=0)
    teacher_seconds = train_teacher(teacher, corpus, cfg["teacher_steps"], 32)
    teacher.save_pretrained(teacher_dir)
    print(f"teacher: {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M parameters, "
          f"{cfg['teacher_steps']} steps in {teacher_seconds:.0f} s", flush=True)

    # the transfer set as a JSON-lines file of text; the CLI tokenizes it with the teacher's tokenizer
    transfer = out / "transfer.jsonl"
    transfer.write_text("".join(json.dumps({"text": t}) + "\n" for t in rest[:cfg["transfer"]]))
    cache = out / "cache-top32"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kdcache", "dump-teacher", "--teacher", f"hf:{teacher_dir}", "--dataset",
                    f"jsonl:{transfer}", "--text-column", "text", "--max-length", str(MAX_LENGTH), "--topk", "32",
                    "--out", str(cache), "--overwrite", "--no-progress"], check=True)
    dump_seconds = time.perf_counter() - t0

    train = prepare(datasets.Dataset.from_json(str(transfer), keep_in_memory=True), tok, text_column="text",
                    max_length=MAX_LENGTH)
    test = prepare(datasets.Dataset.from_dict({"text": held}), tok, text_column="text", max_length=MAX_LENGTH)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    rows = {"teacher (3 layers, width 192)": {**heldout(teacher, teacher, test), "train_s": teacher_seconds}}
    runs = {"labels only (Trainer)": None, "KD from top-32 cache (KDTrainer, alpha 0.5, T 1)": 0.5,
            "KD from top-32 cache (KDTrainer, alpha 1, T 1)": 1.0}
    for name, alpha in runs.items():
        student = gpt2(len(tok), layers=2, width=128, heads=4, seed=1)
        args = TrainingArguments(output_dir=str(out / "runs"), per_device_train_batch_size=32, learning_rate=2e-3,
                                 num_train_epochs=cfg["student_epochs"], lr_scheduler_type="cosine", warmup_steps=20,
                                 use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                                 logging_strategy="no")
        common = dict(model=student, args=args, train_dataset=train, data_collator=collator, processing_class=tok)
        trainer = (Trainer(**common) if alpha is None else
                   KDTrainer(**common, kd_cache=str(cache), temperature=1.0, alpha=alpha))
        t0 = time.perf_counter()
        trainer.train()
        rows[name] = {**heldout(student, teacher, test), "train_s": time.perf_counter() - t0}
        print(f"{name}: {rows[name]}", flush=True)

    report = {"config": cfg, "dump_s": dump_seconds, "rows": rows, "total_s": time.perf_counter() - t_all,
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__}
    (out / "example_causal_lm.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ndump (top-32, {cfg['transfer']} rows of <= {MAX_LENGTH} tokens): {dump_seconds:.1f} s")
    print("| student | held-out CE | held-out KL(teacher || student) | train s |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['heldout_ce']:.3f} | {r['heldout_kl']:.3f} | {r['train_s']:.0f} |")


if __name__ == "__main__":
    main()
