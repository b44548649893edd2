"""Image datasets for the baselines' models, read from local files only (nothing is downloaded).

    train, test = load("digits")                        # scikit-learn's bundled 8×8 digits
    train, test = load("cifar10", root="~/data")        # root/cifar-10-batches-py/…
    train, test = load("cifar100", root="~/data")       # root/cifar-100-python/{train,test}
    train, test = load("tiny-imagenet", root="~/data")  # root/tiny-imagenet-200/{train,val}/…

Each split is a ``Split(images, labels, classes)``: float32 images (N, C, H, W) normalised per
channel with the training split's statistics, int64 labels.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import StipError

DATASETS = ("digits", "cifar10", "cifar100", "tiny-imagenet")


class DatasetMissing(StipError, FileNotFoundError):
    """The dataset's files are not where its standard layout puts them."""


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) float32
    labels: torch.Tensor  # (N,) int64
    classes: int

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, size: int, generator: torch.Generator | None = None):
        """Shuffled minibatches when a generator is given, in order otherwise."""
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        for i in range(0, len(self), size):
            idx = order[i : i + size]
            yield self.images[idx], self.labels[idx]


def load(name: str, root: str | Path | None = None, test_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    if name == "digits":
        return _digits(test_fraction, seed)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (choose from {', '.join(DATASETS)})")
    if root is None:
        raise DatasetMissing(f"{name} is read from local files: pass --data-dir with its standard layout")
    root = Path(root).expanduser()
    images, labels, classes = {"cifar10": _cifar10, "cifar100": _cifar100, "tiny-imagenet": _tiny_imagenet}[name](root)
    return _normalise(*images, *labels, classes)


def _normalise(x_train, x_test, y_train, y_test, classes) -> tuple[Split, Split]:
    x_train, x_test = (torch.as_tensor(x, dtype=torch.float32) for x in (x_train, x_test))
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    mk = lambda x, y: Split((x - mean) / std, torch.as_tensor(np.asarray(y), dtype=torch.int64), classes)  # noqa: E731
    return mk(x_train, y_train), mk(x_test, y_test)


def _digits(test_fraction: float, seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)[:, None] / 16.0
    y = d.target
    order = np.random.default_rng(seed).permutation(len(y))  # a fixed split, not a secret
    cut = int(round(len(y) * (1 - test_fraction)))
    tr, te = order[:cut], order[cut:]
    return _normalise(x[tr], x[te], y[tr], y[te], 10)


def _need(path: Path, name: str) -> Path:
    if not path.exists():
        raise DatasetMissing(f"{name}: {path} not found (expected the dataset's standard layout; nothing is downloaded)")
    return path


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _cifar10(root: Path):
    base = _need(root / "cifar-10-batches-py", "CIFAR-10")
    parts = [_unpickle(_need(base / f"data_batch_{i}", "CIFAR-10")) for i in range(1, 6)]
    test = _unpickle(_need(base / "test_batch", "CIFAR-10"))
    x_train = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32) / 255.0
    y_train = np.concatenate([p["labels"] for p in parts])
    x_test = test["data"].reshape(-1, 3, 32, 32) / 255.0
    return (x_train, x_test), (y_train, np.asarray(test["labels"])), 10


def _cifar100(root: Path):
    base = _need(root / "cifar-100-python", "CIFAR-100")
    train, test = _unpickle(_need(base / "train", "CIFAR-100")), _unpickle(_need(base / "test", "CIFAR-100"))
    x = lambda d: d["data"].reshape(-1, 3, 32, 32) / 255.0  # noqa: E731
    return (x(train), x(test)), (np.asarray(train["fine_labels"]), np.asarray(test["fine_labels"])), 100


def _tiny_imagenet(root: Path):
    from PIL import Image

    base = _need(root / "tiny-imagenet-200", "Tiny-ImageNet")
    wnids = _need(base / "wnids.txt", "Tiny-ImageNet").read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    read = lambda p: np.asarray(Image.open(p).convert("RGB"), np.float32).transpose(2, 0, 1) / 255.0  # noqa: E731
    x_train, y_train = [], []
    for w in wnids:
        for p in sorted(_need(base / "train" / w / "images", "Tiny-ImageNet").glob("*.JPEG")):
            x_train.append(read(p))
            y_train.append(index[w])
    x_test, y_test = [], []
    for line in _need(base / "val" / "val_annotations.txt", "Tiny-ImageNet").read_text().splitlines():
        fname, wnid = line.split("\t")[:2]
        x_test.append(read(base / "val" / "images" / fname))
        y_test.append(index[wnid])
    return (np.stack(x_train), np.stack(x_test)), (np.asarray(y_train), np.asarray(y_test)), 200


def random_shift(images: torch.Tensor, gen: torch.Generator, pad: int, flip: bool = False) -> torch.Tensor:
    """Pad by repeating the border, crop back at a random offset per batch, and optionally
    mirror half the batch: the standard augmentation for small image sets."""
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="replicate")
    dy, dx = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
    out = padded[:, :, dy : dy + h, dx : dx + w]
    if flip:
        mirror = torch.rand(n, generator=gen) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(-1), out)
    return out


def augmentation(name: str):
    """The training-time augmentation for a dataset: f(images, generator) -> images, or None."""
    if name == "digits":  # none: on 8×8 centred digits, shifts cost ~15 points of accuracy here
        return None
    return lambda x, g: random_shift(x, g, pad=4, flip=True)
