"""Reading MNIST-format IDX files (optionally gzipped), as used by MNIST and Fashion-MNIST."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from approxrun.errors import ApproxrunError

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ApproxrunError(f"IDX file {path}: cannot be read ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ApproxrunError(f"IDX file {path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ApproxrunError(f"IDX file {path}: {len(data) - offset} data bytes, expected {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def find_idx_pair(folder: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files of a split in ``folder`` (plain or .gz), searching one level down."""
    candidates = [folder] + sorted(p for p in folder.glob("*") if p.is_dir()) if folder.is_dir() else []
    for base in candidates:
        found = []
        for stem in SPLIT_FILES[split]:
            match = next((base / (stem + ext) for ext in ("", ".gz") if (base / (stem + ext)).is_file()), None)
            found.append(match)
        if all(found):
            return found[0], found[1]
    return None


def load_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    pair = find_idx_pair(folder, split)
    if pair is None:
        raise FileNotFoundError(folder)
    images, labels = read_idx(pair[0]), read_idx(pair[1])
    if images.shape[0] != labels.shape[0]:
        raise ApproxrunError(f"IDX files in {pair[0].parent}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels
