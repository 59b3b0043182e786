"""Per-channel statistics of cached latents: float64 sufficient statistics, merged exactly across shards and ranks
(sums, not running means), and the normalisation they give (``shift``, ``scale_factor = 1 / global std``)."""
from __future__ import annotations

from typing import Mapping

import numpy as np


class LatentStats:
    """Per-channel float64 sufficient statistics of latents, mergeable exactly (sums, not running means)."""

    def __init__(self, channels: int = 0):
        self.count = 0  # elements per channel (samples × h × w)
        self.sum = np.zeros(channels)
        self.sumsq = np.zeros(channels)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)
        self.std_sum = np.zeros(channels)  # sum of the posterior std, for its mean

    def update(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Add latents ``(N, C, h, w)`` (posterior mean and std)."""
        m = np.asarray(mean, dtype=np.float64).transpose(1, 0, 2, 3).reshape(mean.shape[1], -1)
        s = np.asarray(std, dtype=np.float64).transpose(1, 0, 2, 3).reshape(std.shape[1], -1)
        if self.count == 0 and len(self.sum) != m.shape[0]:
            self.__init__(m.shape[0])
        self.count += m.shape[1]
        self.sum += m.sum(1)
        self.sumsq += (m * m).sum(1)
        self.min = np.minimum(self.min, m.min(1))
        self.max = np.maximum(self.max, m.max(1))
        self.std_sum += s.sum(1)

    def merge(self, other: "LatentStats") -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.__init__(len(other.sum))
        self.count += other.count
        for name in ("sum", "sumsq", "std_sum"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.min, self.max = np.minimum(self.min, other.min), np.maximum(self.max, other.max)

    def to_dict(self) -> dict:
        return {"count": self.count, **{k: getattr(self, k).tolist() for k in ("sum", "sumsq", "min", "max",
                                                                            "std_sum")}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LatentStats":
        out = cls(len(d["sum"]))
        out.count = int(d["count"])
        for k in ("sum", "sumsq", "min", "max", "std_sum"):
            setattr(out, k, np.asarray(d[k], dtype=np.float64))
        return out

    def summary(self) -> dict:
        """Per-channel and global mean/std/min/max, mean posterior std, and ``shift``/``scale_factor``."""
        if self.count == 0:
            return {"count": 0}
        n = self.count
        mean = self.sum / n
        std = np.sqrt(np.maximum(self.sumsq / n - mean**2, 0.0))
        g_mean = self.sum.sum() / (n * len(self.sum))
        g_std = float(np.sqrt(max(self.sumsq.sum() / (n * len(self.sum)) - g_mean**2, 0.0)))
        return {"count": n, "channel_mean": mean.tolist(), "channel_std": std.tolist(),
                "channel_min": self.min.tolist(), "channel_max": self.max.tolist(),
                "min": float(self.min.min()), "max": float(self.max.max()),
                "global_mean": float(g_mean), "global_std": g_std, "mean_posterior_std": (self.std_sum / n).tolist(),
                "shift": float(g_mean), "scale_factor": 1.0 / g_std if g_std > 0 else 1.0,
                "method": "exact float64 sums over every stored posterior mean (unflipped, after the dtype cast), "
                          "merged from per-shard sidecars; z_norm = (z - shift) * scale_factor, "
                          "scale_factor = 1 / global_std"}
