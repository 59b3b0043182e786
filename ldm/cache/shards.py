"""The one shard stream under every WebDataset reader (images and latents).

Every rank and every DataLoader worker reads distinct shards (``wds.split_by_node`` then
``wds.split_by_worker``); with ``resampled=True`` each worker instead draws shards at random, forever.
``epoch_length`` counts samples per epoch over all ranks: each rank yields ``ceil(epoch_length / world)``,
shared among its workers, and the shard stream repeats so that no worker runs dry (DDP epochs end together).

``seed``: ``None`` draws shard order, shuffle buffer and resampling from fresh entropy; an int makes all three
(and ``generator()``) a function of (seed, rank, worker) through ``ldm.util.step_generator``.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import random
import tarfile
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from ldm.util import check_range, step_generator

log = logging.getLogger(__name__)

T = TypeVar("T")

# step_generator streams: independent draws of one (seed, rank, worker)
NOISE_STREAM, SHARD_ORDER_STREAM, SHUFFLE_STREAM, RESAMPLE_STREAM = range(4)


def rank_world() -> tuple[int, int]:
    rank, world, _, _ = wds.utils.pytorch_worker_info()
    return rank, world


def worker_slot() -> tuple[int, int]:
    """``(worker id, number of workers)`` of this DataLoader process; ``(0, 1)`` outside workers."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def local_path(url: str) -> str | None:
    """The file a shard URL names on this machine, or None for remote/stream URLs (``s3://``, ``pipe:``, ``-``).

    Where webdataset rewrites URLs (``GOPEN_REWRITE``) nothing is checked."""
    if url == "-" or os.environ.get("GOPEN_REWRITE"):
        return None
    scheme = urlparse(url).scheme
    if scheme == "file":
        return url2pathname(url[len("file:"):].removeprefix("//"))
    return url if scheme == "" else None


class ShardStream(IterableDataset):
    """Base of the tar-shard datasets: subclasses decode ``samples()`` and cap them with ``per_worker``.

    ``shuffle``: sample shuffle buffer size (0 = stream order; shard order is shuffled too when > 0).
    ``total``: samples in all shards when known (gives ``len`` without ``epoch_length``).
    """

    def __init__(self, urls: list[str], shuffle: int = 1000, resampled: bool = False,
                 epoch_length: int | None = None, seed: int | None = None, total: int | None = None):
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be a positive integer or None, got {epoch_length}")
        if isinstance(shuffle, bool) or not isinstance(shuffle, int):  # True would silently mean a buffer of 1
            raise TypeError(f"shuffle is a shuffle-buffer size in samples (0: stream order), got {shuffle!r}")
        check_range("shuffle", shuffle, 0)
        self.urls, self.shuffle, self.resampled = urls, shuffle, resampled
        self.epoch_length, self.seed, self.total = epoch_length, seed, total

    def generator(self, stream: int = NOISE_STREAM) -> torch.Generator | None:
        """This rank's and worker's ``torch.Generator`` for ``stream``; ``None`` without a seed."""
        if self.seed is None:
            return None
        return step_generator(self.seed, 0, micro_batch=worker_slot()[0], rank=rank_world()[0], stream=stream)

    def _random(self, stream: int) -> random.Random:
        gen = self.generator(stream)
        return random.Random(None if gen is None else gen.initial_seed())

    def shard_stream(self) -> Iterator[dict[str, str]]:
        """This worker's shards as ``{"url"}``, repeated when ``epoch_length`` is set."""
        if self.resampled:
            if self.seed is None:  # seeded per worker, rank, pid and time
                yield from wds.ResampledShards(self.urls)
            else:  # the same draws on every pass: for validation streams, not training
                seed = self.generator(RESAMPLE_STREAM).initial_seed()  # holds rank and worker already
                yield from wds.ResampledShards(self.urls, seed=seed, worker_seed=lambda: 0, deterministic=True)
            return
        mine = [s["url"] for s in wds.split_by_worker(wds.split_by_node(dict(url=u) for u in self.urls))]
        if not mine:
            (rank, world), workers = rank_world(), worker_slot()[1]
            msg = (f"rank {rank}/{world} worker got no shard: {len(self.urls)} shards for "
                   f"{world} ranks x {workers} workers")
            if self.epoch_length is not None:
                raise RuntimeError(msg + "; use more shards, fewer workers, or resampled=True")
            log.warning(msg)
            return
        rng = self._random(SHARD_ORDER_STREAM)
        for _ in itertools.count() if self.epoch_length is not None else range(1):
            if self.shuffle > 0:
                rng.shuffle(mine)  # only this worker's disjoint subset, so no seed agreement is needed
            yield from (dict(url=u) for u in mine)

    def first_sample_extensions(self) -> set[str] | None:
        """The extensions (``cls``, ``txt``, ``mean.npy`` ...) of the first sample of the first shard, read with
        ``tarfile`` without starting the stream; None where the shard is not a local file (nothing downloads)."""
        path = local_path(self.urls[0])
        if path is None or not os.path.isfile(path):
            return None
        found, first = set(), None
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, extension = os.path.basename(member.name).partition(".")
                key = os.path.join(os.path.dirname(member.name), key)
                if first is not None and key != first:
                    break
                first = key
                found.add(extension)
        return found

    def useful_workers(self, requested: int, rank: int = 0, world: int = 1) -> int:
        """At most as many DataLoader workers as this rank has shards (``shard_stream`` gives each worker its own);
        resampled streams draw shards at random, so any number works."""
        return requested if self.resampled else min(requested, len(self.urls[rank::world]))

    def samples(self, handler: Callable[[BaseException], bool] = wds.reraise_exception) -> Iterator[dict[str, Any]]:
        """Raw tar samples (``{"__key__", "<ext>": bytes, ...}``) of ``shard_stream``, through the shuffle buffer."""
        samples = wds.tarfile_samples(self.shard_stream(), handler=handler)
        if self.shuffle > 0:
            rng = self._random(SHUFFLE_STREAM)
            samples = wds.shuffle(self.shuffle, initial=min(self.shuffle, 100), rng=rng)(samples)
        return samples

    def per_worker(self, stream: Iterator[T]) -> Iterator[T]:
        """``stream`` cut to this worker's share of the epoch (unchanged without ``epoch_length``)."""
        if self.epoch_length is None:
            return stream
        worker, workers = worker_slot()
        per_rank = math.ceil(self.epoch_length / rank_world()[1])
        return itertools.islice(stream, per_rank // workers + (worker < per_rank % workers))

    def __len__(self) -> int:
        """Samples this rank yields per epoch: ``ceil((epoch_length or total) / world)``."""
        samples = self.epoch_length or self.total
        if samples is None:
            raise TypeError(f"{type(self).__name__} has no length unless epoch_length is set")
        return math.ceil(samples / rank_world()[1])
