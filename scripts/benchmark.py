"""Side-by-side speed and memory benchmarks: one table and one set of ratios from a single run.

    python scripts/benchmark.py --suite all --quick            # about a minute on a 2-core CPU
    python scripts/benchmark.py --suite encoder                # LiteVAE-S/B/M/L vs SD-VAE encoder, 256x256
    python scripts/benchmark.py --suite all --out bench.json   # full run (CPU: minutes; CUDA: bf16, batch 32)
    python scripts/benchmark.py --suite tiling --quick         # tiled vs whole encoding, 1024x1024
    python scripts/benchmark.py --suite roofline               # FLOPs, minimum bytes, H200 bound (CPU counts)
    python scripts/benchmark.py --suite profile --device cuda  # per-kernel tables, training fwd+bwd

Suites: encoder (forward throughput), memory (inference peak in a fresh process; bytes saved for backward;
CUDA training peak), dwt (fast Haar vs ptwt.wavedec2), cache (latent caching vs bare encoder forward),
train-ae (full autoencoder training step, same decoder and loss), train-ldm (diffusion step on cached
latents vs live encoding); by name only: tiling (LiteVAE-B encoding at 1024x1024, 512-px tiles vs whole),
roofline (docs/benchmarks.md), profile. On CUDA in eager mode the encoder, train-ae and profile suites also run
LiteVAE-B and SD-VAE with the fused GroupNorm+SiLU kernel (``... fused`` rows, ``_fused`` ratio keys);
``--compile`` runs add ``_compiled`` to the ratio keys. Each ratio is printed next to its target.
Timings interleave the candidates round-robin so that other load on the machine slows all of them alike;
medians are reported. Defaults: CPU fp32; CUDA bf16 autocast, channels_last, batch 32.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]

from autoencoder.fused_norm import use_fused_norm
from autoencoder.litevae_encoder import LiteVAEEncoder
from autoencoder.sd_vae import Encoder as SDEncoder
from autoencoder.wavelets import haar_dwt_pyramid
from ldm.tools.benchmarking import (count_saved_bytes, format_table, machine_info, peak_memory_growth,
                                    peak_rss_growth, time_round_robin)
from ldm.tools.benchmarking import synchronize as synchronize_device
from ldm.util import count_params

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


# ----------------------------------------------------------------------------------------------- suites
def suite_encoder(args, ratios: dict) -> list[dict]:
    names = ["LiteVAE-S", "LiteVAE-B"] if args.quick else ["LiteVAE-S", "LiteVAE-B", "LiteVAE-M", "LiteVAE-L"]
    names.append("SD-VAE")
    batch = batch_for(args, 2, 4)
    x = images(args, batch)
    eager = {n: prepare(build_encoder(n), args, compile=False).eval() for n in names}
    # FLOPs are counted on each eager model's first call, which is also its warm-up (compiled ones get one more).
    flops = {n: flops_per_image(e, x, args) for n, e in eager.items()}
    encoders = {n: torch.compile(e) if args.compile else e for n, e in eager.items()}

    def forward(enc, fused):
        with torch.inference_mode(), autocast(args), use_fused_norm(fused):
            return enc(x)
    # LiteVAE-B and SD-VAE also with the fused GroupNorm+SiLU kernel where it can run (CUDA eager).
    candidates = {n: (n, False) for n in names}
    for suffix, fused in fused_variants(args).items():
        if fused:
            candidates.update({n + suffix: (n, True) for n in ("LiteVAE-B", "SD-VAE")})
    # Warm-up: compilation, and the Triton kernel's JIT on its first call (the eager models' warm-up was the
    # FLOP count).
    warmup = int(args.compile) + int(len(candidates) > len(names))
    secs = timed({c: (lambda n=n, f=f: forward(encoders[n], f)) for c, (n, f) in candidates.items()}, args, 3, 5,
                 warmup=warmup)
    tag = ratio_tag(args)
    # Equal per-FLOP efficiency would make the throughput ratio equal to this compute ratio.
    flop_ratio = flops["SD-VAE"] / flops["LiteVAE-B"]
    ratios["encoder_flop_ratio_sd_vs_B"] = round(flop_ratio, 3)
    ratios[f"encoder_throughput_B_vs_flop_ratio{tag}"] = round(secs["SD-VAE"] / secs["LiteVAE-B"] / flop_ratio, 3)
    cuda = torch.device(args.device).type == "cuda"
    rows = []
    for c, (n, fused) in candidates.items():
        sd = "SD-VAE fused" if fused else "SD-VAE"
        ratio = secs[sd] / secs[c]
        if n != "SD-VAE":
            ratios[f"encoder_throughput_{n[-1]}_vs_sd{ratio_tag(args, fused)}"] = round(ratio, 3)
        row = {"suite": "encoder", "name": c, "params": count_params(encoders[n]),
               "images_per_s": round(batch / secs[c], 3), "ratio_vs_sd_vae": round(ratio, 2),
               "gflop_per_image": round(flops[n] / 1e9, 1),
               "achieved_gflop_per_s": round(flops[n] * batch / secs[c] / 1e9, 1),
               "batch": batch, "resolution": args.resolution, "compiled": args.compile}
        if cuda:  # against the H200's compute roof (the memory roof needs --suite roofline's byte count)
            row["fraction_of_h200_flops"] = round(flops[n] * batch / secs[c] / H200_PEAK_FLOPS, 3)
        rows.append(row)
    return rows


def flops_per_image(encoder: nn.Module, x: torch.Tensor, args) -> float:
    """FLOPs (2 per multiply-accumulate) per image of a forward on ``x``, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode(), autocast(args):
        encoder(x)
    return counter.get_total_flops() / len(x)


def activation_bytes(encoder: nn.Module, x: torch.Tensor, bytes_per_element: int = 2) -> dict[str, float]:
    """Per image, the activation bytes a forward moves under three models (one call each):

    - ``conv``: every convolution reads its input once and writes its output once; GroupNorm, SiLU, residual
      adds and concatenations are fused into them (the ideal fusion; a lower bound for layer-by-layer
      execution). Counted by forward hooks.
    - ``conv+gn``: as ``conv`` plus one more read of every GroupNorm input for its statistics (what a fused
      GroupNorm+SiLU kernel in front of each convolution needs at the least).
    - ``every op``: every tensor operation reads its inputs and writes its output once (unfused eager
      execution, all in bf16; under CUDA autocast GroupNorm's output is fp32, so eager moves more still).
      Counted by a dispatch mode over the aten operations.

    Weights are left out (read once per batch, amortised over batch 32); ``bytes_per_element`` 2 is bf16.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    weights = {p.data_ptr() for p in encoder.parameters()}
    totals = {"conv": 0, "gn": 0, "ops": 0}

    def hook(kind):
        def count(module, inputs, output):
            totals[kind] += inputs[0].numel() + (output.numel() if kind == "conv" else 0)
        return count

    class CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket not in (torch.ops.aten.view, torch.ops.aten._unsafe_view, torch.ops.aten.detach,
                                           torch.ops.aten.t, torch.ops.aten.permute, torch.ops.aten.unsqueeze):
                flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
                totals["ops"] += sum(t.numel() for t in flat
                                     if isinstance(t, torch.Tensor) and t.data_ptr() not in weights)
            return out
    handles = [m.register_forward_hook(hook("conv" if isinstance(m, nn.Conv2d) else "gn"))
               for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.GroupNorm))]
    try:
        with torch.inference_mode():
            encoder(x)
        handles, old = [], handles
        for h in old:
            h.remove()
        with torch.inference_mode(), CountOps():
            encoder(x)
    finally:
        for h in handles:
            h.remove()
    conv = totals["conv"] * bytes_per_element / len(x)
    return {"conv": conv, "conv+gn": conv + totals["gn"] * bytes_per_element / len(x),
            "every op": totals["ops"] * bytes_per_element / len(x)}


def suite_roofline(args, ratios: dict) -> list[dict]:
    """FLOPs and minimum activation bytes per image (counted on CPU, one forward each), and the H200's
    upper bound on images/s: min(peak FLOP/s / FLOPs, bandwidth / bytes). Docs: docs/benchmarks.md."""
    x = torch.rand(1, 3, args.resolution, args.resolution) * 2 - 1
    ridge = H200_PEAK_FLOPS / H200_PEAK_BYTES_PER_S
    rows = []
    for n in ("LiteVAE-B", "SD-VAE"):
        enc = build_encoder(n).eval()
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            enc(x)
        flops = counter.get_total_flops()
        for model, nbytes in activation_bytes(enc, x).items():
            intensity = flops / nbytes
            bound = min(H200_PEAK_FLOPS / flops, H200_PEAK_BYTES_PER_S / nbytes)
            rows.append({"suite": "roofline", "name": n, "bytes_model": model, "gflop_per_image": round(flops / 1e9, 2),
                         "min_mbytes_per_image": round(nbytes / 1e6, 1), "flop_per_byte": round(intensity, 1),
                         "h200_ridge_flop_per_byte": round(ridge, 1),
                         "binding_limit": "compute" if intensity >= ridge else "memory",
                         "h200_bound_images_per_s": round(bound), "resolution": args.resolution})
            ratios[f"roofline_bound_images_per_s_{n}_{model.replace(' ', '_')}"] = round(bound)
    return rows


def _probe_command(name: str, args, batch: int) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe-memory", name, "--device", args.device,
           "--resolution", str(args.resolution), "--batch", str(batch), "--threads", str(torch.get_num_threads())]
    return cmd + ["--bf16"] * args.bf16 + ["--channels-last"] * args.channels_last


def probe_memory(args) -> int:
    """In a fresh process: build the encoder, then measure one inference forward's peak growth, first as
    RSS (CPU; includes the first call's oneDNN caches) and then as allocated tensor bytes."""
    enc = prepare(build_encoder(args.probe_memory), args).eval()
    x = images(args, args.batch)

    def forward():
        with torch.inference_mode(), autocast(args):
            enc(x)
    cpu = torch.device(args.device).type == "cpu"
    rss = peak_rss_growth(forward) if cpu else None  # CPU: the first call's RSS, oneDNN caches included
    if not cpu:
        forward()  # warm-up: cuDNN autotuning and library workspaces are not activations
    print(json.dumps({"allocated": peak_memory_growth(forward, args.device), "rss": rss}))
    return 0


def checkpoint_inputs_bytes(batch: int, resolution: int) -> int:
    """Bytes the checkpointed LiteVAE keeps alive for recomputation (its UNet inputs; fp32, not seen by
    saved-tensor hooks): 12 wavelet bands per level at H/2^l plus the aggregator's 36 channels at H/8."""
    bands = sum(12 * (resolution // 2**level) ** 2 for level in (1, 2, 3))
    return 4 * batch * (bands + 36 * (resolution // 8) ** 2)


def suite_memory(args, ratios: dict) -> list[dict]:
    names = ["LiteVAE-B", "SD-VAE"]
    batch = batch_for(args, 2, 4)
    rows, inference, rss, saved = [], {}, {}, {}
    # One fresh process per model (peak RSS is a per-process high-water mark), both at once: only memory is
    # measured there, not time. A fixed mmap threshold makes glibc return every freed block >= 64 KiB to the
    # OS at once, so the RSS follows the live tensors (the default dynamic threshold lets them linger, +-30 %).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    probes = {n: subprocess.Popen(_probe_command(n, args, batch), stdout=subprocess.PIPE, text=True, env=env)
              for n in names}
    for n, proc in probes.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"memory probe for {n} failed (exit {proc.returncode})")
        probe = json.loads(out.strip().splitlines()[-1])
        inference[n], rss[n] = probe["allocated"], probe["rss"]
    x = images(args, batch)
    for n, ckpt in (("LiteVAE-B", False), ("LiteVAE-B", True), ("SD-VAE", False)):
        enc = prepare(build_encoder(n, checkpointing=ckpt), args).train()
        with count_saved_bytes(exclude=enc.parameters()) as counted, autocast(args):
            enc(x)
        label = n + (" (checkpointing)" if ckpt else "")
        saved[label] = counted["bytes"] + (checkpoint_inputs_bytes(batch, args.resolution) if ckpt else 0)
        if torch.device(args.device).type == "cuda":
            saved[label + " cuda_train_peak"] = peak_memory_growth(
                lambda enc=enc: _train_forward_backward(enc, x, args), args.device)
        del enc
    mib = 2**20
    ratios["inference_peak_mem_B_vs_sd"] = round(inference["LiteVAE-B"] / inference["SD-VAE"], 3)
    ratios["train_saved_bytes_B_vs_sd"] = round(saved["LiteVAE-B"] / saved["SD-VAE"], 3)
    ratios["train_saved_bytes_B_ckpt_vs_sd"] = round(saved["LiteVAE-B (checkpointing)"] / saved["SD-VAE"], 3)
    for n in names:
        rows.append({"suite": "memory", "name": f"{n} inference peak allocated", "MiB": round(inference[n] / mib, 1),
                     "ratio_vs_sd_vae": round(inference[n] / inference["SD-VAE"], 3)})
    if rss["SD-VAE"]:  # CPU only: RSS adds what is not tensors (oneDNN primitive/weight caches, malloc arena)
        ratios["inference_peak_rss_B_vs_sd"] = round(rss["LiteVAE-B"] / rss["SD-VAE"], 3)
        rows += [{"suite": "memory", "name": f"{n} inference peak RSS growth", "MiB": round(rss[n] / mib, 1),
                  "ratio_vs_sd_vae": round(rss[n] / rss["SD-VAE"], 3)} for n in names]
    for label, b in saved.items():
        ref = saved["SD-VAE cuda_train_peak" if "cuda" in label else "SD-VAE"]
        rows.append({"suite": "memory", "name": f"{label} saved for backward" if "cuda" not in label else label,
                     "MiB": round(b / mib, 1), "ratio_vs_sd_vae": round(b / ref, 3)})
    for r in rows:
        r.update(batch=batch, resolution=args.resolution)
    return rows


def _train_forward_backward(enc: nn.Module, x: torch.Tensor, args) -> None:
    with autocast(args):
        out = enc(x)
    out.float().square().mean().backward()
    enc.zero_grad(set_to_none=True)


def suite_dwt(args, ratios: dict) -> list[dict]:
    import ptwt

    batch = batch_for(args, 4, 16)
    x = torch.randn(batch, 3, args.resolution, args.resolution, device=args.device)

    def ptwt_levels(inp):  # the paper's way: one wavedec2 per level, bands scaled by 1/2^level
        out = []
        for level in (1, 2, 3):
            coeffs = ptwt.wavedec2(inp, "haar", level=level, mode="symmetric")
            out.append(torch.cat([coeffs[0], *coeffs[1]], dim=1) / 2**level)
        return out

    xg = x.clone().requires_grad_(True)
    fns = {
        "fast fwd": lambda: haar_dwt_pyramid(x, 3),
        "ptwt fwd": lambda: ptwt_levels(x),
        "fast fwd+bwd": lambda: sum(t.sum() for t in haar_dwt_pyramid(xg, 3)).backward(),
        "ptwt fwd+bwd": lambda: sum(t.sum() for t in ptwt_levels(xg)).backward(),
    }
    secs = timed(fns, args, 7, 20)
    err = max((a - b).abs().max().item() for a, b in zip(haar_dwt_pyramid(x, 3), ptwt_levels(x)))
    ratios["dwt_max_abs_err"] = err
    rows = []
    for mode, key in (("fwd", "dwt_fwd_speedup_vs_ptwt"), ("fwd+bwd", "dwt_fwdbwd_speedup_vs_ptwt")):
        ratios[key] = round(secs[f"ptwt {mode}"] / secs[f"fast {mode}"], 3)
        rows.append({"suite": "dwt", "name": f"fast DWT {mode}", "ms": round(1e3 * secs[f"fast {mode}"], 2),
                     "ptwt_ms": round(1e3 * secs[f"ptwt {mode}"], 2), "speedup_vs_ptwt": ratios[key],
                     "max_abs_err": err, "batch": batch, "resolution": args.resolution})
    return rows


class _RandomImages(torch.utils.data.Dataset):
    def __init__(self, n: int, resolution: int):
        self.n, self.resolution = n, resolution

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"key": f"{i:08d}", "image": torch.rand(3, self.resolution, self.resolution, generator=g) * 2 - 1}


def _autoencoder(encoder: str, args, decoder_ch: int = 128, checkpointing: bool = False) -> nn.Module:
    from autoencoder.model import Autoencoder

    enc_cfg = ({"target": "autoencoder.sd_vae.Encoder", "params": {"z_channels": 4}} if encoder == "SD-VAE" else
               {"target": "autoencoder.litevae_encoder.LiteVAEEncoder",
                "params": {"size": encoder.split("-")[1], "z_channels": 4,
                           "activation_checkpointing": checkpointing}})
    dec_cfg = {"target": "autoencoder.sd_vae.Decoder", "params": {"z_channels": 4, "ch": decoder_ch}}
    return prepare(Autoencoder(enc_cfg, dec_cfg, z_channels=4), args)


def _write_jpegs(folder: Path, n: int, resolution: int) -> None:
    """``n`` smooth random RGB images as quality-90 JPEGs (upsampled noise: photo-like decode cost)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        low = torch.rand(1, 3, resolution // 16, resolution // 16, generator=g)
        img = torch.nn.functional.interpolate(low, size=(resolution, resolution), mode="bilinear")[0]
        Image.fromarray((img.permute(1, 2, 0) * 255).byte().numpy()).save(folder / f"{i:06d}.jpg", quality=90)


def suite_cache(args, ratios: dict) -> list[dict]:
    """The whole caching path (dataset, encode, posterior, fp16 npy into tar shards, statistics) vs the bare
    encoder forward on the same images and batch size; and, as the second limit, image decoding alone: the
    loader over JPEG files (decode, resize, crop) with the same workers, and caching from those files."""
    from ldm.data import ImageFolder
    from ldm.data.latent_cache import CacheOptions, cache_rank

    batch = batch_for(args, 2, 8)
    n = batch * (1 if args.quick else 4)
    # The script's default loader workers (4) on CUDA; on CPU the encoder already uses every core.
    workers = 4 if torch.device(args.device).type == "cuda" else 0
    model = _autoencoder("LiteVAE-B", args).eval()
    data = _RandomImages(n, args.resolution)
    x = torch.stack([data[i]["image"] for i in range(batch)]).to(args.device)
    tmp = tempfile.TemporaryDirectory()
    jpegs = Path(tmp.name) / "jpeg"
    jpegs.mkdir()
    _write_jpegs(jpegs, n, args.resolution)
    files = ImageFolder(jpegs, args.resolution)
    runs = iter(range(10**6))

    def bare():
        for _ in range(n // batch):
            with torch.no_grad(), autocast(args):
                model.encoder(x)

    def cache(dataset=data):
        opts = CacheOptions(out_dir=f"{tmp.name}/{next(runs)}", batch_size=batch, samples_per_shard=n,
                            precision="bf16" if args.bf16 else "fp32", num_workers=workers)
        cache_rank(model, dataset, opts, device=args.device)

    def decode_only():
        loader = torch.utils.data.DataLoader(files, batch_size=batch, num_workers=workers,
                                             pin_memory=torch.device(args.device).type == "cuda")
        for b in loader:
            b["image"].to(args.device, non_blocking=True)
        synchronize_device(args.device)
    fns = {"bare encoder": bare, "cache_latents": cache, "decode only (JPEG loader)": decode_only,
           "cache_latents (JPEG files)": lambda: cache(files)}
    secs = timed(fns, args, 2, 3)
    tmp.cleanup()
    ratios["cache_vs_bare_encoder_throughput"] = round(secs["bare encoder"] / secs["cache_latents"], 3)
    ratios["decode_only_vs_bare_encoder_throughput"] = round(secs["bare encoder"] / secs["decode only (JPEG loader)"], 3)
    ratios["cache_jpeg_vs_bare_encoder_throughput"] = round(secs["bare encoder"] / secs["cache_latents (JPEG files)"], 3)
    return [{"suite": "cache", "name": k, "images_per_s": round(n / s, 2),
             "ratio_vs_bare": round(secs["bare encoder"] / s, 3), "images": n, "batch": batch,
             "resolution": args.resolution, "workers": workers, "encoder": "LiteVAE-B"} for k, s in secs.items()]


def suite_tiling(args, ratios: dict) -> list[dict]:
    """LiteVAE-B encoding of 1024x1024 images whole vs by 512-px tiles overlapping by 64 px (ldm.tiling):
    throughput and peak allocated tensor memory. Tiles trade extra compute (3x3 tiles cover the image 2.25
    times) for a peak set by the tile, not the image."""
    from ldm.tiling import DEFAULT_OVERLAP, encode_tiled

    resolution, tile = 1024, 512
    batch = batch_for(args, 1, 1, cuda=4)
    model = _autoencoder("LiteVAE-B", args).eval()
    x = images(args, batch, resolution)

    def whole():
        with torch.inference_mode(), autocast(args):
            model.encode(x)

    def tiled():
        with torch.inference_mode(), autocast(args):
            encode_tiled(model, x, tile, DEFAULT_OVERLAP)
    fns = {"whole image": whole, f"tiles {tile}/{DEFAULT_OVERLAP}": tiled}
    secs = timed(fns, args, 1, 3)
    peak = {n: peak_memory_growth(fn, args.device) for n, fn in fns.items()}
    w, t = "whole image", f"tiles {tile}/{DEFAULT_OVERLAP}"
    ratios["tiled_vs_whole_encode_throughput"] = round(secs[w] / secs[t], 3)
    ratios["tiled_vs_whole_encode_peak_mem"] = round(peak[t] / peak[w], 3)
    return [{"suite": "tiling", "name": f"LiteVAE-B encode, {n}", "images_per_s": round(batch / s, 3),
             "peak_MiB": round(peak[n] / 2**20, 1), "throughput_vs_whole": round(secs[w] / s, 3),
             "peak_vs_whole": round(peak[n] / peak[w], 3), "batch": batch, "resolution": resolution}
            for n, s in secs.items()]


def suite_train_ae(args, ratios: dict) -> list[dict]:
    """One full first-stage training step (forward, full generator loss with LPIPS-VGG (random trunk:
    same cost) + wavelet + Gaussian + adversarial terms, backward, Adam step), same SD decoder for both."""
    from autoencoder.losses import AutoencoderLoss

    resolution = args.train_resolution or (64 if args.quick else 128)
    batch = batch_for(args, 1, 2, cuda=8)
    x = images(args, batch, resolution)
    steps = {}
    # One loss module for all candidates (the same LPIPS trunk and discriminator; only the autoencoder steps).
    torch.manual_seed(0)
    loss = prepare(AutoencoderLoss(lpips={"if_missing": "random"}, disc_start=0,
                                   discriminator={"target": "autoencoder.discriminator.UNetDiscriminator"}), args)
    # The checkpointed LiteVAE-B (saved bytes ~0, see the memory suite) pays one extra encoder forward.
    for name in ("LiteVAE-B", "LiteVAE-B (checkpointing)", "SD-VAE"):
        torch.manual_seed(0)
        model = _autoencoder(name.split(" ")[0], args, checkpointing="checkpointing" in name).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)

        def step(model=model, opt=opt, fused=False):
            with autocast(args), use_fused_norm(fused):
                xrec, posterior = model(x)
                g_loss, _ = loss.generator_loss(x, xrec, posterior, 1, last_layer=model.last_layer)
            g_loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = step
        for suffix, fused in fused_variants(args).items():
            if fused and "checkpointing" not in name:
                steps[name + suffix] = lambda step=step: step(fused=True)
    secs = timed(steps, args, 2, 3, warmup=1 + int(args.compile))
    for suffix, fused in fused_variants(args).items():
        tag = ratio_tag(args, fused)
        ratios[f"train_ae_step_speedup_B_vs_sd{tag}"] = round(secs["SD-VAE" + suffix] / secs["LiteVAE-B" + suffix], 3)
    ratios[f"train_ae_step_speedup_B_ckpt_vs_sd{ratio_tag(args)}"] = round(
        secs["SD-VAE"] / secs["LiteVAE-B (checkpointing)"], 3)
    return [{"suite": "train-ae", "name": n, "s_per_step": round(s, 3), "speedup_vs_sd_vae":
             round(secs["SD-VAE"] / s, 3), "batch": batch, "resolution": resolution} for n, s in secs.items()]


def suite_train_ldm(args, ratios: dict) -> list[dict]:
    """One diffusion training step (UNet on 4-channel latents) on cached latents vs encoding the images
    live with a frozen LiteVAE-B first."""
    from ldm.diffusion import diffusion_loss, make_schedule
    from ldm.modules.unet import UNetModel

    resolution = args.train_resolution or (64 if args.quick else 256)
    batch = batch_for(args, 2, 4)
    x = images(args, batch, resolution)
    encoder = prepare(build_encoder("LiteVAE-B"), args).eval().requires_grad_(False)
    unet = prepare(UNetModel(4, 4, 64 if args.quick else 128, channel_mult=(1, 2, 4), attention_resolutions=(2, 4)),
                   args).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    schedule = make_schedule()
    with torch.no_grad():
        cached = encoder(x)[:, :4].float()

    def step(live: bool):
        if live:
            with torch.no_grad(), autocast(args):
                z = encoder(x)[:, :4].float()
        else:
            z = cached
        with autocast(args):
            loss, _ = diffusion_loss(unet, z, schedule)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    secs = timed({"cached latents": lambda: step(False), "live encoding": lambda: step(True)}, args, 2, 3)
    ratios["train_ldm_cached_vs_live_speedup"] = round(secs["live encoding"] / secs["cached latents"], 3)
    return [{"suite": "train-ldm", "name": n, "s_per_step": round(s, 3),
             "speedup_vs_live": round(secs["live encoding"] / s, 3), "batch": batch,
             "image_resolution": resolution} for n, s in secs.items()]


def suite_profile(args, ratios: dict) -> list[dict]:
    """Per-kernel profile of one training forward+backward of LiteVAE-B and SD-VAE (and with the fused
    GroupNorm+SiLU kernel where it runs): the top kernels by self device time (CPU: self CPU time), printed
    in full and returned as rows."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(args.device).type == "cuda"
    batch = batch_for(args, 1, 1)
    x = images(args, batch)
    rows = []
    for name in ("LiteVAE-B", "SD-VAE"):
        enc = prepare(build_encoder(name), args).train()
        for suffix, fused in fused_variants(args).items():
            def step(enc=enc, fused=fused):
                _train_forward_backward_fused(enc, x, args, fused)
            step()  # warm-up: cuDNN autotuning, Triton JIT
            synchronize_device(args.device)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                step()
                synchronize_device(args.device)
            events = prof.key_averages()
            attr = "self_device_time_total" if cuda else "self_cpu_time_total"
            # On CUDA the kernels themselves (device events), so that no time is counted twice through the
            # aten ops that launched them.
            kernels = [e for e in events if not cuda or e.device_type == torch.autograd.DeviceType.CUDA] or events
            total = sum(getattr(e, attr) for e in kernels)
            top = sorted(kernels, key=lambda e: getattr(e, attr), reverse=True)[:12]
            print(f"\n{name}{suffix}: forward+backward, batch {batch}, {args.resolution}², "
                  f"{total / 1e3:.1f} ms self time in all")
            print(events.table(sort_by=attr, row_limit=25))
            ratios[f"profile_fwd_bwd_ms_{name}{ratio_tag(args, fused)}"] = round(total / 1e3, 2)
            rows += [{"suite": "profile", "name": name + suffix, "kernel": e.key[:70],
                      "self_ms": round(getattr(e, attr) / 1e3, 3), "calls": e.count,
                      "share": round(getattr(e, attr) / total, 3)} for e in top]
        del enc
    return rows


def suite_train(args, ratios: dict) -> list[dict]:
    """The tiny configs' training steps through pl.Trainer (ldm/tools/train_speed.py), interleaved."""
    from ldm.tools.train_speed import run

    repeats = args.repeats or (2 if args.quick else 3)
    rows = run(steps=8 if args.quick else 30, warmup=3 if args.quick else 5, repeats=repeats)
    for row in rows[1:]:
        ratios["train_" + "_".join(row["name"].replace(",", "").split()) + "_of_reference"] = row["fraction_of_reference"]
    return rows


def suite_step_profile(args, ratios: dict) -> list[dict]:
    """Where each tiny step's time goes, per part and per op (ldm/tools/step_profile.py), as markdown tables."""
    from ldm.tools.step_profile import markdown, profile_step
    from ldm.tools.train_speed import VARIANTS, reference_rate

    flops, call = reference_rate()
    reference = flops / timed({"reference": call}, args, 2, 3)["reference"] / 1e9
    rows = []
    for variant in VARIANTS:
        report = profile_step(variant, reference)
        print(markdown(report) + "\n")
        rows.append({"suite": "step-profile", "name": variant.name, "step_ms": round(report["step_s"] * 1e3, 1),
                     "gflop": round(report["gflop"], 2)})
    return rows


def _train_forward_backward_fused(enc: nn.Module, x: torch.Tensor, args, fused: bool) -> None:
    with use_fused_norm(fused):
        _train_forward_backward(enc, x, args)


# Memory first: its fresh-process RSS probe measured 122/266 MiB (LiteVAE-B/SD-VAE) when the parent had run
# nothing yet but 745/641 MiB after the parent had run the encoder suite (cause not established; the
# allocated-bytes figure was 110.6/256.6 MiB both times), so `--suite all` matches `--suite memory`.
SUITES = {"memory": suite_memory, "encoder": suite_encoder, "dwt": suite_dwt, "cache": suite_cache,
          "train-ae": suite_train_ae, "train-ldm": suite_train_ldm}
# Run only by name: tiling (fixed 1024x1024 images, minutes on a CPU); roofline (counts, no timing; on CPU);
# profile (per-kernel tables of a training forward+backward; meant for CUDA); train and step-profile (the tiny
# configs' training steps through pl.Trainer, and where their time goes; CPU, minutes).
EXTRA_SUITES = {"tiling": suite_tiling, "roofline": suite_roofline, "profile": suite_profile, "train": suite_train,
                "step-profile": suite_step_profile}


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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="encoder", choices=[*SUITES, *EXTRA_SUITES, "all"])
    p.add_argument("--quick", action="store_true", help="small batches, few repeats (about a minute on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resolution", type=int, default=256, help="encoder/memory/dwt/cache image size")
    p.add_argument("--train-resolution", type=int, default=0, help="train-ae/train-ldm image size (0: default)")
    p.add_argument("--batch", type=int, default=0, help="0: suite default (CPU small; CUDA 32)")
    p.add_argument("--repeats", type=int, default=0, help="0: suite default")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on for CUDA, off for CPU)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last models and inputs (default: on for CUDA, off for CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (slow first call)")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.backends.cudnn.benchmark (default: on; CUDA only)")
    p.add_argument("--out", default="", help="write machine, arguments, rows and ratios as JSON here")
    p.add_argument("--probe-memory", default="", help=argparse.SUPPRESS)  # internal: fresh-process probe
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.bf16 = cuda if args.bf16 is None else args.bf16
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # Every suite runs fixed shapes, so let cuDNN pick its fastest kernels (during the warm-up calls).
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if args.probe_memory:
        return probe_memory(args)
    torch.manual_seed(0)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    rows, ratios, seconds = [], {}, {}
    for name in suites:
        t0 = time.perf_counter()
        rows += {**SUITES, **EXTRA_SUITES}[name](args, ratios)
        seconds[name] = round(time.perf_counter() - t0, 1)
    info = machine_info()
    print(f"machine: {info}")
    print(f"suite seconds: {seconds}")
    print(format_table(rows))
    cuda = torch.device(args.device).type == "cuda"
    print(f"\nratios (targets are the {'GPU' if cuda else 'CPU'} targets of the performance issue):")
    print("\n".join(check_targets(ratios, GPU_TARGETS if cuda else TARGETS)))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": info, "args": vars(args), "suite_seconds": seconds,
                                              "results": rows, "ratios": ratios}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
