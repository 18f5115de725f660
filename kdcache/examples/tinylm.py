"""A tiny causal language model setting for the Hugging Face examples (the ``kdcache[hf]`` extra):
a word-level tokenizer, a corpus of generated sentences, GPT-2 models built from a config, and a
teacher trained on the corpus (a few seconds on a CPU). Nothing is downloaded.

Sentences follow one pattern, "the big cat sat on a red mat": determiner, adjective, noun, verb,
preposition, determiner, adjective, noun, with the verb and the preposition tied to the noun
before them, so a trained teacher is confident where the grammar decides and unsure where it
does not (the dark knowledge a student learns from).
"""

from __future__ import annotations

import random
from typing import Any

import torch

__all__ = ["LENGTH", "tokenizer", "corpus", "model", "trained_teacher"]

LENGTH = 8  # tokens per sentence (every row: no padding needed, but the mask is kept)
_DETS = ["the", "a"]
_ADJS = ["big", "small", "red", "blue", "green", "old", "new"]
_NOUNS = ["cat", "dog", "bird", "fish", "tree", "house", "car", "sun", "moon", "star", "mat", "road"]
_VERBS = ["sat", "ran", "saw", "found"]
_PREPS = ["on", "near", "under", "by"]
WORDS = _DETS + _ADJS + _NOUNS + _VERBS + _PREPS


def tokenizer() -> Any:
    """A word-level fast tokenizer: ``[PAD]`` = 0, ``[UNK]`` = 1, then the corpus' words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


def sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences of the corpus' pattern, drawn with ``seed``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        noun = rng.randrange(len(_NOUNS))
        verb = _VERBS[noun % len(_VERBS)] if rng.random() < 0.8 else rng.choice(_VERBS)
        prep = _PREPS[(noun + _VERBS.index(verb)) % len(_PREPS)]
        out.append(" ".join([rng.choice(_DETS), rng.choice(_ADJS), _NOUNS[noun], verb, prep, rng.choice(_DETS),
                             rng.choice(_ADJS), rng.choice(_NOUNS)]))
    return out


def corpus(n: int = 512, seed: int = 0) -> Any:
    """A ``datasets.Dataset`` of ``n`` tokenized sentences: ``input_ids`` and ``attention_mask``,
    (LENGTH,) int64 each, torch-formatted (the rows a teacher is dumped over and a student reads)."""
    import datasets

    from ..data.hf import prepare

    return prepare(datasets.Dataset.from_dict({"text": sentences(n, seed)}), tokenizer(), text_column="text",
                   max_length=LENGTH)


def model(layers: int = 2, width: int = 64, seed: int = 0) -> Any:
    """A GPT-2 language model over the tokenizer's vocabulary, built from a config (untrained)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(WORDS) + 2, n_positions=LENGTH, n_embd=width, n_layer=layers, n_head=2,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config)


def trained_teacher(steps: int = 300, seed: int = 0) -> Any:
    """The examples' teacher: :func:`model` (2 layers, width 64) trained on :func:`corpus` for
    ``steps`` AdamW steps of 32 sentences; seeded, so the same weights (and cache) every time on
    one machine."""
    teacher = model(seed=seed)
    rows = corpus(seed=seed + 1)[:]
    ids, mask = rows["input_ids"], rows["attention_mask"]
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    teacher.train()
    for _ in range(steps):
        batch = torch.randint(0, len(ids), (32,), generator=generator)
        loss = teacher(input_ids=ids[batch], attention_mask=mask[batch], labels=ids[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return teacher.eval()
