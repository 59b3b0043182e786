"""Stage 1 trains channels_last by default (1.28x on 2 CPU cores): checkpoints stay layout-free, a run
resumed across layouts keeps its optimizer right, and bf16 channels_last GroupNorm on the CPU matches the fp32 one."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from autoencoder.blocks import GroupNorm
from conftest import STAGE1_TEST_OVERRIDES
from ldm import cli
from ldm.checkpoints import load_first_stage
from ldm.util import match_optimizer_state_layout
from helpers import last_ckpt, train

CL = torch.channels_last


def _adam_steps(param_layout, grad, state_from=None, guard=False, steps=3):
    base = torch.arange(72, dtype=torch.float32).reshape(2, 4, 3, 3) / 72
    p = torch.nn.Parameter(base.clone().contiguous(memory_format=param_layout))
    opt = torch.optim.Adam([p], lr=0.1, fused=True)
    if state_from is not None:
        opt.load_state_dict(copy.deepcopy(state_from))  # load_state_dict aliases the tensors it is given
        p.data.copy_(state_from["param"])
    if guard:
        match_optimizer_state_layout(opt)
    for _ in range(steps):
        p.grad = grad.clone().contiguous(memory_format=param_layout)
        opt.step()
    return p.detach(), {**opt.state_dict(), "param": p.detach().clone()}


def test_optimizer_state_of_another_layout_is_relaid_out():
    """The fused Adam kernel reads a parameter and its moments as flat buffers: NCHW moments restored into a
    channels_last parameter update the wrong elements, silently. The reference is the same run in NCHW."""
    grad = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    _, saved = _adam_steps(torch.contiguous_format, grad)
    reference, _ = _adam_steps(torch.contiguous_format, grad, state_from=saved)
    wrong, _ = _adam_steps(CL, grad, state_from=saved)
    right, _ = _adam_steps(CL, grad, state_from=saved, guard=True)
    assert (wrong - reference).abs().max() > 1e-2  # what the guard is for
    torch.testing.assert_close(right, reference, rtol=0, atol=1e-6)


def test_channels_last_run_checkpoints_load_anywhere_and_resume_across_layouts(tmp_path):
    run = train(tmp_path / "cl", "lightning.trainer.max_steps=2", "model.params.loss.params.disc_start=0")
    state = last_ckpt(run)["state_dict"]
    assert state["autoencoder.decoder.conv_in.weight"].is_contiguous(memory_format=CL)
    model, _ = load_first_stage(run)  # a plain NCHW module
    assert model.decoder.conv_in.weight.is_contiguous()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        y = model.decode(model.encode(x).mode())
        y_cl = model.to(memory_format=CL).decode(model.encode(x.contiguous(memory_format=CL)).mode())
    torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-4)

    # An NCHW run resumed channels_last continues like the same run resumed NCHW.
    nchw = train(tmp_path / "nchw", "lightning.trainer.max_steps=3", "model.params.channels_last=false",
                 "model.params.loss.params.disc_start=0", "data.params.train.params.flip=false")
    resumed = {}
    for layout in ("true", "false"):
        copy = tmp_path / f"resume_{layout}"
        shutil.copytree(nchw, copy)
        assert cli.main(["-r", str(copy), "-t", *STAGE1_TEST_OVERRIDES, "lightning.trainer.max_steps=4",
                         f"model.params.channels_last={layout}", "model.params.loss.params.disc_start=0",
                         "data.params.train.params.flip=false"]) == 0
        resumed[layout] = last_ckpt(copy)["state_dict"]
    before = last_ckpt(nchw)["state_dict"]
    worst = max(float((resumed["true"][k] - resumed["false"][k]).abs().max()) for k in before
                if k.startswith("autoencoder.") and before[k].dim() == 4)
    assert worst < 2e-5  # conv rounding; a mis-laid-out moment moves weights by ~lr = 2e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_channels_last_group_norm_is_fp32_group_norm(dtype):
    torch.manual_seed(0)
    norm = GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(2, 16, 8, 8) * 3 + 1).to(dtype).contiguous(memory_format=CL).requires_grad_(True)
    y = norm(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    reference = F.group_norm(x.detach().float(), 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(y.float(), reference, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 2e-3)
    y.float().square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    plain = torch.randn(2, 16, 8, 8)  # anything else: nn.GroupNorm's own path
    torch.testing.assert_close(norm(plain), F.group_norm(plain, 4, norm.weight, norm.bias, norm.eps))
