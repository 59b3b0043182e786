#!/usr/bin/env python
"""Latent probes of a first stage: cheap signals of how well its latents suit diffusion (ldm/evaluation/probes.py).

  python scripts/probe_latents.py --ae logs/<stage-1 run> --out eval/probes.json
  python scripts/probe_latents.py --ae <diffusers folder> --data configs/data/photos64.yaml --probes spectrum equivariance
  python scripts/probe_latents.py --ae model.safetensors --class-accuracy --classifier-cache eval/classifier.pt

The probes run on the first --max-samples images of the data's --split (default: the run's own data config,
validation split): spectrum (high-frequency fraction of latents vs images), equivariance (scale factors 2 and 4/3),
gaussian (MMD² of the normalised latents to N(0, I)), linear (a least-squares probe of the class, where labels
exist) and diffusion (a small flow-matching DiT trained for --diffusion-steps on 80 % of the latents: its
validation loss on a fixed time grid, and with --detector the KID of its samples against the images, with
--class-accuracy their class accuracy). Everything is seeded: the same command gives the same numbers.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any

from omegaconf import OmegaConf

from ldm.artifact_kinds import FIRST_STAGES, argument
from ldm.checkpoints import load_first_stage, resolve_source
from ldm.data.configs import dataset_config, deterministic
from ldm.evaluation import build_detector, data_loader
from ldm.evaluation.probes import PROBES, DiffusionProbe, first_images, run_probes
from ldm.evaluation.samples import reference_classifier
from ldm.io import markdown_table
from ldm.script_options import add_device, add_out, finish, positive_int, start


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/probe_latents.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ae", required=True, type=argument(FIRST_STAGES),
                   help="first stage: stage-1 run folder, .ckpt, export or diffusers folder")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--data", help="data config YAML; default: the stage-1 run's own data config")
    p.add_argument("--split", default="validation")
    p.add_argument("--max-samples", type=positive_int, default=512, help="images probed (the first N)")
    p.add_argument("--probes", nargs="+", choices=PROBES, default=list(PROBES))
    p.add_argument("--diffusion-steps", type=positive_int, default=DiffusionProbe.steps)
    p.add_argument("--diffusion-samples", type=positive_int, default=DiffusionProbe.samples)
    p.add_argument("--detector", help="features for the diffusion samples' KID (auto | inception | fid-helper | "
                                      "PATH | random); default: no KID")
    p.add_argument("--class-accuracy", action="store_true",
                   help="class accuracy of the diffusion samples by a classifier trained on the data's train split")
    p.add_argument("--classifier-cache", help="where that classifier is kept (reused when its settings match)")
    p.add_argument("--seed", type=int, default=0)
    add_device(p)
    add_out(p)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, device = start(build_parser(), argv)
    try:  # every file first: a missing one fails before any compute
        config = OmegaConf.load(args.data if args.data else resolve_source(args.ae)[0])
        data_cfg = deterministic(dataset_config(config, args.split))
        autoencoder, info = load_first_stage(args.ae, use_ema=args.weights == "ema", device=device)
        detector = build_detector(args.detector, device) if args.detector else None
        classifier = reference_classifier(dataset_config(config, "train"), args.classifier_cache, device=device) \
            if args.class_accuracy else None
        images, labels = first_images(data_loader(data_cfg, 64, max_samples=args.max_samples), args.max_samples)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
    probe = DiffusionProbe(steps=args.diffusion_steps, samples=args.diffusion_samples, seed=args.seed)
    autoencoder.eval()
    images, labels = images.to(device), (labels.to(device) if labels is not None else None)
    results = run_probes(autoencoder, images, labels, args.probes, probe, detector, classifier, args.seed)
    report = {"command": sys.argv if argv is None else ["probe_latents.py", *argv],
              "autoencoder": {k: v for k, v in info.items() if k != "weights"}, "weights": info["weights"],
              "data": {"config": data_cfg, "split": args.split, "n": len(images)},
              "diffusion_probe": asdict(probe) if "diffusion" in args.probes else None,
              "detector": None if detector is None else detector.describe(), "results": results}
    scalars = [{"probe": k, "value": v} for k, v in results.items() if isinstance(v, (int, float))]
    return finish(args.out, report, markdown_table(scalars, ["probe", "value"]))


if __name__ == "__main__":
    main()
