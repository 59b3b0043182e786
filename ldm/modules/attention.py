"""Multi-head attention (self or cross) with one kernel dispatch point.

``scaled_dot_product_attention`` (PyTorch's fused SDPA) is the default everywhere. xformers'
``memory_efficient_attention`` is used only when xformers is importable AND the tensors are on CUDA;
the import is tried once and the chosen backend is logged once per backend.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    """xformers.ops or None; cached so the import is attempted once per process."""
    try:
        import xformers.ops as xops  # noqa: PLC0415 - optional dependency
    except Exception:  # ImportError, or a broken build raising at import
        return None
    return xops


@functools.lru_cache(maxsize=None)
def _log_backend(name: str) -> None:
    log.info("attention backend: %s", name)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v for tensors shaped (B, heads, N, d); returns (B, heads, N, d)."""
    xops = _xformers_ops()
    if xops is not None and q.is_cuda:
        _log_backend("xformers")
        # xformers wants (B, N, heads, d).
        out = xops.memory_efficient_attention(*(x.transpose(1, 2).contiguous() for x in (q, k, v)))
        return out.transpose(1, 2)
    _log_backend("sdpa")
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head attention over token sequences (B, N, C); cross-attention when ``context`` is given.

    Parameter names (to_q/to_k/to_v/to_out.0) follow LDM's CrossAttention. ``qkv_bias`` adds biases to the
    q/k/v projections (off, as in LDM; DiT's timm attention has them, which its published sizes count).
    """

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, qkv_bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        out = attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))
