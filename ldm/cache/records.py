"""What the latent cache encodes and where each record goes: the records of a map-style dataset (by index, so bad
inputs are reported) or of a stream, and which shard each one belongs to (the resume logic of ``cache_latents``).

Rank ``r`` of a map-style dataset owns ``range(n)[r::world]``, its shard ``i`` the slice ``[i*N, (i+1)*N)``; a stream's
shard ``i`` is the ``i``-th run of N good samples of the rank's (unshuffled) stream.
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

log = logging.getLogger(__name__)


class IndexedSource(Dataset):
    """``{"index", "sample" | None, "reason"}`` for a map-style dataset, so bad inputs are reported, not lost."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def _source(self, i: int) -> Path | None:
        root, files = getattr(self.dataset, "root", None), getattr(self.dataset, "files", None)
        return Path(root) / files[i] if root is not None and files is not None else None

    def _reason(self, i: int) -> str:
        """Why the dataset returned None for item ``i``: its own ``error(i)`` where it keeps one (the image
        datasets do, in the process that read the file), else a generic reason."""
        error = getattr(self.dataset, "error", None)
        return (error(i) if error is not None else None) or "dataset returned no sample"

    def __getitem__(self, j: int) -> dict:
        i = self.indices[j]
        try:
            sample = self.dataset[i]
        except Exception as e:  # noqa: BLE001 - a bad input must not stop a long caching run
            log.warning("skipping index %d: %s: %s", i, type(e).__name__, e)
            sample, reason = None, f"{type(e).__name__}: {e}"
        else:
            reason = None if sample is not None else self._reason(i)
        path = self._source(i)
        meta = {"index": i, "source": str(path) if path is not None else None, "size": None}
        if sample is not None and path is not None:
            try:
                with Image.open(path) as img:
                    meta["size"] = list(img.size)
            except Exception:  # noqa: BLE001 - the size is informative only
                pass
        return {"index": i, "sample": sample, "reason": reason, "meta": meta}


class StreamSource(IterableDataset):
    """Wraps a streaming dataset in the same record format as ``IndexedSource`` (bad samples are dropped
    by the dataset itself and only counted)."""

    def __init__(self, dataset: IterableDataset):
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict]:
        for sample in self.dataset:
            if sample is not None:
                yield {"index": None, "sample": sample, "reason": None,
                       "meta": {"index": None, "source": None, "size": None}}


def collate_records(records: list[dict]) -> dict:
    """Stack the good images; keep every record (good or bad) with its metadata, in order."""
    good = [r["sample"] for r in records if r["sample"] is not None]
    images = torch.stack([s["image"] for s in good]) if good else None
    return {"records": records, "image": images}


def rank_indices(n: int, rank: int, world: int) -> list[int]:
    return list(range(n))[rank::world]


# An item is ``(shard index, record, row)``: ``row`` indexes the record's latents in its batch, None for a bad input.
Item = tuple[int, dict, int | None]


class StreamSkips:
    """The bad samples a streaming dataset dropped (its ``skipped`` counter), each handed out once."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.seen = self.now()

    def now(self) -> int:
        return getattr(self.dataset, "skipped", 0)

    def rebase(self) -> None:
        """Forget the skips met so far: re-reading an already cached prefix, they belong to earlier shards."""
        self.seen = self.now()

    def take(self) -> int:
        now = self.now()
        new, self.seen = now - self.seen, now
        return max(new, 0)


class IndexedRecords:
    """A map-style dataset: rank ``r`` owns ``range(n)[r::world]``, its shard ``i`` the slice ``[i*N, (i+1)*N)``;
    only the samples of incomplete shards are read (``source``)."""

    skips = None  # a map-style dataset reports its bad inputs as records
    finished = False  # re-running a finished rank rewrites its done file

    def __init__(self, dataset: Dataset, n_per: int, rank: int, world: int, complete: Callable[[int], bool]):
        mine = rank_indices(len(dataset), rank, world)
        self.num_shards = (len(mine) + n_per - 1) // n_per
        self.shard_of = {idx: p // n_per for p, idx in enumerate(mine)}
        pending = {i for i in range(self.num_shards) if not complete(i)}
        self.source = IndexedSource(dataset, [idx for idx in mine if self.shard_of[idx] in pending])
        self.total: int | None = len(self.source)

    def items(self, records: list[dict]) -> list[Item]:
        rows = itertools.count()
        return [(self.shard_of[r["index"]], r, None if r["sample"] is None else next(rows)) for r in records]

    def shard_count(self, last_index: int | None) -> int:
        return self.num_shards


class StreamRecords:
    """A streaming dataset: shard ``i`` is the ``i``-th run of N good samples of the rank's (unshuffled) stream.
    Complete shards form a prefix, which a resumed run reads again and drops."""

    total = None

    def __init__(self, dataset: IterableDataset, n_per: int, complete: Callable[[int], bool],
                 num_shards: int | None = None):
        """``num_shards``: known when an earlier run got to the end (its done file)."""
        self.source, self.skips = StreamSource(dataset), StreamSkips(dataset)
        self.n_per, self.num_shards = n_per, num_shards
        offset = 0
        while complete(offset):
            offset += 1
        self.first, self.position, self.started = offset * n_per, 0, False
        self.finished = num_shards is not None and offset >= num_shards

    def items(self, records: list[dict]) -> list[Item]:
        start, self.position = self.position, self.position + len(records)
        kept = [(p // self.n_per, r, row) for row, (p, r) in enumerate(zip(range(start, self.position), records))
                if p >= self.first]
        if kept and not self.started:
            self.started = True
            if self.first > 0:
                self.skips.rebase()
        return kept

    def shard_count(self, last_index: int | None) -> int:
        """From the done file of an earlier run, else as far as this one got."""
        if self.num_shards is not None:
            return self.num_shards
        return last_index + 1 if last_index is not None else self.first // self.n_per
