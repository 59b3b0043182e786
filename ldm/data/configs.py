"""Dataset configs: find a split's dataset node in a project config, and make it deterministic."""
from __future__ import annotations

import logging
from typing import Mapping

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def dataset_config(config: Mapping | DictConfig, split: str) -> dict:
    """The dataset ``{target, params}`` for ``split`` from a project config, a DataModule node, or itself."""
    cfg = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    if "data" in cfg:
        cfg = cfg["data"]
    params = cfg.get("params") or {}
    if split in params and isinstance(params[split], Mapping) and "target" in params[split]:
        cfg = params[split]
    if "target" not in cfg:
        raise ValueError(f"data config has no dataset for split {split!r} (expected data.params.{split} or a "
                         "{target, params} dataset node)")
    return {"target": cfg["target"], "params": dict(cfg.get("params") or {})}


def deterministic(config: Mapping) -> dict:
    """Turn off random augmentation and shuffling: a cache must be a function of the source only."""
    params = dict(config.get("params") or {})
    for key, value in (("flip", False), ("crop", "center"), ("shuffle", 0), ("resampled", False),
                       ("epoch_length", None)):
        if key == "crop" and params.get(key) == "fixed":  # PhotoCrops' seeded fixed windows are deterministic
            continue
        if key in params and params[key] != value:
            log.info("data: %s=%r -> %r for caching (deterministic preprocessing)", key, params[key], value)
            params[key] = value
    return {"target": config["target"], "params": params}
