"""FID and KID from feature arrays, feature extraction over an image iterable, and cached statistics.

FID is pytorch-fid's / torch-fidelity's formula, with Tr((Σ1Σ2)^½) taken through symmetric eigendecompositions
(``trace_sqrt_product``: same value, faster, exact for singular covariances); KID is the unbiased polynomial-kernel MMD² of Bińkowski et al. averaged over random
subsets, drawn in the same order as torch-fidelity so that the numbers agree for the same seed.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.io import atomic_path, to_uint8

log = logging.getLogger(__name__)


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    f = _as_float64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def small_sample_warning(n: int, dim: int, metric: str = "FID") -> str | None:
    """A warning when a Fréchet distance rests on fewer images than it needs to mean much, else None.

    Below ``dim`` images (2048 for Inception) the feature covariance is rank-deficient; at any n the estimate is
    biased upward by roughly c/n (Chong & Forsyth 2020), so values are only comparable at equal n, and published
    numbers use 50,000 samples (ADM protocol; at least 10,000 for a rough comparison)."""
    if n >= 10_000:
        return None
    rank = f", fewer than the {dim:,} feature dimensions (rank-deficient covariance)" if n < dim else ""
    metric = {"fid": "FID", "rfid": "rFID"}.get(metric, metric)
    return (f"{metric} from n={n:,} images{rank}: biased upward, falling as n grows; compare only at equal n "
            "(published numbers use 50,000)")


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ1Σ2)^½) for covariances Σ1, Σ2, as Tr((Σ1^½ Σ2 Σ1^½)^½): the same eigenvalues (those of Σ1Σ2), but
    both roots are of symmetric PSD matrices, taken by ``eigh`` with round-off negatives clipped to 0.

    Why not ``scipy.linalg.sqrtm(Σ1 @ Σ2)`` (pytorch-fid, torch-fidelity, fid-helper-pytorch): it gives the same
    trace (to ~1e-7 relative at 2048-d), but takes a complex Schur decomposition — about 4x slower at 2048-d on
    a CPU — and leaves imaginary round-off or non-finite values when the covariances are singular (fewer
    images than feature dimensions), which needed an ε·I offset that changed the value."""
    eigenvalues, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(eigenvalues.clip(min=0))) @ vectors.T
    inner = root1 @ sigma2 @ root1
    return float(np.sqrt(np.linalg.eigvalsh((inner + inner.T) / 2).clip(min=0)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½) between two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("Fréchet distance: non-finite mean or covariance (NaN/inf features?)")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def fid_from_features(features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor) -> float:
    """FID between two (N, D) feature sets."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def _polynomial_mmd2(f1: np.ndarray, f2: np.ndarray, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD² with k(a, b) = (a·b / D + coef0)^degree; K_XY keeps its diagonal (torch-fidelity/KID)."""
    gamma = 1.0 / f1.shape[1]
    k_xx = (f1 @ f1.T * gamma + coef0) ** degree
    k_yy = (f2 @ f2.T * gamma + coef0) ** degree
    k_xy = (f1 @ f2.T * gamma + coef0) ** degree
    m = f1.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor, subsets: int = 100,
        subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the subset MMD² estimates."""
    f1, f2 = _as_float64(features1), _as_float64(features2)
    size = min(subset_size, len(f1), len(f2))
    if size < subset_size:
        log.warning("kernel distance: subset_size %d > available samples; using %d", subset_size, size)
    if size < 2:
        raise ValueError("the kernel distance needs at least 2 samples per set")
    rng = np.random.RandomState(seed)
    mmds = np.array([_polynomial_mmd2(f1[rng.choice(len(f1), size, replace=False)],
                                      f2[rng.choice(len(f2), size, replace=False)]) for _ in range(subsets)])
    return float(mmds.mean()), float(mmds.std())


def _as_float64(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().numpy()
    return np.asarray(features, dtype=np.float64)


def _image_batches(images_iterable: Iterable[Any], batch_size: int) -> Iterable[torch.Tensor]:
    """Re-batch an iterable of images/batches to uint8 NCHW batches of ``batch_size``.

    Items may be CHW or NCHW tensors (uint8, or float in [-1, 1]), or tuples/lists whose first element is one.
    """
    buffer: list[torch.Tensor] = []
    count = 0
    for item in images_iterable:
        x = item[0] if isinstance(item, (tuple, list)) else item
        x = torch.as_tensor(x)
        x = x.unsqueeze(0) if x.dim() == 3 else x
        buffer.append(x if x.dtype == torch.uint8 else to_uint8(x))
        count += len(x)
        while count >= batch_size:
            merged = torch.cat(buffer)
            yield merged[:batch_size]
            buffer, count = [merged[batch_size:]], len(merged) - batch_size
    if count:
        yield torch.cat(buffer)


def compute_features(extractor: Any, images_iterable: Iterable[Any], batch_size: int = 64,
                     device: torch.device | str = "cpu", progress: bool = True) -> np.ndarray:
    """Run ``extractor`` over all images and return (N, D) float64 features."""
    extractor = extractor.to(device)
    chunks = []
    with torch.no_grad():
        for batch in tqdm(_image_batches(images_iterable, batch_size), disable=not progress, desc="features",
                          unit="batch"):
            chunks.append(_as_float64(extractor(batch.to(device))))
    if not chunks:
        raise ValueError("compute_features: the image iterable was empty")
    return np.concatenate(chunks)


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, meta: dict | None = None) -> None:
    """Write reference statistics to ``.npz`` (atomically, so a crash never leaves a half file)."""
    with atomic_path(path) as tmp:
        np.savez(tmp, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta or {})))


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read ``(mu, sigma, meta)`` written by ``save_stats``; ``meta`` is ``{}`` for files of other tools (e.g.
    ADM reference batches, which hold ``mu``/``sigma`` and no ``meta``)."""
    with np.load(Path(path), allow_pickle=False) as data:
        missing = {"mu", "sigma"} - set(data.files)
        if missing:
            raise KeyError(f"{path}: no {sorted(missing)} array (has {data.files}); not a statistics file")
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        return data["mu"], data["sigma"], meta
