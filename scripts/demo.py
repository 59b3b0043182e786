#!/usr/bin/env python
"""``make demo``: the whole pipeline on Fashion-MNIST 64x64 on a laptop CPU.

stage 1 (tiny LiteVAE, full loss)  ->  latent cache  ->  stage 2 (class-conditional LDM)  ->  samples
->  accuracy of a classifier trained on real images, on the generated ones.

Every stage is the public command a researcher would type (printed before it runs), so the demo is also
the tutorial. Runs land in ``logs/``, latents in ``latents/``, samples in ``samples/``. A finished stage is
recorded in ``<state-dir>/state.json`` and skipped when the demo runs again (an interrupted one resumes);
``--fresh`` starts over with new run folders (nothing is deleted).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from omegaconf import OmegaConf

from ldm.checkpoints import resolve_source
from ldm.script_options import add_detector
from lab.plots import class_grid
from lab.pipeline import ROOT, Pipeline, curve, manifest_summary, metric_keys
from lab.stages import CacheLatents, EvalSamples, Sample, Train

AE_CONFIG = "configs/autoencoder/litevae_tiny.yaml"
LDM_CONFIG = "configs/ldm/fmnist_litevae_tiny.yaml"
DATA_CONFIG = "configs/data/fmnist64_cache.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/demo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logdir", default="logs", help="parent of the run folders")
    p.add_argument("--latents", default="latents", help="parent of the latent cache (named after the stage-1 run)")
    p.add_argument("--samples", default="samples", help="parent of the sample folder (named after the stage-2 run)")
    p.add_argument("--state-dir", default="logs/demo", help="where state.json records finished stages")
    p.add_argument("--fresh", action="store_true", help="forget finished stages and start new runs")
    p.add_argument("--data", default=DATA_CONFIG, help="data config to cache (train + validation) and evaluate on")
    p.add_argument("--seeds", default="0-499", help="sample seeds; the class of seed s is s %% 10")
    p.add_argument("--seed", type=int, help="main.py -s for both training stages (default: main.py's, 23)")
    p.add_argument("--stage1-overrides", nargs="*", default=[], help="key=value overrides for stage 1")
    p.add_argument("--stage2-overrides", nargs="*", default=[], help="key=value overrides for stage 2")
    add_detector(p)
    return p


def stage1(pipe: Pipeline, args: argparse.Namespace) -> Path:
    run_dir = pipe.train("stage1", Train(bases=(AE_CONFIG,), logdir=args.logdir, name="demo_litevae", seed=args.seed,
                                         overrides=tuple(args.stage1_overrides)))
    psnr = curve(run_dir, "val/psnr_ema") or curve(run_dir, "val/psnr")
    print("\nstage 1 validation PSNR (EMA weights) by step: " + ", ".join(f"{s}: {v:.2f} dB" for s, v in psnr))
    if len(psnr) >= 2:
        print(f"PSNR {'rose' if psnr[-1][1] > psnr[0][1] else 'did NOT rise'}: "
              f"{psnr[0][1]:.2f} -> {psnr[-1][1]:.2f} dB")
    losses = [k for k in metric_keys(run_dir) if k.startswith("train/")]
    print(f"logged loss terms: {', '.join(losses)}")
    disc_start = OmegaConf.load(resolve_source(run_dir)[0]).model.params.loss.params.get("disc_start")
    if any(factor > 0 for _, factor in curve(run_dir, "train/disc_factor")):
        print(f"discriminator (full loss) on from step {disc_start} (model.params.loss.params.disc_start)")
    else:
        print(f"discriminator never switched on (disc_start {disc_start})")
    print(f"checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}; grids: {run_dir / 'images'}; "
          f"CSV log: {run_dir / 'csv'}")
    return run_dir


def cache(pipe: Pipeline, args: argparse.Namespace, ae_run: Path) -> Path:
    latents = Path(args.latents) / ae_run.name  # one cache per autoencoder: a new stage-1 run never mixes in
    for split in ("train", "validation"):
        pipe.command(f"cache_{split}", CacheLatents(ae=ae_run, data=args.data, split=split, out=latents, workers=0),
                     outputs=lambda _: [latents / "manifest.json"])
    print("\n" + manifest_summary(latents))
    return latents


def stage2_and_samples(pipe: Pipeline, args: argparse.Namespace, latents: Path) -> Path:
    run_dir = pipe.train("stage2", Train(bases=(LDM_CONFIG,), logdir=args.logdir, name="demo_ldm", seed=args.seed,
                                         overrides=(f"latents={latents}", *args.stage2_overrides)))
    loss = curve(run_dir, "val/loss_ema") or curve(run_dir, "val/loss")
    if loss:
        print("\nstage 2 validation loss by step: " + ", ".join(f"{s}: {v:.4f}" for s, v in loss))
    out = Path(args.samples) / run_dir.name
    pipe.command("sample", Sample(source=run_dir, seeds=args.seeds, batch_size=100, out=out),
                 outputs=lambda _: [out / "samples.npz", out / "grid.png"])
    return out


def accuracy(pipe: Pipeline, args: argparse.Namespace, samples: Path) -> dict:
    """The user's evaluation command, ``scripts/eval_fid.py`` (--detector only when not the default)."""
    result_file = samples / "eval.json"
    pipe.command("evaluate", EvalSamples(samples=samples / "samples.npz", ref=args.data, ref_split="validation",
                                         classifier_data=args.data, precision_recall=True,
                                         detector=args.detector if args.detector != "auto" else None,
                                         out=result_file),
                 outputs=lambda _: [result_file])
    return json.loads(result_file.read_text())


def fid_line(result: dict) -> str:
    """The demo's FID line: a distance between random features is no FID, so then it says none was computed."""
    if result["detector"]["comparable"]:
        return (f"FID {result['fid']:.2f} ({result['detector']['kind']} features, {result['n_samples']} samples vs "
                f"{result['n_ref']} real images: biased upward at this n, comparable only at equal n); precision "
                f"{result['precision']:.3f}, recall {result['recall']:.3f}")
    return ("no FID computed (--detector random): the random-feature distance "
            f"{result.get('random_feature_distance', result.get('fid')):.3g} is comparable within this run alone")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.chdir(ROOT)  # the printed commands and paths are relative to the repository root
    state_dir = Path(args.state_dir)
    if args.fresh and state_dir.exists():
        shutil.move(state_dir, state_dir.with_name(f"{state_dir.name}_{time.strftime('%Y%m%d-%H%M%S')}"))
    return run_demo(args, Pipeline(state_dir))


def run_demo(args: argparse.Namespace, pipe: Pipeline) -> int:
    """Every stage through ``pipe`` (tests give it a fake runner), then the summary."""
    t0 = time.time()
    ae_run = stage1(pipe, args)
    latents = cache(pipe, args, ae_run)
    samples = stage2_and_samples(pipe, args, latents)
    result = accuracy(pipe, args, samples)
    print(f"\nclassifier (trained on real Fashion-MNIST) recognises {100 * result['class_accuracy']:.1f}% of "
          f"{result['n_samples']} generated samples as their conditioning class (chance: 10%)")
    print(fid_line(result))
    grid = class_grid(samples / "samples.npz", samples / "class_grid.png")
    print(f"class-conditional sample grid (row c = class c): {grid}; first seeds: {samples / 'grid.png'}; "
          f"PNGs: {samples / 'images'}")
    times = ", ".join(f"{name} {sec / 60:.1f}" for name, sec in pipe.seconds().items())
    print(f"stage wall-clock (min): {times}; this invocation: {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    main()
