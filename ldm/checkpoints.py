"""Loading and exporting trained models of both stages, for inference: the first-stage autoencoder (latent
caching, LDM decoding) without its training parts, and the stage-2 diffusion model with its first stage.

Sources: a stage-1 run folder (``logs/<run>``), a Lightning ``.ckpt`` inside one, or an exported
``.safetensors`` with a config sidecar. Only the autoencoder (``model.params.autoencoder``) is built, from
its ``target:`` strings — never the LightningModule, so no LPIPS/discriminator is constructed, and ``ldm``
does not import ``autoencoder`` directly.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.util import ConfigError, instantiate_from_config, load_state_dict, load_weights, sha256_file

log = logging.getLogger(__name__)

EMA_PREFIX = "ema.module."
LIVE_PREFIX = "autoencoder."


def autoencoder_config(config: Mapping | DictConfig) -> dict:
    """The autoencoder's ``{target, params}`` from a full project config, a ``model:`` node, or itself."""
    cfg = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    if "model" in cfg:
        cfg = cfg["model"]
    params = cfg.get("params") or {}
    if "autoencoder" in params:  # the stage-1 LightningModule node
        cfg = params["autoencoder"]
    if "target" not in cfg:
        raise ConfigError("config has no autoencoder: expected model.params.autoencoder or a {target, params} node")
    return {"target": cfg["target"], "params": dict(cfg.get("params") or {})}


def _run_config(run: Path) -> Path:
    configs = sorted((run / "configs").glob("*-project.yaml"))  # names start with a sortable timestamp
    if not configs:
        raise FileNotFoundError(f"no configs/*-project.yaml in run folder {run}; pass a config explicitly")
    return configs[-1]


def _run_checkpoint(run: Path) -> Path:
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise FileNotFoundError(f"no checkpoints/last.ckpt or *.ckpt in run folder {run}")
    return ckpts[-1]


def _safetensors_config(path: Path) -> Path:
    for candidate in (path.with_suffix(".yaml"), path.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no config sidecar for {path}: expected {path.with_suffix('.yaml').name} or "
                            f"config.yaml next to it (scripts/export.py writes both)")


def resolve_source(source: str | Path) -> tuple[Path, Path]:
    """``(config_path, weights_path)`` for a run folder, a ``.ckpt`` in a run folder, or a ``.safetensors``."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _run_config(path), _run_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"first-stage source not found: {path} (a run folder, .ckpt or .safetensors)")
    if path.suffix == ".safetensors":
        return _safetensors_config(path), path
    return _run_config(path.parent.parent), path  # logs/<run>/checkpoints/x.ckpt


def select_weights(state: Mapping[str, torch.Tensor], use_ema: bool, what: str
                   ) -> tuple[dict[str, torch.Tensor], str]:
    """The autoencoder's own keys and which they are: ``"ema"`` when asked and present, else ``"live"``
    (``autoencoder.*``), else ``"as stored"`` (a plain autoencoder state dict, e.g. an export)."""
    for prefix, kind, wanted in ((EMA_PREFIX, "ema", use_ema), (LIVE_PREFIX, "live", True)):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if wanted else {}
        if sub:
            log.info("%s: using %s weights (%s*)", what, kind, prefix)
            return sub, kind
    log.info("%s: no %s*/%s* keys; using the weights as stored", what, EMA_PREFIX, LIVE_PREFIX)
    return dict(state), "as stored"


def load_first_stage(source: str | Path | None = None, use_ema: bool = True, device: str | torch.device = "cpu",
                     config: Mapping | DictConfig | None = None, ckpt: str | Path | None = None
                     ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the autoencoder, load its weights strictly, freeze it, put it in eval mode on ``device``.

    Either ``source`` (run folder / ``.ckpt`` / ``.safetensors``), or ``config`` + ``ckpt``.
    Returns ``(model, info)``, ``info = {"config", "ckpt_path", "sha256", "weights"}`` (ema / live / as stored).
    """
    if source is not None:
        config_path, weights_path = resolve_source(source)
        config = OmegaConf.load(config_path) if config is None else config
        weights_path = Path(ckpt) if ckpt is not None else weights_path
    elif config is None or ckpt is None:
        raise ValueError("load_first_stage needs a source, or both config and ckpt")
    else:
        weights_path = Path(ckpt)
    ae_config = autoencoder_config(config)
    model = instantiate_from_config(ae_config, where="model.params.autoencoder")
    state = load_state_dict(weights_path)
    weights, kind = select_weights(state, use_ema, str(weights_path))
    load_weights(model, weights, strict=True, what=f"{ae_config['target']} from {weights_path}")
    model.eval().requires_grad_(False).to(device)
    info = {"config": ae_config, "ckpt_path": str(weights_path.resolve()), "sha256": sha256_file(weights_path),
            "weights": kind}
    return model, info


def export_first_stage(source: str | Path, out: str | Path, use_ema: bool = True) -> tuple[Path, Path]:
    """Write the autoencoder's weights (EMA by default) as ``<out>.safetensors`` plus its config sidecar
    ``<out>.yaml`` (``{model: {params: {autoencoder: ...}}}``), the release format ``load_first_stage`` reads.

    Only the autoencoder is kept: no discriminator, optimizer or EMA duplicate, so the file is a fraction of
    the training checkpoint.
    """
    from safetensors.torch import save_file

    model, info = load_first_stage(source, use_ema=use_ema)
    out = Path(out).with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={"source": info["ckpt_path"], "sha256": info["sha256"],
                                         "weights": info["weights"]})
    sidecar = out.with_suffix(".yaml")
    OmegaConf.save(OmegaConf.create({"model": {"params": {"autoencoder": info["config"]}}}), sidecar)
    log.info("exported %s weights of %s to %s (+ %s)", info["weights"], info["ckpt_path"], out, sidecar.name)
    return out, sidecar


# ------------------------------------------------------------------------------------------ stage 2
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
