"""Choices by name come from one table each (ldm.registry): an unknown sampler or objective is refused with the
known names before any compute, and an objective's settings that do not apply to it are refused like unknown keys."""
from __future__ import annotations

import pytest
import torch

from ldm.diffusion.flow_samplers import sample_flow
from ldm.diffusion.objectives import make_objective
from ldm.models.latent_diffusion import LatentDiffusion

TINY_DIT = {"target": "ldm.modules.dit.DiT", "params": {"input_size": 4, "patch_size": 2, "in_channels": 4,
                                                         "hidden_size": 32, "depth": 1, "num_heads": 2}}


def tiny_model(**params) -> LatentDiffusion:
    return LatentDiffusion(unet_config=TINY_DIT, conditioning="none", latent_shape=[4, 4, 4], scale_factor=1.0,
                           shift=0.0, **params)


def zero_model(x, t, **cond):
    return torch.zeros_like(x)


def test_an_unknown_ddpm_sampler_is_refused_with_the_known_names_not_run_as_another():
    """The old ``else:`` ran DPM-Solver++ for any DDPM sampler name but 'ddim' and 'ddpm'."""
    ddpm = make_objective("ddpm")
    with pytest.raises(ValueError, match="unknown DDPM sampler 'dpm_solver'; known: ddim, ddpm, dpmpp2m"):
        ddpm.sample(zero_model, "dpm_solver", steps=2, eta=0.0, shift=1.0, guidance_interval=None,
                    shape=(4, 4, 4), seeds=[0])


def test_an_unknown_flow_sampler_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="unknown flow sampler 'rk4'; known: euler, heun, euler_maruyama"):
        sample_flow(zero_model, shape=(4, 4, 4), seeds=[0], sampler="rk4", steps=2)


@pytest.mark.parametrize("sampler", ["euler", "heun", "euler_maruyama"])
def test_every_flow_sampler_of_the_table_runs(sampler):
    x = sample_flow(zero_model, shape=(4, 4, 4), seeds=[0, 1], sampler=sampler, steps=3)
    assert x.shape == (2, 4, 4, 4) and torch.isfinite(x).all()


def test_an_unknown_objective_is_refused_at_model_build_with_the_known_names():
    with pytest.raises(ValueError, match="unknown objective 'flows'; known: ddpm, flow"):
        tiny_model(objective="flows")


@pytest.mark.parametrize("objective, foreign", [
    ("flow", {"schedule": {"schedule": "linear"}}),
    ("flow", {"parameterization": "v"}),
    ("flow", {"min_snr_gamma": 5.0}),
    ("ddpm", {"time_sampler": {"distribution": "uniform"}}),
])
def test_a_setting_of_the_other_objective_is_refused(objective, foreign):
    """These were ignored: a flow config with a schedule trained a flow model and said nothing."""
    with pytest.raises(ValueError, match=f"{next(iter(foreign))} does not apply"):
        tiny_model(objective=objective, **foreign)


def test_each_objective_builds_from_its_own_settings():
    assert tiny_model(objective="flow", time_sampler={"distribution": "uniform"}).objective.name == "flow"
    assert tiny_model(objective="ddpm", parameterization="v").objective.parameterization == "v"
    assert tiny_model().objective.parameterization == "eps"
