"""Sample metrics: reference statistics computed once and cached, FID/KID and precision/recall of samples (all
from the same detector features), class accuracy."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch

from ldm.evaluation.detectors import Detector
from ldm.evaluation.sources import ImageSource, _skip_none, data_loader
from ldm.io import atomic_path, from_uint8
from ldm.metrics.classifier import (
    SmallClassifier,
    classification_accuracy,
    train_classifier,
)
from ldm.metrics.fid import (
    compute_features,
    small_sample_warning,
    feature_statistics,
    frechet_distance,
    kid,
    load_stats,
    save_stats,
)
from ldm.metrics.precision_recall import precision_recall

log = logging.getLogger(__name__)

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
    features: np.ndarray | None  # kept only when KID or precision/recall need them
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
        log.info("%s has no reference features (needed for the kernel distance or precision/recall): "
                 "recomputing", cache)
    features = source_features(source, detector, device, progress)
    mu, sigma = feature_statistics(features)
    meta = {"key": key, "detector": detector.identity, "ref": source.identity(), "count": len(features)}
    kept = features.astype(np.float32) if keep_features else None  # as cached: a rerun gives the same numbers
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_stats(cache, mu, sigma, meta)
        if kept is not None:
            np.save(_features_path(cache), kept)
        log.info("reference statistics of %d images written to %s", len(features), cache)
    return ReferenceStats(mu, sigma, kept, meta, from_cache=False)


def _given_stats(path: Path, detector: Detector, keep_features: bool) -> ReferenceStats:
    mu, sigma, meta = load_stats(path)
    if not meta:  # no ``meta``: statistics from elsewhere, e.g. an ADM reference batch's mu/sigma
        meta = _foreign_stats_meta(path, mu, detector)
    if meta.get("detector") not in (None, detector.identity):
        raise ValueError(f"{path} was computed with detector {meta['detector']}, not {detector.identity}")
    features = np.load(_features_path(path)) if _features_path(path).is_file() else None
    if keep_features and features is None:
        raise ValueError(f"the kernel distance and precision/recall need reference features, but {path} holds only "
                         f"statistics; pass the reference images (folder, .npz or data config) as --ref")
    return ReferenceStats(mu, sigma, features, meta, from_cache=True)


# ------------------------------------------------------------------------------------ sample metrics
def evaluate_samples(samples: ImageSource, ref: ReferenceStats, detector: Detector, with_kid: bool = False,
                     kid_subsets: int = 100, kid_subset_size: int = 1000, device: torch.device | str = "cpu",
                     progress: bool = True, with_precision_recall: bool = False, pr_k: int = 3) -> dict:
    """FID (and KID, precision/recall with k-NN manifolds of ``pr_k``) of the images of ``samples`` against
    ``ref``, all from the same ``detector`` features. Keys are the Inception names (``fid``, ``kid_mean``...);
    outputs rename them with ``detector.named`` so that random features are never called FID/KID."""
    features = source_features(samples, detector, device, progress)
    out = {"fid": frechet_distance(*feature_statistics(features), ref.mu, ref.sigma),
           "n_samples": len(features), "n_ref": ref.meta.get("count")}
    warning = small_sample_warning(min(n for n in (out["n_samples"], out["n_ref"]) if n is not None),
                                   features.shape[1], detector.metric_name("fid"))
    if warning:
        out["sample_size_warning"] = warning
        log.warning(warning)
    if (with_kid or with_precision_recall) and ref.features is None:
        raise ValueError("the kernel distance and precision/recall need the reference features; compute the "
                         "reference with keep_features=True")
    if with_kid:
        out["kid_mean"], out["kid_std"] = kid(features, ref.features, kid_subsets, kid_subset_size)
    if with_precision_recall:
        out.update(precision_recall(ref.features, features, k=pr_k, device=device))
        out["pr_k"] = pr_k
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
        with atomic_path(cache) as tmp:  # a comparison's parallel evaluations may write it at once
            torch.save({"key": key, "num_classes": num_classes, "in_channels": model.features[0][0].in_channels,
                        "size": model.size, "state_dict": model.state_dict()}, tmp)
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
        x = from_uint8(images)
        correct += round(classification_accuracy(model, x, labels) * len(labels))
        total += len(labels)
    return correct / total


def _foreign_stats_meta(path: Path, mu: np.ndarray, detector: Detector) -> dict:
    """Accept ``mu``/``sigma`` that we did not write (ADM's evaluator: TF Inception pool_3, 2048-d) only with an
    Inception-compatible detector of the same width; with the random network such an FID would mean nothing."""
    if detector.kind == "random" or mu.shape != (detector.extractor.dim,):
        raise ValueError(f"{path} holds {mu.shape[0]}-d statistics from another tool (no 'meta', e.g. an ADM "
                         f"reference batch); they need an Inception detector with {mu.shape[0]}-d features, not "
                         f"{detector.identity} ({detector.extractor.dim}-d). Pass the reference images instead.")
    log.warning("%s: statistics without 'meta' (e.g. an ADM reference batch), taken as Inception pool features; "
                "FIDs against them match ADM's evaluator up to the TF-vs-PyTorch port's numerical differences", path)
    return {"count": None, "detector": None, "ref": str(path), "foreign": True}
