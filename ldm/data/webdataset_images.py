"""Images streamed from WebDataset tar shards (LAION-style ``.jpg``/``.png`` + optional ``.cls``/``.txt``).

Shards are split across ranks and DataLoader workers (or resampled), and epochs sized, by ``ShardStream``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Literal

import webdataset as wds

from ldm.data.images import SkipCounter
from ldm.cache.shards import ShardStream, local_path
from ldm.data.transforms import (DECODE_ERRORS, BadImageError, ImageTransform, check_truncated_flag, open_image,
                                 to_rgb_tensor)

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class WebDatasetImages(ShardStream):
    """Samples ``{"image": (3, size, size) in [-1, 1], "key": __key__[, "cls"][, "txt"]}`` from tar shards.

    ``urls``: a list or a brace pattern (``/data/shard-{000000..000099}.tar``); ``shuffle``, ``resampled``,
    ``epoch_length``: see ``ShardStream``. Undecodable samples (and unreadable tar members) are skipped,
    warned about and counted in ``skipped``.
    """

    def __init__(self, urls: str | list[str], size: int, crop: Literal["random", "center"] = "center",
                 flip: bool = False, shuffle: int = 1000, resampled: bool = False,
                 epoch_length: int | None = None, min_size: int = 16):
        check_truncated_flag()
        shards = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
        if not shards:
            raise ValueError(f"no shards in {urls!r}")
        # Fail at start, not at the first batch: local shard paths must exist (remote URLs are not checked).
        missing = [u for u in shards if local_path(u) is not None and not os.path.exists(local_path(u))]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(shards)} shard(s) not found, e.g. {missing[0]!r}"
                                    + (" (set data...params.urls)" if "???" in str(urls) else ""))
        super().__init__(shards, shuffle, resampled, epoch_length)
        self.transform = ImageTransform(size, crop, flip)
        self.min_size = min_size
        self.skip_counter = SkipCounter()
        if resampled and epoch_length is None:
            log.warning("WebDatasetImages(resampled=True) without epoch_length never ends an epoch; "
                        "set epoch_length (or the Trainer's limit_train_batches)")

    def sample_fields(self) -> frozenset[str] | None:
        """The keys a sample has, from the first sample of the first shard (None for remote shards)."""
        extensions = self.first_sample_extensions()
        return None if extensions is None else frozenset({"image", "key"} | ({"cls", "txt"} & extensions))

    @property
    def skipped(self) -> int:
        """Bad samples met so far by this process and its DataLoader workers (events, not distinct keys)."""
        return self.skip_counter.total

    def _skip(self, what: str, error: BaseException) -> bool:
        total = self.skip_counter.add()
        log.warning("skipping %s: %s: %s [%d skipped so far]", what, type(error).__name__, error, total)
        return True  # the webdataset handler protocol: True = continue with the next sample

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = sample.get("__key__", "?")
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            self._skip(f"sample {key} from {sample.get('__url__')}", KeyError(f"no image among {IMAGE_KEYS}"))
            return None
        try:
            pixels = to_rgb_tensor(open_image(sample[image_key], self.min_size))
            out: dict[str, Any] = {"key": key}
            if "cls" in sample:
                out["cls"] = int(sample["cls"].decode("utf-8").strip())
            if "txt" in sample:
                out["txt"] = sample["txt"].decode("utf-8")
        except (*DECODE_ERRORS, BadImageError) as e:
            self._skip(f"sample {key} from {sample.get('__url__')}", e)
            return None
        out["image"] = self.transform.from_tensor(pixels)
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        samples = self.samples(handler=lambda e: self._skip("tar member", e))
        return self.per_worker(s for s in map(self._decode, samples) if s is not None)
