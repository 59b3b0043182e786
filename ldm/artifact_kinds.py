"""What a path on disk is: the kinds of artifact this project reads, told apart before anything is loaded.

Every option that takes a model or a cache checks the kind first (``require``), so that a stage-2 run given
where an autoencoder belongs fails in a line ("logs/x is a stage-2 run; --ae needs an autoencoder ...") instead
of a dump of missing keys, and before any output folder is touched. The kind comes from what the artifact says
about itself: a run folder's saved config, an export's metadata (``format``/``kind``, written since
``EXPORT_FORMAT``) or config sidecar, a cache's ``manifest.json``, a sample folder's ``samples.json``.
"""
from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

# Written into the metadata of every scripts/export.py file (format/version, kind).
EXPORT_FORMAT = "litevae-export/1"


class Kind(str, Enum):
    AUTOENCODER_RUN = "stage-1 run (an autoencoder)"
    AUTOENCODER_EXPORT = "stage-1 export (an autoencoder)"
    DIFFUSERS_AUTOENCODER = "diffusers autoencoder folder"
    DIFFUSION_RUN = "stage-2 run (a latent diffusion model)"
    DIFFUSION_EXPORT = "stage-2 export (a latent diffusion model)"
    LATENT_CACHE = "latent cache"
    SAMPLE_FOLDER = "sample folder"


FIRST_STAGES = frozenset({Kind.AUTOENCODER_RUN, Kind.AUTOENCODER_EXPORT, Kind.DIFFUSERS_AUTOENCODER})
DIFFUSION_MODELS = frozenset({Kind.DIFFUSION_RUN, Kind.DIFFUSION_EXPORT})
NEEDS = {FIRST_STAGES: "an autoencoder (a stage-1 run folder, a .ckpt in one, a stage-1 export .safetensors or a "
                       "diffusers autoencoder folder)",
         DIFFUSION_MODELS: "a stage-2 model (a stage-2 run folder, a .ckpt in one, or a stage-2 export .safetensors)"}


class ArtifactError(ValueError):
    """A path of the wrong kind for the option it was given to."""


def kind_of_config(config: Any) -> Kind | None:
    """``AUTOENCODER_*`` / ``DIFFUSION_*`` (as a run) from a project config's ``model`` node; None if neither."""
    model = (config or {}).get("model") or {}
    params = model.get("params") or {}
    if "unet_config" in params or str(model.get("target", "")).endswith("LatentDiffusion"):
        return Kind.DIFFUSION_RUN
    if "autoencoder" in params:
        return Kind.AUTOENCODER_RUN
    return None


def _config_kind(path: Path, export: bool) -> Kind | None:
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - unreadable: the loader reports it
        return None
    kind = kind_of_config(config)
    if export and kind is not None:
        return Kind.AUTOENCODER_EXPORT if kind is Kind.AUTOENCODER_RUN else Kind.DIFFUSION_EXPORT
    return kind


def _export_kind(path: Path) -> Kind | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001
        return None
    if meta.get("kind") in Kind.__members__:
        return Kind[meta["kind"]]
    if "first_stage" in meta:  # stage-2 exports recorded their first stage before they recorded their kind
        return Kind.DIFFUSION_EXPORT
    for sidecar in (path.with_suffix(".yaml"), path.parent / "config.yaml"):
        if sidecar.is_file():
            return _config_kind(sidecar, export=True)
    return None


def identify(source: str | Path) -> Kind | None:
    """The kind of ``source``, or None when it is none of them (missing, or another file)."""
    from ldm.first_stage import diffusers_folder

    path = Path(source).expanduser()
    if path.is_dir():
        if diffusers_folder(path) is not None:
            return Kind.DIFFUSERS_AUTOENCODER
        if (path / "manifest.json").is_file():
            return Kind.LATENT_CACHE
        configs = sorted((path / "configs").glob("*-project.yaml"))
        if configs:
            return _config_kind(configs[-1], export=False)
        if (path / "samples.json").is_file() or (path / "samples.npz").is_file():
            return Kind.SAMPLE_FOLDER
        return None
    if path.suffix == ".safetensors" and path.is_file():
        return _export_kind(path)
    if path.suffix == ".ckpt" and path.is_file():
        return identify(path.parent.parent) if path.parent.name == "checkpoints" else None
    return None


def require(source: str | Path, kinds: Iterable[Kind], option: str | None = None) -> Kind | None:
    """``ArtifactError`` when ``source`` is an artifact of another kind than ``kinds`` (``option``: the flag or
    config key it was given to, named first); its kind otherwise (None: unknown, left to the loader's checks)."""
    kinds = frozenset(kinds)
    kind = identify(source)
    if kind is None or kind in kinds:
        return kind
    need = NEEDS.get(kinds, "a " + " or a ".join(k.value for k in kinds))
    raise ArtifactError(f"{option + ': ' if option else ''}{source} is a {kind.value}, not {need}")


def argument(kinds: Iterable[Kind]):
    """An argparse ``type=`` that refuses a path of another kind when the arguments are parsed (argparse names
    the flag), before any output folder is created or anything is loaded."""
    import argparse

    def check(value: str) -> str:
        try:
            require(value, kinds)
        except ArtifactError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value
    return check


def export_metadata(kind: Kind) -> dict[str, str]:
    """What an export says about itself (safetensors metadata): format version and kind."""
    return {"format": EXPORT_FORMAT, "kind": kind.name}

