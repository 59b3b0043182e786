"""The GroupNorm group-count rule of every network here (the LiteVAE encoder and decoder, the SD baseline, the
stage-2 UNet): one home, so the networks cannot drift apart."""
from __future__ import annotations


def group_count(channels: int, preferred: int = 32, min_channels: int = 1) -> int:
    """Largest divisor of ``channels`` that is <= ``preferred`` and leaves at least ``min_channels`` channels in
    each group (1 if none does).

    ``min_channels`` is the rule for narrow layers: with 32 groups a 32-wide layer has one channel per group, i.e.
    instance normalisation, which removes each channel's per-image mean. The photo study measured that as worse
    on the tiny LiteVAE (docs/results/scale_study.md), and in a stage-2 UNet it would exactly cancel the per-channel
    time/class embedding added just before the norm. GroupNorm's parameter count does not depend on the group
    count, so no choice here changes a model's size.
    """
    limit = max(1, min(preferred, channels // max(1, min_channels)))
    return next(g for g in range(limit, 0, -1) if channels % g == 0)
