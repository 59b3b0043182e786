"""Tiled against whole-image encoding at 1024x1024: throughput and peak memory."""
from __future__ import annotations

import torch

from lab.bench.common import autocast, autoencoder, batch_for, images, timed
from lab.bench.measure import peak_memory_growth


def suite_tiling(args, ratios: dict) -> list[dict]:
    """LiteVAE-B encoding of 1024x1024 images whole vs by 512-px tiles overlapping by 64 px (ldm.tiling):
    throughput and peak allocated tensor memory. Tiles trade extra compute (3x3 tiles cover the image 2.25
    times) for a peak set by the tile, not the image."""
    from ldm.tiling import DEFAULT_OVERLAP, encode_tiled

    resolution, tile = 1024, 512
    batch = batch_for(args, 1, 1, cuda=4)
    model = autoencoder("LiteVAE-B", args).eval()
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
