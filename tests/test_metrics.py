"""ldm.metrics against references: scipy/torchmetrics/torch-fidelity, closed forms, direct loops."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torchvision
from scipy import linalg
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import _compute_fid
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from ldm.metrics import features as feat
from ldm.metrics.classifier import SmallClassifier, classification_accuracy, train_classifier
from ldm.metrics.fid import (compute_features, feature_statistics, fid_from_features, frechet_distance, kid,
                             load_stats, save_stats, trace_sqrt_product)
from ldm.io import to_uint8
from ldm.metrics.image import psnr, ssim
from ldm.metrics.lpips import VGG16_FILENAME, build_lpips
from ldm.metrics.mmd import mmd_rbf, mmd_to_standard_normal


def _pair(seed: int = 0, shape=(3, 3, 32, 32)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * 2 - 1
    y = (x + 0.1 * torch.randn(shape, generator=g)).clamp(-1, 1)
    return x, y


# ---------------------------------------------------------------- PSNR / SSIM

def test_psnr_matches_hand_formula_and_torchmetrics_on_unit_range():
    x, y = _pair()
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(psnr(x, y), 10 * torch.log10(4.0 / mse))  # range 2 on [-1, 1]
    tm = peak_signal_noise_ratio((x + 1) / 2, (y + 1) / 2, data_range=1.0, reduction="none", dim=(1, 2, 3))
    torch.testing.assert_close(psnr(x, y), tm)
    torch.testing.assert_close(psnr(x, y, reduction="mean"), tm.mean())


def test_ssim_matches_torchmetrics_on_0_255_and_is_fp32():
    x, y = _pair(1)
    ref = structural_similarity_index_measure((x + 1) * 127.5, (y + 1) * 127.5, data_range=255.0, reduction="none")
    torch.testing.assert_close(ssim(x, y), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    xb, yb = x.bfloat16(), y.bfloat16()  # bf16 inputs are evaluated in fp32, not in bf16
    torch.testing.assert_close(ssim(xb, yb), ssim(xb.float(), yb.float()))
    assert psnr(xb, yb).dtype == torch.float32


# ---------------------------------------------------------------- LPIPS

@pytest.fixture(scope="module")
def fake_vgg(tmp_path_factory):
    """Random torchvision VGG16 weights in the hub-cache layout, and the LPIPS built from them."""
    hub = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    state = torchvision.models.vgg16(weights=None).state_dict()
    # Only the conv trunk matters (and keeps the file small); one classifier key checks that they are ignored.
    state = {k: v for k, v in state.items() if k.startswith("features.") or k == "classifier.6.bias"}
    (hub / "checkpoints").mkdir()
    torch.save(state, hub / "checkpoints" / VGG16_FILENAME)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "get_dir", lambda: str(hub))
        mp.delenv("LITEVAE_VGG16", raising=False)
        model = build_lpips()
    return state, model


def test_lpips_trunk_loaded_from_hub_cache(fake_vgg):
    state, model = fake_vgg
    trunk = model.net.state_dict()
    assert len(trunk) == 26
    for key, value in trunk.items():
        index, kind = key.split(".")[1:]
        torch.testing.assert_close(value, state[f"features.{index}.{kind}"], rtol=0, atol=0)


def test_lpips_values_gradients_and_frozen(fake_vgg):
    _, model = fake_vgg
    x, y = _pair(2, (2, 3, 32, 32))
    assert torch.all(model(x, x).abs() < 1e-6)
    assert torch.all(model(x, y) > 0)
    x = x.clone().requires_grad_(True)
    model(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    model.train()
    assert not model.training and not any(m.training for m in model.modules())


def test_lpips_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("LITEVAE_VGG16", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        build_lpips()
    assert str(tmp_path / "checkpoints" / VGG16_FILENAME) in str(err.value)
    assert "LITEVAE_VGG16" in str(err.value)
    assert build_lpips(if_missing="skip") is None
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_lpips(tmp_path / "nowhere.pth", if_missing="skip")  # an explicit path must exist


# ---------------------------------------------------------------- FID / KID

def _features(seed: int, n: int = 200, d: int = 8, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mix + shift


def _reference_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """Independent route: Tr (Σ1Σ2)^½ = Tr (Σ1^½ Σ2 Σ1^½)^½, both roots of symmetric PSD matrices."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r1 = linalg.sqrtm(s1).real
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(inner.clip(0)).sum())


def test_frechet_distance_matches_references():
    f1, f2 = _features(0), _features(1, shift=0.5)
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(f2)
    value = frechet_distance(mu1, s1, mu2, s2)
    assert value == pytest.approx(_reference_fid(f1, f2), rel=1e-8)
    tm = _compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2)))
    assert value == pytest.approx(float(tm), rel=1e-6)
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert value == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)
    assert fid_from_features(f1, f2) == pytest.approx(value, rel=1e-12)
    assert fid_from_features(f1, f1) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_rank_deficient_covariance_is_finite():
    f = _features(4, n=5, d=16)  # fewer samples than dimensions: singular covariance
    assert abs(fid_from_features(f, f)) < 1e-3


@pytest.mark.parametrize("n", [20, 300])  # singular (n < d) and full-rank covariances
def test_trace_sqrt_product_matches_scipy_sqrtm(n):
    s1 = np.cov(_features(5, n=n, d=64), rowvar=False)
    s2 = np.cov(_features(6, n=n, d=64, shift=1.0), rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns that the singular product may have no square root
        expected = np.trace(linalg.sqrtm(s1 @ s2)).real
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-6)
    assert trace_sqrt_product(s1, s1) == pytest.approx(np.trace(s1), rel=1e-6)  # (Σ²)^½ = Σ


def _direct_poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased KID MMD² with explicit loops (diagonal of K_xy kept, as in KID/torch-fidelity)."""
    k = lambda a, b: (a @ b / len(a) + 1.0) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (xx + yy) / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_matches_direct_loop_and_torch_fidelity():
    f1, f2 = _features(5, n=30, d=6), _features(6, n=30, d=6, shift=0.3)
    mean, std = kid(f1, f2, subsets=1, subset_size=30)  # the whole sets: subset order does not matter
    assert mean == pytest.approx(_direct_poly_mmd2(f1, f2), rel=1e-9) and std == 0.0
    f1, f2 = _features(7, n=60, d=6), _features(8, n=50, d=6, shift=0.3)
    ours = kid(f1, f2, subsets=7, subset_size=20, seed=3)
    ref = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=7, kid_subset_size=20,
                                 rng_seed=3, verbose=False)
    assert ours == pytest.approx((ref["kernel_inception_distance_mean"], ref["kernel_inception_distance_std"]))


def test_stats_roundtrip(tmp_path):
    mu, sigma = feature_statistics(_features(9))
    save_stats(tmp_path / "ref.npz", mu, sigma, {"detector": "random", "n": 200})
    mu2, sigma2, meta = load_stats(tmp_path / "ref.npz")
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert meta == {"detector": "random", "n": 200}


# ---------------------------------------------------------------- feature extractors

def test_random_features_end_to_end_fid():
    g = torch.Generator().manual_seed(0)
    dark = torch.rand(40, 3, 16, 16, generator=g) - 1  # float images in [-1, 0]
    bright = torch.rand(40, 3, 16, 16, generator=g)
    net = feat.build_feature_extractor("random", dim=8, seed=1)
    # Items of uneven size (single images, batches, (image, label) pairs) are re-batched.
    items = [dark[0], dark[1:7], (dark[7:40], torch.zeros(33))]
    f_dark = compute_features(net, items, batch_size=16, progress=False)
    direct = net(to_uint8(dark)).numpy()
    np.testing.assert_allclose(f_dark, direct, rtol=1e-6, atol=1e-9)
    assert f_dark.dtype == np.float64 and f_dark.shape == (40, 8)
    f_bright = compute_features(net, [to_uint8(bright)], batch_size=16, progress=False)
    assert fid_from_features(f_dark, f_bright) == pytest.approx(_reference_fid(f_dark, f_bright), rel=1e-6)
    assert fid_from_features(f_dark[:20], f_dark[20:]) < fid_from_features(f_dark, f_bright)
    again = feat.build_feature_extractor("random", dim=8, seed=1)(to_uint8(dark))  # seeded: reproducible
    torch.testing.assert_close(again, torch.from_numpy(direct))


class _TinyDetector(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = x.float().mean(dim=(2, 3))
        return torch.cat([f, f.square()], dim=1) if return_features else f.sum(dim=1, keepdim=True)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_detector(tmp_path):
    torch.jit.save(torch.jit.script(_TinyDetector()), str(tmp_path / "det.pt"))
    det = feat.build_feature_extractor("torchscript", path=tmp_path / "det.pt")
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    out = det(images)
    mean = images.double().mean(dim=(2, 3))
    assert det.dim == 6 and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.cat([mean, mean.square()], 1), rtol=1e-5, atol=1e-3)
    gray = det(images[:, :1])  # grayscale is repeated to RGB
    torch.testing.assert_close(gray[:, 0], gray[:, 2])
    with pytest.raises(FileNotFoundError, match="--detector"):
        feat.build_feature_extractor("torchscript", path=tmp_path / "missing.pt")


def test_inception_missing_weights_names_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("LITEVAE_INCEPTION", raising=False)
    with pytest.raises(FileNotFoundError) as err:
        feat.build_feature_extractor("inception")
    expected = tmp_path / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert str(expected) in str(err.value) and "--detector" in str(err.value)


def test_inception_loads_from_hub_cache(tmp_path, monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    # Make a random-weights file with the real layout (patch out torch-fidelity's own loading once).
    with monkeypatch.context() as mp:
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        reference = tfi.FeatureExtractorInceptionV3("ref", ["2048"])
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / feat.INCEPTION_FILENAME)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("LITEVAE_INCEPTION", raising=False)
    det = feat.build_feature_extractor("inception")
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    out = det(images)
    assert out.shape == (2, 2048) and out.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(out, reference(images)[0].double())


# ---------------------------------------------------------------- MMD

def _direct_rbf_mmd2(x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    k = lambda a, b: math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma**2))  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_rbf_matches_double_loop_with_chunking():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randn(10, 2, 3, generator=g, dtype=torch.float64) * 1.5 + 0.3
    ours = mmd_rbf(x, y, bandwidths=(1.0, 3.0), chunk_size=5)
    for sigma in (1.0, 3.0):
        assert ours[sigma] == pytest.approx(_direct_rbf_mmd2(x.flatten(1), y.flatten(1), sigma), rel=1e-9)


def test_mmd_to_standard_normal_matches_gaussian_closed_form():
    # For N(μ, I) vs N(0, I) in D dims: MMD² = 2 (σ²/(σ²+2))^{D/2} (1 − exp(−‖μ‖² / (2(σ²+2)))).
    sigma, d = 2.0, 4
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1500, 1, 2, 2, generator=g)
    latents[:, 0, 0, 0] += 1.0
    expected = 2 * (sigma**2 / (sigma**2 + 2)) ** (d / 2) * (1 - math.exp(-1.0 / (2 * (sigma**2 + 2))))
    value = mmd_to_standard_normal(latents, seed=2, bandwidths=(sigma,))[sigma]
    assert value == pytest.approx(expected, abs=0.012)
    null = mmd_to_standard_normal(torch.randn(1500, 1, 2, 2, generator=g), seed=3, bandwidths=(sigma,))[sigma]
    assert abs(null) < 0.01


# ---------------------------------------------------------------- classifier

def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes: bright left half, bright right half, bright top half (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = -torch.ones(n, 1, 16, 16)
    x[labels == 0, :, :, :8] = 1
    x[labels == 1, :, :, 8:] = 1
    x[labels == 2, :, :8, :] = 1
    return x + 0.3 * torch.randn(x.shape, generator=g), labels


def test_classifier_learns_separable_classes():
    x, y = _separable(96, 0)
    model = train_classifier(torch.utils.data.TensorDataset(x, y), epochs=8, lr=3e-3, num_classes=3,
                             size=16, batch_size=32, progress=False)
    assert isinstance(model, SmallClassifier)
    xt, yt = _separable(60, 1)
    assert classification_accuracy(model, xt, yt) == 1.0
    assert classification_accuracy(model, xt, (yt + 1) % 3) == 0.0


def test_classifier_accepts_ldm_style_dict_batches():
    x, y = _separable(96, 2)
    batches = [{"image": x[i:i + 32].permute(0, 2, 3, 1), "class_label": y[i:i + 32]} for i in range(0, 96, 32)]
    model = train_classifier(batches, epochs=8, num_classes=3, size=16, progress=False)
    xt, yt = _separable(60, 3)
    assert classification_accuracy(model, xt, yt) == 1.0
