"""Training steps: the full autoencoder step (LiteVAE-B vs SD-VAE encoder), the diffusion step on cached vs
live latents, and the tiny configs' steps through pl.Trainer with where their time goes (``train_speed``,
``step_profile``)."""
from __future__ import annotations

import torch

from autoencoder.fused_norm import use_fused_norm
from lab.bench.common import (autocast, autoencoder, batch_for, build_encoder, fused_variants, images, prepare,
                                   ratio_tag, timed)


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
        model = autoencoder(name.split(" ")[0], args, checkpointing="checkpointing" in name).train()
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


def suite_train(args, ratios: dict) -> list[dict]:
    """The tiny configs' training steps through pl.Trainer (lab/bench/train_speed.py), interleaved."""
    from lab.bench.train_speed import run

    repeats = args.repeats or (2 if args.quick else 3)
    rows = run(steps=8 if args.quick else 30, warmup=3 if args.quick else 5, repeats=repeats)
    for row in rows[1:]:
        key = "_".join(row["name"].replace(",", "").split())
        ratios[f"train_{key}_of_reference"] = row["fraction_of_reference"]
    return rows


def suite_step_profile(args, ratios: dict) -> list[dict]:
    """Where each tiny step's time goes, per part and per op (lab/bench/step_profile.py), as markdown tables."""
    from lab.bench.step_profile import markdown, profile_step
    from lab.bench.train_speed import VARIANTS, reference_rate

    flops, call = reference_rate()
    reference = flops / timed({"reference": call}, args, 2, 3)["reference"] / 1e9
    rows = []
    for variant in VARIANTS:
        report = profile_step(variant, reference)
        print(markdown(report) + "\n")
        rows.append({"suite": "step-profile", "name": variant.name, "step_ms": round(report["step_s"] * 1e3, 1),
                     "gflop": round(report["gflop"], 2)})
    return rows
