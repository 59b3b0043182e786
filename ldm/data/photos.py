"""A folder of natural photos split by photo, served as square crops: random ones for training, a fixed set for
validation (so validation metrics of different runs are computed on the same tiles).

The default root holds the 273 landscape and city photos of Debian's ``endless-sky-data`` (``make data``).

Split rule (``split_photos``): the photos (relative paths under ``root``) are ranked by
``sha256(f"{seed}/{relpath}")``; the first ``val_count`` (default ``round(val_fraction * n)``) are the validation
photos, the rest the training photos. Each photo is in exactly one split, the split does not depend on listing order
or on the machine, and a photo's rank does not depend on which other photos exist.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Literal, Sequence

import torch

from ldm.data.images import IMAGE_EXTENSIONS, ImageFolder, check_folder, list_images

ENDLESS_SKY_PHOTOS = "/usr/share/games/endless-sky/images/land"
SPLITS = ("train", "validation")


def _digest(seed: int, name: str) -> bytes:
    return hashlib.sha256(f"{seed}/{name}".encode()).digest()


def split_photos(files: Sequence[str], val_fraction: float = 0.2, val_count: int | None = None,
                 seed: int = 0) -> dict[str, list[str]]:
    """``{"train": [...], "validation": [...]}`` (each sorted) by the rule in the module docstring."""
    if len(set(files)) != len(files):
        raise ValueError("split_photos: the file list has duplicates")
    if val_count is None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        val_count = max(1, round(val_fraction * len(files)))
    if not 0 < val_count < len(files):
        raise ValueError(f"cannot put {val_count} of {len(files)} photos in validation and keep some for training")
    ranked = sorted(files, key=lambda f: _digest(seed, f))
    return {"train": sorted(ranked[val_count:]), "validation": sorted(ranked[:val_count])}


def fixed_positions(name: str, count: int, seed: int = 0) -> list[tuple[float, float]]:
    """``count`` crop positions ``(y, x)`` in [0, 1] (see ``ImageTransform.crop_at``) for the photo ``name``: drawn
    from a generator seeded by the name, with x stratified (crop ``j`` in the ``j``-th of ``count`` equal bins) so
    the tiles spread across a landscape photo instead of piling up."""
    g = torch.Generator().manual_seed(int.from_bytes(_digest(seed, "crops/" + name)[:8], "little") >> 1)
    u = torch.rand(count, 2, generator=g, dtype=torch.float64).tolist()
    return [(uy, (j + ux) / count) for j, (uy, ux) in enumerate(u)]


class PhotoCrops(ImageFolder):
    """One split of a photo folder as ``{"image": (3, size, size) in [-1, 1], "key"}`` crops of the photo resized so
    that its shorter side is ``resize``.

    ``crop``: ``"random"`` (one random crop per photo and epoch, optionally flipped; torch's global RNG, as in
    ``ImageTransform``), ``"center"`` (one per photo) or ``"fixed"`` (``val_crops`` crops per photo at positions
    seeded by the photo's name, keys ``<relpath>#<j>``); ``None`` picks ``random`` for ``train`` and ``fixed`` for
    ``validation``. ``val_fraction`` / ``val_count`` / ``seed`` define the split (``split_photos``); ``seed`` also
    places the fixed crops and is independent of the run's ``--seed``. Bad photos give ``None`` for all their crops
    and count once in ``skipped``. ``cache``: keep every photo, decoded and resized, in memory (per process and
    DataLoader worker: ~0.4 MB per 512x256 photo), so each is decoded once instead of once per crop; the crops are
    the same either way.
    """

    def __init__(self, root: str | os.PathLike = ENDLESS_SKY_PHOTOS, split: Literal["train", "validation"] = "train",
                 size: int = 64, resize: int | None = 256, crop: Literal["random", "center", "fixed"] | None = None,
                 flip: bool = False, val_crops: int = 4, val_fraction: float = 0.2, val_count: int | None = None,
                 seed: int = 0, cache: bool = False, min_size: int = 16,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        crop = crop or ("random" if split == "train" else "fixed")
        if crop not in ("random", "center", "fixed"):
            raise ValueError(f"crop must be 'random', 'center' or 'fixed', got {crop!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):  # e.g. an unresolved "${...}" would split differently
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if crop == "fixed" and val_crops < 1:
            raise ValueError(f"val_crops must be a positive integer, got {val_crops}")
        try:
            root = check_folder(root)
        except FileNotFoundError as e:
            if str(root).rstrip("/") == ENDLESS_SKY_PHOTOS:
                e.add_note("the endless-sky photos come with Debian's endless-sky-data package: run `make data` "
                           "(as root) or `sudo apt-get install endless-sky-data`")
            raise
        photos = list_images(root, extensions)
        if len(photos) < 2:
            raise ValueError(f"PhotoCrops needs at least 2 photos under {root} (one per split), found {len(photos)}")
        self.photos = split_photos(photos, val_fraction, val_count, seed)[split]
        per_photo = val_crops if crop == "fixed" else 1
        # One entry of ``files`` per sample (a photo repeated per fixed crop): what ImageFolder and the latent cache
        # (which names a sample's source as ``root / files[i]``) index by.
        super().__init__(root, size, "center" if crop == "fixed" else crop, flip, min_size=min_size,
                         extensions=extensions, resize=resize,
                         files=[p for p in self.photos for _ in range(per_photo)])
        self.split, self.crop_mode = split, crop
        self.photo_of = torch.arange(len(self.photos)).repeat_interleave(per_photo)
        self.positions = ([pos for p in self.photos for pos in fixed_positions(p, per_photo, seed)]
                          if crop == "fixed" else None)
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.keys = ([f"{p}#{j}" for p in self.photos for j in range(per_photo)] if crop == "fixed"
                     else self.files)

    def load_scaled(self, i: int) -> torch.Tensor | None:
        """Sample ``i``'s photo decoded and resized (``transform.scale``), or ``None`` if it is bad."""
        photo = int(self.photo_of[i])
        if self._cache is not None and photo in self._cache:
            return self._cache[photo]
        pixels = self.load(i)
        if pixels is None:
            self._bad[self.photo_of == photo] = True  # its other crops: no second decode or warning
            return None
        pixels = self.transform.scale(pixels)
        if self._cache is not None:
            self._cache[photo] = pixels
        return pixels

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        pixels = self.load_scaled(i)
        if pixels is None:
            return None
        position = None if self.positions is None else self.positions[i]
        return {"image": self.transform.crop_scaled(pixels, position), "key": self.keys[i]}

    @property
    def skipped(self) -> int:
        """Number of distinct bad photos met so far."""
        return int(self.photo_of[self._bad].unique().numel())

    @property
    def bad_files(self) -> list[str]:
        return [self.photos[p] for p in self.photo_of[self._bad].unique().tolist()]

    def __repr__(self) -> str:
        return (f"PhotoCrops({self.root}, split={self.split!r}, photos={len(self.photos)}, samples={len(self)}, "
                f"crop={self.crop_mode!r}, {self.transform})")
