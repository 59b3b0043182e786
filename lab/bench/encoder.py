"""Encoder forward throughput: LiteVAE-S/B(/M/L) against the SD-VAE encoder, with FLOPs and achieved GFLOP/s."""
from __future__ import annotations

import torch

from autoencoder.fused_norm import use_fused_norm
from lab.bench.common import (H200_PEAK_FLOPS, autocast, batch_for, build_encoder, flops_per_image,
                                   fused_variants, images, prepare, ratio_tag, timed)
from ldm.util import count_params


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
