"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") as a latent denoiser.

``DiT.forward(x, t, y=None, context=None)`` takes the same call as ``ldm.modules.unet.UNetModel``, so stage 2
calls either backbone as ``model(x_t, t, **cond)``. The architecture is the official one (facebookresearch/DiT):
patchify by a strided convolution, a fixed 2-D sin-cos position embedding, time (and class) embeddings summed
into one vector ``c`` that modulates every block through adaLN-Zero, and a zero-initialised final layer, so an
untrained DiT is the identity on its residual stream and predicts exactly zero.

Differences from the official code, all deliberate:

* Attention goes through ``ldm.modules.attention.Attention`` (SDPA; xformers on CUDA), with q/k/v biases as in
  timm's fused qkv, so the parameter count is the official one.
* The position embedding is a non-persistent buffer (the official code keeps a frozen ``nn.Parameter``): it is a
  function of the shape alone, so it is neither trained, nor averaged by the EMA, nor stored in checkpoints.
  The published parameter counts include it (``parameter_count``).
* The class table always has ``num_classes + 1`` rows, the last one (``null_label``) being the null class for
  classifier-free guidance; the caller drops labels (``ldm.models.conditioning``), not the model.
* Optional text conditioning: with ``context_dim`` each block gets a cross-attention layer on ``context``
  (B, L, context_dim) between self-attention and MLP (as in PixArt-alpha), output-projection zero-initialised.
* ``learn_sigma`` is off by default: the output has ``in_channels`` channels (eps / v / velocity). With it on,
  the output has twice as many and the second half is the official model's variance interpolation.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .attention import Attention
from .checkpointing import maybe_checkpoint
from .unet import timestep_embedding

# Official sizes (Table 1 of the paper): depth, hidden size, heads; each at patch size 2, 4 and 8.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PRESETS = {f"DiT-{name}/{p}": {"depth": d, "hidden_size": w, "num_heads": h, "patch_size": p}
               for name, (d, w, h) in DIT_SIZES.items() for p in (2, 4, 8)}


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """(H·W, dim) fixed position embedding of a row-major H×W token grid, as in MAE / DiT.

    The first half of the channels encodes the column, the second half the row, each as
    [sin(pos·ω_k), cos(pos·ω_k)] with ω_k = 10000^(-k / (dim/4)); computed in float64 like the reference.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.cat([embed_1d(cols.flatten()), embed_1d(rows.flatten())], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine transform of normalised tokens; ``scale`` is a residual around 1."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency embedding of t (the UNet's ``timestep_embedding``) followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class-label table with one extra row, the null class (index ``num_classes``) used for CFG."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class Mlp(nn.Module):
    """Transformer MLP with the tanh-approximated GELU that DiT uses."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Self-attention and MLP, each pre-normed (no affine) and modulated by ``c`` with shift, scale and a gate.

    The modulation layer is zero-initialised (adaLN-Zero): every gate starts at 0, so each block starts as the
    identity, which the paper found to train best. With ``context_dim`` a cross-attention on the text tokens sits
    between the two; it is not modulated (the condition is the context itself) and its output starts at zero.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None):
        super().__init__()
        head_dim = hidden_size // num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, None, num_heads, head_dim, qkv_bias=True)
        self.cross_attn = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = Attention(hidden_size, context_dim, num_heads, head_dim, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context.to(x.dtype))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map of each token to its patch of output pixels; all zero-initialised."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer over (B, in_channels, *input_size) latents.

    Defaults are DiT-XL/2's shape; ``DiT.from_preset("DiT-B/2", ...)`` builds the published sizes.
    ``num_classes`` makes it class-conditional (labels ``y``, null label ``num_classes``); ``context_dim`` adds
    cross-attention on ``context``; both may be set, or neither (unconditional).
    """

    def __init__(self, input_size: int | Sequence[int] = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 num_classes: int | None = None, context_dim: int | None = None, learn_sigma: bool = False,
                 use_checkpoint: bool = False):
        super().__init__()
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2 or any(s % patch_size for s in size):
            raise ValueError(f"input_size {input_size} must be one or two sizes divisible by patch_size={patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        self.input_size, self.patch_size, self.in_channels = size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes, self.context_dim, self.learn_sigma = num_classes, context_dim, learn_sigma
        self.use_checkpoint = use_checkpoint
        self.grid = (size[0] // patch_size, size[1] // patch_size)

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes is not None else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **kwargs: Any) -> DiT:
        """A published size by name (``DiT-S/2`` ... ``DiT-XL/8``); ``kwargs`` set the rest (input_size, ...)."""
        if name not in DIT_PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; choose from {sorted(DIT_PRESETS)}")
        return cls(**{**DIT_PRESETS[name], **kwargs})

    def initialize_weights(self) -> None:
        """The official initialisation: Xavier-uniform linears (the patch convolution treated as one), N(0, 0.02)
        embeddings, and zeros for every adaLN modulation, the final projection and cross-attention outputs."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            _init_like_fused_qkv(block.attn)
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.to_out[0].weight)
                nn.init.zeros_(block.cross_attn.to_out[0].bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    @property
    def null_label(self) -> int:
        """Index of the unconditional label (CFG dropout / guidance)."""
        if self.num_classes is None:
            raise AttributeError("this DiT is not class-conditional (num_classes=None)")
        return self.num_classes

    def parameter_count(self, include_pos_embed: bool = True) -> int:
        """Parameters as the DiT paper counts them: the official code keeps the fixed position embedding as a
        frozen parameter, so published sizes include it (here a buffer)."""
        n = sum(p.numel() for p in self.parameters())
        return n + (self.pos_embed.numel() if include_pos_embed else 0)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h·w, p·p·C) row-major tokens, each a p×p×C patch (channels last) → (B, C, h·p, w·p)."""
        (h, w), p, c = self.grid, self.patch_size, self.out_channels
        x = tokens.reshape(tokens.shape[0], h, w, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) with (H, W) = input_size; t: (B,) or scalar timesteps; y: (B,) labels (class-conditional
        models; ``null_label`` for unconditional samples); context: (B, L, context_dim) with cross-attention."""
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"this DiT was built for {self.input_size} inputs (input_size), got {tuple(x.shape[-2:])}")
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("class-conditional DiT needs y; pass y=null_label for unconditional samples")
            c = c + self.y_embedder(y)
        if self.context_dim is not None and context is None:
            raise ValueError("this DiT was built with context_dim: pass context=(B, L, context_dim)")
        h = self.x_embedder(x).flatten(2).transpose(1, 2)
        h = h + self.pos_embed.to(h.dtype)
        for block in self.blocks:
            h = maybe_checkpoint(block, h, c, context, enabled=self.use_checkpoint and self.training)
        return self.unpatchify(self.final_layer(h, c))


def _init_like_fused_qkv(attn: Attention) -> None:
    """Official DiT draws its fused (3d, d) qkv matrix from one Xavier-uniform; draw q, k, v from that same
    distribution rather than three (d, d) ones (whose bound would be sqrt(2) larger)."""
    weights = (attn.to_q.weight, attn.to_k.weight, attn.to_v.weight)
    fan_in, fan_out = weights[0].shape[1], sum(w.shape[0] for w in weights)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    for w in weights:
        nn.init.uniform_(w, -bound, bound)


def dit(name: str, **kwargs: Any) -> DiT:
    """Config-friendly alias of ``DiT.from_preset``: ``target: ldm.modules.dit.dit``, ``params: {name: DiT-B/2}``."""
    return DiT.from_preset(name, **kwargs)
