"""Loading and exporting trained models of both stages, for inference: the first-stage autoencoder (latent
caching, LDM decoding) without its training parts, and the stage-2 diffusion model with its first stage.

Sources: a stage-1 run folder (``logs/<run>``), a Lightning ``.ckpt`` inside one, an exported ``.safetensors``
with a config sidecar, or a diffusers autoencoder folder (``ldm.first_stage``: AutoencoderKL/DC/Tiny). Only
the autoencoder (``model.params.autoencoder``) is built, from its ``target:`` strings — never the
LightningModule, so no LPIPS/discriminator is constructed, and ``ldm`` does not import ``autoencoder`` directly.

Weights are "ema" (the EMA copy) or "raw" (the trained weights themselves, ``autoencoder.*``). A stage-2
checkpoint describes itself: next to its normalisation buffers it records the identity of the first stage
whose latents it learned (``first_stage_identity``), so sampling needs no latent cache, and the first stage
it decodes with is checked against that record (``first_stage_mismatch``).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.artifact_kinds import DIFFUSION_MODELS, FIRST_STAGES, Kind, export_metadata, require
from ldm.cache.manifest import read_latent_stats
from ldm.first_stage import DIFFUSERS_TARGET, diffusers_folder, load_diffusers_first_stage
from ldm.util import (ConfigError, get_obj_from_str, instantiate_from_config, load_state_dict, load_weights,
                      sha256_file)

log = logging.getLogger(__name__)

EMA_PREFIX = "ema.module."
RAW_PREFIX = "autoencoder."
# Where a stage-2 checkpoint records its first stage: a key of the Lightning checkpoint dict, and of an
# export's safetensors metadata (JSON).
FIRST_STAGE_KEY = "first_stage"
# ``model.params.first_stage.path`` value: the first stage recorded in the latent cache's manifest.
FROM_MANIFEST = "from_manifest"
# Files written before "raw" was the one word for non-EMA weights say "live".
_LEGACY_WEIGHTS = {"live": "raw"}
IDENTITY_KEYS = ("config", "ckpt_path", "sha256", "weights", "exported_from")


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


def run_config(run: str | Path) -> Path:
    """The newest ``configs/*-project.yaml`` of a run folder (a resumed run adds one per session)."""
    configs = sorted((Path(run) / "configs").glob("*-project.yaml"))  # names start with a sortable timestamp
    if not configs:
        raise FileNotFoundError(f"no configs/*-project.yaml in run folder {run}; pass a config explicitly")
    return configs[-1]


def is_run_folder(path: str | Path) -> bool:
    return any((Path(path) / "configs").glob("*-project.yaml"))


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
    if diffusers_folder(path) is not None:
        raise FileNotFoundError(f"{path} is a diffusers autoencoder folder: it has no project config (data, "
                                "training); pass the data config explicitly (--data)")
    if path.is_dir():
        return run_config(path), _run_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"first-stage source not found: {path} (a run folder, .ckpt or .safetensors)")
    if path.suffix == ".safetensors":
        return _safetensors_config(path), path
    return run_config(path.parent.parent), path  # logs/<run>/checkpoints/x.ckpt


def select_weights(state: Mapping[str, torch.Tensor], use_ema: bool, what: str
                   ) -> tuple[dict[str, torch.Tensor], str]:
    """The autoencoder's own keys and which they are: ``"ema"`` when asked and present, else ``"raw"``
    (``autoencoder.*``), else ``"as stored"`` (a plain autoencoder state dict, e.g. an export)."""
    for prefix, kind, wanted in ((EMA_PREFIX, "ema", use_ema), (RAW_PREFIX, "raw", True)):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if wanted else {}
        if sub:
            log.info("%s: using %s weights (%s*)", what, kind, prefix)
            return sub, kind
    log.info("%s: no %s*/%s* keys; using the weights as stored", what, EMA_PREFIX, RAW_PREFIX)
    return dict(state), "as stored"


def load_first_stage(source: str | Path | None = None, use_ema: bool = True, device: str | torch.device = "cpu",
                     config: Mapping | DictConfig | None = None, ckpt: str | Path | None = None
                     ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the autoencoder, load its weights strictly, freeze it, put it in eval mode on ``device``.

    Either ``source`` (run folder / ``.ckpt`` / ``.safetensors`` / diffusers folder), or ``config`` + ``ckpt``.
    Returns ``(model, info)``, ``info = {"config", "ckpt_path", "sha256", "weights"}`` (ema / raw / as stored),
    plus ``exported_from`` (the source checkpoint's path, SHA-256 and weights) for a ``scripts/export.py`` file,
    and ``scaling`` (the config's latent scaling) for a diffusers model, whose weights are always "as stored".
    """
    if source is not None:
        require(source, FIRST_STAGES, "the first stage")
    folder = _diffusers_location(source, config, ckpt)
    if folder is not None:
        expected = autoencoder_config(config) if config is not None else None
        return load_diffusers_first_stage(folder, device, expected)
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
    exported_from = _export_source(weights_path)
    if exported_from:
        info["exported_from"] = exported_from
    return model, info


def _diffusers_location(source: str | Path | None, config: Mapping | DictConfig | None,
                        ckpt: str | Path | None) -> Path | None:
    """The folder of a diffusers first stage: ``source`` is one, or ``config`` + ``ckpt`` record one (the identity's
    ``target: diffusers.<Class>`` and its weights file); None for our own checkpoints."""
    if source is not None:
        return diffusers_folder(source)
    if config is not None and ckpt is not None and autoencoder_config(config)["target"].startswith(DIFFUSERS_TARGET):
        return Path(ckpt).expanduser().parent
    return None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _export_source(path: Path) -> dict[str, str] | None:
    """The checkpoint a first-stage export was made from (its metadata), so that the release file and the
    training checkpoint count as the same first stage although their bytes differ."""
    meta = _safetensors_metadata(path) if path.suffix == ".safetensors" else {}
    if not meta.get("sha256"):
        return None
    return {"ckpt_path": meta.get("source", ""), "sha256": meta["sha256"], "weights": meta.get("weights", "")}


# ------------------------------------------------------------------------------------------ identity
def first_stage_identity(info: Mapping[str, Any]) -> dict[str, Any]:
    """What a stage-2 checkpoint records about its first stage, from ``load_first_stage``'s ``info`` or a cache
    manifest's ``autoencoder`` entry: config, checkpoint path, SHA-256, weights (ema / raw / as stored)."""
    identity = {key: info[key] for key in IDENTITY_KEYS if info.get(key) is not None}
    if "weights" in identity:
        identity["weights"] = _LEGACY_WEIGHTS.get(identity["weights"], identity["weights"])
    return identity


def _origin(info: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(sha256, weights)`` of the checkpoint the weights come from (an export's source for an export)."""
    source = info.get("exported_from") or info
    weights = source.get("weights")
    return source.get("sha256"), _LEGACY_WEIGHTS.get(weights, weights)


def first_stage_mismatch(expected: Mapping[str, Any], loaded: Mapping[str, Any]) -> str | None:
    """``None`` when ``loaded`` (``load_first_stage``'s info) is the first stage ``expected`` describes, else
    a message naming both SHA-256s. An export (``scripts/export.py``) matches the checkpoint it was made from."""
    (want_sha, want_weights), (have_sha, have_weights) = _origin(expected), _origin(loaded)
    if not want_sha:
        log.warning("the recorded first stage has no sha256: cannot check %s", loaded["ckpt_path"])
        return None
    if (want_sha, want_weights) == (have_sha, have_weights):
        return None
    return (f"first stage {loaded['ckpt_path']} is sha256 {have_sha} ({have_weights} weights), but the latents "
            f"were cached with {want_sha} ({want_weights} weights of {expected.get('ckpt_path')})")


def load_recorded_first_stage(identity: Mapping[str, Any], source: str | Path | None = None,
                              device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The first stage ``identity`` records (its EMA or raw weights, as recorded): from ``source`` when given
    (another copy, e.g. the stage-1 export), else from the recorded checkpoint path and config."""
    use_ema = identity.get("weights") != "raw"
    if source is not None:
        return load_first_stage(source, use_ema=use_ema, device=device)
    if not identity.get("ckpt_path") or not identity.get("config"):
        raise ValueError(f"the recorded first stage {dict(identity)} names no checkpoint and config: pass the "
                         "first stage explicitly (scripts/sample.py --first-stage)")
    if not Path(identity["ckpt_path"]).is_file():
        raise FileNotFoundError(f"the recorded first stage {identity['ckpt_path']} (sha256 {identity.get('sha256')}) "
                                "is not on this machine: pass a copy of it, e.g. its stage-1 export "
                                "(scripts/sample.py --first-stage)")
    return load_first_stage(config=identity["config"], ckpt=identity["ckpt_path"], use_ema=use_ema, device=device)


def export_first_stage(source: str | Path, out: str | Path, use_ema: bool = True) -> tuple[Path, Path]:
    """Write the autoencoder's weights (EMA by default) as ``<out>.safetensors`` plus its config sidecar
    ``<out>.yaml`` (``{model: {params: {autoencoder: ...}}}``), the release format ``load_first_stage`` reads.

    Only the autoencoder is kept: no discriminator, optimizer or EMA duplicate, so the file is a fraction of
    the training checkpoint.
    """
    from safetensors.torch import save_file

    if diffusers_folder(source) is not None:
        raise ValueError(f"{source} is a diffusers autoencoder folder, already a release format that "
                         "load_first_stage reads: use the folder itself")
    model, info = load_first_stage(source, use_ema=use_ema)
    out = Path(out).with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata={"source": info["ckpt_path"], "sha256": info["sha256"],
                                         "weights": info["weights"], **export_metadata(Kind.AUTOENCODER_EXPORT)})
    sidecar = out.with_suffix(".yaml")
    # A model built from other files (a distilled encoder's teacher) gives the config that rebuilds it alone.
    config = model.release_config() if hasattr(model, "release_config") else info["config"]
    OmegaConf.save(OmegaConf.create({"model": {"params": {"autoencoder": config}}}), sidecar)
    readable_like(out, sidecar)
    log.info("exported %s weights of %s to %s (+ %s)", info["weights"], info["ckpt_path"], out, sidecar.name)
    return out, sidecar


def readable_like(path: Path, reference: Path) -> None:
    """Give ``path`` the permission bits of ``reference``: safetensors creates its files private (0600), while
    the config sidecar beside it gets the usual umask (e.g. 0644); a release is readable as a whole."""
    os.chmod(path, reference.stat().st_mode & 0o777)


# ------------------------------------------------------------------------------------------ stage 2
def read_diffusion_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, record)`` of a stage-2 ``.ckpt`` or export. ``record`` is what the file says about itself:
    ``first_stage`` (the identity; absent from files made before checkpoints recorded it) and, for an export,
    ``weights`` (ema / raw: the one UNet it holds)."""
    if path.suffix == ".safetensors":
        meta = _safetensors_metadata(path)
        record = {key: json.loads(value) for key, value in meta.items() if key == FIRST_STAGE_KEY}
        if meta.get("weights"):
            record["weights"] = _LEGACY_WEIGHTS.get(meta["weights"], meta["weights"])
        return load_state_dict(path), record
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt.get("state_dict", ckpt), {key: ckpt[key] for key in (FIRST_STAGE_KEY,) if key in ckpt}


def _recorded_identity(record: Mapping[str, Any], config: DictConfig, ckpt_path: Path) -> dict | None:
    """The first stage the checkpoint records; for one made before checkpoints recorded it, the latent cache
    manifest's record where the cache is still reachable (the old way), else ``None``."""
    if FIRST_STAGE_KEY in record:
        return record[FIRST_STAGE_KEY]
    latent_stats = config.model.params.get("latent_stats")
    if not latent_stats:
        return None
    try:
        autoencoder = read_latent_stats(latent_stats)["autoencoder"]
    except FileNotFoundError:
        return None
    log.warning("%s records no first stage (made before checkpoints described themselves): using the record in "
                "%s; scripts/export.py writes a self-describing copy", ckpt_path, latent_stats)
    return first_stage_identity(autoencoder) or None


def _configured_first_stage(config: DictConfig) -> dict:
    node = config.model.params.get("first_stage")
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def _unrecorded_first_stage(source: str | None, config: DictConfig, ckpt_path: Path) -> torch.nn.Module:
    """The decoder of a checkpoint that records no first stage: ``source`` or the configured path, unchecked."""
    configured = _configured_first_stage(config)
    path = configured.get("path")
    source = source or (path if path not in (None, FROM_MANIFEST, "???") else None)
    if source is None:
        raise ValueError(
            f"{ckpt_path} records no first stage (it predates self-describing checkpoints) and its latent cache "
            f"({config.model.params.get('latent_stats')}) is not reachable: pass --first-stage <the stage-1 run or "
            "export that made the cache>, or convert it where the cache is: python scripts/export.py <run> --out <name>")
    log.warning("%s records no first stage: decoding with %s, unchecked", ckpt_path, source)
    return load_first_stage(source, use_ema=configured.get("use_ema", True))[0]


def _sampling_first_stage(identity: Mapping[str, Any] | None, source: str | None, config: DictConfig,
                          ckpt_path: Path, allow_mismatch: bool) -> torch.nn.Module:
    if identity is None:
        return _unrecorded_first_stage(source, config, ckpt_path)
    model, info = load_recorded_first_stage(identity, source)
    problem = first_stage_mismatch(identity, info)
    if problem and not allow_mismatch:
        raise ValueError(f"{ckpt_path}: {problem}. Decode with the first stage that made the latents "
                         "(--first-stage), or pass --allow-first-stage-mismatch to decode anyway")
    if problem:
        log.warning("%s: %s; decoding anyway (--allow-first-stage-mismatch)", ckpt_path, problem)
    return model


def _check_ema_choice(ckpt_path: Path, record: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                      use_ema: bool) -> None:
    """An export holds one UNet: asking for the other one is an error, never a silent swap."""
    exported = record.get("weights")
    if exported == "ema" and not use_ema:
        raise ValueError(f"{ckpt_path} is an export of the EMA UNet and holds no raw weights, so --no-ema cannot "
                         "apply: sample the training run (logs/<run>), or export the raw UNet with "
                         "scripts/export.py --no-ema")
    if exported == "raw" and use_ema:
        log.warning("%s holds the raw UNet (exported with --no-ema): sampling with it", ckpt_path)
    elif exported is None and use_ema and not any(key.startswith("ema.") for key in state):
        log.warning("%s has no EMA weights; sampling with the raw UNet", ckpt_path)


def load_diffusion(source: str | Path, use_ema: bool = True, device: str | torch.device = "cpu",
                   first_stage: str | None = None, allow_first_stage_mismatch: bool = False
                   ) -> tuple[torch.nn.Module, DictConfig]:
    """A stage-2 model from a run folder (newest ``configs/*-project.yaml`` + ``checkpoints/last.ckpt``), a
    ``.ckpt`` inside one, or a ``scripts/export.py`` file, in eval mode on ``device``, built in one pass.

    The checkpoint describes itself: normalisation and latent shape (buffers) and its first stage's identity,
    so no latent cache is needed. The first stage comes from ``first_stage`` (``--first-stage``, e.g. the
    stage-1 export) or the recorded checkpoint, and must be the recorded one (SHA-256 and weights; an export
    counts as its source): else ValueError naming both hashes, or with ``allow_first_stage_mismatch`` a warning.
    """
    require(source, DIFFUSION_MODELS, "the stage-2 model")
    config_path, ckpt_path = resolve_source(source)
    config = OmegaConf.load(config_path)
    state, record = read_diffusion_checkpoint(ckpt_path)
    missing = [k for k in ("scale_factor", "shift", "latent_shape") if k not in state]
    if missing:
        raise RuntimeError(f"{ckpt_path} has no {missing}: is it a stage-2 (LatentDiffusion) checkpoint?")
    _check_ema_choice(ckpt_path, record, state, use_ema)
    identity = _recorded_identity(record, config, ckpt_path)
    decoder = _sampling_first_stage(identity, first_stage, config, ckpt_path, allow_first_stage_mismatch)
    # Resolved from the node, so that interpolations like ${latents} in model.params see the whole config.
    model_config = OmegaConf.to_container(config.model, resolve=True)
    cls = get_obj_from_str(model_config["target"])
    module = cls.from_saved(model_config.get("params") or {}, state, decoder, identity)
    load_weights(module, state, strict=True, what=f"stage-2 model from {ckpt_path}")
    module.use_ema_for_sampling = use_ema
    log.info("loaded %s (config %s)", ckpt_path, config_path.name)
    return module.eval().to(device), config


def export_diffusion(source: str | Path, out: str | Path, use_ema: bool = True) -> tuple[Path, Path]:
    """Write a stage-2 model for release: ``<out>.safetensors`` (the EMA UNet in the ``unet.*`` slot by default,
    plus the normalisation and latent-shape buffers; metadata: the first stage's identity and which UNet) and
    ``<out>.yaml`` (the run's config with ``ema_decay: null``, no cache, and the identity under ``first_stage``).
    ``load_diffusion`` and ``scripts/sample.py`` read it; on another machine pass ``--first-stage`` (e.g. the
    stage-1 export), which is checked against the identity. Exporting a checkpoint made before checkpoints
    recorded their first stage, where its cache is reachable, writes a self-describing copy.
    """
    from safetensors.torch import save_file

    config_path, ckpt_path = resolve_source(source)
    config = OmegaConf.load(config_path)
    state, record = read_diffusion_checkpoint(ckpt_path)
    if "scale_factor" not in state:
        raise RuntimeError(f"{ckpt_path} is not a stage-2 (LatentDiffusion) checkpoint")
    identity = _recorded_identity(record, config, ckpt_path)
    if identity is None:
        log.warning("%s records no first stage: sampling the export will need --first-stage (unchecked)", ckpt_path)
    ema = {"unet." + k[len("ema.module."):]: v for k, v in state.items() if k.startswith("ema.module.")}
    if use_ema and not ema:
        log.warning("%s has no EMA weights; exporting the raw UNet", ckpt_path)
    weights = "ema" if use_ema and ema else "raw"
    export = {k: v for k, v in state.items() if not k.startswith("ema.")}
    if weights == "ema":
        export.update(ema)
    first_stage = _configured_first_stage(config)
    if first_stage.get("path") == FROM_MANIFEST:  # the export travels without the cache
        first_stage["path"] = (identity or {}).get("ckpt_path")
    config = OmegaConf.merge(config, {"model": {"params": {"ema_decay": None, "latent_stats": None,
                                                           "first_stage": first_stage or None}},
                                      FIRST_STAGE_KEY: identity})
    out = Path(out).with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in export.items()}, str(out),
              metadata={"source": str(ckpt_path), "weights": weights, FIRST_STAGE_KEY: json.dumps(identity),
                        **export_metadata(Kind.DIFFUSION_EXPORT)})
    sidecar = out.with_suffix(".yaml")
    OmegaConf.save(config, sidecar)
    readable_like(out, sidecar)
    log.info("exported %s stage-2 weights of %s to %s (+ %s)", weights, ckpt_path, out, sidecar.name)
    return out, sidecar
