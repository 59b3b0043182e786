"""Sampling from a trained stage-2 model: seeds, their class labels, per-seed samples decoded by the first stage.

Used by ``scripts/sample.py`` (which writes them with ``ldm.sample_folder``). A sample depends only on its seed
(and its class or prompt), never on the batch size or the number of processes, so ``--seeds 0-49999`` split
over any number of GPUs gives the same images (EDM2-style).
"""
from __future__ import annotations

import bisect
import itertools
import logging
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ldm.io import to_uint8
from ldm.precision import GuardedAutoencoder, autocast
from ldm.tiling import DEFAULT_OVERLAP, tiled


log = logging.getLogger(__name__)



class Seeds(Sequence[int]):
    """Sample seeds as inclusive ranges, expanded only where read: ``--seeds 0-999999999`` costs a few bytes until
    it is sampled, so its size can be checked first. Overlapping ranges are refused (a seed twice would be sampled
    twice and counted twice by FID)."""

    def __init__(self, ranges: Sequence[tuple[int, int]], spec: str = ""):
        self.ranges, self.spec = [range(lo, hi + 1) for lo, hi in ranges], spec
        self._ends = list(itertools.accumulate(len(r) for r in self.ranges))
        ordered = sorted(self.ranges, key=lambda r: r.start)
        for a, b in zip(ordered, ordered[1:]):
            if b.start <= a.stop - 1:
                raise ValueError(f"seed {b.start} is given twice in {spec!r}: each seed once (ranges must not overlap)")

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = bisect.bisect_right(self._ends, index)
        return self.ranges[part][index - (self._ends[part - 1] if part else 0)]

    def __iter__(self) -> Iterator[int]:
        return itertools.chain.from_iterable(self.ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"Seeds({self.spec!r}: {len(self):,} seeds)"


def parse_seeds(spec: str) -> Seeds:
    """``"0-999"``, ``"1,5,7"`` or ``"0-9,20-29"`` → ``Seeds`` (ranges inclusive, like EDM2; nothing expanded)."""
    ranges: list[tuple[int, int]] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise ValueError(f"bad seed {part!r} in {spec!r}: seeds are non-negative integers or ranges like 0-999")
        if sep and int(hi) < int(lo):
            raise ValueError(f"bad seed range {part!r}: end before start")
        ranges.append((int(lo), int(hi) if sep else int(lo)))
    if not ranges:
        raise ValueError(f"no seeds in {spec!r}")
    return Seeds(ranges, str(spec))


def labels_for_seeds(seeds: Sequence[int], num_classes: int | None, class_label: int | None = None
                     ) -> np.ndarray | None:
    """The class of each seed: ``class_label`` for all, else ``seed % num_classes`` (None if unconditional)."""
    if not num_classes:
        if class_label is not None:
            raise ValueError("--class given but the model is not class-conditional")
        return None
    if class_label is not None:
        if not 0 <= class_label < num_classes:
            raise ValueError(f"class {class_label} out of range [0, {num_classes})")
        return np.full(len(seeds), class_label, dtype=np.int64)
    return np.fromiter(seeds, dtype=np.int64, count=len(seeds)) % num_classes


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW → uint8 NHWC (the layout of samples.npz and PNGs)."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(module: torch.nn.Module, seeds: Sequence[int], batch_size: int = 8, steps: int | None = None,
             eta: float | None = None, cfg: float | None = None, class_label: int | None = None,
             prompt: str | None = None, precision: str = "fp32", sampler: str | None = None,
             use_ema: bool | None = None, progress: bool = True, decode_precision: str = "fp32",
             tile: int | None = None, tile_overlap: int = DEFAULT_OVERLAP) -> tuple[np.ndarray, np.ndarray | None]:
    """``(images uint8 NHWC, labels or None)`` for ``seeds``, ``batch_size`` seeds at a time.

    ``precision`` is the UNet's autocast; the first stage decodes under ``decode_precision`` (an fp16 overflow
    is redone in fp32, ``ldm.precision``), by tiles of ``tile`` pixels when given (``ldm.tiling``).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    use_ema = getattr(module, "use_ema_for_sampling", True) if use_ema is None else use_ema
    labels = labels_for_seeds(seeds, module.num_classes, class_label)
    if module.conditioning.mode == "text" and prompt is None:
        raise ValueError("a text-conditional model needs --prompt")
    device = module.device
    decoder = _first_stage_decoder(module, decode_precision, tile, tile_overlap)
    chunks = range(0, len(seeds), batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="sampling", unit="batch")
    out = []
    for start in chunks:
        batch = list(seeds[start:start + batch_size])
        kw = {"labels": labels[start:start + len(batch)].tolist() if labels is not None else None,
              "texts": [prompt] * len(batch) if prompt is not None else None}
        with autocast(device.type, precision):
            z = module.sample_latents(batch, steps=steps, eta=eta, cfg=cfg, sampler=sampler, use_ema=use_ema, **kw)
        out.append(to_uint8_nhwc(decoder(z)))
    return np.concatenate(out), labels


def _first_stage_decoder(module: torch.nn.Module, precision: str, tile: int | None, tile_overlap: int
                         ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalised latents -> images in [-1, 1]: ``module.decode`` with the first stage guarded (built once, so
    that the fp16 warning comes once) and optionally tiled."""
    if module.first_stage is None:
        return module.decode  # raises the module's own "no first stage" error
    first_stage = tiled(GuardedAutoencoder(module.first_stage, precision), tile, tile_overlap)
    return lambda z_norm: first_stage.decode(module.denormalise(z_norm.float())).float().clamp(-1, 1)
