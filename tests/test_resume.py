"""Mid-epoch resume through Lightning: a checkpoint taken inside an epoch (here by SIGUSR1) continues with exactly
the batches, and so the weights, of an uninterrupted run with the same seed."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from ldm.callbacks import CheckpointOnSignal
from ldm.data import DataModule

MAX_STEPS = 10  # 10 samples in batches of 3: 4 batches an epoch (the last holds one), so into a third epoch


class Numbered(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.full((2,), float(i)), "key": i}


class RecordsBatches(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step, batch["key"].tolist()))
        return self.layer(batch["x"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SignalBefore(pl.Callback):
    """Sends this process SIGUSR1 before the batch of optimizer step ``step`` + 1, like a pre-emption warning."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            signal.raise_signal(signal.SIGUSR1)


def fit(root: Path, num_workers: int, ckpt_path: Path | None = None, callbacks: list = ()) -> RecordsBatches:
    model = RecordsBatches()
    data = DataModule(batch_size=3, num_workers=num_workers, train=Numbered())
    trainer = pl.Trainer(default_root_dir=root, max_steps=MAX_STEPS, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=list(callbacks))
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("num_workers", [0, 2], ids=["main_process", "workers_prefetch_ahead"])
def test_mid_epoch_checkpoint_resumes_with_the_uninterrupted_batches(tmp_path, monkeypatch, num_workers):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what the CLI's --seed exports
    ckpt = tmp_path / "signal.ckpt"
    handler = signal.getsignal(signal.SIGUSR1)
    try:  # the uninterrupted run; it also saves a checkpoint at step 7, the middle of its second epoch
        straight = fit(tmp_path, num_workers, callbacks=[SignalBefore(6), CheckpointOnSignal(str(ckpt))])
    finally:
        signal.signal(signal.SIGUSR1, handler)
    assert [step for step, _ in straight.seen] == list(range(MAX_STEPS))

    resumed = fit(tmp_path, num_workers, ckpt_path=ckpt)
    assert resumed.seen == straight.seen[7:]
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), straight.parameters()))
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 7
    assert saved["DataModule"]["train_sampler"] == {"epoch": 1, "consumed": 9, "seed": 7, "num_replicas": 1}
