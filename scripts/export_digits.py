"""Export scikit-learn's bundled handwritten digits into data/digits.npz (numpy only to read).

Source: the UCI "Optical Recognition of Handwritten Digits" test set (Alpaydin & Kaynak, 1998),
as bundled by scikit-learn (`sklearn.datasets.load_digits`, BSD-3-Clause; the data is
CC BY 4.0 from the UCI ML repository). 1,797 8x8 images with 17 grey levels (0..16), 10 classes.

The split is fixed and stratified: 1,200 train / 597 test; of the train images, 12 per class
(120) keep their labels in the transfer set and the rest are unlabelled (Hinton's setting).

Run: python scripts/export_digits.py  (needs scikit-learn; kdcache itself does not)
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parent.parent / "data" / "digits.npz"


def main() -> None:
    digits = load_digits()
    images = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    rng = np.random.default_rng(20261123)
    train, test, labelled = [], [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = round(len(idx) * 1200 / len(labels))
        train.append(idx[:n_train])
        test.append(idx[n_train:])
        labelled.append(idx[:12])
    train_idx = np.sort(np.concatenate(train))
    # fix the total at exactly 1,200 / 597 after per-class rounding
    extra = len(train_idx) - 1200
    if extra > 0:
        moved, train_idx = train_idx[-extra:], train_idx[:-extra]
        test.append(moved)
    test_idx = np.sort(np.concatenate(test))
    assert len(train_idx) == 1200 and len(test_idx) == 597 and not set(train_idx) & set(test_idx)
    labelled_idx = np.sort(np.concatenate(labelled))
    assert set(labelled_idx) <= set(train_idx)
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(OUT, images=images, labels=labels, train_idx=train_idx.astype(np.int16),
                        test_idx=test_idx.astype(np.int16), labelled_idx=labelled_idx.astype(np.int16))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
