"""The fused GroupNorm+SiLU(+residual) Triton kernel against its PyTorch reference, on CPU.

The kernel runs through Triton's interpreter. ``TRITON_INTERPRET=1`` must be set before ``triton.language``
is imported (its ``tl.sum``/``tl.sigmoid`` are themselves ``@triton.jit`` functions, bound to the compiler or
the interpreter at import), and in a pytest process triton may already be imported. So the kernel calls run
in one spawned worker process that starts with the variable set (module fixture ``interpreter``); the
comparisons run here. Shapes are tiny (the interpreter runs the kernel in numpy) and include
non-power-of-two channel counts per group and pixel counts, and several loop steps per group
(``block_hw``), so every masked edge and the statistics merge are exercised.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from autoencoder import fused_norm
from autoencoder.blocks import ResnetBlock
from autoencoder.fused_norm import (
    group_norm_silu,
    reference_group_norm_silu,
    use_fused_norm,
)

# (shape, groups, pixels per loop step): C/G = 2, 3, 1, 5, 4; H*W = 35, 15, 16, 9, 30.
CASES = [((2, 6, 5, 7), 3, 8), ((1, 12, 3, 5), 4, 4), ((2, 8, 4, 4), 8, None), ((1, 5, 3, 3), 1, 2),
         ((1, 16, 5, 6), 4, 16)]
# fp32: the kernel's fp32 statistics and PyTorch's agree to rounding. bf16: the relative L2 error against
# the fp32 reference on the same bf16 inputs, i.e. what rounding the output (8 mantissa bits, 2^-9 per
# element) and the gradients to bf16 costs; 1e-2 leaves 3x margin over the ~3e-3 observed.
FP32_TOL = {"atol": 2e-5, "rtol": 2e-5}
BF16_REL_TOL = 1e-2


def _worker_init() -> None:
    torch.set_num_threads(1)
    from triton.runtime.interpreter import InterpretedFunction

    # Really the interpreter, not a silent fallback to the reference path.
    assert isinstance(fused_norm._fwd_kernel, InterpretedFunction), "TRITON_INTERPRET was not in effect"


@pytest.fixture(scope="module")
def interpreter():
    """A one-process pool whose worker imported triton with TRITON_INTERPRET=1 (spawned: a fresh import)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setenv("OMP_NUM_THREADS", "1")
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
        pool.submit(os.getpid).result()  # start the worker while the variable is set
    yield pool
    pool.shutdown()


def _kernel_fwd_bwd(x, r, w, b, dy, ds, groups, block_hw):
    y, s, grads = _run(fused_norm.fused_group_norm_silu, x, r, w, b, dy, ds, groups, block_hw=block_hw)
    return y.detach(), (s.detach() if s is not None else None), grads  # autograd stays in the worker


def _kernel_no_grad(x, w, b, groups, block_hw, out_into_x):
    with torch.no_grad():
        out = fused_norm.fused_group_norm_silu(x, w, b, groups, 1e-6, block_hw=block_hw,
                                               out=x if out_into_x else None)
        return out, out.data_ptr() == x.data_ptr()


def _inputs(shape, dtype, channels_last, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    # An offset mean: a one-pass E[x^2] - E[x]^2 would lose digits here, the centred merge does not.
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], generator=g)
    b = torch.randn(shape[1], generator=g)
    dy = torch.randn(shape, generator=g).to(dtype)
    ds = torch.randn(shape, generator=g).to(dtype) if residual else None
    return x, r, w, b, dy, ds


def _run(fn, x, r, w, b, dy, ds, groups, **kw):
    """Output(s) and gradients of x, (r,) w, b for the loss <y, dy> (+ <s, ds>)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    res = r.detach().clone().requires_grad_(True) if r is not None else None
    out = fn(leaves[0], leaves[1], leaves[2], groups, 1e-6, res, **kw)
    if res is None:
        y, s = out, None
        loss = (y.float() * dy.float()).sum()
    else:
        y, s = out
        loss = (y.float() * dy.float()).sum() + (s.float() * ds.float()).sum()
    loss.backward()
    grads = [leaves[0].grad] + ([res.grad] if res is not None else []) + [leaves[1].grad, leaves[2].grad]
    return y, s, grads


def _reference(x, r, w, b, dy, ds, groups):
    """fp32 reference; with a residual, on the sum rounded to x's dtype (what the kernel normalises)."""
    if r is None:
        return _run(reference_group_norm_silu, x.float(), None, w, b, dy, None, groups)
    s = (x + r).float()  # the rounded sum; d/dx = d/dr = d/ds of the sum
    y, _, (gs, gw, gb) = _run(reference_group_norm_silu, s, None, w, b, dy, None, groups)
    return y, s, [gs + ds.float(), gs + ds.float(), gw, gb]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("shape,groups,block_hw,residual", [(*c, False) for c in CASES] + [(*c, True) for c in CASES[:3]])
def test_kernel_matches_reference_fp32(interpreter, shape, groups, block_hw, residual):
    channels_last = shape[0] == 2  # both layouts among the cases
    x, r, w, b, dy, ds = _inputs(shape, torch.float32, channels_last, residual)
    y, s, grads = interpreter.submit(_kernel_fwd_bwd, x, r, w, b, dy, ds, groups, block_hw).result()
    y_ref, s_ref, grads_ref = _reference(x, r, w, b, dy, ds, groups)
    assert y.dtype == torch.float32 and y.stride() == x.stride()  # layout kept, no copy back
    torch.testing.assert_close(y, y_ref, **FP32_TOL)
    if residual:
        torch.testing.assert_close(s, s_ref, atol=0, rtol=0)
    for name, got, ref in zip(("x", "r", "w", "b") if residual else ("x", "w", "b"), grads, grads_ref, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


@pytest.mark.parametrize("shape,groups,block_hw,residual", [(*CASES[0], False), (*CASES[1], True), (*CASES[2], True),
                                                            (*CASES[3], False)])
def test_kernel_matches_reference_bf16(interpreter, shape, groups, block_hw, residual):
    x, r, w, b, dy, ds = _inputs(shape, torch.bfloat16, shape[0] == 2, residual, seed=1)
    y, s, grads = interpreter.submit(_kernel_fwd_bwd, x, r, w, b, dy, ds, groups, block_hw).result()
    y_ref, s_ref, grads_ref = _reference(x, r, w, b, dy, ds, groups)
    assert y.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16  # no fp32 round trip
    assert grads[-1].dtype == torch.float32  # parameter gradients in the parameters' dtype
    assert _rel(y, y_ref) < BF16_REL_TOL
    if residual:
        # The sum to one bf16 ulp: the GPU rounds fp32 -> bf16 to nearest as PyTorch does (tests/test_cuda.py
        # asserts equality there), Triton's interpreter truncates.
        torch.testing.assert_close(s.float(), s_ref, atol=0, rtol=2**-7)
    for got, ref in zip(grads, grads_ref):
        assert _rel(got, ref) < BF16_REL_TOL


def test_kernel_statistics_survive_a_large_group_mean(interpreter):
    """A group mean of 1000 sigma over several loop steps: the merged centred variance stays exact to fp32."""
    x = torch.randn(1, 4, 7, 9, generator=torch.Generator().manual_seed(2)) + 1000
    w, b = torch.ones(4), torch.zeros(4)
    y, _ = interpreter.submit(_kernel_no_grad, x, w, b, 2, 8, False).result()
    ref = reference_group_norm_silu(x.double(), w.double(), b.double(), 2, 1e-6).float()
    torch.testing.assert_close(y, ref, atol=1e-3, rtol=1e-3)


def test_kernel_in_place_inference_matches(interpreter):
    x, _, w, b, _, _ = _inputs((2, 6, 5, 7), torch.float32, True, False)
    expected, _ = interpreter.submit(_kernel_no_grad, x, w, b, 3, None, False).result()
    out, wrote_into_x = interpreter.submit(_kernel_no_grad, x, w, b, 3, None, True).result()
    assert wrote_into_x
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_cpu_always_takes_the_reference_path():
    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    x = torch.randn(2, 8, 5, 5)
    with use_fused_norm(True):
        assert fused_norm.fused_norm_enabled() and not fused_norm.kernel_applies(x, norm)
        assert torch.equal(group_norm_silu(x, norm), F.silu(norm(x)))
    assert not fused_norm.fused_norm_enabled()  # restored; off by default (LITEVAE_FUSED_NORM unset)


def _old_block_forward(block: ResnetBlock, x: torch.Tensor) -> torch.Tensor:
    """ResnetBlock.forward as it was before the fused op was wired in."""
    h = block.conv1(F.silu(block.norm1(x)))
    h = block.conv2(block.dropout(F.silu(block.norm2(h))))
    return block.shortcut(x) + h


@pytest.mark.parametrize("channels_last", [False, True])
def test_resnet_block_keys_and_numbers_unchanged(channels_last):
    torch.manual_seed(0)
    block = ResnetBlock(8, 12, norm_groups=4)
    assert list(block.state_dict()) == [f"{m}.{p}" for m in ("norm1", "conv1", "norm2", "conv2", "nin_shortcut")
                                        for p in ("weight", "bias")]
    x = torch.randn(2, 8, 6, 6)
    if channels_last:
        block, x = block.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    ref = _old_block_forward(block, x)
    assert torch.equal(block(x), ref)
    with torch.no_grad():
        assert torch.equal(block(x), ref)
        # The up path's in-place GroupNorm (fp32 NCHW on CPU) equals nn.GroupNorm up to rounding, as before.
        torch.testing.assert_close(block.forward_concat([x[:, :4].clone(), x[:, 4:].clone()]), ref, **FP32_TOL)


def _block_through_kernel(block: ResnetBlock, x: torch.Tensor):
    """In the worker: the block with the kernel switched in (as on CUDA with LITEVAE_FUSED_NORM=1)."""
    fused_norm.kernel_applies = lambda x, norm: True
    xg = x.clone().requires_grad_(True)
    out = block(xg)
    out.square().sum().backward()
    grads = [xg.grad] + [p.grad for p in block.parameters()]
    with torch.no_grad():  # inference: the in-place variants
        inference = block(x), block.forward_concat([x[:, :3].clone(), x[:, 3:].clone()])
    return out.detach(), grads, inference


def test_resnet_block_through_the_kernel(interpreter):
    """The block's wiring with the kernel switched in (interpreted on CPU): forward and every gradient."""
    torch.manual_seed(0)
    block = ResnetBlock(8, 12, norm_groups=4)
    x = torch.randn(1, 8, 5, 6)
    out, grads, inference = interpreter.submit(_block_through_kernel, block, x).result()
    x2 = x.clone().requires_grad_(True)
    ref = _old_block_forward(block, x2)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, **FP32_TOL)
    for got, want in zip(grads, [x2.grad] + [p.grad for p in block.parameters()], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for got in inference:
        torch.testing.assert_close(got, ref.detach(), **FP32_TOL)
