#!/usr/bin/env python
"""Encode an image dataset once with a trained first stage and store the latents as WebDataset shards.

  python scripts/cache_latents.py --ae logs/<run> --data configs/data.yaml --split train --out latents/
  torchrun --nproc_per_node=8 scripts/cache_latents.py --ae logs/<run> --split train --out latents/
  python scripts/cache_latents.py --verify latents/     # every shard's size and SHA-256 against the manifest

Re-running the same command resumes: complete shards are kept, damaged or missing ones (size or SHA-256 other
than recorded) are encoded again. One process writes each (split, rank) of a folder (a lock file names it).
See ``ldm/cache/writer.py``.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

from ldm.artifact_kinds import FIRST_STAGES, argument
from ldm.script_options import (add_batch_size, add_device, add_out, add_workers, check_output_dir, non_negative_int,
                            positive_int)
from ldm.data.configs import dataset_config, deterministic
from ldm.cache.writer import CacheError, CacheOptions, cache_latents, merge_manifest
from ldm.cache.manifest import MANIFEST_NAME, Manifest
from ldm.checkpoints import load_first_stage, resolve_source
from ldm.locks import LockError
from ldm.precision import PRECISIONS
from ldm.script_options import add_tiling_args, check_tiling_args
from ldm.util import fit_workers, instantiate_from_config, join_torchrun_group, pick_device

log = logging.getLogger("cache_latents")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/cache_latents.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ae", type=argument(FIRST_STAGES), help="stage-1 run folder, .ckpt in one, or exported .safetensors "
                                               "(with config.yaml / <name>.yaml next to it)")
    p.add_argument("--ae-config", help="autoencoder/project config, overriding the one found from --ae")
    p.add_argument("--data", help="data config YAML: a dataset {target, params}, a DataModule node or a full "
                                  "project config (default: the stage-1 run's own data config)")
    p.add_argument("--split", default="train", help="split to cache (data.params.<split>); names the shards")
    add_out(p, "output folder (shards + manifest.json)")
    add_batch_size(p, 32)
    add_workers(p, 4)
    add_device(p)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="encoder autocast; an fp16 batch that overflows (NaN/inf) is redone in fp32, with a warning")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored latent dtype")
    add_tiling_args(p, "encode")
    p.add_argument("--flip", action="store_true", help="also store the latents of the flipped image")
    p.add_argument("--samples-per-shard", type=positive_int, default=1000)
    p.add_argument("--no-ema", action="store_true", help="use the live weights instead of the EMA copy")
    p.add_argument("--rank", type=non_negative_int, help="this process's rank, without torchrun (no process group)")
    p.add_argument("--world-size", type=positive_int, help="number of processes, without torchrun")
    p.add_argument("--merge-only", action="store_true", help="only (re)write manifest.json from finished ranks "
                                                              "(with --world-size K when K > 1)")
    p.add_argument("--verify", metavar="CACHE", help="check every shard of an existing cache (size and SHA-256 "
                                                     "against its manifest), print the result and exit (1: damaged)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.verify is None and (args.ae is None or args.out is None):
        p.error("--ae and --out are required (or --verify CACHE)")
    check_ranks(p, args)
    return args


def verify(cache: str) -> int:
    """Every split's shards against the manifest, hashes included; prints one line per split."""
    manifest = Manifest.read(cache)
    damaged = 0
    for split in manifest.splits:
        try:
            manifest.check_shards(split, hashes=True)
            print(f"{split}: {len(manifest.split(split).shards)} shards whole")
        except ValueError as err:
            print(f"{split}: {err}")
            damaged += 1
    return 1 if damaged else 0


def check_ranks(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--rank and --world-size come together (--merge-only takes --world-size alone): neither is silently 0 or 1."""
    if args.rank is not None and args.world_size is None:
        p.error(f"--rank {args.rank} needs --world-size")
    if args.world_size is not None and args.rank is None and not args.merge_only:
        p.error(f"--world-size {args.world_size} needs --rank: each process caches its part (--rank i --world-size K)")
    if args.rank is not None and args.rank >= args.world_size:
        p.error(f"--rank {args.rank} must be < --world-size {args.world_size}")


def setup_ranks(args: argparse.Namespace) -> tuple[int, int, int, bool]:
    """``(rank, world, local_rank, distributed)``: torchrun's env, else --rank/--world-size, else 0/1."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.rank is None:
        return (*join_torchrun_group(), True)
    rank, world = args.rank or 0, args.world_size or 1  # both or neither given (check_ranks)
    # Streaming sources split shards with webdataset, which reads RANK/WORLD_SIZE without a process group.
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
    return rank, world, 0, False


def load_data_config(args: argparse.Namespace) -> dict:
    if args.data is not None:
        cfg = OmegaConf.load(args.data)
    else:
        cfg = OmegaConf.load(args.ae_config or resolve_source(args.ae)[0])
    return deterministic(dataset_config(cfg, args.split))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.verify is not None:
        status = verify(args.verify)
        if status:
            raise SystemExit(status)
        return
    check_output_dir(args.out, "--out")  # before the autoencoder and the data are loaded
    try:
        run(args)
    except (CacheError, LockError) as e:
        raise SystemExit(f"error: {e}") from None


def run(args: argparse.Namespace) -> None:
    rank, world, local_rank, distributed = setup_ranks(args)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [r{rank}] %(levelname)s %(name)s: %(message)s")
    opts = CacheOptions(out_dir=args.out, split=args.split, samples_per_shard=args.samples_per_shard,
                        batch_size=args.batch_size, num_workers=fit_workers(args.workers, "--workers"),
                        flip=args.flip, dtype=args.dtype, precision=args.precision, tile=args.tile,
                        tile_overlap=args.tile_overlap)
    if args.merge_only:
        entry = merge_manifest(args.out, args.split, world)
        log.info("manifest: split %r: %s -> %s", args.split, entry.describe(), Path(args.out) / MANIFEST_NAME)
        return
    device = pick_device(args.device, local_rank)
    data_cfg = load_data_config(args)  # fails before the model is built when the data path is wrong
    dataset = instantiate_from_config(data_cfg, where=f"data.params.{args.split}")
    ae_config = OmegaConf.load(args.ae_config) if args.ae_config else None
    model, info = load_first_stage(args.ae, use_ema=not args.no_ema, device=device, config=ae_config)
    check_tiling_args(args, model)
    barrier = None
    if distributed:
        import torch.distributed as dist

        barrier = dist.barrier
    result, entry = cache_latents(model, info, dataset, opts, data_cfg, rank, world, device, barrier,
                                  progress=local_rank == 0)
    rate = result["written"] / max(result["seconds"], 1e-9)
    print(f"rank {rank}: wrote {result['written']} samples in {result['shards']} new shards, "
          f"skipped {result['skipped']}, {rate:.1f} img/s", flush=True)
    if entry is not None:
        manifest = Manifest.read(args.out)
        print(f"done: split {args.split!r}: {manifest.split(args.split).describe()}; "
              f"~{rate * world:.1f} img/s over {world} process(es) -> {manifest.path}", flush=True)
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
