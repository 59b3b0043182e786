"""Decode an image safely and turn it into a float tensor in [-1, 1].

Every image source (folder, WebDataset) goes through ``open_image`` + ``ImageTransform`` so that odd
files (CMYK, RGBA, palette, 16-bit, truncated) are handled the same way everywhere.
"""
from __future__ import annotations

import io
import os
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torchvision.transforms import v2

# Errors that mean "this file is not a usable image" (as opposed to a bug in our code).
# UnidentifiedImageError is an OSError; truncated files raise OSError or SyntaxError.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImageError(ValueError):
    """The file is readable but must not be used (e.g. too small)."""


def check_truncated_flag() -> None:
    """Refuse to run if someone set PIL's global LOAD_TRUNCATED_IMAGES (it hides truncated files)."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; truncated images "
                           "would be silently accepted as partly grey. Set it back to False.")


def open_image(src: str | os.PathLike | bytes | BinaryIO, min_size: int = 1) -> Image.Image:
    """Open and fully decode an image, then apply its EXIF orientation.

    ``img.load()`` forces the full decode here, so a truncated file raises now (PIL's
    ``LOAD_TRUNCATED_IMAGES`` must stay False) instead of yielding a half-grey tensor later.
    Raises one of ``DECODE_ERRORS`` or ``BadImageError``.
    """
    check_truncated_flag()
    if isinstance(src, bytes):
        src = io.BytesIO(src)
    with Image.open(src) as img:
        img.load()
        img = ImageOps.exif_transpose(img)  # always a new image, independent of the (now closed) file
    if min(img.size) < min_size:
        raise BadImageError(f"too small ({img.size[0]}x{img.size[1]}, shorter side < min_size={min_size})")
    return img


def to_rgb_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image of any common mode -> (3, H, W) tensor: uint8, or float32 in [0, 1] for 16-bit input."""
    if img.mode in _SIXTEEN_BIT_MODES:
        # 16-bit grayscale: keep the full precision rather than letting PIL clip to 0..255.
        a = np.asarray(img, dtype=np.float32)
        if a.min() < 0 or a.max() > 65535:
            raise BadImageError(f"mode {img.mode} values outside the 16-bit range [{a.min()}, {a.max()}]")
        return torch.from_numpy(a / 65535.0).unsqueeze(0).expand(3, -1, -1).contiguous()
    if img.mode == "F":
        raise BadImageError("32-bit float images have no defined range; convert them to 8/16-bit first")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        # Composite on white: dropping alpha would expose arbitrary colours under transparent pixels.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGB
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 (0..255) or float in [0, 1] -> float32 in [-1, 1]."""
    # uint8 resize rounds and saturates itself; float (16-bit) bicubic can overshoot, so clamp.
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.clamp(0.0, 1.0)
    return x * 2.0 - 1.0


class ImageTransform:
    """PIL image -> (3, size, size) float tensor in [-1, 1].

    Resizes the shorter side to ``resize`` (bicubic, antialiased; ``None``: to ``size``), crops a ``size`` square
    (``"center"`` or ``"random"``), optionally flips horizontally. ``resize > size`` trains on crops at a chosen
    scale (e.g. 64x64 windows of a photo whose shorter side is 256) instead of on whole downscaled images.
    Random crops and flips draw from torch's global RNG, as torchvision's transforms do: seeded per run, rank and
    DataLoader worker by ``pl.seed_everything(workers=True)``, so a run is reproducible from its seed (the RNG state
    is not checkpointed: a resumed run re-seeds it, so its crops after the resume differ from an uninterrupted run's).
    """

    def __init__(self, size: int, crop: Literal["random", "center"] = "center", flip: bool = False,
                 resize: int | None = None):
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if resize is not None and resize < size:
            raise ValueError(f"resize (the shorter side before cropping) must be >= size={size}, got {resize}")
        self.size, self.crop, self.flip, self.resize = size, crop, flip, resize
        self.scale = v2.Resize(size if resize is None else resize, interpolation=v2.InterpolationMode.BICUBIC,
                               antialias=True)
        steps = [v2.RandomCrop(size) if crop == "random" else v2.CenterCrop(size)]
        if flip:
            steps.append(v2.RandomHorizontalFlip(p=0.5))
        self.window = v2.Compose(steps)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.from_tensor(to_rgb_tensor(img))

    def from_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Same as ``__call__`` for the output of ``to_rgb_tensor``."""
        return self.crop_scaled(self.scale(x))

    def crop_scaled(self, x: torch.Tensor, position: tuple[float, float] | None = None) -> torch.Tensor:
        """The crop (and flip) of an image already resized by ``self.scale``, in [-1, 1]. ``position = (y, x)``, each
        in [0, 1] of the free range (0: top/left edge, 1: bottom/right edge), takes that window instead, never
        flipped: fixed crops for validation."""
        if position is None:
            return to_model_range(self.window(x))
        top = round(position[0] * (x.shape[-2] - self.size))
        left = round(position[1] * (x.shape[-1] - self.size))
        return to_model_range(v2.functional.crop(x, top, left, self.size, self.size))

    def __repr__(self) -> str:
        return f"ImageTransform(size={self.size}, crop={self.crop!r}, flip={self.flip}, resize={self.resize})"
