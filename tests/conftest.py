"""Shared fixtures: small real models written to files (so specs resolve by path) and datasets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A shell starts a background job (`bash scripts/test.sh &`, nohup) with SIGINT ignored, and an ignored
# signal stays ignored in every process it starts: the tests that interrupt a run with SIGINT would
# see it do nothing. Python's own handler here gives this run's children the default disposition.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

MODELS_PY = textwrap.dedent('''
    import random
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import Dataset, TensorDataset

    FORWARD_CALLS = [0]

    class Teacher(nn.Module):
        def __init__(self, d_in=12, width=32, classes=5):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh())
            self.head = nn.Linear(width, classes)
        def forward(self, x):
            FORWARD_CALLS[0] += 1
            return self.head(self.body(x))

    class Student(nn.Module):
        def __init__(self, d_in=12, width=8, classes=5):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(d_in, width), nn.ReLU())
            self.head = nn.Linear(width, classes)
        def forward(self, x):
            return self.head(self.body(x))

    def teacher(seed=0, **kw):
        torch.manual_seed(seed)
        return Teacher(**kw)

    def student(seed=1, **kw):
        torch.manual_seed(seed)
        return Student(**kw)

    def dataset(n=300, d_in=12, classes=5, seed=0, unlabelled_from=None, edit_row=None):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d_in, generator=g)
        y = torch.randint(0, classes, (n,), generator=g)
        if unlabelled_from is not None:
            y[unlabelled_from:] = -1
        if edit_row is not None:
            x[edit_row, 0] += 1.0
        return TensorDataset(x, y)

    class DictItems(Dataset):
        """HF-style items: a dict of input tensors with a 'label' key."""
        def __init__(self, n=100):
            g = torch.Generator().manual_seed(3)
            self.a, self.b = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
            self.y = torch.randint(0, 5, (n,), generator=g)
        def __len__(self):
            return len(self.y)
        def __getitem__(self, i):
            return {"a": self.a[i], "b": self.b[i], "label": int(self.y[i])}

    class DictTeacher(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = nn.Linear(12, 5)
        def forward(self, a, b):
            return {"logits": self.proj(torch.cat([a, b], dim=1)), "extra": a.sum(1)}

    class TinyLM(nn.Module):
        """A causal toy LM: embedding, one GRU layer, a head over a padded vocabulary."""
        def __init__(self, vocab=40, padded=48, width=16, seed=0, sharp=4.0):
            super().__init__()
            self.sharp = sharp
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab, width)
            self.rnn = nn.GRU(width, width, batch_first=True)
            self.head = nn.Linear(width, padded)
        def forward(self, input_ids, attention_mask=None):
            h, _ = self.rnn(self.embed(input_ids))
            return {"logits": self.sharp * self.head(h)}

    def tiny_lm(**kw):
        return TinyLM(**kw)

    class Tokens(Dataset):
        """Right- and left-padded token rows of varied length, with shifted token labels."""
        def __init__(self, n=40, length=12, vocab=40, seed=5):
            g = torch.Generator().manual_seed(seed)
            self.ids = torch.randint(1, vocab, (n, length), generator=g)
            lengths = torch.randint(3, length + 1, (n,), generator=g)
            pos = torch.arange(length)
            self.mask = torch.stack([(pos < l) if i % 3 else (pos >= length - l) for i, l in enumerate(lengths)]).long()
            self.ids[self.mask == 0] = 0
            self.labels = torch.full((n, length), -100)
            self.labels[:, :-1] = torch.where(self.mask[:, 1:] == 1, self.ids[:, 1:], -100)
        def __len__(self):
            return len(self.ids)
        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}

    def tokens(**kw):
        return Tokens(**kw)

    class Augmented(Dataset):
        """Rows with a random shift, noise and scale drawn from torch, numpy and random's global
        generators; ``nondeterministic`` adds noise from a private unseeded generator."""
        def __init__(self, n=48, d=12, nondeterministic=False):
            g = torch.Generator().manual_seed(7)
            self.x, self.y = torch.randn(n, d, generator=g), torch.randint(0, 5, (n,), generator=g)
            self.nondeterministic = nondeterministic
            self.private = np.random.default_rng()
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            x = torch.roll(self.x[i], int(torch.randint(-2, 3, ())))
            x = x + 0.1 * torch.from_numpy(np.random.normal(size=x.shape)).float()
            x = x * random.uniform(0.9, 1.1)
            if self.nondeterministic:
                x = x + 0.01 * float(self.private.normal())
            return x, int(self.y[i])

    def augmented(**kw):
        return Augmented(**kw)

    class ParamAugmented(Augmented):
        """Records its augmentation explicitly: (shift, scale) drawn from the given generator."""
        def sample_params(self, i, generator):
            return torch.tensor([float(torch.randint(-2, 3, (), generator=generator)),
                                 0.9 + 0.2 * float(torch.rand((), generator=generator))])
        def apply_params(self, i, params):
            return torch.roll(self.x[i], int(params[0])) * float(params[1]), int(self.y[i])

    def param_augmented(**kw):
        return ParamAugmented(**kw)

    class Recording(nn.Module):
        """Wraps a teacher and keeps every input batch it sees."""
        def __init__(self, inner):
            super().__init__()
            self.inner, self.seen = inner, []
        def forward(self, x):
            self.seen.append(x.detach().clone())
            return self.inner(x)

    def failing_dataset(n=300, fail_at=None):
        base = dataset(n)
        class Failing(Dataset):
            def __len__(self):
                return n
            def __getitem__(self, i):
                if fail_at is not None and i == fail_at:
                    raise RuntimeError("simulated crash")
                return base[i]
        return Failing()
''')


@pytest.fixture()
def models_file(tmp_path: Path) -> Path:
    path = tmp_path / "kd_models.py"
    path.write_text(MODELS_PY)
    return path


@pytest.fixture()
def models(models_file: Path):
    from kdcache.spec import _import_target
    return _import_target(str(models_file), "test")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m kdcache ARGS`` as a user would; returns the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kdcache", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a cache, by relative path (the zarr.json of the group without run timings,
    nor the attrs digest, which covers them)."""
    import json
    files = {}
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            data = f.read_bytes()
            if f.name == "zarr.json" and f.parent == Path(path):
                meta = json.loads(data)
                meta["attributes"]["kdcache"].pop("dump", None)
                meta["attributes"]["kdcache"].pop("attrs_digest", None)
                data = json.dumps(meta, sort_keys=True).encode()
            files[str(f.relative_to(path))] = data
    return files
