"""Fashion-MNIST read straight from its gzipped IDX files (the embedded default data of the demo).

The Debian/Ubuntu package ``dataset-fashion-mnist`` installs the files in
``/usr/share/datasets/fashion-mnist``; ``download=True`` fetches them with torchvision instead (never by
default). Images are decompressed once into a uint8 array and resized per item.
"""
from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08  # IDX type code for unsigned bytes


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes with ``ndim`` dimensions, checking magic and size."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise ValueError(f"{path}: not an IDX file of {ndim}-d unsigned bytes (magic {raw[:4].hex()}, "
                         f"expected 000008{ndim:02x})")
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes) but the file "
                         f"holds {len(raw) - header} bytes of data (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_files(root: Path, split: str) -> tuple[Path, Path] | None:
    # torchvision's download layout is root/FashionMNIST/raw; the Debian package puts files in root.
    for folder in (root, root / "FashionMNIST" / "raw"):
        images = folder / f"{_PREFIX[split]}-images-idx3-ubyte.gz"
        labels = folder / f"{_PREFIX[split]}-labels-idx1-ubyte.gz"
        if images.is_file() and labels.is_file():
            return images, labels
    return None


def _download(root: Path, split: str) -> tuple[Path, Path] | None:
    """Fetch the files once even when several processes (DDP ranks) ask at the same time: the first holds a lock
    file in root while it downloads, the others then find its files."""
    from filelock import FileLock  # a dependency of torch
    from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".fashion-mnist-download.lock")):
        files = _find_files(root, split)
        if files is None:
            log.info("downloading Fashion-MNIST into %s (download=True)", root)
            TorchvisionFashionMNIST(str(root), train=split == "train", download=True)
            files = _find_files(root, split)
    return files


class FashionMNIST(Dataset):
    """Fashion-MNIST as ``{"image": (3, size, size) in [-1, 1], "cls": int, "key": "fmnist-<split>-<index>"}``.

    ``from_files`` (what configs' ``target: ldm.data.FashionMNIST`` calls) reads the idx files of ``split`` from
    ``root``; ``limit`` keeps the first N images (deterministic subsets for tests and the demo). ``__init__`` takes
    the decoded arrays.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, split: Literal["train", "test"] = "train",
                 size: int = 64, flip: bool = False):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.split, self.size = images, labels, split, size
        steps = [v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
        if flip:
            steps.append(v2.RandomHorizontalFlip(p=0.5))
        self.transform = v2.Compose(steps)

    @classmethod
    def from_files(cls, root: str | os.PathLike = DEFAULT_ROOT, split: Literal["train", "test"] = "train",
                   size: int = 64, flip: bool = False, limit: int | None = None,
                   download: bool = False) -> "FashionMNIST":
        if split not in _PREFIX:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive integer or None, got {limit}")
        root = Path(root).expanduser()
        files = _find_files(root, split)
        if files is None and download:
            files = _download(root, split)
        if files is None:
            prefix = _PREFIX[split]
            raise FileNotFoundError(
                f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte.gz, {prefix}-labels-idx1-ubyte.gz) "
                f"not found in {root}. Install them with `apt-get install dataset-fashion-mnist` "
                f"(goes to {DEFAULT_ROOT}) or set `download: true` to fetch them into root.")
        images, labels = read_idx(files[0], 3), read_idx(files[1], 1)
        if len(images) != len(labels):
            raise ValueError(f"{files[0]} has {len(images)} images but {files[1]} has {len(labels)} labels")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{files[1]}: label {labels.max()} outside 0..9")
        n = len(images) if limit is None else min(limit, len(images))
        return cls(images[:n], labels[:n], split, size, flip)

    from_params = from_files  # what instantiate_from_config calls with a config's params

    def __len__(self) -> int:
        return len(self.images)

    def sample_fields(self) -> frozenset[str]:
        return frozenset({"image", "cls", "key"})

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = torch.from_numpy(self.images[i].copy()).unsqueeze(0)  # (1, 28, 28) uint8; copy: buffer is read-only
        x = self.transform(x).float() / 127.5 - 1.0  # uint8 resize saturates, so no clamp needed
        return {"image": x.expand(3, -1, -1).contiguous(), "cls": int(self.labels[i]),
                "key": f"fmnist-{self.split}-{i:05d}"}
