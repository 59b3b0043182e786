"""LPIPS (VGG) built offline: the linear heads ship with the ``lpips`` pip package, the VGG16 trunk is
torchvision's ImageNet file ``vgg16-397923af.pth``, which we load ourselves instead of letting
torchvision download it.

Where the trunk is looked for, in order: the explicit ``vgg_weights`` path, ``$LITEVAE_VGG16``, and
torch hub's cache ``torch.hub.get_dir()/checkpoints/vgg16-397923af.pth`` (where torchvision itself
would have put it). Inputs are NCHW images in [-1, 1]; the output is LPIPS per image, shape (N, 1, 1, 1).
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Literal

import lpips
import torch
from torch import nn

from ldm.util import load_state_dict, load_weights

log = logging.getLogger(__name__)

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"
VGG16_ENV = "LITEVAE_VGG16"
# lpips.pretrained_networks.vgg16 splits torchvision's `features` Sequential at these indices.
_SLICE_STARTS = (0, 4, 9, 16, 23, 30)


class FrozenLPIPS(lpips.LPIPS):
    """LPIPS that stays in eval mode (its heads contain dropout) even inside a module put in train mode."""

    def train(self, mode: bool = True) -> "FrozenLPIPS":
        return super().train(False)


def default_vgg16_path() -> Path:
    """Where torchvision caches the VGG16 ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def find_vgg16_weights(vgg_weights: str | os.PathLike | None = None) -> Path | None:
    """The first VGG16 weights file found (explicit path, env var, hub cache), or None."""
    explicit = vgg_weights or os.environ.get(VGG16_ENV)
    if explicit:  # an explicit path that is missing is an error, never a silent fall-through
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"VGG16 weights for LPIPS not found at {path} (given via "
                                    f"{'vgg_weights' if vgg_weights else '$' + VGG16_ENV}).")
        return path
    path = default_vgg16_path()
    return path if path.is_file() else None


def missing_vgg16_message() -> str:
    return (f"LPIPS needs torchvision's ImageNet VGG16 weights '{VGG16_FILENAME}' ({VGG16_URL}) and nothing "
            f"here downloads. Either place the file at {default_vgg16_path()} (torch hub cache), or set "
            f"{VGG16_ENV}=/path/to/{VGG16_FILENAME}, or pass its path as `vgg_weights` (the perceptual-loss / "
            f"eval config key).")


def vgg16_to_lpips_trunk(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map torchvision ``features.<i>.*`` keys to lpips' ``slice<k>.<i>.*``; classifier keys are dropped.

    Keys already in lpips layout (``slice<k>.<i>.*``) pass through unchanged.
    """
    out = {}
    for key, value in state_dict.items():
        if key.startswith("slice"):
            out[key] = value
            continue
        m = re.fullmatch(r"features\.(\d+)\.(weight|bias)", key)
        if m is None:
            continue
        index = int(m.group(1))
        k = next(k for k in range(1, 6) if _SLICE_STARTS[k - 1] <= index < _SLICE_STARTS[k])
        out[f"slice{k}.{index}.{m.group(2)}"] = value
    return out


def _build_lpips_module() -> FrozenLPIPS:
    # pnet_rand=True: the trunk starts random, so torchvision never tries to download; pretrained=True
    # still loads the linear heads from the files inside the lpips package.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        return FrozenLPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False)


def _freeze(model: FrozenLPIPS) -> FrozenLPIPS:
    model.requires_grad_(False)
    return model.eval()


def build_lpips(vgg_weights: str | os.PathLike | None = None,
                if_missing: Literal["error", "skip", "random"] = "error") -> nn.Module | None:
    """Frozen LPIPS-VGG with the VGG16 trunk loaded from a local file (see module docstring).

    ``if_missing`` says what happens when no trunk file is found: "error" raises FileNotFoundError that
    says where to put which file; "skip" returns None with a warning; "random" keeps a random trunk
    (meaningless values; for tests only). Parameters are frozen, gradients still flow to the inputs.
    """
    if if_missing not in ("error", "skip", "random"):
        raise ValueError(f"if_missing must be 'error', 'skip' or 'random', got {if_missing!r}")
    path = find_vgg16_weights(vgg_weights)
    if path is None:
        if if_missing == "error":
            raise FileNotFoundError(missing_vgg16_message())
        if if_missing == "skip":
            log.warning("LPIPS disabled: %s", missing_vgg16_message())
            return None
        log.warning("LPIPS with a RANDOMLY INITIALISED VGG16 trunk (if_missing='random'): its values are "
                    "meaningless and not comparable to published LPIPS. Use only for tests.")
        return _freeze(_build_lpips_module())
    model = _build_lpips_module()
    load_weights(model.net, vgg16_to_lpips_trunk(load_state_dict(path)), strict=True, what=f"LPIPS VGG16 trunk ({path})")
    log.info("LPIPS: VGG16 trunk loaded from %s", path)
    return _freeze(model)
