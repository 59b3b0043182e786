"""DataLoader workers sized to the machine: a requested count above the usable cores is lowered with one
message, and a shard stream gets no more workers than it has shards (torch warned "suggested max number of worker
... is 2" at every loader, the shard reader "worker got no shard")."""
from __future__ import annotations

import logging
import warnings

from ldm.data.datamodule import DataModule
from ldm.cache.reader import LatentShards
from ldm.util import fit_workers, usable_cpus
from helpers import make_cache, make_images, make_stage1_run


def test_requested_workers_are_lowered_to_the_usable_cores_once(caplog):
    cores = usable_cpus()
    with caplog.at_level(logging.INFO, logger="ldm.util"):
        assert fit_workers(cores) == cores and not caplog.records
        assert fit_workers(cores + 6, "data.params.num_workers") == cores
    (record,) = caplog.records
    assert f"data.params.num_workers={cores + 6}" in record.getMessage() and f"using {cores} workers" in record.getMessage()


def test_latent_loaders_use_no_more_workers_than_shards(tmp_path, caplog):
    images, captions = make_images(tmp_path / "images")
    cache = make_cache(make_stage1_run(tmp_path / "stage1"), images, captions, tmp_path / "cache")
    validation = LatentShards.from_cache(str(cache), "validation", shuffle=0)
    assert len(validation.urls) == 3  # 16 images, 6 per shard
    resampled = LatentShards.from_cache(str(cache), "train", resampled=True, epoch_length=16)
    data = DataModule(batch_size=4, num_workers=64, train=resampled, validation=validation)
    assert data.num_workers == usable_cpus()
    assert validation.useful_workers(8) == 3 and validation.useful_workers(8, rank=1, world=2) == 1
    assert resampled.useful_workers(8) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "suggested max number of worker" warning would fail here
        loader = data.val_dataloader()
        assert loader.num_workers == min(3, usable_cpus())
        assert sum(len(b["latent"]) for b in loader) == 16
