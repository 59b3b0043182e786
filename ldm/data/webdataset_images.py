"""Images streamed from WebDataset tar shards (LAION-style ``.jpg``/``.png`` + optional ``.cls``/``.txt``).

Every rank and every DataLoader worker reads distinct shards (``wds.split_by_node`` then
``wds.split_by_worker``); with ``resampled=True`` each worker instead draws shards at random, forever.
``epoch_length`` fixes how many samples an epoch has, so DDP ranks finish their epochs together.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import random
from typing import Any, Iterator, Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.images import SkipCounter
from ldm.data.transforms import (DECODE_ERRORS, BadImageError, ImageTransform, check_truncated_flag, open_image,
                                 to_rgb_tensor)

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def _rank_world() -> tuple[int, int]:
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    return rank, world


def _local_path(url: str) -> str | None:
    """The file a shard URL names on this machine, or None for remote/stream URLs (``s3://``, ``pipe:``, ``-``).

    Where webdataset rewrites URLs (``GOPEN_REWRITE``) nothing is checked."""
    if url == "-" or os.environ.get("GOPEN_REWRITE"):
        return None
    scheme = urlparse(url).scheme
    if scheme == "file":
        return url2pathname(url[len("file:"):].removeprefix("//"))
    return url if scheme == "" else None


class WebDatasetImages(IterableDataset):
    """Samples ``{"image": (3, size, size) in [-1, 1], "key": __key__[, "cls"][, "txt"]}`` from tar shards.

    ``urls``: a list or a brace pattern (``/data/shard-{000000..000099}.tar``). ``shuffle``: sample
    shuffle buffer size (0 = stream order; shard order is shuffled too when > 0). ``epoch_length``:
    samples per epoch summed over all ranks; each rank yields ``ceil(epoch_length / world_size)``,
    shared among its workers, and the shard stream repeats so that no worker runs dry.
    Undecodable samples (and unreadable tar members) are skipped, warned about and counted in ``skipped``.
    """

    def __init__(self, urls: str | list[str], size: int, crop: Literal["random", "center"] = "center",
                 flip: bool = False, shuffle: int = 1000, resampled: bool = False,
                 epoch_length: int | None = None, min_size: int = 16):
        check_truncated_flag()
        self.urls = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        # Fail at start, not at the first batch: local shard paths must exist (remote URLs are not checked).
        missing = [u for u in self.urls if _local_path(u) is not None and not os.path.exists(_local_path(u))]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(self.urls)} shard(s) not found, e.g. {missing[0]!r}"
                                    + (" (set data...params.urls)" if "???" in str(urls) else ""))
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be a positive integer or None, got {epoch_length}")
        self.transform = ImageTransform(size, crop, flip)
        self.shuffle, self.resampled, self.epoch_length, self.min_size = shuffle, resampled, epoch_length, min_size
        self.skip_counter = SkipCounter()
        if resampled and epoch_length is None:
            log.warning("WebDatasetImages(resampled=True) without epoch_length never ends an epoch; "
                        "set epoch_length (or the Trainer's limit_train_batches)")

    @property
    def skipped(self) -> int:
        """Bad samples met so far by this process and its DataLoader workers (events, not distinct keys)."""
        return self.skip_counter.total

    def _skip(self, what: str, error: BaseException) -> bool:
        total = self.skip_counter.add()
        log.warning("skipping %s: %s: %s [%d skipped so far]", what, type(error).__name__, error, total)
        return True  # the webdataset handler protocol: True = continue with the next sample

    def _samples_per_worker(self) -> int | None:
        if self.epoch_length is None:
            return None
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        per_rank = math.ceil(self.epoch_length / _rank_world()[1])
        return per_rank // workers + (worker < per_rank % workers)

    def _my_shards(self) -> list[str]:
        shards = wds.split_by_worker(wds.split_by_node(iter(dict(url=u) for u in self.urls)))
        return [s["url"] for s in shards]

    def _shard_stream(self) -> Iterator[dict[str, str]]:
        if self.resampled:
            yield from wds.ResampledShards(self.urls)  # seeded per worker, rank, pid and time
            return
        mine = self._my_shards()
        if not mine:
            rank, world = _rank_world()
            msg = (f"rank {rank}/{world} worker got no shard: {len(self.urls)} shards for "
                   f"{world} ranks x {get_worker_info().num_workers if get_worker_info() else 1} workers")
            if self.epoch_length is not None:
                raise RuntimeError(msg + "; use more shards, fewer workers, or resampled=True")
            log.warning(msg)
            return
        rng = random.Random()
        for _ in itertools.count() if self.epoch_length is not None else range(1):
            if self.shuffle > 0:
                rng.shuffle(mine)  # only this worker's disjoint subset, so no seed agreement is needed
            yield from (dict(url=u) for u in mine)

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
        samples = wds.tarfile_samples(self._shard_stream(), handler=lambda e: self._skip("tar member", e))
        if self.shuffle > 0:
            samples = wds.shuffle(self.shuffle, initial=min(self.shuffle, 100))(samples)
        decoded = (s for s in map(self._decode, samples) if s is not None)
        n = self._samples_per_worker()
        return decoded if n is None else itertools.islice(decoded, n)

    def __len__(self) -> int:
        """Samples this rank yields per epoch; only defined with ``epoch_length``."""
        if self.epoch_length is None:
            raise TypeError("WebDatasetImages has no length unless epoch_length is set")
        return math.ceil(self.epoch_length / _rank_world()[1])
