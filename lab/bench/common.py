"""What the benchmark suites share: targets, the models they build, inputs, autocast, interleaved timing.

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

# Ratio key -> (target, "min" | "max"): what the issue asks of a CPU run.
TARGETS = {
    "encoder_throughput_B_vs_sd": (4.5, "min"),
    # Issue 12: keep the CPU throughput ratio within 5 % of the compute (FLOP) ratio.
    "encoder_throughput_B_vs_flop_ratio": (0.95, "min"),
    "inference_peak_mem_B_vs_sd": (0.36, "max"),
    "train_saved_bytes_B_vs_sd": (0.6, "max"),
    "dwt_fwd_speedup_vs_ptwt": (3.0, "min"),
    "dwt_fwdbwd_speedup_vs_ptwt": (4.0, "min"),
    "dwt_max_abs_err": (1e-5, "max"),
    "cache_vs_bare_encoder_throughput": (0.9, "min"),
    "train_ae_step_speedup_B_vs_sd": (1.0, "min"),
}


# What issue 12 asks of a CUDA run (bf16, batch 32, 256x256), eager and compiled (``_compiled`` keys), with
# the fused GroupNorm+SiLU kernel off and on (``_fused`` keys); other ratios are reported without a target.
GPU_TARGETS = {
    **{f"encoder_throughput_B_vs_sd{tag}": (2.5, "min") for tag in ("", "_fused", "_compiled")},
    **{f"train_ae_step_speedup_B_vs_sd{tag}": (1.2, "min") for tag in ("", "_fused", "_compiled")},
    "cache_vs_bare_encoder_throughput": (0.9, "min"),
    "inference_peak_mem_B_vs_sd": (0.36, "max"),
}

# The roofline's machine: NVIDIA H200 SXM, dense bf16 tensor-core peak and HBM3e bandwidth (issue 12).
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

# -------------------------------------------------------------------------------------------------- CLI
def check_targets(ratios: dict, targets: dict = TARGETS) -> list[str]:
    lines = []
    for key, value in ratios.items():
        target = targets.get(key)
        if target is None:
            lines.append(f"  {key:36s} {value}")
            continue
        bound, kind = target
        ok = value >= bound if kind == "min" else value <= bound
        lines.append(f"  {key:36s} {value:<10g} target {'>=' if kind == 'min' else '<='} {bound:g}  "
                     f"{'met' if ok else 'NOT met'}")
    return lines
