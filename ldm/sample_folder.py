"""A sample folder knows what made it: ``samples.json`` records the model, its first stage, the settings and the
seeds, so that one folder never mixes two runs' samples (an FID over it would score both), and so that an
interrupted ``scripts/sample.py`` can be re-run into it. Its files (PNGs per seed, ``samples.npz``, ``grid.png``)
are written and read here. Also the check that a request fits in memory and on disk
before anything is sampled.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ldm.artifact_kinds import Kind
from ldm.io import write_samples_npz
from ldm.util import image_grid

RECORD_NAME = "samples.json"
FORMAT = "litevae-samples/1"
# What a folder of samples holds besides its record: a folder with any of them and no record is of unknown origin.
SAMPLE_FILES = ("images", "samples.npz", "grid.png")


class SampleFolderError(ValueError):
    """The output folder holds other samples, or the request cannot fit."""


def sample_record(source: Mapping[str, Any], settings: Mapping[str, Any], seeds: str) -> dict[str, Any]:
    """What ``samples.json`` holds: the model (checkpoint path and SHA-256, first-stage identity), the sampling
    settings and the seed specification."""
    return {"format": FORMAT, "kind": Kind.SAMPLE_FOLDER.name, "source": dict(source), "settings": dict(settings),
            "seeds": seeds}


def check_sample_folder(out: Path, record: Mapping[str, Any]) -> None:
    """Refuse an ``out`` that holds samples of another model, other settings or other seeds (re-running the same
    request, e.g. after an interruption, is fine), or samples without a record (made elsewhere or by hand)."""
    path = out / RECORD_NAME
    if path.is_file():
        held = json.loads(path.read_text())
        differs = sorted(k for k in ("source", "settings", "seeds") if held.get(k) != record.get(k))
        if differs:
            detail = "; ".join(f"{k}: {held.get(k)} there, {record.get(k)} now" for k in differs)
            raise SampleFolderError(f"{out} holds samples of another request ({detail}); one folder holds one "
                                    "request's samples: use another --out")
        return
    found = [name for name in SAMPLE_FILES if (out / name).exists() and not _empty_dir(out / name)]
    if found:
        raise SampleFolderError(f"{out} already holds samples ({', '.join(found)}) with no {RECORD_NAME} saying what "
                                "made them; use another --out (or move them away)")


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def write_record(out: Path, record: Mapping[str, Any]) -> None:
    from ldm.io import write_json_atomic

    write_json_atomic(out / RECORD_NAME, record, indent=1)


def available_memory() -> int:
    """Bytes of memory available to this process now (Linux ``MemAvailable``; total physical memory elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_request_fits(count: int, image_bytes: int, out: Path) -> None:
    """``count`` images of ``image_bytes`` (uint8) each must fit in memory (``samples.npz`` is assembled in memory)
    and on ``out``'s disk (PNGs, at most their raw size, plus the npz): else an error before any sampling."""
    need = count * image_bytes
    memory, disk = available_memory(), shutil.disk_usage(out).free

    def gib(n: float) -> str:
        return f"{n / 2 ** 30:,.1f} GiB"
    if need > memory:
        raise SampleFolderError(f"{count:,} samples of {image_bytes:,} bytes need {gib(need)} of memory for "
                                f"samples.npz, and {gib(memory)} are available: sample fewer seeds per call (e.g. "
                                "--seeds 0-49999, then 50000-99999 into another --out)")
    if 2 * need > disk:
        raise SampleFolderError(f"{count:,} samples of {image_bytes:,} bytes need up to {gib(2 * need)} on disk "
                                f"(PNGs and samples.npz), and {out} has {gib(disk)} free")


def png_name(seed: int) -> str:
    return f"{seed:06d}.png"


def write_pngs(folder: str | Path, images: np.ndarray, seeds: Sequence[int]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for image, seed in zip(images, seeds):
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(folder / png_name(seed))


def read_pngs(folder: str | Path, seeds: Sequence[int]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(Path(folder) / png_name(s)).convert("RGB")) for s in seeds])


def write_outputs(outdir: str | Path, images: np.ndarray, seeds: Sequence[int], labels: np.ndarray | None) -> Path:
    """``samples.npz`` (``arr_0`` uint8 NHWC, ``seeds``[, ``labels``]) and ``grid.png`` in ``outdir``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    npz = write_samples_npz(outdir / "samples.npz", images, seeds, labels)
    Image.fromarray(image_grid(images[:64])).save(outdir / "grid.png")
    return npz
