"""Reconstruction metrics of an autoencoder at several resolutions: PSNR/SSIM, LPIPS, rFID."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ldm.evaluation.detectors import Detector
from ldm.evaluation.sources import _skip_none
from ldm.metrics.fid import feature_statistics, frechet_distance, small_sample_warning
from ldm.io import atomic_path, to_uint8
from ldm.metrics.image import psnr, ssim
from ldm.precision import GuardedAutoencoder

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- autoencoder metrics
def resize_images(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Float [-1, 1] NCHW images resized (bicubic, antialiased) to ``resolution`` squared, clipped."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    x = F.interpolate(x.float(), size=(resolution, resolution), mode="bicubic", align_corners=False,
                      antialias=True)
    return x.clamp(-1, 1)


@torch.no_grad()
def reconstruct(model: Any, x: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """decode(encode(x).mode()): the deterministic reconstruction used for all stage-1 metrics.

    Runs under ``precision`` autocast through ``ldm.precision.GuardedAutoencoder`` (an fp16 overflow is redone
    in fp32). ``model`` may itself be a guarded or tiled wrapper (the script's, built once so that the fp16
    warning comes once per run); its own precision then applies.
    """
    guarded = GuardedAutoencoder(model, precision)
    return guarded.decode(guarded.encode(x).mode()).float()


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


def load_real_features(path: str | Path | None, key: str) -> dict[int, np.ndarray] | None:
    """Cached detector features of the original images (``{resolution: (N, D)}``) for ``key`` (detector, data,
    split, count), so that every autoencoder evaluated on the same images reuses them; None if ``path`` does not
    exist yet. The project's rule for keyed result caches: a file made for another key is an error naming it,
    never silently recomputed and overwritten (reference statistics and the classifier cache do the same)."""
    if path is None or not Path(path).is_file():
        return None
    with np.load(path) as data:
        if str(data["key"]) != key:
            raise ValueError(f"{path} holds the features of other images or another detector; give this "
                             "evaluation its own --real-features-cache")
        return {int(name.split("_")[1]): data[name] for name in data.files if name.startswith("res_")}


def save_real_features(path: str | Path, key: str, features: Mapping[int, np.ndarray]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # two evaluations writing the same cache leave one whole file
        np.savez(tmp, key=np.array(key), **{f"res_{r}": f for r, f in features.items()})


def evaluate_autoencoder(model: torch.nn.Module, batches: Iterable[Any], resolutions: Sequence[int] | None = None,
                         lpips: torch.nn.Module | None = None, detector: Detector | None = None,
                         device: torch.device | str = "cpu", max_samples: int | None = None,
                         precision: str = "fp32", progress: bool = True,
                         real_features: Mapping[int, np.ndarray] | None = None,
                         return_real_features: bool = False) -> dict[int, dict]:
    """PSNR/SSIM (mean and std over images), LPIPS and rFID (reconstructions vs originals) per resolution.

    ``batches``: float [-1, 1] NCHW tensors or dicts with ``"image"``; each batch is resized to every
    resolution (default: its own size). Returns ``{resolution: {"psnr", "psnr_std", "ssim", ..., "n"}}``.
    ``real_features`` (``load_real_features``): the originals' detector features, in batch order, instead of
    recomputing them; ``return_real_features`` puts the computed ones in ``result[r]["real_features"]``.
    """
    device = torch.device(device)
    factor = int(getattr(model, "downsample_factor", 8))
    bad = [r for r in resolutions or () if r % factor]
    if bad:
        raise ValueError(f"resolutions {bad} are not divisible by the autoencoder's factor {factor}")
    acc: dict[int, _Accumulator] = {}
    seen = 0
    bar = tqdm(total=_expected_images(batches, max_samples), disable=not progress, desc="eval autoencoder",
               unit="img", dynamic_ncols=True)
    for batch in _skip_none(batches):
        x = batch["image"] if isinstance(batch, Mapping) else batch
        if max_samples is not None:
            x = x[:max_samples - seen]
        x = x.to(device).float()
        if seen == 0:
            source = int(x.shape[-1])
            _name_upsampling(resolutions, source)
        for r in resolutions or [x.shape[-1]]:
            real = None if real_features is None else real_features[r][seen:seen + len(x)]
            _evaluate_batch(model, resize_images(x, r), acc.setdefault(r, _Accumulator()), lpips, detector,
                            precision, real)
        seen += len(x)
        bar.update(len(x))
        if max_samples is not None and seen >= max_samples:
            break
    bar.close()
    if seen == 0:
        raise ValueError("evaluate_autoencoder: no images")
    results = {r: a.summary() for r, a in acc.items()}
    for r, metrics in results.items():
        if r > source:
            metrics["upsampled_from"] = source
        warning = (small_sample_warning(metrics["n"], detector.extractor.dim, detector.metric_name("rfid"))
                   if detector is not None else None)
        if warning:
            metrics["sample_size_warning"] = warning
            log.warning("%s px: %s", r, warning)
    if return_real_features and detector is not None and real_features is None:
        for r, a in acc.items():
            results[r]["real_features"] = np.concatenate(a.features["real"])
    return results


def _expected_images(batches: Iterable[Any], max_samples: int | None) -> int | None:
    """How many images the loop will see, for the progress bar: the dataset's size (capped by ``max_samples``)."""
    try:
        count = len(getattr(batches, "dataset"))
    except (AttributeError, TypeError):  # a plain iterable, or a stream without a length
        return max_samples
    return count if max_samples is None else min(count, max_samples)


def _name_upsampling(resolutions: Sequence[int] | None, source: int) -> None:
    above = [r for r in resolutions or () if r > source]
    if above:
        log.warning("resolutions %s are above the images' own %d px: they are upsampled (bicubic) before encoding, "
                    "so these rows measure the autoencoder on interpolated images, not on %s px content",
                    above, source, "/".join(map(str, above)))


def _evaluate_batch(model, x: torch.Tensor, acc: _Accumulator, lpips, detector, precision: str,
                    real: np.ndarray | None = None) -> None:
    rec = reconstruct(model, x, precision).clamp(-1, 1)  # saved images are clipped; metrics see the same
    acc.add("psnr", psnr(rec, x))
    acc.add("ssim", ssim(rec, x))
    if lpips is not None:
        with torch.no_grad():
            acc.add("lpips", lpips(rec, x))
    if detector is not None:
        acc.features["real"].append(detector.extractor(to_uint8(x)).cpu().numpy() if real is None else real)
        acc.features["rec"].append(detector.extractor(to_uint8(rec)).cpu().numpy())
