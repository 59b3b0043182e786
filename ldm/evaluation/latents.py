"""Latent diagnostics of a cache: per-channel statistics and MMD to N(0, I) (paper Table 6)."""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ldm.cache.reader import LatentShards
from ldm.cache.manifest import Manifest
from ldm.metrics.mmd import DEFAULT_BANDWIDTHS, mmd_to_standard_normal

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- latent diagnostics
def read_latent_sample(cache_dir: str | Path, split: str = "train", n: int | None = None, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds (float32, (N, C, h, w)) of up to ``n`` cached samples, unflipped, read from
    the split's shards in a seeded random order (so a sample spans shards without reading them all)."""
    reader = LatentShards.from_cache(str(cache_dir), split, sample=False, flip=False, scale_factor=1.0, shift=0.0,
                                     seed=seed)
    moments = list(itertools.islice((reader.moments(raw) for raw in reader.samples()), n))
    if len(moments) < 2:
        raise ValueError(f"{cache_dir}: split {split!r} has fewer than 2 latents")
    means, stds = zip(*moments)
    return torch.stack(means), torch.stack(stds)


def channel_stats(latents: torch.Tensor) -> dict:
    """Per-channel mean/std (population) over samples and positions, and the global std, in float64."""
    z = latents.double().transpose(0, 1).flatten(1)
    return {"channel_mean": z.mean(1).tolist(), "channel_std": z.std(1, unbiased=False).tolist(),
            "global_mean": float(z.mean()), "global_std": float(z.std(unbiased=False))}


def latent_diagnostics(cache_dir: str | Path, split: str = "train", n: int = 2000,
                       bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS, repeats: int = 3, seed: int = 0,
                       use_mean: bool = False, normalize: bool = False) -> dict:
    """Per-channel latent statistics (manifest vs recomputed from a sample) and MMD² to N(0, I) (Table 6).

    The MMD uses posterior samples z = mean + std·ε (``use_mean``: the means), raw as the encoder emits them
    (``normalize``: after ``(z - shift) * scale_factor`` with the statistics that normalise every split for
    stage 2, ``Manifest.normalisation``). Repeat ``r`` takes the ``r``-th block
    of ``n`` latents and a fresh reference draw (seed + r); with too few latents every repeat reuses them all.
    """
    manifest = Manifest.read(cache_dir)
    manifest_stats = manifest.split(split).stats
    means, stds = read_latent_sample(cache_dir, split, n * repeats, seed)
    generator = torch.Generator().manual_seed(seed)
    z = means if use_mean else means + stds * torch.randn(means.shape, generator=generator)
    if normalize:
        norm = manifest.normalisation(split)
        z = (z - norm.shift) * norm.scale_factor
    enough = len(z) >= n * repeats
    if not enough:
        log.warning("latent diagnostics: %d latents < n*repeats = %d; every repeat uses all %d latents with a "
                    "fresh N(0, I) draw", len(z), n * repeats, len(z))
    runs = [mmd_to_standard_normal(z[r * n:(r + 1) * n] if enough else z, seed=seed + r, bandwidths=bandwidths)
            for r in range(repeats)]
    mmd = {str(s): {"mean": float(np.mean([run[s] for run in runs])), "std": float(np.std([run[s] for run in runs])),
                    "values": [run[s] for run in runs]} for s in runs[0]}
    keys = ("count", "channel_mean", "channel_std", "global_mean", "global_std", "shift", "scale_factor")
    return {"cache": str(cache_dir), "split": split, "latent_shape": list(means.shape[1:]),
            "manifest": {k: manifest_stats.get(k) for k in keys},
            "sample": {"n": len(means), **channel_stats(means),
                       "mean_posterior_std": stds.double().mean(dim=(0, 2, 3)).tolist()},
            "mmd": {"latents": "posterior mean" if use_mean else "posterior sample", "normalized": normalize,
                    "n_per_repeat": min(n, len(z)), "repeats": repeats, "seed": seed, "per_bandwidth": mmd}}
