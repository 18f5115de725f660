"""The bundled example: scikit-learn's handwritten digits (data/digits.npz), a teacher and a student.

Specs for the CLI:
    datasets  kdcache.examples.digits:train     1,200 labelled images (how the teacher is trained)
              kdcache.examples.digits:transfer  the same 1,200 images, only 120 labelled (12 per
                                                class), the rest -1: Hinton's transfer set
              kdcache.examples.digits:test      597 held-out labelled images
              kdcache.examples.digits:augmented_train / augmented_transfer
                                                the same, randomly shifted and noised on every read
                                                (for --views; ``fresh=true`` draws from a private
                                                generator that no seed controls)
    models    kdcache.examples.digits:teacher   64-512-512-10 MLP with dropout (untrained)
              kdcache.examples.digits:student   64-16-10 MLP
Both models expose ``features`` (the last hidden layer) for hints. In Python,
:func:`trained_teacher` gives the demo's teacher, trained.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ..errors import KdcacheError

__all__ = ["MLP", "AugmentedDigits", "teacher", "trained_teacher", "student", "train", "transfer", "test", "labelled",
           "augmented_train", "augmented_transfer", "data_file", "DEMO_TEACHER"]

DEMO_TEACHER = Path("demo-out") / "teacher" / "student.pt"  # where scripts/demo.sh saves its teacher


def data_file() -> Path:
    """``$KDCACHE_DIGITS`` or the repository's ``data/digits.npz``."""
    env = os.environ.get("KDCACHE_DIGITS")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "digits.npz"
    if not path.is_file():
        raise KdcacheError(f"digits data not found at {path}; run from a kdcache checkout or set KDCACHE_DIGITS")
    return path


@lru_cache(maxsize=1)
def _arrays() -> dict[str, np.ndarray]:
    with np.load(data_file()) as f:
        return {k: f[k] for k in f.files}


def _split(name: str, keep_labels: str | None = None) -> TensorDataset:
    a = _arrays()
    idx = a[f"{name}_idx"].astype(np.int64)
    x = torch.from_numpy(a["images"][idx].reshape(len(idx), 64).astype(np.float32) / 16.0)
    y = torch.from_numpy(a["labels"][idx].astype(np.int64))
    if keep_labels is not None:
        y = torch.where(torch.from_numpy(np.isin(idx, a[f"{keep_labels}_idx"])), y, torch.full_like(y, -1))
    return TensorDataset(x, y)


def train() -> TensorDataset:
    """1,200 labelled training images: inputs (64,) float32 in [0, 1], labels 0..9."""
    return _split("train")


def transfer() -> TensorDataset:
    """The 1,200 training images with only 120 labels kept (12 per class), the rest -1."""
    return _split("train", keep_labels="labelled")


def labelled() -> TensorDataset:
    """The 120 labelled images of the transfer set alone."""
    return _split("labelled")


def test() -> TensorDataset:
    """597 held-out labelled images."""
    return _split("test")


class AugmentedDigits(Dataset):
    """Digits shifted by up to ``shift`` pixels (zero fill) plus Gaussian noise on every read.

    The randomness comes from torch's global generator, so ``dump-teacher --views K`` can seed
    each view and stage two can replay it; with ``fresh=True`` it comes from a private generator
    instead, so every read is a new augmentation that no seed reproduces.
    """

    def __init__(self, base: TensorDataset, shift: int = 1, noise: float = 0.1, fresh: bool = False) -> None:
        self.x, self.y = base.tensors
        self.shift, self.noise = shift, noise
        self.generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little")) if fresh else None

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g, s = self.generator, self.shift
        image = self.x[i].view(8, 8)
        dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,), generator=g))
        shifted = torch.zeros_like(image)
        shifted[max(dy, 0):8 + min(dy, 0), max(dx, 0):8 + min(dx, 0)] = \
            image[max(-dy, 0):8 + min(-dy, 0), max(-dx, 0):8 + min(-dx, 0)]
        noisy = shifted + self.noise * torch.randn(8, 8, generator=g)
        return noisy.flatten(), int(self.y[i])


def augmented_train(shift: int = 1, noise: float = 0.1, fresh: bool = False) -> AugmentedDigits:
    return AugmentedDigits(train(), shift, noise, fresh)


def augmented_transfer(shift: int = 1, noise: float = 0.1, fresh: bool = False) -> AugmentedDigits:
    return AugmentedDigits(transfer(), shift, noise, fresh)


class MLP(nn.Module):
    """``features`` (Linear-ReLU-Dropout stacks) then ``head`` (Linear to the classes)."""

    def __init__(self, sizes: tuple[int, ...] = (64, 16, 10), dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-2], sizes[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-2], sizes[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.flatten(1)))


def teacher(width: int = 512, dropout: float = 0.3) -> MLP:
    return MLP((64, width, width, 10), dropout=dropout)


def student(width: int = 16) -> MLP:
    return MLP((64, width, 10))


def trained_teacher(checkpoint: str | Path | None = DEMO_TEACHER, epochs: int = 30) -> MLP:
    """The demo's teacher, trained: loaded from ``checkpoint`` (the demo's, relative to the
    working directory) when that file exists, else trained here as the demo trains it (1,200
    labels, ``epochs`` epochs, AdamW lr 1e-3, batch 64, seed 0, CPU; ~2 s). Training is seeded,
    so both give the same weights on one machine, and a dump of it is a cache hit next time."""
    from ..spec import load_checkpoint
    from ..train.loop import train_student

    if checkpoint is not None and Path(checkpoint).is_file():
        model = teacher()
        load_checkpoint(model, checkpoint)
        return model
    result = train_student(teacher, train(), epochs=epochs, lr=1e-3, batch_size=64, seed=0, device="cpu",
                           progress=False)
    assert result.student is not None
    return result.student.eval()
