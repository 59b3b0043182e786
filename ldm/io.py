"""Small things written once: atomic file writes, ``samples.npz``, image dtype conversion, markdown tables."""
from __future__ import annotations

import json
import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch


# --------------------------------------------------------------------------------------------- files
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed over ``path`` when the block ends without error and
    removed otherwise. A reader never sees half a file, and of two writers racing on one path one whole file wins.
    The temporary name ends like ``path`` (``np.savez`` appends ``.npz`` to any other name)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps: Any) -> None:
    write_text_atomic(path, json.dumps(obj, **dumps))


# ------------------------------------------------------------------------------------------- samples
def write_samples_npz(path: str | os.PathLike, images: np.ndarray, seeds: Sequence[int],
                      labels: Sequence[int] | None = None) -> Path:
    """``samples.npz``: ``arr_0`` uint8 NHWC (ADM's layout), ``seeds``[, ``labels``], written atomically."""
    arrays = {"arr_0": np.asarray(images, dtype=np.uint8), "seeds": np.fromiter(seeds, dtype=np.int64, count=len(seeds))}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
    return Path(path)


def read_samples_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """``(images uint8 NHWC, labels or None)`` of a ``samples.npz`` or an ADM reference batch (``arr_0``, or
    ``images``; labels as ``labels`` or ADM's ``arr_1``)."""
    with np.load(path, allow_pickle=False) as data:
        key = "arr_0" if "arr_0" in data.files else "images" if "images" in data.files else None
        if key is None:
            raise KeyError(f"{path}: no 'arr_0' or 'images' array (has {data.files})")
        label_key = next((k for k in ("labels", "arr_1") if k in data.files and data[k].ndim == 1), None)
        return data[key], data[label_key].astype(np.int64) if label_key else None


# ------------------------------------------------------------------------------------------- images
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (clipped) -> uint8 in [0, 255], rounded to nearest, same layout."""
    return x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1] (``to_uint8`` undone up to its rounding)."""
    return x.float() / 127.5 - 1


# ------------------------------------------------------------------------------------------- tables
def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any] | Sequence[Any]], columns: Sequence[str] | None = None,
                   digits: int = 4) -> str:
    """A GitHub markdown table. ``rows`` are mappings (``columns``: given, or every key in order of first
    appearance) or sequences of cells under ``columns``; floats get ``digits`` significant digits."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(v, digits) for v in (row if not isinstance(row, Mapping) else [row.get(c) for c in columns])]
             for row in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells]) + "\n"
