"""Stage-2 dataset over the latent shards written by ``scripts/cache_latents.py``.

Each read draws ``z = mean + std·ε`` afresh (or takes the mean with ``sample=False``), picks the flipped copy
at random when the cache has one, and normalises ``z_norm = (z - shift) * scale_factor`` with the manifest's
statistics (overridable). Shards are split across ranks and DataLoader workers by ``ShardStream``. Under DDP,
make epochs end together with the standard recipe::

    LatentShards.from_cache(root, resampled=True, epoch_length=total)   # each rank yields ceil(total / world)

(``resampled=True`` draws shards at random per worker, so no rank runs dry; ``epoch_length`` counts samples
over all ranks.)
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ldm.cache.keys import key_from_tar
from ldm.cache.manifest import Manifest
from ldm.cache.shards import ShardStream


def npy_tensor(data: bytes) -> torch.Tensor:
    """A stored ``.npy`` field as a float32 tensor."""
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


class LatentShards(ShardStream):
    """Samples ``{"latent": (C, h, w) float32 normalised, "key": str[, "cls": int][, "txt": str]}``.

    Built from a cache folder by ``from_cache`` (what configs' ``target: ldm.cache.LatentShards`` calls), which
    reads the manifest; ``__init__`` takes the shard list and the normalisation as values. ``scale_factor``/
    ``shift``: the manifest's normalisation unless given (``Manifest.normalisation``: the ``train`` split's
    statistics when cached); ``shift`` may be per channel. ``shuffle``: sample shuffle buffer (0: stream order).
    ``seed``: ``None`` uses the torch RNG (fresh noise every epoch, seeded per DataLoader worker by torch); an int
    makes noise, flips and shuffling reproducible (e.g. validation).
    """

    def __init__(self, urls: list[str], scale_factor: float, shift: float | Sequence[float],
                 latent_shape: Sequence[int] | None = None, total: int | None = None, sample: bool = True,
                 flip: bool = True, shuffle: int = 1000, resampled: bool = False, epoch_length: int | None = None,
                 seed: int | None = None):
        super().__init__(urls, shuffle, resampled, epoch_length, seed, total=total)
        self.scale_factor = float(scale_factor)
        self.shift = torch.as_tensor(shift, dtype=torch.float32).reshape(-1, 1, 1)
        self.sample, self.flip, self.latent_shape = sample, flip, latent_shape

    @classmethod
    def from_cache(cls, root: str | Path, split: str = "train", scale_factor: float | None = None,
                   shift: float | Sequence[float] | None = None, verify: bool = False,
                   **stream: Any) -> "LatentShards":
        """The ``split`` of the cache in ``root`` (``stream``: sample, flip, shuffle, resampled, epoch_length, seed).

        Every shard is checked before anything trains: present and of its recorded size, and with ``verify`` also
        of its recorded SHA-256 (reads the whole cache once)."""
        manifest = Manifest.read(root)
        manifest.check_shards(split, hashes=verify)
        entry = manifest.split(split)
        urls = [str(Path(root) / s.name) for s in entry.shards if s.count > 0]
        if not urls:
            raise ValueError(f"{root}: split {split!r} has no non-empty shards")
        norm = manifest.normalisation(split)
        return cls(urls, norm.scale_factor if scale_factor is None else scale_factor,
                   norm.shift if shift is None else shift, entry.latent_shape, entry.total, **stream)

    from_params = from_cache  # what instantiate_from_config calls with a config's params

    def sample_fields(self) -> frozenset[str]:
        """The keys a sample has: ``cls`` / ``txt`` where the cached source had labels / captions (the first sample
        of the first shard says, as every sample of a cache has the same fields)."""
        return frozenset({"latent", "key"} | ({"cls", "txt"} & (self.first_sample_extensions() or set())))

    def moments(self, raw: dict[str, Any], gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior ``(mean, std)`` of one tar sample: the flipped copy half the time when ``flip``."""
        suffix = ""
        if self.flip and "mean_flip.npy" in raw and torch.rand((), generator=gen) < 0.5:
            suffix = "_flip"
        return npy_tensor(raw[f"mean{suffix}.npy"]), npy_tensor(raw[f"std{suffix}.npy"])

    def decode(self, raw: dict[str, Any], gen: torch.Generator | None = None) -> dict[str, Any]:
        """One tar sample (``{"mean.npy": bytes, ...}``) -> a training sample."""
        mean, std = self.moments(raw, gen)
        z = mean + std * torch.randn(mean.shape, generator=gen) if self.sample else mean
        out: dict[str, Any] = {"latent": (z - self.shift) * self.scale_factor}
        meta = json.loads(raw["json"]) if "json" in raw else {}
        # The json holds the key as given (caches of every key scheme); __key__ is its reversible escape.
        out["key"] = meta["key"] if "key" in meta else key_from_tar(raw["__key__"])
        if "cls" in raw:
            out["cls"] = int(raw["cls"].decode().strip())
        if "txt" in raw:
            out["txt"] = raw["txt"].decode("utf-8")
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        gen = self.generator()
        return self.per_worker(self.decode(s, gen) for s in self.samples())
