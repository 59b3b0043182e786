"""Precision and recall (Kynkäänniemi et al. 2019) against a direct brute-force computation and closed forms,
and through eval_fid.py, where they come from the same detector features as the FID."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import command_module
from ldm.evaluation.detectors import build_detector
from ldm.metrics.features import build_feature_extractor
from ldm.metrics.fid import feature_statistics, save_stats
from ldm.metrics.precision_recall import manifold_radii, precision_recall


def _brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """The paper's definition with explicit loops: radius = distance to the k-th nearest other point."""
    def radii(points):
        out = []
        for i, p in enumerate(points):
            others = [np.linalg.norm(p - q) for j, q in enumerate(points) if j != i]
            out.append(sorted(others)[k - 1])
        return out

    def coverage(queries, support, support_radii):
        inside = [any(np.linalg.norm(q - s) <= r for s, r in zip(support, support_radii)) for q in queries]
        return sum(inside) / len(queries)

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_brute_force_and_does_not_depend_on_batching(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(37, 6))
    fake = rng.normal(loc=0.4, scale=1.3, size=(29, 6))
    expected = _brute_force(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] <= 1  # a case where both sides of the boundary occur
    for batch_size in (1, 7, 256):
        got = precision_recall(real, fake, k=k, batch_size=batch_size)
        assert (got["precision"], got["recall"]) == pytest.approx(expected, abs=1e-12)
    # float32 inputs and tensors are accepted; same answer on well-separated random data
    got = precision_recall(torch.from_numpy(real).float(), fake.astype(np.float32), k=k)
    assert (got["precision"], got["recall"]) == pytest.approx(expected, abs=1e-12)


def test_radii_exclude_the_point_itself():
    points = np.array([[0.0], [1.0], [3.0], [7.0]])
    # k=1: nearest other point; k=2: second nearest (squared distances)
    assert manifold_radii(points, k=1).tolist() == [1.0, 1.0, 4.0, 16.0]
    assert manifold_radii(points, k=2).tolist() == [9.0, 4.0, 9.0, 36.0]


def test_closed_forms():
    # 1-D, k=1, worked by hand: real radii 1, 1, 1, 8; fake radii 2, 2, 15, 2.5.
    real = np.array([[0.0], [1.0], [2.0], [10.0]])
    fake = np.array([[0.5], [2.5], [20.0], [5.0]])
    assert precision_recall(real, fake, k=1) == {"precision": 0.75, "recall": 1.0}
    # A point exactly on a ball's boundary is inside (<=, as in the paper's and ADM's code).
    assert precision_recall(real, np.array([[12.0], [18.0], [18.5], [30.0]]), k=1)["precision"] == 0.5
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 8))
    assert precision_recall(features, features.copy()) == {"precision": 1.0, "recall": 1.0}
    far = features + 1000.0
    assert precision_recall(features, far) == {"precision": 0.0, "recall": 0.0}
    # Mode dropping: samples from one half of the data have high precision, low recall.
    half = features[features[:, 0] > 0]
    result = precision_recall(features, half + rng.normal(scale=1e-3, size=half.shape))
    assert result["precision"] == 1.0 and result["recall"] < 0.9


def test_needs_more_points_than_k():
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(np.zeros((3, 2)), np.ones((10, 2)))


# ----------------------------------------------------------------------------------------- eval_fid
def test_eval_fid_precision_recall_uses_the_fid_features(tmp_path):
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)  # NHWC, the ADM/sample.py layout
    samples = np.clip(ref[:30].astype(int) + rng.integers(-40, 40, size=(30, 16, 16, 3)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    # An ADM reference batch: the images plus the evaluator's own mu/sigma; we read the images.
    np.savez(tmp_path / "adm_ref.npz", arr_0=ref, mu=np.zeros(2048), sigma=np.eye(2048))
    net = build_feature_extractor("random")
    net_identity = build_detector("random").identity
    real = net(torch.from_numpy(ref).permute(0, 3, 1, 2)).numpy().astype(np.float32)  # as cached
    fake = net(torch.from_numpy(samples).permute(0, 3, 1, 2)).numpy()
    expected = precision_recall(real, fake, k=3)
    script = command_module("eval_fid")
    cache = tmp_path / "stats" / "ref.npz"
    results = []
    for ref_spec, extra in ((tmp_path / "ref.npz", ["--ref-stats-cache", str(cache)]),
                            (tmp_path / "ref.npz", ["--ref-stats-cache", str(cache)]),  # reused from the cache
                            (tmp_path / "adm_ref.npz", [])):
        out = tmp_path / f"pr{len(results)}.json"
        report = script.main(["--samples", str(tmp_path / "samples.npz"), "--ref", str(ref_spec), "--detector",
                              "random", "--precision-recall", "--device", "cpu", "--out", str(out), *extra])
        assert json.loads(out.read_text())["precision"] == report["precision"]
        results.append(report)
    assert results[1]["ref_stats_from_cache"]
    for report in results:
        assert (report["precision"], report["recall"]) == pytest.approx(
            (expected["precision"], expected["recall"]), abs=1e-12)
        assert report["pr_k"] == 3
    assert 0 < expected["precision"] <= 1 and 0 < expected["recall"] <= 1
    # Statistics alone (no features next to them) cannot give precision/recall: a clear error.
    stats_only = tmp_path / "stats_only.npz"
    save_stats(stats_only, *feature_statistics(real), {"detector": net_identity, "count": len(real)})
    with pytest.raises(SystemExit, match="need reference features"):
        script.main(["--samples", str(tmp_path / "samples.npz"), "--ref", str(stats_only), "--detector", "random",
                     "--precision-recall"])
