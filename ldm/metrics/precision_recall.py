"""Improved precision and recall of generative models (Kynkäänniemi et al. 2019), from detector features.

Each feature set spans a manifold: the union of balls around its points, each with radius the distance to the
point's k-th nearest neighbour in the same set (itself excluded; k = 3 as in the paper and ADM's evaluator).
Precision is the fraction of generated features inside the real manifold, recall the fraction of real features
inside the generated one. A point on a ball's boundary counts as inside (``<=``, as in both reference codes).

Distances are computed block by block (``batch_size`` rows against all columns), so 50k x 50k features need
memory for ``batch_size`` x 50k distances (100 MB in float64 at the default 256), not 50k x 50k.
"""
from __future__ import annotations

import numpy as np
import torch


def _as_tensor(features: np.ndarray | torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    f = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    if f.ndim != 2:
        raise ValueError(f"need (N, D) features, got shape {tuple(f.shape)}")
    return f.to(device=device, dtype=dtype)


def _squared_distances(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (rows of ``a`` vs rows of ``b``), clamped at 0 against round-off."""
    d = a @ b.T  # in place from here on: one (rows, N) block in memory
    return d.mul_(-2).add_((a * a).sum(1, keepdim=True)).add_(b_sq[None, :]).clamp_min_(0)


def manifold_radii(features: np.ndarray | torch.Tensor, k: int = 3, batch_size: int = 256,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(N,) squared distance of each feature to its k-th nearest neighbour in the same set, itself excluded."""
    f = _as_tensor(features, device, dtype)
    if len(f) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features per set, got {len(f)}")
    f_sq = (f * f).sum(1)
    radii = []
    for start in range(0, len(f), batch_size):
        d = _squared_distances(f[start:start + batch_size], f, f_sq)
        # The (k+1)-th smallest distance of a row, counting the point's own zero: its k-th neighbour's.
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def manifold_coverage(queries: np.ndarray | torch.Tensor, support: np.ndarray | torch.Tensor,
                      radii: torch.Tensor, batch_size: int = 256, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float64) -> float:
    """Fraction of ``queries`` inside at least one ball (``support[j]``, squared radius ``radii[j]``)."""
    q, s = _as_tensor(queries, device, dtype), _as_tensor(support, device, dtype)
    radii = radii.to(device=device, dtype=dtype)
    s_sq = (s * s).sum(1)
    inside = 0
    for start in range(0, len(q), batch_size):
        d = _squared_distances(q[start:start + batch_size], s, s_sq)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(q)


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3,
                     batch_size: int = 256, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float64) -> dict[str, float]:
    """``{"precision", "recall"}`` of ``fake`` (generated) features against ``real`` (reference) features."""
    kw = {"batch_size": batch_size, "device": device, "dtype": dtype}
    real_radii = manifold_radii(real, k, **kw)
    fake_radii = manifold_radii(fake, k, **kw)
    return {"precision": manifold_coverage(fake, real, real_radii, **kw),
            "recall": manifold_coverage(real, fake, fake_radii, **kw)}
