"""Image sources (folder / ``.npz`` / data config) read as uint8 NCHW batches for the metrics."""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset

from ldm.checkpoints import is_run_folder, run_config
from ldm.data.images import IMAGE_EXTENSIONS, collate_skip_bad, list_images
from ldm.data.configs import dataset_config, deterministic
from ldm.data.transforms import (
    DECODE_ERRORS,
    BadImageError,
    ImageTransform,
    open_image,
    to_rgb_tensor,
)
from ldm.io import read_samples_npz, to_uint8
from ldm.util import fit_workers, instantiate_from_config

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, "torch.Tensor | None"]  # (uint8 NCHW images, int64 labels or None)

# -------------------------------------------------------------------------------------- image sources
def source_kind(spec: str | Path) -> str:
    """``"folder"``, ``"npz"`` (images: ours or an ADM reference batch), ``"stats"`` (``mu``/``sigma`` only: our
    ``save_stats`` output or ADM statistics) or ``"data"`` (a YAML config, or a run folder: its data config)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return "data" if is_run_folder(path) else "folder"
    if not path.is_file():
        raise FileNotFoundError(f"image source not found: {path} (a folder, .npz, data config .yaml or run folder)")
    if path.suffix == ".npz":
        # ADM reference batches hold images (arr_0) AND the evaluator's statistics (mu, sigma): read the images,
        # so both sides of the FID go through the same detector code.
        with np.load(path, allow_pickle=False) as data:
            has_images = bool({"arr_0", "images"} & set(data.files))
            return "stats" if {"mu", "sigma"} <= set(data.files) and not has_images else "npz"
    if path.suffix in (".yaml", ".yml"):
        return "data"
    raise ValueError(f"{path}: unknown image source; expected a folder, an .npz or a data config .yaml")


@dataclass
class ImageSource:
    """Where images come from and how many; ``batches()`` yields ``(uint8 NCHW, labels | None)``.

    ``size``: resize folder images / override a data config's ``size``; ``split``: the data config split.
    """

    spec: str
    split: str = "validation"
    size: int | None = None
    max_samples: int | None = None
    batch_size: int = 64
    num_workers: int = 0
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = source_kind(self.spec)

    def identity(self) -> dict:
        """What the cached statistics of this source depend on."""
        path = Path(self.spec).expanduser().resolve()
        out: dict[str, Any] = {"kind": self.kind, "path": str(path), "max_samples": self.max_samples,
                               "size": self.size}
        if self.kind == "folder":
            out["files"] = len(list_images(path, IMAGE_EXTENSIONS))
        elif self.kind == "data":
            out["dataset"] = self.dataset_config()
        else:
            stat = path.stat()
            out.update(bytes=stat.st_size, mtime=stat.st_mtime)
        return out

    def check(self) -> int | None:
        """Fail now, not after the other input's features were computed: the number of images this source will
        give (``None`` for statistics), or a ``ValueError`` saying why it gives none."""
        count = {"folder": self._count_folder, "npz": self._count_npz, "data": self._count_data,
                 "stats": lambda: None}[self.kind]()
        if count == 0:
            raise ValueError(f"{self.spec}: no images")
        return count if count is None or self.max_samples is None else min(count, self.max_samples)

    def _count_folder(self) -> int:
        return len(list_images(Path(self.spec).expanduser(), IMAGE_EXTENSIONS))

    def _count_npz(self) -> int:
        shape, dtype = npz_array_header(self.spec, ("arr_0", "images"))
        if dtype != np.uint8 or len(shape) != 4:
            raise ValueError(f"{self.spec}: expected uint8 images (N, H, W, C), got {dtype} {shape}")
        return shape[0]

    def _count_data(self) -> int:
        dataset = instantiate_from_config(self.dataset_config(), where=f"{self.spec}: data.params.{self.split}")
        return len(dataset) if hasattr(dataset, "__len__") else -1  # a stream: counted while reading

    def dataset_config(self) -> dict:
        path = Path(self.spec).expanduser()
        cfg = deterministic(dataset_config(OmegaConf.load(run_config(path) if path.is_dir() else path), self.split))
        if self.size is not None:
            cfg["params"]["size"] = self.size
        return cfg

    def batches(self) -> Iterator[Batch]:
        readers = {"folder": self._folder, "npz": self._npz, "data": self._data}
        if self.kind not in readers:
            raise ValueError(f"{self.spec} holds statistics, not images")
        produced = 0
        for images, labels in readers[self.kind]():
            if self.max_samples is not None:
                keep = self.max_samples - produced
                images, labels = images[:keep], None if labels is None else labels[:keep]
            produced += len(images)
            yield images, labels
            if self.max_samples is not None and produced >= self.max_samples:
                return

    def _folder(self) -> Iterator[Batch]:
        root = Path(self.spec).expanduser()
        buffer: list[torch.Tensor] = []
        for name in list_images(root, IMAGE_EXTENSIONS):
            image = read_image_uint8(root / name, self.size)
            if image is None:
                continue
            if buffer and image.shape != buffer[0].shape:
                raise ValueError(f"{root}: images of different sizes ({tuple(buffer[0].shape)} and "
                                 f"{tuple(image.shape)} at {name}); pass a size (--size) to resize them")
            buffer.append(image)
            if len(buffer) == self.batch_size:
                yield torch.stack(buffer), None
                buffer = []
        if buffer:
            yield torch.stack(buffer), None

    def _npz(self) -> Iterator[Batch]:
        images, labels = load_npz_images(self.spec)
        for start in range(0, len(images), self.batch_size):
            chunk = torch.from_numpy(images[start:start + self.batch_size])
            yield chunk, None if labels is None else torch.from_numpy(labels[start:start + self.batch_size])

    def _data(self) -> Iterator[Batch]:
        for batch in _skip_none(data_loader(self.dataset_config(), self.batch_size, self.num_workers,
                                            self.max_samples)):
            labels = batch.get("cls")
            yield to_uint8(batch["image"]), None if labels is None else torch.as_tensor(labels).long()


def read_image_uint8(path: Path, size: int | None = None) -> torch.Tensor | None:
    """(3, H, W) uint8 RGB, exact pixels unless ``size`` (then centre crop + bicubic resize); None if bad."""
    try:
        pixels = to_rgb_tensor(open_image(path))
    except (*DECODE_ERRORS, BadImageError) as e:
        log.warning("skipping bad image %s: %s: %s", path, type(e).__name__, e)
        return None
    if pixels.dtype != torch.uint8:  # 16-bit input arrives as float in [0, 1]
        pixels = (pixels * 255).round().clamp(0, 255).to(torch.uint8)
    if size is not None and tuple(pixels.shape[1:]) != (size, size):
        pixels = to_uint8(ImageTransform(size, "center", False).from_tensor(pixels))
    return pixels


def npz_array_header(path: str | Path, keys: Sequence[str]) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the first of ``keys`` in an ``.npz``, read from the array header only (a 50k-sample
    file is gigabytes; checking it must not load it)."""
    with zipfile.ZipFile(Path(path).expanduser()) as archive:
        names = set(archive.namelist())
        key = next((k for k in keys if f"{k}.npy" in names), None)
        if key is None:
            raise KeyError(f"{path}: no {' or '.join(repr(k) for k in keys)} array (has "
                           f"{sorted(n[:-4] for n in names)})")
        with archive.open(f"{key}.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
    return shape, dtype


def load_npz_images(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``arr_0`` (or ``images``) as uint8 NCHW, and ``labels`` (or ADM's ``arr_1``) if present (sample.py /
    ADM layout: NHWC)."""
    images, labels = read_samples_npz(Path(path).expanduser())
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: expected uint8 images (N, H, W, C) or (N, C, H, W), got {images.dtype} "
                         f"{images.shape}")
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return np.ascontiguousarray(images), labels


def data_loader(config: Mapping, batch_size: int, num_workers: int = 0, max_samples: int | None = None,
                shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader over the dataset ``config`` (first ``max_samples`` items), dropping bad samples."""
    dataset = instantiate_from_config(config, where="data")
    if max_samples is not None and hasattr(dataset, "__len__"):
        dataset = Subset(dataset, range(min(max_samples, len(dataset))))
    return DataLoader(dataset, batch_size=batch_size, num_workers=fit_workers(num_workers, "--workers"),
                      shuffle=shuffle, collate_fn=collate_skip_bad, generator=torch.Generator().manual_seed(seed))


def _skip_none(loader: Iterable) -> Iterator:
    return (b for b in loader if b is not None)
