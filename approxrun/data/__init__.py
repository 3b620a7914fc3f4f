"""Datasets: ``build_data(cfg, data_dir)`` returns train/val/test loaders and the data's shape.

Splits are deterministic (``split_seed``); only the training loader shuffles (with the run's seed).
Missing data gives one line: which dataset, where it looked, what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from approxrun.data.idx import load_idx_split
from approxrun.errors import ApproxrunError, ConfigError, one_line

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int

    def loaders(self, batch_size: int, eval_batch_size: int, seed: int, num_workers: int = 0):
        generator = torch.Generator().manual_seed(seed)
        train = DataLoader(self.train, batch_size=batch_size, shuffle=True, generator=generator,
                           num_workers=num_workers, drop_last=False)
        val = DataLoader(self.val, batch_size=eval_batch_size, num_workers=num_workers)
        test = DataLoader(self.test, batch_size=eval_batch_size, num_workers=num_workers)
        return train, val, test


def _split_indices(n: int, fractions: tuple[float, float], seed: int, labels: np.ndarray | None = None):
    """Deterministic (train, val, test) index arrays; stratified by label when labels are given."""
    rng = np.random.default_rng(seed)
    val_f, test_f = fractions
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    parts = ([], [], [])
    for idx in groups:
        idx = rng.permutation(idx)
        n_test, n_val = int(round(len(idx) * test_f)), int(round(len(idx) * val_f))
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test:n_test + n_val])
        parts[0].append(idx[n_test + n_val:])
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def _tensor_images(images: np.ndarray, mean, std, size: int | None = None) -> torch.Tensor:
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(mean).reshape(1, -1, 1, 1)
    std = torch.tensor(std).reshape(1, -1, 1, 1)
    return (x - mean) / std


def _digits(cfg) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images / 16.0
    labels = digits.target.astype(np.int64)
    x = _tensor_images(images, (0.0,), (1.0,), cfg.get("image_size", 28))
    x = (x - x.mean()) / x.std()
    y = torch.as_tensor(labels)
    train, val, test = _split_indices(len(y), (cfg.get("val_fraction", 0.1), cfg.get("test_fraction", 0.2)),
                                      cfg.get("split_seed", 0), labels)
    full = TensorDataset(x, y)
    return DataBundle(Subset(full, train), Subset(full, val), Subset(full, test), 10, 1, x.shape[-1])


def _idx_dataset(name: str, cfg, data_dir: Path) -> DataBundle:
    """MNIST / Fashion-MNIST from IDX files (configured root, Debian package, data dir) or a download."""
    folders = [Path(cfg["root"]).expanduser()] if cfg.get("root") else []
    if name == "fashion_mnist":
        folders.append(DEBIAN_FASHION_MNIST)
    folders.append(data_dir / name)
    for folder in folders:
        try:
            (train_x, train_y), (test_x, test_y) = load_idx_split(folder, "train"), load_idx_split(folder, "test")
            break
        except FileNotFoundError:
            continue
    else:
        train_x, train_y, test_x, test_y = _download_idx(name, cfg, data_dir, folders)
    mean, std = NORMALIZATION[name]
    x_train, x_test = _tensor_images(train_x / 255.0, mean, std), _tensor_images(test_x / 255.0, mean, std)
    y_train, y_test = torch.as_tensor(train_y.astype(np.int64)), torch.as_tensor(test_y.astype(np.int64))
    rng = np.random.default_rng(cfg.get("split_seed", 0))
    order = rng.permutation(len(y_train))
    val_size = int(cfg.get("val_size", 5000))
    full = TensorDataset(x_train, y_train)
    return DataBundle(Subset(full, np.sort(order[val_size:])), Subset(full, np.sort(order[:val_size])),
                      TensorDataset(x_test, y_test), 10, 1, x_train.shape[-1])


def _download_idx(name, cfg, data_dir: Path, searched):
    import torchvision

    where = ", ".join(str(f) for f in searched)
    if not cfg.get("download", True):
        raise ApproxrunError(f"dataset {name}: IDX files not found in {where}; set dataset.root to a folder "
                             "holding them or dataset.download=true")
    cls = torchvision.datasets.FashionMNIST if name == "fashion_mnist" else torchvision.datasets.MNIST
    try:
        train = cls(str(data_dir / name), train=True, download=True)
        test = cls(str(data_dir / name), train=False, download=True)
    except Exception as exc:  # network errors come in many types
        raise ApproxrunError(f"dataset {name}: not found in {where} and the download failed "
                             f"({type(exc).__name__}); set dataset.root to a folder with the IDX files") from None
    return train.data.numpy(), train.targets.numpy(), test.data.numpy(), test.targets.numpy()


class _Transformed(Dataset):
    """A dataset view applying a transform to the image of each (image, label) pair."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return self.transform(x), y


def _torchvision_dataset(name: str, cfg, data_dir: Path) -> DataBundle:
    import torchvision
    from torchvision import transforms as T

    root = Path(cfg["root"]).expanduser() if cfg.get("root") else data_dir / name
    mean, std = NORMALIZATION[name]
    plain = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    augmented = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), plain]) \
        if cfg.get("augment", True) and name != "svhn" else plain
    try:
        if name == "svhn":
            train_base = torchvision.datasets.SVHN(str(root), split="train", download=cfg.get("download", True))
            test_base = torchvision.datasets.SVHN(str(root), split="test", download=cfg.get("download", True))
            num_classes = 10
        else:
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            train_base = cls(str(root), train=True, download=cfg.get("download", True))
            test_base = cls(str(root), train=False, download=cfg.get("download", True))
            num_classes = 10 if name == "cifar10" else 100
    except Exception as exc:
        raise ApproxrunError(f"dataset {name}: not found in {root} and could not be downloaded "
                             f"({one_line(exc)}); "
                             "download it there or set dataset.root") from None
    rng = np.random.default_rng(cfg.get("split_seed", 0))
    order = rng.permutation(len(train_base))
    val_size = int(cfg.get("val_size", 5000))
    train = Subset(_Transformed(train_base, augmented), np.sort(order[val_size:]))
    val = Subset(_Transformed(train_base, plain), np.sort(order[:val_size]))
    return DataBundle(train, val, _Transformed(test_base, plain), num_classes, 3, 32)


def _imagefolder(cfg) -> DataBundle:
    import torchvision
    from torchvision import transforms as T

    root = Path(str(cfg["root"])).expanduser()
    if not root.is_dir():
        raise ApproxrunError(f"dataset imagefolder: root {root} is not a folder; set dataset.root to a folder "
                             "of class subfolders")
    size, channels = int(cfg.get("image_size", 32)), int(cfg.get("channels", 3))
    tf = T.Compose([T.Grayscale(channels) if channels == 1 else T.Lambda(lambda im: im.convert("RGB")),
                    T.Resize((size, size)), T.ToTensor(), T.Normalize((0.5,) * channels, (0.5,) * channels)])
    try:
        if (root / "train").is_dir() and (root / "test").is_dir():
            train = torchvision.datasets.ImageFolder(str(root / "train"), tf)
            test = torchvision.datasets.ImageFolder(str(root / "test"), tf)
            val = torchvision.datasets.ImageFolder(str(root / "val"), tf) if (root / "val").is_dir() else test
            return DataBundle(train, val, test, len(train.classes), channels, size)
        full = torchvision.datasets.ImageFolder(str(root), tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise ApproxrunError(f"dataset imagefolder: {root}: {exc}") from None
    labels = np.array(full.targets)
    tr, va, te = _split_indices(len(full), (cfg.get("val_fraction", 0.1), cfg.get("test_fraction", 0.2)),
                                cfg.get("split_seed", 0), labels)
    return DataBundle(Subset(full, tr), Subset(full, va), Subset(full, te), len(full.classes), channels, size)


def _synthetic(cfg) -> DataBundle:
    """Class-dependent patterns plus noise: learnable, deterministic for a split seed."""
    g = torch.Generator().manual_seed(int(cfg.get("split_seed", 0)))
    classes, channels, size = int(cfg["num_classes"]), int(cfg.get("channels", 1)), int(cfg["image_size"])
    patterns = torch.randn(classes, channels, size, size, generator=g)

    def make(n):
        y = torch.randint(0, classes, (n,), generator=g)
        return TensorDataset(patterns[y] + 0.8 * torch.randn(n, channels, size, size, generator=g), y)

    return DataBundle(make(int(cfg["train_size"])), make(int(cfg["val_size"])), make(int(cfg["test_size"])),
                      classes, channels, size)


DATASETS = ("digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "imagefolder", "synthetic")


def build_data(cfg: Mapping, data_dir: str | Path) -> DataBundle:
    """The dataset named by ``cfg['name']`` with its deterministic splits."""
    name = cfg.get("name")
    data_dir = Path(str(data_dir)).expanduser()
    if name == "digits":
        return _digits(cfg)
    if name in ("mnist", "fashion_mnist"):
        return _idx_dataset(name, cfg, data_dir)
    if name in ("cifar10", "cifar100", "svhn"):
        return _torchvision_dataset(name, cfg, data_dir)
    if name == "imagefolder":
        return _imagefolder(cfg)
    if name == "synthetic":
        return _synthetic(cfg)
    raise ConfigError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")
