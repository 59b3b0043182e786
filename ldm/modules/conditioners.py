"""Conditioning encoders and CFG-dropout helpers.

Class conditioning lives in the UNet (``UNetModel(num_classes=...)``, null label = ``num_classes``).
Text conditioning: ``OpenCLIPTextEncoder`` returns per-token features (B, L, D) for cross-attention,
taken from the penultimate (SD 2.x) or last transformer layer, after the final LayerNorm.

Weights never download. They come from ``pretrained_path`` (a full OpenCLIP checkpoint or a text-tower-only
state dict, .bin/.pt/.safetensors), or from the Hugging Face cache if the file of ``pretrained_tag`` is
already there, or — only with ``random_init=True`` — from random initialisation (tests).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

NULL_TEXT = ""  # the unconditional prompt used for CFG dropout and guidance


def drop_labels(y: torch.Tensor, p: float, null_label: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by ``null_label`` with probability ``p`` (classifier-free-guidance dropout)."""
    draw_device = generator.device if generator is not None else y.device
    drop = (torch.rand(y.shape, generator=generator, device=draw_device) < p).to(y.device)
    return torch.where(drop, torch.full_like(y, null_label), y)


def drop_texts(texts: Sequence[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by ``NULL_TEXT`` with probability ``p``."""
    drop = torch.rand(len(texts), generator=generator) < p
    return [NULL_TEXT if d else s for s, d in zip(texts, drop.tolist())]


def _cached_checkpoint(arch: str, tag: str | None, cache_dir: str | None = None) -> str | None:
    """Path of an ALREADY-downloaded OpenCLIP checkpoint in the Hugging Face cache, else None (no network)."""
    if not tag:
        return None
    import open_clip
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    repo_file = (cfg or {}).get("hf_hub", "")
    if not repo_file:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo_id, filename = repo_file.rstrip("/"), None
    if not repo_file.endswith("/"):
        repo_id, filename = repo_file.rsplit("/", 1)
    for name in ([filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
        path = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(path, str):
            return path
    return None


def _text_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the text-tower entries of a full CLIP (or CustomTextCLIP 'text.'-prefixed) state dict."""
    if any(k.startswith("text.") for k in state):
        return {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    skip = ("visual.", "logit_scale", "logit_bias")
    return {k: v for k, v in state.items() if not k.startswith(skip)}


class OpenCLIPTextEncoder(nn.Module):
    """OpenCLIP text tower → token features (B, max_length, width) for the UNet's cross-attention.

    Only the text tower is built (the image tower of ViT-H would be 630M unused parameters).
    ``text_cfg`` overrides the architecture's text config (tests pass a tiny one with ``random_init``).
    """

    def __init__(self, arch: str = "ViT-H-14", pretrained_path: str | None = None, random_init: bool = False,
                 max_length: int = 77, freeze: bool = True, layer: str = "penultimate",
                 pretrained_tag: str | None = "laion2b_s32b_b79k", text_cfg: dict | None = None):
        super().__init__()
        import open_clip
        from open_clip.model import _build_text_tower  # private helper, but it builds the text tower alone

        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got '{layer}'")
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise ValueError(f"unknown OpenCLIP architecture '{arch}'")
        cfg = dict(text_cfg if text_cfg is not None else model_cfg["text_cfg"])
        if cfg.get("hf_model_name"):
            raise ValueError(f"'{arch}' uses a Hugging Face text tower; only OpenCLIP's own TextTransformer is supported")
        if cfg.get("context_length", 77) != max_length:
            raise ValueError(f"max_length={max_length} must equal the tower's context_length={cfg.get('context_length', 77)}")
        weights = self._resolve_weights(arch, pretrained_path, pretrained_tag, random_init, text_cfg is not None)
        self.tower = _build_text_tower(model_cfg["embed_dim"], cfg, quick_gelu=model_cfg.get("quick_gelu", False))
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=max_length)  # BPE vocab ships with the package
        self.num_layers = len(self.tower.transformer.resblocks)
        self.layer_index = self.num_layers - (2 if layer == "penultimate" else 1)
        self.out_dim = cfg["width"]
        if weights is not None:
            self._load_weights(weights)
        else:
            log.warning("OpenCLIPTextEncoder(%s): RANDOM weights (random_init=True)", arch)
        self.freeze = freeze
        if freeze:
            self.tower.eval().requires_grad_(False)

    @staticmethod
    def _resolve_weights(arch: str, path: str | None, tag: str | None, random_init: bool,
                         custom_cfg: bool) -> str | None:
        """The weights file to load, None for random init; raises before any model is built if missing."""
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"OpenCLIP text encoder '{arch}': weights file '{path}' does not exist")
            return path
        if random_init:
            return None
        cached = None if custom_cfg else _cached_checkpoint(arch, tag)
        if cached is None:
            raise FileNotFoundError(
                f"OpenCLIP text encoder '{arch}': no weights found. Provide pretrained_path=<file>, the OpenCLIP "
                f"checkpoint file (open_clip_pytorch_model.bin or open_clip_model.safetensors) of '{arch}' / "
                f"'{tag}' — for ViT-H-14 that is hf.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K — or place it in "
                f"the Hugging Face cache for that tag. Nothing is downloaded. random_init=True is for tests only.")
        return cached

    def _load_weights(self, path: str) -> None:
        from open_clip.factory import load_state_dict as load_openclip_file

        self.tower.load_state_dict(_text_state_dict(load_openclip_file(path)), strict=True)
        log.info("OpenCLIPTextEncoder: loaded text tower from %s", path)

    def train(self, mode: bool = True) -> "OpenCLIPTextEncoder":
        super().train(mode)
        if self.freeze:
            self.tower.eval()  # a frozen encoder stays in eval mode even inside a training model
        return self

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Token features (B, max_length, width) after the final LayerNorm of the chosen layer."""
        tokens = self.tokenize(texts).to(self.tower.token_embedding.weight.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            out = self.tower.forward_intermediates(tokens, indices=[self.layer_index], stop_early=True,
                                                   normalize_intermediates=True, intermediates_only=True,
                                                   output_fmt="NLC")
        return out["text_intermediates"][0]

    encode = forward
