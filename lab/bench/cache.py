"""Latent caching against the bare encoder forward, and image decoding alone (JPEG loader)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lab.bench.common import autocast, autoencoder, batch_for, timed
from lab.bench.measure import synchronize


class _RandomImages(torch.utils.data.Dataset):
    def __init__(self, n: int, resolution: int):
        self.n, self.resolution = n, resolution

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"key": f"{i:08d}", "image": torch.rand(3, self.resolution, self.resolution, generator=g) * 2 - 1}


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
    from ldm.cache.writer import CacheOptions, cache_rank

    batch = batch_for(args, 2, 8)
    n = batch * (1 if args.quick else 4)
    # The script's default loader workers (4) on CUDA; on CPU the encoder already uses every core.
    workers = 4 if torch.device(args.device).type == "cuda" else 0
    model = autoencoder("LiteVAE-B", args).eval()
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
        synchronize(args.device)
    fns = {"bare encoder": bare, "cache_latents": cache, "decode only (JPEG loader)": decode_only,
           "cache_latents (JPEG files)": lambda: cache(files)}
    secs = timed(fns, args, 2, 3)
    tmp.cleanup()
    for key, candidate in (("cache", "cache_latents"), ("decode_only", "decode only (JPEG loader)"),
                           ("cache_jpeg", "cache_latents (JPEG files)")):
        ratios[f"{key}_vs_bare_encoder_throughput"] = round(secs["bare encoder"] / secs[candidate], 3)
    return [{"suite": "cache", "name": k, "images_per_s": round(n / s, 2),
             "ratio_vs_bare": round(secs["bare encoder"] / s, 3), "images": n, "batch": batch,
             "resolution": args.resolution, "workers": workers, "encoder": "LiteVAE-B"} for k, s in secs.items()]
