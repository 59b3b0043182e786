"""Sampling from a trained stage-2 model: load it (with its first stage), draw per-seed samples, write them.

Used by ``scripts/sample.py`` and by the evaluation / comparison scripts. A sample depends only on its seed
(and its class or prompt), never on the batch size or the number of processes, so ``--seeds 0-49999`` split
over any number of GPUs gives the same images (EDM2-style).
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ldm.first_stage import resolve_source
from ldm.util import instantiate_from_config, load_state_dict, load_weights

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")


def parse_seeds(spec: str) -> list[int]:
    """``"0-999"``, ``"1,5,7"`` or ``"0-9,20-29"`` → list of ints (ranges inclusive, like EDM2)."""
    seeds: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if sep:
            if int(hi) < int(lo):
                raise ValueError(f"bad seed range {part!r}: end before start")
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    if not seeds:
        raise ValueError(f"no seeds in {spec!r}")
    return seeds


def load_diffusion(source: str | Path, use_ema: bool = True, device: str | torch.device = "cpu",
                   first_stage: str | None = None) -> tuple[torch.nn.Module, DictConfig]:
    """A stage-2 model from a run folder (newest ``configs/*-project.yaml`` + ``checkpoints/last.ckpt``) or a
    ``.ckpt`` inside one, in eval mode on ``device``. ``first_stage`` overrides the decoder's source.

    The normalisation (scale/shift) and latent shape come from the checkpoint's buffers. With
    ``first_stage.path: from_manifest`` the decoder's checkpoint is found through the cache's
    ``manifest.json``; on a machine without the cache pass ``first_stage`` (``--first-stage``) instead.
    """
    config_path, ckpt_path = resolve_source(source)
    config = OmegaConf.load(config_path)
    state = load_state_dict(ckpt_path)
    params = config.model.params
    missing = [k for k in ("scale_factor", "shift", "latent_shape") if k not in state]
    if missing:
        raise RuntimeError(f"{ckpt_path} has no {missing}: is it a stage-2 (LatentDiffusion) checkpoint?")
    overrides = {"input": "cached", "latent_stats": None, "scale_factor": float(state["scale_factor"]),
                 "shift": state["shift"].tolist(), "latent_shape": state["latent_shape"].tolist()}
    if first_stage is not None:
        overrides["first_stage"] = {**OmegaConf.to_container(params.get("first_stage") or {}), "path": first_stage}
    elif (params.get("first_stage") or {}).get("path") == "from_manifest":
        overrides["first_stage"] = {**OmegaConf.to_container(params.first_stage),
                                    "path": _manifest_first_stage(params.get("latent_stats"))}
    # Merged at the root so that interpolations like ${latents} elsewhere in model.params still resolve.
    model_config = OmegaConf.merge(config, {"model": {"params": overrides}}).model
    module = instantiate_from_config(model_config, where="model")
    load_weights(module, state, strict=True, what=f"stage-2 model from {ckpt_path}")
    if use_ema and module.ema is None and ckpt_path.suffix != ".safetensors":  # exports hold the EMA UNet
        log.warning("%s has no EMA weights; sampling with the live UNet", ckpt_path)
    module.use_ema_for_sampling = use_ema
    log.info("loaded %s (config %s)", ckpt_path, config_path.name)
    return module.eval().to(device), config


def export_diffusion(source: str | Path, out: str | Path, use_ema: bool = True) -> tuple[Path, Path]:
    """Write a stage-2 model for release: ``<out>.safetensors`` (the EMA UNet in the ``unet.*`` slot by default,
    plus the normalisation and latent-shape buffers) and ``<out>.yaml`` (the run's config with
    ``ema_decay: null`` and the first stage's path resolved). ``load_diffusion`` and ``scripts/sample.py`` read
    it; on another machine pass ``--first-stage`` (e.g. the stage-1 export).
    """
    from safetensors.torch import save_file

    config_path, ckpt_path = resolve_source(source)
    state = load_state_dict(ckpt_path)
    if "scale_factor" not in state:
        raise RuntimeError(f"{ckpt_path} is not a stage-2 (LatentDiffusion) checkpoint")
    ema = {"unet." + k[len("ema.module."):]: v for k, v in state.items() if k.startswith("ema.module.")}
    if use_ema and not ema:
        log.warning("%s has no EMA weights; exporting the live UNet", ckpt_path)
    weights = "ema" if use_ema and ema else "live"
    export = {k: v for k, v in state.items() if not k.startswith("ema.")}
    if weights == "ema":
        export.update(ema)
    config = OmegaConf.load(config_path)
    params = config.model.params
    first_stage = OmegaConf.to_container(params.get("first_stage") or {})
    if first_stage.get("path") == "from_manifest":
        first_stage["path"] = _manifest_first_stage(params.get("latent_stats"))
    # The buffers carry the normalisation and shape, so the sidecar needs no cache.
    config = OmegaConf.merge(config, {"model": {"params": {"ema_decay": None, "latent_stats": None,
                                                           "first_stage": first_stage or None}}})
    out = Path(out).with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in export.items()}, str(out),
              metadata={"source": str(ckpt_path), "weights": weights})
    sidecar = out.with_suffix(".yaml")
    OmegaConf.save(config, sidecar)
    log.info("exported %s stage-2 weights of %s to %s (+ %s)", weights, ckpt_path, out, sidecar.name)
    return out, sidecar


def _manifest_first_stage(latent_stats: str | None) -> str:
    from ldm.data.latents import read_latent_stats

    if not latent_stats:
        raise ValueError("first_stage.path=from_manifest but the config has no latent_stats; pass --first-stage")
    path = read_latent_stats(latent_stats)["autoencoder"].get("ckpt_path")
    if not path:
        raise ValueError(f"{latent_stats}: the manifest records no autoencoder ckpt_path; pass --first-stage")
    return path


def labels_for_seeds(seeds: Sequence[int], num_classes: int | None, class_label: int | None = None
                     ) -> np.ndarray | None:
    """The class of each seed: ``class_label`` for all, else ``seed % num_classes`` (None if unconditional)."""
    if not num_classes:
        if class_label is not None:
            raise ValueError("--class given but the model is not class-conditional")
        return None
    if class_label is not None:
        if not 0 <= class_label < num_classes:
            raise ValueError(f"class {class_label} out of range [0, {num_classes})")
        return np.full(len(seeds), class_label, dtype=np.int64)
    return np.asarray(seeds, dtype=np.int64) % num_classes


def autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW → uint8 NHWC."""
    x = images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(module: torch.nn.Module, seeds: Sequence[int], batch_size: int = 8, steps: int | None = None,
             eta: float | None = None, cfg: float | None = None, class_label: int | None = None,
             prompt: str | None = None, precision: str = "fp32", sampler: str = "ddim",
             use_ema: bool | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """``(images uint8 NHWC, labels or None)`` for ``seeds``, ``batch_size`` seeds at a time."""
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    use_ema = getattr(module, "use_ema_for_sampling", True) if use_ema is None else use_ema
    labels = labels_for_seeds(seeds, module.num_classes, class_label)
    if module.conditioning.mode == "text" and prompt is None:
        raise ValueError("a text-conditional model needs --prompt")
    device = module.device
    chunks = range(0, len(seeds), batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="sampling", unit="batch")
    out = []
    for start in chunks:
        batch = list(seeds[start:start + batch_size])
        kw = {"labels": labels[start:start + len(batch)].tolist() if labels is not None else None,
              "texts": [prompt] * len(batch) if prompt is not None else None}
        with autocast(device, precision):
            z = module.sample_latents(batch, steps=steps, eta=eta, cfg=cfg, sampler=sampler, use_ema=use_ema, **kw)
        out.append(to_uint8(module.decode(z)))
    return np.concatenate(out), labels


# ------------------------------------------------------------------------------------------ output
def png_name(seed: int) -> str:
    return f"{seed:06d}.png"


def write_pngs(folder: str | Path, images: np.ndarray, seeds: Sequence[int]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for image, seed in zip(images, seeds):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(folder / png_name(seed))


def read_pngs(folder: str | Path, seeds: Sequence[int]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(Path(folder) / png_name(s)).convert("RGB")) for s in seeds])


def make_grid(images: np.ndarray, max_images: int = 64) -> np.ndarray:
    """The first ``max_images`` images (uint8 NHWC) in a near-square grid with a 2-pixel gap."""
    images = images[:max_images]
    n, h, w, c = images.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * (h + 2) + 2, cols * (w + 2) + 2, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + k * (w + 2):2 + k * (w + 2) + w] = image
    return grid


def write_outputs(outdir: str | Path, images: np.ndarray, seeds: Sequence[int], labels: np.ndarray | None) -> Path:
    """``samples.npz`` (``arr_0`` uint8 NHWC, ``seeds``[, ``labels``]) and ``grid.png`` in ``outdir``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": images, "seeds": np.asarray(seeds, dtype=np.int64)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    npz = outdir / "samples.npz"
    np.savez(npz, **arrays)
    Image.fromarray(make_grid(images)).save(outdir / "grid.png")
    return npz
