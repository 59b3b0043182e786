"""Stage-2 dataset over the latent shards written by ``scripts/cache_latents.py``.

Each read draws ``z = mean + std·ε`` afresh (or takes the mean with ``sample=False``), picks the flipped copy
at random when the cache has one, and normalises ``z_norm = (z - shift) * scale_factor`` with the manifest's
statistics (overridable). Shards are split across ranks (``wds.split_by_node``) and DataLoader workers
(``wds.split_by_worker``). Under DDP, make epochs end together with the standard recipe::

    LatentShards(root, resampled=True, epoch_length=total)   # each rank yields ceil(total / world)

(``resampled=True`` draws shards at random per worker, so no rank runs dry; ``epoch_length`` counts samples
over all ranks.)
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import math
import random
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

log = logging.getLogger(__name__)


def _world() -> tuple[int, int]:
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    return rank, world


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.json in {root}: is it a latent cache (scripts/cache_latents.py)? "
                                "An unfinished cache gets its manifest when the same command is re-run to the end")
    return json.loads(path.read_text())


def normalisation_entry(manifest: Mapping[str, Any], split: str | None = None) -> dict:
    """The split whose statistics normalise every split: ``train`` when cached (one normalisation for
    training, validation and sampling), else ``split``, else the first one."""
    splits = manifest.get("splits") or {}
    if not splits:
        raise ValueError("the latent cache manifest has no splits")
    return splits.get("train") or (splits.get(split) if split else None) or next(iter(splits.values()))


def read_latent_stats(path: str | Path) -> dict[str, Any]:
    """``{"scale_factor", "shift", "latent_shape", "autoencoder", "manifest"}`` from a cache folder or its
    manifest.json, normalised as ``LatentShards`` does (see ``normalisation_entry``)."""
    path = Path(path)
    path = path / "manifest.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"latent_stats: {path} not found (a latent cache folder or its manifest.json "
                                "written by scripts/cache_latents.py)")
    entry = normalisation_entry(json.loads(path.read_text()))
    return {"scale_factor": float(entry["stats"]["scale_factor"]), "shift": entry["stats"]["shift"],
            "latent_shape": entry.get("latent_shape"), "autoencoder": entry.get("autoencoder") or {},
            "manifest": str(path)}


def _npy(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


class LatentShards(IterableDataset):
    """Samples ``{"latent": (C, h, w) float32 normalised, "key": str[, "cls": int][, "txt": str]}``.

    ``scale_factor``/``shift``: default to the manifest statistics of the ``train`` split when present (all
    splits must share one normalisation), else of ``split``; ``shift`` may be per channel. ``shuffle``:
    sample shuffle buffer (0: stream order). ``seed``: ``None`` uses the torch RNG (fresh noise every epoch,
    seeded per DataLoader worker by torch); an int makes noise and flips reproducible (e.g. validation).
    """

    def __init__(self, root: str, split: str = "train", sample: bool = True, flip: bool = True,
                 scale_factor: float | None = None, shift: float | Sequence[float] | None = None,
                 shuffle: int = 1000, resampled: bool = False, epoch_length: int | None = None,
                 seed: int | None = None):
        manifest = read_manifest(root)
        if split not in manifest.get("splits", {}):
            raise KeyError(f"{root}/manifest.json has no split {split!r} (has {sorted(manifest.get('splits', {}))})")
        entry = manifest["splits"][split]
        self.urls = [str(Path(root) / s["name"]) for s in entry["shards"] if s["count"] > 0]
        if not self.urls:
            raise ValueError(f"{root}: split {split!r} has no non-empty shards")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be a positive integer or None, got {epoch_length}")
        stats = normalisation_entry(manifest, split)["stats"]
        self.scale_factor = float(stats["scale_factor"] if scale_factor is None else scale_factor)
        shift = stats["shift"] if shift is None else shift
        self.shift = torch.as_tensor(shift, dtype=torch.float32).reshape(-1, 1, 1)
        self.total, self.sample, self.flip = int(entry["total"]), sample, flip
        self.shuffle, self.resampled, self.epoch_length, self.seed = shuffle, resampled, epoch_length, seed
        self.latent_shape = entry.get("latent_shape")

    # --------------------------------------------------------------------------------- decoding
    def _rng(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        info = get_worker_info()
        gen = torch.Generator()
        gen.manual_seed(self.seed * 1_000_003 + _world()[0] * 1009 + (info.id if info else 0))
        return gen

    def decode(self, raw: dict[str, Any], gen: torch.Generator | None = None) -> dict[str, Any]:
        """One tar sample (``{"mean.npy": bytes, ...}``) -> a training sample."""
        suffix = ""
        if self.flip and "mean_flip.npy" in raw and torch.rand((), generator=gen) < 0.5:
            suffix = "_flip"
        mean = _npy(raw[f"mean{suffix}.npy"])
        z = mean
        if self.sample:
            std = _npy(raw[f"std{suffix}.npy"])
            z = mean + std * torch.randn(mean.shape, generator=gen)
        out: dict[str, Any] = {"latent": (z - self.shift) * self.scale_factor}
        meta = json.loads(raw["json"]) if "json" in raw else {}
        out["key"] = meta.get("key", raw.get("__key__"))
        if "cls" in raw:
            out["cls"] = int(raw["cls"].decode().strip())
        if "txt" in raw:
            out["txt"] = raw["txt"].decode("utf-8")
        return out

    # -------------------------------------------------------------------------------- streaming
    def _shards(self) -> Iterator[dict[str, str]]:
        if self.resampled:
            if self.seed is None:
                yield from wds.ResampledShards(self.urls)
            else:  # the same draws on every pass, per rank and worker: for validation streams, not training
                info = get_worker_info()
                stream = _world()[0] * 1009 + (info.id if info else 0)
                yield from wds.ResampledShards(self.urls, seed=self.seed, worker_seed=lambda: stream,
                                               deterministic=True)
            return
        mine = [s["url"] for s in wds.split_by_worker(wds.split_by_node(dict(url=u) for u in self.urls))]
        if not mine:
            msg = f"a rank/worker got no latent shard ({len(self.urls)} shards); use fewer workers or resampled=True"
            if self.epoch_length is not None:
                raise RuntimeError(msg)
            log.warning(msg)
            return
        rng = random.Random(self.seed)
        for _ in itertools.count() if self.epoch_length is not None else range(1):
            if self.shuffle > 0:
                rng.shuffle(mine)
            yield from (dict(url=u) for u in mine)

    def _per_worker(self) -> int | None:
        if self.epoch_length is None:
            return None
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        per_rank = math.ceil(self.epoch_length / _world()[1])
        return per_rank // workers + (worker < per_rank % workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        gen = self._rng()
        samples = wds.tarfile_samples(self._shards())
        if self.shuffle > 0:
            samples = wds.shuffle(self.shuffle, initial=min(self.shuffle, 100))(samples)
        decoded = (self.decode(s, gen) for s in samples)
        n = self._per_worker()
        return decoded if n is None else itertools.islice(decoded, n)

    def __len__(self) -> int:
        """Samples per epoch on this rank: ``ceil((epoch_length or total) / world)``."""
        return math.ceil((self.epoch_length or self.total) / _world()[1])
