"""ldm.data.sampler.ResumableSampler: DistributedSampler's order and rank slices, and a position that survives
a restart."""
from __future__ import annotations

import itertools

from torch.utils.data import DistributedSampler

from ldm.data.sampler import ResumableSampler

N = 12


def epoch_order(sampler: ResumableSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_rank_slices_are_disjoint_cover_the_dataset_and_follow_distributed_sampler():
    data = range(N)
    for epoch in range(3):
        slices = [epoch_order(ResumableSampler(data, 3, rank, seed=5), epoch) for rank in range(3)]
        assert sorted(itertools.chain(*slices)) == list(range(N))  # disjoint and complete (12 = 3 x 4, no padding)
        for rank, got in enumerate(slices):
            reference = DistributedSampler(data, num_replicas=3, rank=rank, seed=5)
            reference.set_epoch(epoch)
            assert got == list(reference)
    first = ResumableSampler(data, seed=5)
    assert epoch_order(first, 0) != epoch_order(first, 1)  # a new permutation each epoch
    assert epoch_order(ResumableSampler(data, seed=5), 1) == epoch_order(first, 1)  # ... the same for the same seed
    assert epoch_order(ResumableSampler(data, seed=6), 1) != epoch_order(first, 1)
    assert epoch_order(ResumableSampler(data, shuffle=False), 2) == list(range(N))


def test_state_round_trip_continues_the_uninterrupted_order():
    data = range(N)
    straight = ResumableSampler(data, 2, 1, seed=3)
    expected = [epoch_order(straight, epoch) for epoch in (0, 1, 2)]

    first = ResumableSampler(data, 2, 1, seed=3)
    first.set_epoch(1)
    seen = list(itertools.islice(first, 4))  # a DataLoader worker may draw more than was trained on ...
    first.advance(2)
    first.advance(2)  # ... the position counts what the training loop took: 4 of this rank's 6 samples
    state = first.state_dict()
    assert state == {"epoch": 1, "consumed": 4, "seed": 3, "num_replicas": 2}

    resumed = ResumableSampler(data, 2, 1, seed=999)  # the checkpoint's seed wins over a different --seed
    resumed.load_state_dict(state)
    assert len(resumed) == 6  # the whole epoch's: Lightning counts the resumed epoch on from its own progress
    resumed.set_epoch(1)  # Lightning does this at the start of the resumed epoch: the position is kept
    assert seen + list(resumed) == expected[1]
    assert list(resumed) == expected[1][4:]  # iterating again (e.g. a persistent worker's reset) is the same
    assert epoch_order(resumed, 2) == expected[2]  # the next epoch starts at its beginning
    resumed.advance(100)
    assert resumed.consumed == 6  # the last batch of an epoch may be short: the position stops at its end


def test_resume_with_another_world_size_continues_at_the_same_position():
    data = range(N)
    ranks = [ResumableSampler(data, 2, rank, seed=1) for rank in range(2)]
    for sampler in ranks:
        sampler.set_epoch(1)
        sampler.advance(3)
    single = ResumableSampler(data, seed=1)
    single.load_state_dict(ranks[0].state_dict())
    single.set_epoch(1)
    assert list(single) == epoch_order(ResumableSampler(data, seed=1), 1)[6:]  # 2 ranks x 3 samples were taken
