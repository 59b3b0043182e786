"""Small helpers used everywhere: config instantiation, safe checkpoint loading, parameter counts."""
from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config that cannot be turned into an object; the message names the config path."""


class OutOfRangeError(ConfigError):
    """A config value out of its range (``check_range``); ``instantiate_from_config`` adds the config path."""


class NonFiniteLossError(RuntimeError):
    """Raised by a LightningModule when a loss is NaN/inf; the run stops and no checkpoint is overwritten."""


def check_range(name: str, value: float | None, low: float | None = None, high: float | None = None,
                above: bool = False) -> None:
    """A config value out of range is an error at start naming it and its value (``None`` means "not set" and
    passes): ``low <= value <= high``, or ``low < value`` with ``above``. ``instantiate_from_config`` adds the
    config path."""
    if value is None:
        return
    too_low = low is not None and (value <= low if above else value < low)
    if too_low or (high is not None and value > high):
        bounds = (f"> {low}" if above else f">= {low}") if high is None else f"in [{low}, {high}]"
        raise OutOfRangeError(f"{name}={value} is out of range: must be {bounds}")


# The key of the batch that ``ldm.data.images.collate_train`` returns when every sample was unreadable.
ALL_BAD = "all_bad"


def is_empty_batch(batch: Any) -> bool:
    """``None`` or the training collate's all-bad marker: no image to use (all already counted and warned)."""
    return batch is None or (isinstance(batch, Mapping) and ALL_BAD in batch)


def batch_missing(module: Any, batch: Any) -> bool:
    """Whether a training step must be skipped for an empty batch (``is_empty_batch``): this rank's, or under
    DDP any rank's, so that all ranks skip together. A rank that skipped alone would leave the others waiting
    in the gradient all-reduce forever (this is also why the training collate never yields ``None``, which
    Lightning would drop on that rank alone)."""
    missing = is_empty_batch(batch)
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and trainer.world_size > 1:
        missing = not trainer.strategy.reduce_boolean_decision(not missing, all=True)
        if missing and not is_empty_batch(batch):
            log.warning("step %d skipped on every rank: another rank's batch held no readable image",
                        module.global_step)
    return missing


def check_finite(loss: torch.Tensor, step: int, logs: Mapping[str, torch.Tensor] | None = None) -> None:
    """Stop training with a readable message when ``loss`` is NaN/inf (one host sync per call)."""
    if not torch.isfinite(loss.detach()).all():
        terms = {k: float(v) for k, v in (logs or {}).items() if torch.is_tensor(v) and v.numel() == 1}
        raise NonFiniteLossError(f"non-finite loss at step {step}: {terms}. Lower the learning rate, check the "
                                 "data, or try fp32; the last good checkpoint is kept.")


def fused_optimizer_kwargs(device: torch.device | str) -> dict[str, bool]:
    """``{"fused": True}`` for Adam/AdamW on CPU and CUDA, else ``{}``.

    Why: the default (for-loop) Adam issues ~5 small kernels per parameter tensor; with the tiny configs'
    ~500 tensors that cost ~200 ms per stage-1 step on 2 CPU threads, against ~4 ms fused (same update
    rule, same state_dict layout; results agree to float rounding).
    """
    return {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {}


def clip_gradients(module: Any, optimizer: Any, value: float | None, algorithm: str = "norm") -> None:
    """Clip ``optimizer``'s gradients to ``value`` (global norm, or per element with ``algorithm="value"``): the one
    gradient clipping of both stages, which works with the fused Adam/AdamW they build under every precision.

    Why not Lightning's own: it refuses any optimizer that unscales inside ``step()`` (fused Adam) under every
    mixed precision, bf16 included, where no grad scaler exists. With fp16's scaler, the gradients are unscaled here
    first; torch's ``GradScaler.step`` then knows they are and only skips the step on inf/NaN, as usual. Everything
    else (fp32, non-fused optimizers, sharded strategies with their own plugins) goes through Lightning.
    """
    from pytorch_lightning.plugins.precision import MixedPrecision

    if not value:
        return
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch one
    plugin = module.trainer.precision_plugin
    if not (isinstance(plugin, MixedPrecision) and getattr(torch_optimizer, "_step_supports_amp_scaling", False)):
        module.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=algorithm)
        return
    if plugin.scaler is not None:
        plugin.scaler.unscale_(torch_optimizer)
    params = [p for group in torch_optimizer.param_groups for p in group["params"] if p.grad is not None]
    if str(algorithm).lower() == "value":
        torch.nn.utils.clip_grad_value_(params, value)
    else:
        torch.nn.utils.clip_grad_norm_(params, value)


def match_optimizer_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Lay every per-parameter state tensor (Adam's moments) out in memory like its parameter.

    Why: the fused Adam/AdamW kernels treat a parameter, its gradient and its state as flat buffers; a moment
    saved from an NCHW model and restored into a channels_last one (resuming an older run) is then applied to
    the wrong elements, silently (tests/test_channels_last.py shows the wrong update).
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def maybe_compile(module: torch.nn.Module, enabled: bool) -> None:
    """``module.compile()`` in place when ``enabled`` (meant for CUDA; on CPU it mostly adds compile time).

    ``nn.Module.compile`` compiles the module's ``forward`` but keeps the module itself registered, so
    state_dict keys, checkpoints and the EMA copy are unchanged.
    """
    if enabled:
        module.compile()


def run_seed() -> int:
    """The run's global seed (``main.py -s``), as ``pl.seed_everything`` exports it to every rank and worker."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def step_generator(seed: int, step: int, micro_batch: int = 0, rank: int = 0, stream: int = 0,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """The one seed formula of the project: a generator seeded from (seed, step, micro-batch, rank, stream).

    Training randomness drawn from it is a pure function of the step, so a resumed run draws exactly what an
    uninterrupted one would (Lightning checkpoints do not hold the global RNG states). ``stream`` separates
    independent uses within one step (crop offsets, noise, ...). ``np.random.SeedSequence`` mixes the entropy
    so that neighbouring tuples give unrelated streams.
    """
    entropy = [int(seed) % 2**63, int(step), int(micro_batch), int(rank), int(stream)]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))


def get_obj_from_str(path: str) -> Any:
    """Import ``package.module.Name`` and return ``Name``."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ConfigError(f"target '{path}' is not a dotted import path (expected 'package.module.Name')")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"target '{path}': module '{module}' not found ({e})") from e
    except AttributeError as e:
        raise ConfigError(f"target '{path}': module '{module}' has no attribute '{name}'") from e


def instantiate_from_config(config: Mapping | DictConfig, where: str = "config", **extra: Any) -> Any:
    """Build ``target(**params, **extra)`` from a ``{target:, params:}`` mapping, or
    ``target.from_params(**params, **extra)`` when the class defines that factory (params that name files:
    the factory reads them, ``__init__`` takes values).

    ``where`` is the dotted path of this node in the full config; errors name it, so a bad key in a
    nested config says exactly where to look.
    """
    if config is None or "target" not in config:
        raise ConfigError(f"{where}: expected a mapping with a 'target:' key, got {config!r}")
    unknown = set(config.keys()) - {"target", "params", "base_learning_rate"}  # the LR is read by the CLI
    if unknown:
        raise ConfigError(f"{where}: unexpected keys {sorted(unknown)} next to 'target' (put arguments under 'params:')")
    try:
        cls = get_obj_from_str(str(config["target"]))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e
    params = config.get("params") or {}
    if isinstance(params, DictConfig):
        params = OmegaConf.to_container(params, resolve=True)
    try:
        return getattr(cls, "from_params", cls)(**params, **extra)
    except TypeError as e:
        raise ConfigError(f"{where}: cannot build {config['target']} with params {sorted(params)}: {e}") from e
    except OutOfRangeError as e:  # a value the class refused (``check_range``): say which config node holds it
        raise ConfigError(f"{where}.params: {e}") from e


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a weights file safely: ``.safetensors`` or a torch pickle with ``weights_only=True``.

    Lightning checkpoints are unwrapped to their ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


def load_weights(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                 what: str = "model", keep: Iterable[str] = ()) -> None:
    """``load_state_dict`` whose error lists the missing and unexpected keys (a few of each).

    ``keep``: keys whose current values stay (dropped from ``state_dict``, never counted as missing).
    """
    keep = set(keep)
    missing, unexpected = module.load_state_dict({k: v for k, v in state_dict.items() if k not in keep},
                                                 strict=False)
    missing = [k for k in missing if k not in keep]
    if strict and (missing or unexpected):
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")

        raise RuntimeError(
            f"weights do not match {what}: {len(missing)} missing [{show(missing)}], "
            f"{len(unexpected)} unexpected [{show(unexpected)}]. Wrong architecture config for this checkpoint?")
    if missing or unexpected:
        log.warning("non-strict load of %s: %d missing, %d unexpected keys", what, len(missing), len(unexpected))


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a CUDA device is ``cuda:local_rank`` (one per torchrun rank)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or a SLURM job's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def fit_workers(requested: int, what: str = "num_workers") -> int:
    """``requested`` DataLoader worker processes, lowered to the usable CPU cores with one message: more only
    compete for the same cores (and make torch warn at every loader). ``what`` names the setting in the message."""
    cores = usable_cpus()
    if requested <= cores:
        return requested
    log.info("%s=%d is more than this machine's %d usable CPU cores: using %d workers", what, requested, cores, cores)
    return cores


def join_torchrun_group(timeout_hours: float = 6) -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` of a torchrun launch, joining a gloo process group when there are several
    processes; ``(0, 1, 0)`` outside torchrun. Gloo serves CPU and CUDA runs alike because only barriers cross
    ranks in the scripts that use this (the data travels as files: shards, PNGs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=timeout_hours))
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def image_grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """The project's one image grid: uint8 NHWC arrays or [-1, 1] float NCHW tensors → one uint8 HWC array
    (``torchvision.utils.make_grid``), ``nrow`` images per row (default ceil(sqrt(N)): near-square)."""
    from torchvision.utils import make_grid

    from ldm.io import to_uint8

    if isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    else:
        x = to_uint8(images).cpu()
    nrow = nrow or max(1, math.ceil(math.sqrt(len(x))))
    return make_grid(x, nrow=nrow, padding=padding).permute(1, 2, 0).numpy()
