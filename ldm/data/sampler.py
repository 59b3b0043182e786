"""The training sampler of map-style datasets: seeded, split by rank, and resumable in the middle of an epoch."""
from __future__ import annotations

import itertools
import logging
from typing import Iterator

from torch.utils.data import Dataset, DistributedSampler

log = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler``'s order (a permutation seeded by ``seed + epoch``, padded to a multiple of the world
    size, then ``rank::num_replicas``) that also knows how far into it the training loop got, so that a checkpoint
    taken mid-epoch resumes with exactly the samples an uninterrupted run would have seen next.

    ``consumed`` counts the samples of this rank's slice that the training loop has taken this epoch; the owner
    reports them with ``advance`` (the sampler cannot count them itself: DataLoader workers prefetch ahead of the
    loop). An iteration starts at ``consumed``. ``__len__`` stays the whole slice's, because Lightning counts a
    resumed epoch's batches on from its own restored progress. As a ``DistributedSampler`` it is left in place by
    Lightning under DDP, which calls ``set_epoch`` at every epoch start.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.consumed = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # a new epoch starts at its beginning; the restored one where it was left
            self.consumed = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.consumed, None)

    def advance(self, samples: int) -> None:
        """The training loop has taken ``samples`` more of this rank's samples (the epoch's last batch may be short)."""
        self.consumed = min(self.consumed + samples, self.num_samples)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` was taken, with its seed (the epoch in progress was drawn with it)."""
        self.epoch, self.seed, self.consumed = state["epoch"], state["seed"], state["consumed"]
        if state["num_replicas"] != self.num_replicas:
            # Ranks take their slices in lockstep, so the permutation's first consumed x world entries were used.
            # That count need not divide by the new world size, and the padding differs: hence "about".
            self.consumed = state["consumed"] * state["num_replicas"] // self.num_replicas
            log.warning("resuming with %d instead of %d processes: the epoch in progress continues at about the "
                        "same position (a few samples may be seen twice or skipped)",
                        self.num_replicas, state["num_replicas"])
