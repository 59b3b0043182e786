"""ADM evaluation-suite files: reference batches (``arr_0`` images + ``mu``/``sigma`` without our ``meta``),
statistics-only files, and class-conditional sample files with labels in ``arr_1``."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ldm.evaluation.detectors import Detector, build_detector
from ldm.evaluation.samples import evaluate_samples, reference_stats, source_accuracy
from ldm.evaluation.sources import ImageSource, load_npz_images
from ldm.metrics.fid import feature_statistics, frechet_distance


def _images(seed: int, n: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)  # NHWC


def _adm_reference(path, images: np.ndarray, dim: int = 2048) -> str:
    # ADM's reference batches: arr_0 (uint8 NHWC) plus pool_3 statistics mu/sigma (and spatial ones), no meta.
    rng = np.random.default_rng(1)
    np.savez(path, arr_0=images, mu=rng.normal(size=dim), sigma=np.eye(dim), mu_s=rng.normal(size=7),
             sigma_s=np.eye(7))
    return str(path)


def test_adm_reference_batch_is_read_as_images(tmp_path):
    ref, samples = _images(0), _images(1)
    np.savez(tmp_path / "plain.npz", arr_0=ref)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    adm = _adm_reference(tmp_path / "VIRTUAL_ref.npz", ref)
    detector = build_detector("random", random_dim=16)
    fids = []
    for spec in (adm, str(tmp_path / "plain.npz")):
        stats = reference_stats(ImageSource(spec, batch_size=16), detector, progress=False)
        fids.append(evaluate_samples(ImageSource(str(tmp_path / "samples.npz"), batch_size=16), stats, detector,
                                     progress=False)["fid"])
    assert fids[0] == pytest.approx(fids[1], rel=1e-9) and fids[0] > 0


def test_statistics_without_meta_need_a_matching_inception_detector(tmp_path):
    dim, rng = 8, np.random.default_rng(2)
    mu, sigma = rng.normal(size=dim), np.cov(rng.normal(size=(dim, 50)))
    np.savez(tmp_path / "adm_stats.npz", mu=mu, sigma=sigma)  # statistics only, no meta
    source = ImageSource(str(tmp_path / "adm_stats.npz"))
    assert source.kind == "stats"
    with pytest.raises(ValueError, match="ADM reference batch"):
        reference_stats(source, build_detector("random", random_dim=dim), progress=False)

    # An Inception-kind detector with features of the same width: accepted, FID against those statistics.
    features = rng.normal(size=(30, dim))
    extractor = SimpleNamespace(dim=dim)
    inception_like = Detector(extractor, "inception", "inception-like", comparable=True)
    stats = reference_stats(source, inception_like, progress=False)
    assert stats.meta["foreign"] and np.allclose(stats.mu, mu)
    assert frechet_distance(*feature_statistics(features), stats.mu, stats.sigma) > 0
    wider = Detector(SimpleNamespace(dim=dim * 2), "inception", "wider", comparable=True)
    with pytest.raises(ValueError, match="8-d statistics"):
        reference_stats(source, wider, progress=False)


def test_adm_sample_labels_in_arr_1(tmp_path):
    images, labels = _images(3, 12), np.arange(12) % 3
    np.savez(tmp_path / "adm_samples.npz", arr_0=images, arr_1=labels)
    read, read_labels = load_npz_images(tmp_path / "adm_samples.npz")
    assert read.shape == (12, 3, 16, 16) and np.array_equal(read_labels, labels)

    class Oracle(torch.nn.Module):  # answers the labels written to arr_1, so the accuracy is 1 iff they are read
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(()))  # the accuracy helper reads the model's device

        def forward(self, x):
            return torch.nn.functional.one_hot(torch.as_tensor(labels[:len(x)]), 3).float()

    assert source_accuracy(Oracle(), ImageSource(str(tmp_path / "adm_samples.npz"), batch_size=12)) == 1.0
