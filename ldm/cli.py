"""The LDM-style command line: ``python main.py --base a.yaml [b.yaml ...] -t [key.path=value ...]``.

Config layout (OmegaConf, merged left to right, dotlist overrides last)::

    model:     {base_learning_rate: ..., target: ..., params: ...}
    data:      {target: ldm.data.DataModule, params: ...}
    lightning: {trainer: {...pl.Trainer kwargs...}, logger: {name: {target, params}},
                callbacks: {name: {target, params}}, checkpoint: {...}, image_logger: {...}}
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from ldm.callbacks import CheckpointOnSignal, ImageLogger, SetupCallback, ThroughputMonitor, ValidateAtLastStep
from ldm.atomic_checkpoint_io import AtomicCheckpointIO
from ldm.util import ConfigError, NonFiniteLossError, instantiate_from_config, load_state_dict, load_weights

log = logging.getLogger("ldm")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py", description="Train or evaluate a stage-1 autoencoder or a stage-2 latent diffusion model.",
        epilog="Trailing key.path=value arguments override any config key, e.g. lightning.trainer.max_steps=1000.")
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="config.yaml",
                   help="config files, merged left to right")
    p.add_argument("-t", "--train", action="store_true", help="train (otherwise: validate only)")
    p.add_argument("-r", "--resume", default="", help="resume from a run folder or a checkpoint")
    p.add_argument("-n", "--name", default="", help="run name (default: the first config's file name)")
    p.add_argument("-s", "--seed", type=int, default=23, help="global seed")
    p.add_argument("-l", "--logdir", default="logs", help="parent folder of run folders")
    p.add_argument("--scale_lr", action="store_true",
                   help="scale the base LR by batch size x devices x nodes x accumulation (off by default)")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    p.add_argument("--init-from", default="", metavar="CKPT",
                   help="initialise model weights from a checkpoint (weights only, fresh optimizers and step)")
    return p


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    opt, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-") or "=" not in a]
    if bad:
        parser.error(f"unrecognised arguments {bad} (config overrides must look like key.path=value)")
    if opt.resume and opt.init_from:
        parser.error("--resume and --init-from are exclusive (resume restores everything; init-from only weights)")
    return opt, rest


def resolve_resume(resume: str) -> tuple[Path, Path]:
    """Map ``-r`` (run folder or checkpoint file) to (run folder, checkpoint)."""
    path = Path(resume)
    if path.is_file():
        return path.parent.parent, path
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise FileNotFoundError(f"cannot resume: {ckpt} does not exist")
        return path, ckpt
    raise FileNotFoundError(f"cannot resume: {path} is neither a run folder nor a checkpoint")


SECTIONS = ("model", "data", "lightning")


def merge_configs(configs: Sequence[DictConfig]) -> DictConfig:
    """OmegaConf's left-to-right merge, except that a node whose ``target`` a later config replaces takes that
    config's ``params`` only: the old object's arguments mean nothing to the new one (a second ``--base`` that
    swaps Fashion-MNIST for an ImageFolder must not hand it ``split: train``)."""
    merged = OmegaConf.create()
    for config in configs:
        _drop_replaced_params(merged, config)
        merged = OmegaConf.merge(merged, config)
    return merged


def _drop_replaced_params(old: Any, new: Any) -> None:
    if not (isinstance(old, DictConfig) and isinstance(new, DictConfig)):
        return
    new_target = new.get("target") if "target" in new else None
    if new_target is not None and "target" in old and old.get("target") != new_target and "params" in old:
        log.info("config: target %s -> %s: the earlier params %s are dropped", old.get("target"), new_target,
                 sorted(old.get("params") or {}))
        del old["params"]
    for key in new:
        if key in old and not _is_leaf_value(old, key) and not _is_leaf_value(new, key):
            _drop_replaced_params(old[key], new[key])


def _is_leaf_value(config: DictConfig, key: str) -> bool:
    """``???`` and ``${...}`` values: reading them would resolve (or fail), and they hold no nested node."""
    return OmegaConf.is_missing(config, key) or OmegaConf.is_interpolation(config, key)


def check_sections(config: DictConfig, files: Sequence[DictConfig]) -> None:
    """Top-level keys are the sections ``model``/``data``/``lightning`` or plain values that the config files
    declare (e.g. ``latents: ???``); anything else is a typo that would be saved silently into the run."""
    from_files = {k for file in files for k in file}
    for key in config:
        nested = not _is_leaf_value(config, key) and isinstance(config[key], DictConfig)
        misspelt_section = key not in SECTIONS and nested
        new_by_override = key not in SECTIONS and key not in from_files
        if misspelt_section or new_by_override:
            where = "an override" if new_by_override else "a config file"
            raise ConfigError(f"unknown top-level config key {key!r} (from {where}); the sections are "
                              f"{list(SECTIONS)}" + (f", the files' top-level values {sorted(from_files - set(SECTIONS))}"
                                                     if from_files - set(SECTIONS) else ""))


def _value_kind(value: Any) -> str:
    if isinstance(value, (ListConfig, list, tuple)):
        return "list"
    if isinstance(value, (DictConfig, dict)):
        return "mapping"
    return {bool: "boolean", int: "number", float: "number", str: "string"}.get(type(value), type(value).__name__)


def check_override_types(files: DictConfig, overrides: Sequence[str]) -> None:
    """An override that gives text where the config files hold a number, list, mapping or boolean, or a scalar
    where they hold a list or mapping (``channel_mult=abc``, ``ch_mult=4``) is a typo: an error naming the key,
    before anything is built (it would fail deep inside a constructor, or run with the wrong value)."""
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        old = OmegaConf.select(files, key, default=None, throw_on_missing=False, throw_on_resolution_failure=False)
        new = OmegaConf.select(OmegaConf.from_dotlist([item]), key, default=None)
        if old is None or new is None:
            continue
        was, now = _value_kind(old), _value_kind(new)
        if (now == "string" and was != "string") or (was in ("list", "mapping") and now != was):
            shown = OmegaConf.to_container(old) if isinstance(old, (DictConfig, ListConfig)) else old
            raise ConfigError(f"override {item!r}: {key} is a {was} in the config ({shown!r}), not a {now}")


def load_config(bases: Sequence[str], overrides: Sequence[str]) -> DictConfig:
    configs = []
    for base in bases:
        if not Path(base).is_file():
            raise FileNotFoundError(f"config file not found: {base}")
        configs.append(OmegaConf.load(base))
    files = merge_configs(configs)
    check_override_types(files, overrides)
    config = merge_configs([files, OmegaConf.from_dotlist(list(overrides))])
    check_sections(config, configs)
    for key in ("model",):
        if key not in config:
            raise ConfigError(f"the merged config has no '{key}' section (files: {list(bases)})")
    config.setdefault("lightning", {})
    return config


def check_checkpoint(path: str | Path, flag: str, lightning: bool) -> None:
    """Open a checkpoint argument before anything is built: a wrong file fails in a second, naming itself.

    ``torch.load(..., mmap=True)`` maps the file instead of reading it, so even a large checkpoint costs little.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                f.keys()
            obj: Any = {"state_dict": True}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to open is the reason we report
        raise ConfigError(f"{flag} {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or (lightning and not {"state_dict", "loops"} <= set(obj)):
        raise ConfigError(f"{flag} {path} is not a readable checkpoint (not a Lightning training checkpoint: "
                          f"{'-r needs one with state_dict and loop state' if lightning else 'no weights found'})")


def _leaves(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}.{key}").items()}
    return {prefix: node}


def check_resume_shapes(model: torch.nn.Module, ckpt_path: Path, saved: DictConfig, config: DictConfig) -> None:
    """``-r`` restores every weight, so the model must have the checkpoint's parameter shapes. If the overrides
    change them, say which config keys differ from the run's saved config instead of Lightning's hundreds of
    size-mismatch lines."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    mismatched = [f"{k}: saved {tuple(state[k].shape)}, now {tuple(v.shape)}"
                  for k, v in model.state_dict().items() if k in state and state[k].shape != v.shape]
    if not mismatched:
        return
    before, after = (_leaves(OmegaConf.to_container(c.model, resolve=False), "model") for c in (saved, config))
    changed = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(before.keys() | after.keys())
               if before.get(k) != after.get(k)]
    raise ConfigError(f"-r {ckpt_path}: {len(mismatched)} parameter(s) would change shape (e.g. {mismatched[0]}); "
                      f"model keys that differ from the run's saved config: {changed or 'none'}. A resumed run keeps "
                      "its architecture: drop those overrides, or start a new run from these weights with --init-from")


def build_loggers(config: DictConfig, logdir: Path, run_name: str, resumed_at: str | None = None) -> list:
    """CSV + TensorBoard by default (offline-safe); more (e.g. wandb) via ``lightning.logger``.

    Lightning's CSV logger truncates an existing ``metrics.csv``, so a resumed session writes its own
    ``csv/resumed_<time>/metrics.csv`` and the earlier log is kept.
    """
    csv_version = f"resumed_{resumed_at}" if resumed_at else ""
    specs = {
        "csv": {"target": "pytorch_lightning.loggers.CSVLogger", "params": {"name": "csv", "version": csv_version}},
        "tensorboard": {"target": "pytorch_lightning.loggers.TensorBoardLogger",
                        "params": {"name": "tensorboard", "version": ""}},
    }
    specs = OmegaConf.merge(specs, config.lightning.get("logger") or {})
    loggers = []
    for name, spec in specs.items():
        if spec is None:  # `lightning.logger.tensorboard=null` switches one off
            continue
        spec = OmegaConf.merge({"params": {"save_dir": str(logdir)}}, spec)
        if name == "wandb":
            spec = OmegaConf.merge({"params": {"name": run_name, "id": run_name, "resume": "allow"}}, spec)
        loggers.append(instantiate_from_config(spec, where=f"lightning.logger.{name}"))
    return loggers


def build_callbacks(config: DictConfig, logdir: Path, now: str) -> list[pl.Callback]:
    ckpt_cfg = {"every_n_train_steps": 5000, "save_top_k": -1, **(config.lightning.get("checkpoint") or {})}
    callbacks: list[pl.Callback] = [
        SetupCallback(str(logdir), config, now),
        # No version counter: a run resumed in another folder (copied, moved) rewrites its one last.ckpt rather
        # than adding last-v1.ckpt beside it; AtomicCheckpointIO makes every rewrite all-or-nothing.
        ModelCheckpoint(dirpath=logdir / "checkpoints", filename="step={step:07d}", save_last=True,
                        auto_insert_metric_name=False, enable_version_counter=False, **ckpt_cfg),
        ImageLogger(str(logdir), **(config.lightning.get("image_logger") or {})),
        ValidateAtLastStep(),
        ThroughputMonitor(),
        CheckpointOnSignal(str(logdir / "checkpoints" / "last.ckpt")),
    ]
    for name, spec in (config.lightning.get("callbacks") or {}).items():
        callbacks.append(instantiate_from_config(spec, where=f"lightning.callbacks.{name}"))
    return callbacks


def effective_lr(config: DictConfig, trainer: pl.Trainer, scale: bool) -> float:
    base_lr = float(config.model.get("base_learning_rate", 1e-4))
    if not scale:
        log.info("learning rate %.3g (base_learning_rate, not scaled; --scale_lr to scale)", base_lr)
        return base_lr
    batch = int(config.data.params.batch_size)
    # Stage 1 accumulates in its own (manual) loop, stage 2 through the Trainer.
    accumulate = int(config.model.params.get("accumulate_grad_batches") or trainer.accumulate_grad_batches)
    factor = batch * trainer.num_devices * trainer.num_nodes * accumulate
    log.info("learning rate %.3g = %d (batch) x %d (devices) x %d (nodes) x %d (accumulation) x %.3g (base)",
             factor * base_lr, batch, trainer.num_devices, trainer.num_nodes, accumulate, base_lr)
    return factor * base_lr


def all_finite(module: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


class _DropAdvert(logging.Filter):
    """Lightning 2.6 logs an advertisement for a cloud logger at every Trainer start; nothing for the user to do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_known_warnings() -> None:
    """Silence third-party messages that are known, harmless here and not the user's business; real warnings stay."""
    # The EMA copy is in eval mode on purpose; Lightning's check cannot know that.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # Emitted by Lightning's own pytree helper with torch >= 2.10; nothing to act on here.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # Stage 1 optimises manually; Lightning then warns (with a pasted code example) that a periodic checkpoint
    # holds the weights after the step. That is what we want: a checkpoint at step k holds k optimizer steps.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")
    # Lightning's caution about len() of iterable datasets under several workers: our shard streams give each rank
    # and worker its own shards and count len() per rank (ldm.cache.shards.ShardStream), as it asks.
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    # "fewer training batches than the logging interval": we log by global step, so short epochs still log.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropAdvert())


def main(argv: Sequence[str] | None = None) -> int:
    quiet_known_warnings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opt, overrides = parse_args(argv)
    # DDP re-launches this script once per extra rank; they must all agree on the run folder name.
    now = os.environ.setdefault("LITEVAE_RUN_TIME", datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S"))

    ckpt_path = None
    bases = list(opt.base)
    if opt.resume:
        logdir, ckpt_path = resolve_resume(opt.resume)
        check_checkpoint(ckpt_path, "-r", lightning=True)
        bases = sorted(str(p) for p in (logdir / "configs").glob("*-project.yaml")) + bases
        run_name = logdir.name
    else:
        if not bases:
            build_parser().error("give at least one --base config (or -r to resume)")
        name = opt.name or Path(bases[0]).stem
        run_name = f"{now}_{name}"
        logdir = Path(opt.logdir) / run_name
    if opt.init_from:
        check_checkpoint(opt.init_from, "--init-from", lightning=False)
    config = load_config(bases, overrides)

    if opt.print_config:
        print(OmegaConf.to_yaml(config))
        return 0

    pl.seed_everything(opt.seed, workers=True)
    if "data" not in config:
        raise ConfigError("the merged config has no 'data' section")
    # Data first: a missing dataset path must fail before any model is built or compute spent.
    data = instantiate_from_config(config.data, where="data")
    model = instantiate_from_config(config.model, where="model")
    if opt.resume:
        check_resume_shapes(model, ckpt_path, load_config(bases[:len(bases) - len(opt.base)], []), config)
    if opt.init_from:
        # A model may name buffers that describe this run's data rather than learned weights (stage 2's
        # latent normalisation): they keep the values this config gave them.
        load_weights(model, load_state_dict(opt.init_from), strict=True, what=f"model (from {opt.init_from})",
                     keep=getattr(model, "KEEP_ON_INIT_FROM", ()))
        log.info("initialised weights from %s (optimizers and step start fresh)", opt.init_from)

    trainer_kwargs: dict[str, Any] = OmegaConf.to_container(config.lightning.get("trainer") or {}, resolve=True)
    trainer_kwargs.setdefault("plugins", []).append(AtomicCheckpointIO())
    trainer = pl.Trainer(default_root_dir=str(logdir), logger=build_loggers(config, logdir, run_name, now if opt.resume else None),
                         callbacks=build_callbacks(config, logdir, now), **trainer_kwargs)
    model.learning_rate = effective_lr(config, trainer, opt.scale_lr)

    if not opt.train:
        trainer.validate(model, datamodule=data, ckpt_path=ckpt_path)
        return 0
    try:
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    except BaseException as err:
        save_after_crash(trainer, model, logdir, err)
        raise
    trainer.save_checkpoint(logdir / "checkpoints" / "last.ckpt", weights_only=False)  # all ranks: it has a barrier inside
    return 0


def save_after_crash(trainer: pl.Trainer, model: torch.nn.Module, logdir: Path, err: BaseException) -> None:
    """Keep the work of an interrupted run: save ``last.ckpt`` unless that could poison it."""
    if isinstance(err, NonFiniteLossError):
        log.error("non-finite loss: stopping; the last good checkpoint in %s is kept", logdir / "checkpoints")
        return
    if trainer.world_size > 1 or trainer.global_step == 0 or not all_finite(model):
        return  # multi-process: a checkpoint here would need all ranks (barrier) and could hang
    path = logdir / "checkpoints" / "last.ckpt"
    log.error("%s: saving %s before exiting", type(err).__name__, path)
    try:
        trainer.save_checkpoint(path, weights_only=False)
    except Exception as save_err:  # never mask the original error
        log.error("could not save the checkpoint: %s", save_err)


if __name__ == "__main__":
    sys.exit(main())
