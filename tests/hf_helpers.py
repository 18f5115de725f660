"""Tiny Hugging Face models, tokenizers and datasets built in ``tmp_path`` (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a cat dog sat on mat ran fast slow big small red blue green tree house car road sun moon star "
         "river hill stone bird fish").split()
TEXTS = [" ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(3 + i % 9)) for i in range(48)]


def tokenizer(words: tuple[str, ...] | list[str] = WORDS, shuffle: int = 0):
    """A word-level fast tokenizer: [PAD]=0, [UNK]=1, then ``words`` (rotated by ``shuffle``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(words)
    words = words[shuffle:] + words[:shuffle]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


def gpt2(vocab: int, seed: int = 0, layers: int = 1, width: int = 16, positions: int = 32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=2,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def save_lm(path: Path, seed: int = 0, tok=None, vocab: int | None = None, **kw) -> Path:
    """A GPT-2 LM and its tokenizer saved with save_pretrained in ``path``."""
    tok = tok if tok is not None else tokenizer()
    model = gpt2(vocab or len(tok), seed=seed, **kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def text_dataset(n: int = 48):
    import datasets

    return datasets.Dataset.from_dict({"text": TEXTS[:n], "idx": list(range(n))})
