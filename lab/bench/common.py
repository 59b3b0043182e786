"""What the benchmark suites share: the models they build, inputs, autocast, interleaved timing.

The suites (one module each in ``lab.bench``) take the parsed ``scripts/benchmark.py`` arguments and a dict
of ratios they fill; ``scripts.benchmark`` runs them. Tooling, not library: the suites build the
autoencoder package's encoders directly, which the stage-2 library never does.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from autoencoder.litevae_encoder import LiteVAEEncoder
from autoencoder.sd_vae import Encoder as SDEncoder
from lab.bench.measure import time_round_robin

# The roofline's machine: NVIDIA H200 SXM, dense bf16 tensor-core peak and HBM3e bandwidth.
H200_PEAK_FLOPS, H200_PEAK_BYTES_PER_S = 989e12, 4.8e12


def fused_variants(args) -> dict[str, bool]:
    """Candidate suffix -> fused GroupNorm+SiLU kernel on/off. The kernel is measured where it can run:
    CUDA, eager (under torch.compile the reference path is traced and Inductor fuses it), triton installed."""
    from autoencoder.fused_norm import triton

    measurable = torch.device(args.device).type == "cuda" and triton is not None and not args.compile
    return {"": False, " fused": True} if measurable else {"": False}


def ratio_tag(args, fused: bool = False) -> str:
    return ("_compiled" if args.compile else "") + ("_fused" if fused else "")


# ----------------------------------------------------------------------------------------------- models
def build_encoder(name: str, checkpointing: bool = False) -> nn.Module:
    """``"SD-VAE"`` or ``"LiteVAE-{S,B,M,L}"``, z = 4, as in the paper's Table 3."""
    if name == "SD-VAE":
        return SDEncoder(z_channels=4, double_z=True)
    return LiteVAEEncoder(size=name.split("-")[1], z_channels=4, activation_checkpointing=checkpointing)


def prepare(module: nn.Module, args, compile: bool | None = None) -> nn.Module:
    module = module.to(args.device)
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if args.compile if compile is None else compile:
        module = torch.compile(module)
    return module


def images(args, batch: int, resolution: int | None = None) -> torch.Tensor:
    r = resolution or args.resolution
    x = torch.rand(batch, 3, r, r, device=args.device) * 2 - 1
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def autocast(args):
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16)


def batch_for(args, quick: int, full: int, cuda: int = 32) -> int:
    if args.batch:
        return args.batch
    return cuda if torch.device(args.device).type == "cuda" else (quick if args.quick else full)


def timed(fns: dict[str, Callable[[], object]], args, quick: int, full: int, warmup: int = 1) -> dict[str, float]:
    return time_round_robin(fns, repeats=args.repeats or (quick if args.quick else full), warmup=warmup,
                            device=args.device)


def flops_per_image(encoder: nn.Module, x: torch.Tensor, args) -> float:
    """FLOPs (2 per multiply-accumulate) per image of a forward on ``x``, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode(), autocast(args):
        encoder(x)
    return counter.get_total_flops() / len(x)


def train_forward_backward(enc: nn.Module, x: torch.Tensor, args) -> None:
    with autocast(args):
        out = enc(x)
    out.float().square().mean().backward()
    enc.zero_grad(set_to_none=True)


def train_forward_backward_fused(enc: nn.Module, x: torch.Tensor, args, fused: bool) -> None:
    from autoencoder.fused_norm import use_fused_norm

    with use_fused_norm(fused):
        train_forward_backward(enc, x, args)


def autoencoder(encoder: str, args, decoder_ch: int = 128, checkpointing: bool = False) -> nn.Module:
    from autoencoder.model import Autoencoder

    enc_cfg = ({"target": "autoencoder.sd_vae.Encoder", "params": {"z_channels": 4}} if encoder == "SD-VAE" else
               {"target": "autoencoder.litevae_encoder.LiteVAEEncoder",
                "params": {"size": encoder.split("-")[1], "z_channels": 4,
                           "activation_checkpointing": checkpointing}})
    dec_cfg = {"target": "autoencoder.sd_vae.Decoder", "params": {"z_channels": 4, "ch": decoder_ch}}
    return prepare(Autoencoder(enc_cfg, dec_cfg, z_channels=4), args)
