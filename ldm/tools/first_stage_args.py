"""The ``--tile`` / ``--tile-overlap`` options shared by the scripts that encode or decode (``ldm.tiling``)."""
from __future__ import annotations

import argparse
from typing import Any

from ldm.tiling import DEFAULT_OVERLAP, check_tiling
from ldm.tools.args import non_negative_int, positive_int


def add_tiling_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--tile", type=positive_int, help=f"{what} by overlapping tiles of this many image pixels "
                                                     "(a multiple of the downsample factor; default: whole images)")
    p.add_argument("--tile-overlap", type=non_negative_int, default=DEFAULT_OVERLAP,
                   help="overlap of neighbouring tiles in image pixels, blended with a raised-cosine ramp")


def check_tiling_args(args: argparse.Namespace, model: Any) -> None:
    """Tile sizes against the loaded model's downsample factor: a ``SystemExit`` naming the flags, before compute."""
    if args.tile is None:
        return
    try:
        check_tiling(args.tile, args.tile_overlap, int(model.downsample_factor))
    except ValueError as e:
        raise SystemExit(f"error: --tile {args.tile} --tile-overlap {args.tile_overlap}: {e}") from None
