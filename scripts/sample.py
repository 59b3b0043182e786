#!/usr/bin/env python
"""Sample a trained latent diffusion model into a PNG folder, ``samples.npz`` and ``grid.png``.

  python scripts/sample.py logs/<stage-2 run> --seeds 0-999 --batch 64 --out samples/
  python scripts/sample.py logs/<run>/checkpoints/last.ckpt --seeds 0-63 --class 3 --cfg 3
  torchrun --nproc_per_node=8 scripts/sample.py logs/<run> --seeds 0-49999 --batch 125 --precision bf16

The checkpoint records its first stage (config, checkpoint, SHA-256, EMA/raw weights) and decodes with it, so
no latent cache is needed; --first-stage gives another copy of it (e.g. the stage-1 export), and whatever is
loaded must be the recorded first stage (else an error naming both hashes; --allow-first-stage-mismatch turns
it into a warning).

Every image depends only on its seed (and class / prompt): any --batch and any number of processes give the
same images. With torchrun each rank samples seeds[rank::world] and writes its PNGs; rank 0 then collects them
into samples.npz.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from ldm.artifact_kinds import DIFFUSION_MODELS, FIRST_STAGES, argument
from ldm.checkpoints import load_diffusion, resolve_source
from ldm.diffusion.objectives import DDPM_SAMPLERS, FLOW_SAMPLERS
from ldm.precision import PRECISIONS
from ldm.locks import LockError, output_lock
from ldm.generate import Seeds, generate, labels_for_seeds, parse_seeds
from ldm.sample_folder import (SampleFolderError, check_request_fits, check_sample_folder, read_pngs, sample_record,
                               write_outputs, write_pngs, write_record)
from ldm.script_options import (setup_logging, add_batch_size, add_device, add_out, check_output_dir, non_negative_float,
                            non_negative_int, positive_int)
from ldm.script_options import add_tiling_args, check_tiling_args
from ldm.util import join_torchrun_group, pick_device, sha256_file

log = logging.getLogger("sample")


def seed_list(spec: str) -> Seeds:
    """``--seeds`` parsed at argument time (lazily: ranges), so a bad list fails naming the flag."""
    try:
        return parse_seeds(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/sample.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=argument(DIFFUSION_MODELS), help="stage-2 run folder, a .ckpt inside one, or a scripts/export.py .safetensors")
    add_out(p, "output folder (default: <run>/samples/<checkpoint>_<settings>)")
    p.add_argument("--seeds", type=seed_list, default="0-63", help="e.g. 0-999 or 1,5,7 (inclusive ranges)")
    add_batch_size(p, 32, "samples per forward pass (per process)")
    p.add_argument("--steps", type=positive_int, help="sampling steps (default: the config's sample_steps)")
    p.add_argument("--eta", type=non_negative_float, help="DDIM eta (0: deterministic)")
    p.add_argument("--cfg", type=non_negative_float, help="classifier-free guidance scale (1: off; default: the config's)")
    p.add_argument("--sampler", choices=(*DDPM_SAMPLERS, *FLOW_SAMPLERS),
                   help="default: ddim for a DDPM model, heun for a flow model. DDPM: ddim | ddpm | dpmpp2m "
                        "(DPM-Solver++(2M), accurate in fewer steps than DDIM); flow: euler | heun (ODE) | "
                        "euler_maruyama (SDE)")
    p.add_argument("--class", dest="class_label", type=non_negative_int, help="class for all samples (default: seed %% classes)")
    p.add_argument("--prompt", help="text prompt (text-conditional models)")
    p.add_argument("--first-stage", type=argument(FIRST_STAGES), help="stage-1 run folder / .ckpt / .safetensors to decode with instead of the "
                   "recorded path (checked against the checkpoint's record)")
    p.add_argument("--allow-first-stage-mismatch", action="store_true",
                   help="decode even if the first stage is not the one the checkpoint records (warns)")
    p.add_argument("--no-ema", action="store_true",
                   help="use the raw UNet instead of the EMA copy (a training checkpoint; an export holds one UNet)")
    add_device(p)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="autocast for the UNet")
    p.add_argument("--decode-precision", choices=PRECISIONS, default="fp32",
                   help="autocast for the first-stage decoder; an fp16 batch that overflows (NaN/inf) is redone in "
                        "fp32, with a warning")
    add_tiling_args(p, "decode")
    return p


def default_out(args: argparse.Namespace) -> Path:
    source = Path(args.source)
    run = source if source.is_dir() else source.parent.parent
    ckpt = "last" if source.is_dir() else source.stem
    tag = f"{ckpt}_{args.sampler or 'default'}{args.steps or ''}_cfg{args.cfg if args.cfg is not None else 'default'}"
    return run / "samples" / tag


def request_record(args: argparse.Namespace, module: torch.nn.Module) -> dict:
    """What the output folder records about this request (``ldm.sample_folder``)."""
    ckpt = resolve_source(args.source)[1]
    source = {"checkpoint": str(ckpt.resolve()), "sha256": sha256_file(ckpt), "weights": "raw" if args.no_ema else "ema",
              "first_stage": module.first_stage_identity}
    settings = {key: getattr(args, key) for key in ("steps", "eta", "cfg", "sampler", "class_label", "prompt",
                                                    "precision", "decode_precision", "tile", "tile_overlap")}
    return sample_record(source, settings, args.seeds.spec)


def image_bytes(module: torch.nn.Module) -> int:
    """Bytes of one uint8 RGB sample: the latent size times the first stage's upsampling."""
    _, h, w = (int(v) for v in module.latent_shape.tolist())
    factor = getattr(module.first_stage, "downsample_factor", 1) if module.first_stage is not None else 1
    return 3 * h * w * factor * factor


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    rank, world, local_rank = join_torchrun_group()  # images travel between ranks as PNG files
    device = pick_device(args.device, local_rank)
    seeds = args.seeds
    # Checked before the model is loaded: a bad --out must not cost a whole sampling run.
    out = check_output_dir(Path(args.out) if args.out else default_out(args), "--out")
    try:
        module, _ = load_diffusion(args.source, use_ema=not args.no_ema, device=device, first_stage=args.first_stage,
                                   allow_first_stage_mismatch=args.allow_first_stage_mismatch)
    except (ValueError, FileNotFoundError) as err:  # a wrong or missing first stage, --no-ema on an export
        raise SystemExit(f"error: {err}") from None
    if module.first_stage is not None:
        check_tiling_args(args, module.first_stage)
    # One writer per folder (rank 0 holds the lock for all ranks), one request's samples per folder. Rank 0 claims
    # the folder and every rank hears its verdict before any rank writes an image: otherwise another rank's first
    # PNG can land before rank 0's check, which then sees images without samples.json and refuses its own folder.
    with contextlib.ExitStack() as held:
        error = None
        if rank == 0:
            try:
                held.enter_context(output_lock(out, what="scripts/sample.py"))
                record = request_record(args, module)
                check_sample_folder(out, record)
                check_request_fits(len(seeds), image_bytes(module), out)
                write_record(out, record)
            except (SampleFolderError, LockError) as err:
                error = str(err)
        error = from_rank0(error, world)
        if error is not None:
            raise SystemExit(f"error: {error}")
        sample_into(out, args, module, seeds, rank, world)
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def from_rank0(value: str | None, world: int) -> str | None:
    """Rank 0's ``value`` on every rank (as is without a process group)."""
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def sample_into(out: Path, args: argparse.Namespace, module: torch.nn.Module, seeds: Seeds, rank: int,
                world: int) -> None:
    labels = labels_for_seeds(seeds, module.num_classes, args.class_label)
    counts = np.bincount(labels, minlength=module.num_classes) if labels is not None else None
    if counts is not None and args.class_label is None and counts.min() != counts.max():
        # ADM-protocol evaluations (FID-50K on ImageNet) expect the same number of samples per class.
        log.warning("%d seeds over %d classes: not class-balanced (use a multiple of the class count, e.g. "
                    "0-49999 for 1000 classes)", len(seeds), module.num_classes)

    mine = seeds[rank::world]
    if mine:
        images, _ = generate(module, mine, batch_size=args.batch_size, steps=args.steps, eta=args.eta, cfg=args.cfg,
                             class_label=args.class_label, prompt=args.prompt, precision=args.precision,
                             sampler=args.sampler, progress=rank == 0, decode_precision=args.decode_precision,
                             tile=args.tile, tile_overlap=args.tile_overlap)
        write_pngs(out / "images", images, mine)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        npz = write_outputs(out, read_pngs(out / "images", seeds), seeds, labels)
        print(f"{len(seeds)} samples: {out / 'images'}, {npz}, {out / 'grid.png'}")
    if world > 1:
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
