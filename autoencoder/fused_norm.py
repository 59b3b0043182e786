"""Fused GroupNorm + SiLU (+ residual add) for the autoencoders' residual blocks, with its PyTorch reference.

``group_norm_silu(x, norm)`` is the one place that chooses: ``silu(norm(x))`` through PyTorch (the
reference; CPU always, and CUDA unless enabled), or one Triton kernel that reads the activations twice
(statistics, then normalise) and writes the activated output once, in the input's dtype with fp32
statistics. Under autocast PyTorch's GroupNorm instead casts a bf16 input to fp32, writes an fp32 output
and SiLU makes another pass over it: that is the memory traffic the kernel removes (docs/benchmarks.md).

The kernel is opt-in, ``LITEVAE_FUSED_NORM=1`` (or ``use_fused_norm(True)``), until it has been measured
on a GPU (``scripts/gpu_check.sh``); it never changes parameters or state_dict keys, since it reads the
``nn.GroupNorm`` module's own weight and bias. Under ``torch.compile`` the reference path is traced, so
that Inductor fuses it itself. Tests run the kernel on CPU through Triton's interpreter
(``TRITON_INTERPRET=1``, tests/test_fused_norm.py).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is all there is
    triton = None

ENV_VAR = "LITEVAE_FUSED_NORM"
_override: bool | None = None  # set by use_fused_norm(); None: the environment variable decides


def fused_norm_enabled() -> bool:
    """Whether CUDA GroupNorm+SiLU goes through the Triton kernel (off unless asked for)."""
    if _override is not None:
        return _override
    return os.environ.get(ENV_VAR, "0") == "1"


@contextlib.contextmanager
def use_fused_norm(enabled: bool) -> Iterator[None]:
    """Turn the kernel on or off inside the block, whatever the environment says (benchmarks, tests)."""
    global _override
    old, _override = _override, enabled
    try:
        yield
    finally:
        _override = old


def kernel_applies(x: Tensor, norm: nn.GroupNorm) -> bool:
    """The kernel handles affine GroupNorm of 4-d CUDA float tensors, eager mode only."""
    return (triton is not None and fused_norm_enabled() and x.is_cuda and x.dim() == 4 and norm.affine
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and not torch.compiler.is_compiling())


def group_norm_silu(x: Tensor, norm: nn.GroupNorm, residual: Tensor | None = None, *, inplace: bool = False,
                    overwrite_input: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """``silu(norm(x))``; with ``residual``, ``(silu(norm(s)), s)`` for ``s = x + residual``.

    Inference only: ``inplace`` lets the reference path apply SiLU to ``norm``'s output in place (``x`` is
    kept); ``overwrite_input`` writes the result into ``x`` itself, saving a full-size allocation.
    """
    if kernel_applies(x, norm):
        if overwrite_input and residual is None:
            return fused_group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, out=x)
        return fused_group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, residual)
    if residual is not None:
        s = x + residual
        return F.silu(norm(s), inplace=inplace), s
    if overwrite_input:
        return _group_norm_silu_into_input(x, norm)
    return F.silu(norm(x), inplace=inplace)


def _group_norm_silu_into_input(x: Tensor, norm: nn.GroupNorm) -> Tensor:
    """``silu(norm(x))`` written into ``x`` (inference only), in PyTorch.

    Same numbers as ``nn.GroupNorm`` up to float rounding: a centred two-pass variance whose statistics are
    accumulated in fp32 also for bf16/fp16 ``x`` (a mean rounded to bf16 would cancel badly).
    """
    groups = x.unflatten(1, (norm.num_groups, -1))  # (B, G, C/G, H, W), a view in any layout
    dims = (2, 3, 4)
    groups.sub_(groups.mean(dims, keepdim=True, dtype=torch.float32))
    var = torch.linalg.vector_norm(groups, dim=dims, keepdim=True, dtype=torch.float32).square_()
    rstd = var.div_(groups[0, 0].numel()).add_(norm.eps).rsqrt_()
    weight = norm.weight.view(1, norm.num_groups, -1, 1, 1)
    groups.mul_(rstd * weight).add_(norm.bias.view_as(weight))
    return F.silu(x, inplace=True)


def reference_group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float,
                              residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """What the kernel computes, in PyTorch (the tests' reference)."""
    s = x if residual is None else x + residual
    y = F.silu(F.group_norm(s, groups, weight, bias, eps))
    return y if residual is None else (y, s)


# --------------------------------------------------------------------------------------------- launcher
def _layout(x: Tensor) -> tuple[Tensor, int, int, int]:
    """``x`` as NCHW-contiguous or channels_last, and its (batch, channel, flattened-pixel) strides."""
    if not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous()
    b_stride, c_stride, _, w_stride = x.stride()
    return x, b_stride, c_stride, w_stride  # H and W flatten into one index of stride w_stride in both


def _blocks(channels_per_group: int, pixels: int, block_hw: int | None) -> tuple[int, int]:
    block_c = triton.next_power_of_2(channels_per_group)
    # About 4k elements per loop step: enough in flight per program, few registers per thread.
    block_hw = block_hw or max(1, min(triton.next_power_of_2(pixels), 4096 // block_c))
    return block_c, block_hw


def _forward(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, residual: Tensor | None,
             out: Tensor | None = None, block_hw: int | None = None) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    x, sb, sc, shw = _layout(x)
    if residual is not None:
        residual = residual.to(x.dtype).contiguous(memory_format=_memory_format(x))
    batch, channels, h, w = x.shape
    cpg = channels // groups
    y = torch.empty_like(x) if out is None else out
    s = torch.empty_like(x) if residual is not None else None
    mean = torch.empty(batch * groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_c, block_hw = _blocks(cpg, h * w, block_hw)
    _fwd_kernel[(batch * groups,)](
        x, residual if residual is not None else x, weight, bias, y, s if s is not None else x, mean, rstd,
        groups, cpg, h * w, sb, sc, shw, eps, HAS_RES=residual is not None, BLOCK_C=block_c, BLOCK_HW=block_hw)
    return y, s, mean, rstd


def _backward(dy: Tensor, ds: Tensor | None, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
              rstd: Tensor, groups: int, block_hw: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    x, sb, sc, shw = _layout(x)
    fmt = _memory_format(x)
    dy = dy.to(x.dtype).contiguous(memory_format=fmt)
    if ds is not None:
        ds = ds.to(x.dtype).contiguous(memory_format=fmt)
    batch, channels, h, w = x.shape
    cpg = channels // groups
    dx = torch.empty_like(x)
    # Per-sample partial sums of the weight and bias gradients, added over the batch afterwards (no atomics).
    dw = torch.empty(batch, channels, device=x.device, dtype=torch.float32)
    db = torch.empty_like(dw)
    block_c, block_hw = _blocks(cpg, h * w, block_hw)
    _bwd_kernel[(batch * groups,)](
        dy, ds if ds is not None else dy, x, weight, bias, mean, rstd, dx, dw, db,
        groups, cpg, h * w, sb, sc, shw, HAS_DS=ds is not None, BLOCK_C=block_c, BLOCK_HW=block_hw)
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)


def _memory_format(x: Tensor) -> torch.memory_format:
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, groups, eps, block_hw):
        y, s, mean, rstd = _forward(x, weight, bias, groups, eps, residual, block_hw=block_hw)
        ctx.save_for_backward(x if s is None else s, weight, bias, mean, rstd)
        ctx.groups, ctx.block_hw, ctx.has_residual = groups, block_hw, residual is not None
        return (y, s) if s is not None else y

    @staticmethod
    def backward(ctx, dy, ds=None):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        dx, dw, db = _backward(dy, ds, x, weight, bias, mean, rstd, ctx.groups, ctx.block_hw)
        # d(x + residual) reaches both summands unchanged.
        return dx, (dx if ctx.has_residual else None), dw, db, None, None, None


def fused_group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float,
                          residual: Tensor | None = None, out: Tensor | None = None,
                          block_hw: int | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """The Triton kernel (any device Triton runs on; CPU tensors through ``TRITON_INTERPRET=1``).

    ``out`` (no autograd) writes the result there, which may be ``x`` itself: each element is read
    before it is overwritten by the same program. ``block_hw`` overrides the pixels per loop step (tests
    use it to exercise the multi-step statistics merge at tiny sizes).
    """
    if triton is None:
        raise RuntimeError("fused_group_norm_silu needs triton; use group_norm_silu for the reference path")
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} channels are not divisible into {groups} groups")
    if out is not None:
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            raise RuntimeError("out= is for inference; it has no backward")
        y, s, _, _ = _forward(x, weight, bias, groups, eps, residual, out=out, block_hw=block_hw)
        return y if s is None else (y, s)
    return _GroupNormSiLU.apply(x, residual, weight, bias, groups, eps, block_hw)


# ---------------------------------------------------------------------------------------------- kernels
if triton is not None:
    @triton.jit
    def _fwd_kernel(X, R, W, B, Y, S, Mean, Rstd, groups, cpg, hw, sb, sc, shw, eps,
                    HAS_RES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
        # One program per (sample, group). Pass 1: mean and centred sum of squares in fp32, merged block by
        # block (Chan et al.), so a large group mean does not cancel as in E[x^2] - E[x]^2. Pass 2: normalise,
        # affine, SiLU, store in the input dtype.
        pid = tl.program_id(0)
        b = pid // groups
        g = pid % groups
        c = tl.arange(0, BLOCK_C)
        c_mask = c < cpg
        base = b.to(tl.int64) * sb + (g * cpg).to(tl.int64) * sc
        c_off = c.to(tl.int64)[:, None] * sc
        mean = 0.0
        m2 = 0.0
        count = 0.0
        for start in range(0, hw, BLOCK_HW):
            p = start + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (p < hw)[None, :]
            off = base + c_off + p.to(tl.int64)[None, :] * shw
            v = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                # Added in fp32 and rounded to the input dtype once, as PyTorch's x + r; the statistics are
                # those of the rounded sum that pass 2 reads back.
                v = (v + tl.load(R + off, mask=mask, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
                tl.store(S + off, v, mask=mask)
                v = v.to(tl.float32)
            n = (tl.minimum(hw - start, BLOCK_HW) * cpg).to(tl.float32)
            block_mean = tl.sum(tl.sum(v, axis=1), axis=0) / n
            d = tl.where(mask, v - block_mean, 0.0)
            block_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
            total = count + n
            delta = block_mean - mean
            mean = mean + delta * (n / total)
            m2 = m2 + block_m2 + delta * delta * (count * n / total)
            count = total
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        tl.store(Mean + pid, mean)
        tl.store(Rstd + pid, rstd)
        w = tl.load(W + g * cpg + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
        bias = tl.load(B + g * cpg + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
        for start in range(0, hw, BLOCK_HW):
            p = start + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (p < hw)[None, :]
            off = base + c_off + p.to(tl.int64)[None, :] * shw
            if HAS_RES:
                v = tl.load(S + off, mask=mask, other=0.0).to(tl.float32)
            else:
                v = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
            z = (v - mean) * rstd * w + bias
            y = z * tl.sigmoid(z)
            tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_kernel(DY, DS, X, W, B, Mean, Rstd, DX, DW, DB, groups, cpg, hw, sb, sc, shw,
                    HAS_DS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
        # z = xhat * w + b, y = silu(z): dz = dy * sig * (1 + z * (1 - sig)). Pass 1 sums what the input
        # gradient needs over the group (dxhat and dxhat * xhat) and the per-channel weight/bias partials;
        # pass 2 writes dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) (+ ds).
        pid = tl.program_id(0)
        b = pid // groups
        g = pid % groups
        c = tl.arange(0, BLOCK_C)
        c_mask = c < cpg
        base = b.to(tl.int64) * sb + (g * cpg).to(tl.int64) * sc
        c_off = c.to(tl.int64)[:, None] * sc
        mean = tl.load(Mean + pid)
        rstd = tl.load(Rstd + pid)
        w = tl.load(W + g * cpg + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
        bias = tl.load(B + g * cpg + c, mask=c_mask, other=0.0).to(tl.float32)[:, None]
        sum_dxhat = 0.0
        sum_dxhat_xhat = 0.0
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        db = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, hw, BLOCK_HW):
            p = start + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (p < hw)[None, :]
            off = base + c_off + p.to(tl.int64)[None, :] * shw
            xhat = (tl.load(X + off, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            z = xhat * w + bias
            sig = tl.sigmoid(z)
            dz = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32) * sig * (1.0 + z * (1.0 - sig))
            dz = tl.where(mask, dz, 0.0)
            xhat = tl.where(mask, xhat, 0.0)
            dw += tl.sum(dz * xhat, axis=1)
            db += tl.sum(dz, axis=1)
            dxhat = dz * w
            sum_dxhat += tl.sum(tl.sum(dxhat, axis=1), axis=0)
            sum_dxhat_xhat += tl.sum(tl.sum(dxhat * xhat, axis=1), axis=0)
        tl.store(DW + b * groups * cpg + g * cpg + c, dw, mask=c_mask)
        tl.store(DB + b * groups * cpg + g * cpg + c, db, mask=c_mask)
        n = (hw * cpg).to(tl.float32)
        mean_dxhat = sum_dxhat / n
        mean_dxhat_xhat = sum_dxhat_xhat / n
        for start in range(0, hw, BLOCK_HW):
            p = start + tl.arange(0, BLOCK_HW)
            mask = c_mask[:, None] & (p < hw)[None, :]
            off = base + c_off + p.to(tl.int64)[None, :] * shw
            xhat = (tl.load(X + off, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            z = xhat * w + bias
            sig = tl.sigmoid(z)
            dz = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32) * sig * (1.0 + z * (1.0 - sig))
            dx = rstd * (dz * w - mean_dxhat - xhat * mean_dxhat_xhat)
            if HAS_DS:
                dx += tl.load(DS + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)
