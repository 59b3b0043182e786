#!/usr/bin/env python
"""Export a trained model for release: ``.safetensors`` (EMA weights by default) + a config sidecar ``.yaml``.

    python scripts/export.py logs/<stage-1 run> --out release/litevae_b   # -> litevae_b.safetensors + .yaml
    python scripts/cache_latents.py --ae release/litevae_b.safetensors ...  # every --ae accepts the export
    python scripts/export.py logs/<stage-2 run> --out release/ldm_ffhq    # the EMA UNet + normalisation
    python scripts/sample.py release/ldm_ffhq.safetensors --first-stage release/litevae_b.safetensors ...
    python scripts/export.py logs/<stage-1 run> --format diffusers --scaling-factor 0.18 --out release/litevae_hf

The stage is read from the run's config. Loading is strict and needs no pickle (``safetensors``). Stage 1:
the sidecar holds the autoencoder's ``{target, params}``. Stage 2: the run's config, without EMA and cache, and
the first stage's identity (also in the .safetensors metadata), which sample.py checks --first-stage against.
--format diffusers (stage 1): a diffusers folder (config.json + diffusion_pytorch_model.safetensors) of
autoencoder/diffusers_model.py's LiteVAEModel, AutoencoderKL's interface, for diffusers pipelines.
"""
from __future__ import annotations

import argparse
import logging

from ldm.artifact_kinds import DIFFUSION_MODELS, Kind, require
from ldm.checkpoints import export_diffusion, export_first_stage
from ldm.script_options import add_out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/export.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="stage-1 or stage-2 run folder, or a .ckpt inside one")
    add_out(p, "output path without suffix (writes .safetensors and .yaml)", required=True)
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA copy")
    p.add_argument("--format", choices=("safetensors", "diffusers"), default="safetensors",
                   help="diffusers: a folder for diffusers pipelines (stage 1 only)")
    p.add_argument("--scaling-factor", type=float, default=1.0, help="--format diffusers: config.scaling_factor")
    p.add_argument("--shift-factor", type=float, help="--format diffusers: config.shift_factor")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        kind = require(args.source, {Kind.AUTOENCODER_RUN, Kind.DIFFUSION_RUN}, "source")
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.format == "diffusers":
        if kind in DIFFUSION_MODELS:
            raise SystemExit(f"error: --format diffusers exports first stages; {args.source} is a stage-2 model")
        from autoencoder.diffusers_model import export_diffusers  # needs diffusers: only for this format

        folder = export_diffusers(args.source, args.out, use_ema=not args.no_ema,
                                  scaling_factor=args.scaling_factor, shift_factor=args.shift_factor)
        print(f"wrote {folder}")
        return 0
    export = export_diffusion if kind in DIFFUSION_MODELS else export_first_stage
    weights, sidecar = export(args.source, args.out, use_ema=not args.no_ema)
    print(f"wrote {weights} and {sidecar}")
    return 0


if __name__ == "__main__":
    main()
