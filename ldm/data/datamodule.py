"""The LightningDataModule behind every config's ``data:`` section (LDM-style ``{target:, params:}`` datasets)."""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.images import collate_skip_bad, collate_train
from ldm.data.sampler import ResumableSampler
from ldm.cache.shards import ShardStream
from ldm.util import check_range, fit_workers, instantiate_from_config, run_seed

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


class DataModule(pl.LightningDataModule):
    """Builds the ``train`` / ``validation`` / ``test`` datasets from their configs and serves loaders.

    Datasets are built in ``__init__`` so a missing path or bad config fails at start, before any compute.
    Map-style training sets are drawn by a ``ResumableSampler`` (shuffled with the run's ``--seed``, split by
    rank under DDP) whose position is part of the checkpoint (``state_dict``), so a run resumed from a mid-epoch
    checkpoint sees the same batches as an uninterrupted one; iterable ones (WebDataset) split themselves by
    rank and worker and get no sampler. Validation and test are never shuffled. Bad samples are dropped by
    ``collate_skip_bad``; a batch in which every sample was bad arrives as ``None``, in training as
    ``{"all_bad": n}`` (``collate_train``: see there why).
    """

    def __init__(self, batch_size: int, num_workers: int = 0, train: Mapping | Dataset | None = None,
                 validation: Mapping | Dataset | None = None, test: Mapping | Dataset | None = None,
                 val_batch_size: int | None = None, shuffle: bool = True, pin_memory: bool | None = None,
                 persistent_workers: bool | None = None):
        super().__init__()
        check_range("batch_size", batch_size, 1)
        check_range("val_batch_size", val_batch_size, 1)
        check_range("num_workers", num_workers, 0)
        if not isinstance(shuffle, bool):  # -1 or "no" would otherwise be read as true or false silently
            raise TypeError(f"shuffle must be true or false, got {shuffle!r}")
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle = fit_workers(num_workers, "data.params.num_workers"), shuffle
        self._pin_memory = pin_memory
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self._train_sampler: ResumableSampler | None = None
        self._sampler_state: dict[str, int] | None = None  # from a checkpoint, for the sampler not yet built
        configs = {"train": train, "validation": validation, "test": test}
        self.datasets = {name: self._build(name, cfg) for name, cfg in configs.items() if cfg is not None}
        if not self.datasets:
            raise ValueError("data.params: none of train / validation / test is configured")
        # Lightning decides whether a split exists by whether its *_dataloader hook is overridden, so
        # only the configured splits get one (an unconfigured validation is then skipped, not an error).
        if "train" in self.datasets:
            self.train_dataloader = self._train_dataloader
        if "validation" in self.datasets:
            self.val_dataloader = partial(self._eval_dataloader, "validation")  # partial: picklable
        if "test" in self.datasets:
            self.test_dataloader = partial(self._eval_dataloader, "test")

    @staticmethod
    def _build(name: str, cfg: Mapping | Dataset) -> Dataset:
        if isinstance(cfg, Dataset):
            return cfg
        where = f"data.params.{name}"
        try:
            dataset = instantiate_from_config(cfg, where=where)
        except Exception as e:  # e.g. FileNotFoundError from the dataset: keep its type, say which config
            e.add_note(f"while building {where}")
            raise
        log.info("%s: %s", where, f"{len(dataset)} samples" if _has_len(dataset) else "streaming dataset")
        return dataset

    @property
    def pin_memory(self) -> bool:
        if self._pin_memory is not None:
            return self._pin_memory
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def _loader(self, dataset: Dataset, batch_size: int, sampler: ResumableSampler | None = None,
                collate=collate_skip_bad) -> DataLoader:
        workers = self.num_workers
        if isinstance(dataset, ShardStream):  # a worker without a shard of its own would idle (and warn)
            trainer = getattr(self, "trainer", None)
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            workers = dataset.useful_workers(workers, rank, world)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=collate, pin_memory=self.pin_memory,
                          persistent_workers=self.persistent_workers and workers > 0)

    def _train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        if not isinstance(dataset, IterableDataset) and self._train_sampler is None:
            trainer = getattr(self, "trainer", None)
            world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            self._train_sampler = ResumableSampler(dataset, world, rank, shuffle=self.shuffle, seed=run_seed())
            if self._sampler_state is not None:
                self._train_sampler.load_state_dict(self._sampler_state)
        return self._loader(dataset, self.batch_size, self._train_sampler, collate=collate_train)

    def _eval_dataloader(self, split: str) -> DataLoader:
        return self._loader(self.datasets[split], self.val_batch_size)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this once for each batch its loops take: counting the training ones here (not in the
        # sampler, which DataLoader workers run ahead of) makes the sampler's position what was trained on.
        if self._train_sampler is not None and self.trainer.training:
            self._train_sampler.advance(self.batch_size)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The training sampler's position; Lightning stores it in every checkpoint."""
        return {"train_sampler": self._train_sampler.state_dict()} if self._train_sampler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # On resume Lightning calls this before it asks for the train loader, which hands it to the new sampler.
        self._sampler_state = state.get("train_sampler")
        if self._train_sampler is not None and self._sampler_state is not None:
            self._train_sampler.load_state_dict(self._sampler_state)

    def skipped(self) -> dict[str, int]:
        """Bad samples skipped so far per split (for datasets that count them; per rank)."""
        return {name: ds.skipped for name, ds in self.datasets.items() if hasattr(ds, "skipped")}

    def teardown(self, stage: str) -> None:
        for name, count in self.skipped().items():
            if count:
                log.warning("data.params.%s: %d bad samples were skipped", name, count)


def _has_len(dataset: Any) -> bool:
    try:
        len(dataset)
        return True
    except TypeError:
        return False
