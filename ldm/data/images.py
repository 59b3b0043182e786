"""A folder of images (recursive), with optional class sub-folders and a captions file.

Bad files are never fatal and never produce a wrong tensor: ``__getitem__`` returns ``None`` for them,
``collate_skip_bad`` drops the ``None``s, and every bad file is warned about once and counted in
``dataset.skipped`` — shared-memory bookkeeping, so the count is right with DataLoader worker processes too.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from ldm.data.transforms import (DECODE_ERRORS, BadImageError, ImageTransform, check_truncated_flag, open_image,
                                 to_rgb_tensor)
from ldm.util import ALL_BAD

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")


def collate_skip_bad(batch: Sequence[dict | None]) -> dict | None:
    """``default_collate`` after dropping ``None`` (bad) samples; ``None`` if the whole batch was bad."""
    good = [s for s in batch if s is not None]
    return default_collate(good) if good else None


def collate_train(batch: Sequence[dict | None]) -> dict:
    """``collate_skip_bad`` for training loaders: an all-bad batch becomes ``{ALL_BAD: n}``, not ``None``.

    Lightning drops a ``None`` batch before ``training_step`` on that rank alone, which desynchronises DDP;
    given the marker, the modules skip the step on every rank together (``ldm.util.batch_missing``).
    """
    out = collate_skip_bad(batch)
    return out if out is not None else {ALL_BAD: len(batch)}


class SkipCounter:
    """Counts skipped samples across DataLoader workers: one shared-memory slot per worker process.

    The tensor's storage is shared with workers whether they are forked or spawned, and each worker
    only writes its own slot, so there are no lost updates. Counts are per process group rank.
    """

    def __init__(self, slots: int = 1024):
        self.counts = torch.zeros(slots, dtype=torch.int64).share_memory_()

    def add(self) -> int:
        """Count one skip; returns the total so far."""
        info = get_worker_info()
        slot = 0 if info is None else (info.id + 1) % len(self.counts)
        self.counts[slot] += 1
        return self.total

    @property
    def total(self) -> int:
        return int(self.counts.sum())


def list_images(root: Path, extensions: Iterable[str]) -> list[str]:
    """Sorted relative POSIX paths of the images under ``root`` (hidden files and folders ignored).

    Symlinks are followed, but each real folder is walked once and each real file listed once (a symlink loop or
    a second link to an image cannot repeat it), and only regular files are listed: FIFOs, sockets and devices
    with an image name would block or fail a reader. What was left out is counted in the log."""
    exts = {"." + e.lower().lstrip(".") for e in extensions}
    found, seen_dirs, seen_files = [], set(), set()
    left_out = {"repeated through links": 0, "not regular files": 0}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # reached again through a link: its files are listed already
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # e.g. .ipynb_checkpoints
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in exts:
                continue
            path = os.path.join(dirpath, name)
            target = os.path.realpath(path)
            if not os.path.isfile(target):
                left_out["not regular files"] += 1
            elif target in seen_files:
                left_out["repeated through links"] += 1
            else:
                seen_files.add(target)
                found.append((rel_dir / name).as_posix())
    if any(left_out.values()):
        log.warning("%s: left out %s", root, ", ".join(f"{n} {why}" for why, n in left_out.items() if n))
    return sorted(found)


def check_folder(root: str | os.PathLike) -> Path:
    """``root`` as a ``Path``; a clear error if it does not exist or is not a directory."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder is not a directory: {root}")
    return root


def read_captions(path: str | os.PathLike) -> dict[str, str]:
    """``{relpath: caption}`` from a JSON object, or a TSV (``.tsv``/``.txt``) / CSV (``.csv``) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"captions file {path}: expected a JSON object {{relpath: caption}}")
        return {str(k): str(v) for k, v in data.items()}
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r]
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != 2]
    if bad:
        raise ValueError(f"captions file {path}: lines {bad[:5]} do not have exactly 2 fields "
                         f"(relpath{'<TAB>' if delimiter == chr(9) else ','}caption)")
    return {r[0]: r[1] for r in rows}


class ImageFolder(Dataset):
    """Images under ``root`` as ``{"image": (3, size, size) in [-1, 1], "key": relpath[, "cls"][, "txt"]}``.

    ``labels_from_subfolders``: class index = position of the first path component in the sorted list
    of sub-folder names. ``min_size``: images whose shorter side is smaller are skipped; all others are
    resized (up or down) so that the shorter side is ``resize`` (``None``: ``size``), then a ``size`` square
    is cropped (``crop``: ``center`` or ``random``; see ``ImageTransform``). ``files``: the relative paths to
    use, in this order, instead of every image under ``root`` (``PhotoCrops`` passes one split's files).
    Returns ``None`` for bad files (use ``collate_skip_bad``).
    """

    def __init__(self, root: str | os.PathLike, size: int, crop: Literal["random", "center"] = "center",
                 flip: bool = False, labels_from_subfolders: bool = False,
                 captions: str | os.PathLike | None = None, min_size: int = 16,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, resize: int | None = None,
                 files: Sequence[str] | None = None):
        check_truncated_flag()
        self.root = check_folder(root)
        self.files = list_images(self.root, extensions) if files is None else list(files)
        if not self.files:
            raise ValueError(f"no images with extensions {tuple(extensions)} found under {self.root}"
                             if files is None else f"ImageFolder({self.root}): the list of files is empty")
        self.transform = ImageTransform(size, crop, flip, resize)
        self.min_size = min_size
        self.classes: list[str] | None = None
        self.labels: list[int] | None = None
        if labels_from_subfolders:
            self._init_labels()
        self.captions: list[str] | None = None
        if captions is not None:
            self._init_captions(captions)
        # One flag per file in shared memory: workers mark bad files, the main process can count them.
        self._bad = torch.zeros(len(self.files), dtype=torch.bool).share_memory_()
        self._errors: dict[int, str] = {}  # why file i was bad, in the process that read it

    def _init_labels(self) -> None:
        loose = [f for f in self.files if "/" not in f]
        if loose:
            raise ValueError(f"labels_from_subfolders=True but {len(loose)} images lie directly in {self.root} "
                             f"(e.g. {loose[0]}); put every image in a class sub-folder")
        self.classes = sorted({f.split("/", 1)[0] for f in self.files})
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index[f.split("/", 1)[0]] for f in self.files]

    def _init_captions(self, path: str | os.PathLike) -> None:
        table = read_captions(path)
        self.captions = [table.get(f, "") for f in self.files]
        missing = sum(f not in table for f in self.files)
        unused = len(set(table) - set(self.files))
        if missing:
            log.warning("captions %s: %d of %d images have no caption and get txt=''", path, missing,
                        len(self.files))
        if unused:
            log.warning("captions %s: %d entries name no image under %s", path, unused, self.root)

    def __len__(self) -> int:
        return len(self.files)

    def sample_fields(self) -> frozenset[str]:
        """The keys every sample has (a model checks them against its conditioning before training)."""
        optional = {"cls": self.labels, "txt": self.captions}
        return frozenset({"image", "key"} | {name for name, values in optional.items() if values is not None})

    def load(self, i: int) -> torch.Tensor | None:
        """File ``i`` decoded as ``to_rgb_tensor`` returns it, or ``None`` (warned and counted) if it is bad."""
        if self._bad[i]:
            return None
        path = self.root / self.files[i]
        try:
            # Mode conversion (e.g. LAB, float TIFF) can fail too: that is a bad file, not a crash.
            return to_rgb_tensor(open_image(path, self.min_size))
        except (*DECODE_ERRORS, BadImageError) as e:
            self._bad[i] = True
            self._errors[i] = f"{type(e).__name__}: {e}"
            log.warning("skipping bad image %s: %s: %s [%d bad files so far in %s]", path, type(e).__name__, e,
                        self.skipped, self.root)
            return None

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        pixels = self.load(i)
        if pixels is None:
            return None
        sample: dict[str, Any] = {"image": self.transform.from_tensor(pixels), "key": self.files[i]}
        if self.labels is not None:
            sample["cls"] = self.labels[i]
        if self.captions is not None:
            sample["txt"] = self.captions[i]
        return sample

    def error(self, i: int) -> str | None:
        """Why file ``i`` was skipped, when this process read it (the latent cache records it)."""
        return self._errors.get(i)

    @property
    def skipped(self) -> int:
        """Number of distinct bad files met so far (by any worker of this process)."""
        return int(self._bad.sum())

    @property
    def bad_files(self) -> list[str]:
        return [self.files[i] for i in torch.nonzero(self._bad).flatten().tolist()]
