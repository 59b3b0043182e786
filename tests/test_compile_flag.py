"""``compile: true`` (torch.compile, meant for CUDA) must not change what a checkpoint holds.

Compilation is lazy (nothing is compiled until the first forward), so building both modules is cheap;
the reference is the same module built with ``compile: false``.
"""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from conftest import ROOT
from ldm.util import fused_optimizer_kwargs, instantiate_from_config


def _build(config: str, compile: bool, **params):
    cfg = OmegaConf.load(ROOT / config).model
    cfg.params.update(params, compile=compile)
    torch.manual_seed(0)
    return instantiate_from_config(cfg)


def test_compile_keeps_state_dict_keys_and_values():
    for config, params in (("configs/autoencoder/litevae_tiny.yaml", {}),
                           ("configs/ldm/fmnist_litevae_tiny.yaml", {"latent_stats": None, "first_stage": None})):
        eager, compiled = _build(config, False, **params), _build(config, True, **params)
        ref, got = eager.state_dict(), compiled.state_dict()
        assert list(got) == list(ref), config
        assert all(torch.equal(got[k], ref[k]) for k in ref), config


def test_fused_adam_matches_for_loop_adam():
    # The fused kernel implements the same update rule as torch's reference for-loop Adam.
    torch.manual_seed(0)
    params = [torch.randn(7, 5, requires_grad=True), torch.randn(3, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = torch.optim.Adam(params, lr=1e-2, betas=(0.5, 0.9), **fused_optimizer_kwargs("cpu"))
    opt_ref = torch.optim.Adam(ref, lr=1e-2, betas=(0.5, 0.9), foreach=False)
    assert fused_optimizer_kwargs("cpu") == {"fused": True}
    for step in range(3):
        for p, q in zip(params, ref):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        opt.step()
        opt_ref.step()
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
