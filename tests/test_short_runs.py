"""A run shorter than its validation and image intervals still ends with a validation number and grids (before,
30- and 50-step runs ended with empty ``images/`` folders and no ``val/*`` value)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import LITEVAE_TINY, STAGE1_TEST_OVERRIDES
from ldm import cli
from helpers import make_cache, make_images, make_stage1_run, run_folder, stage2_config, write_config

STEPS = 3
LONG_INTERVALS = ["lightning.trainer.val_check_interval=1000", "lightning.image_logger.every_n_steps=1000"]


def val_rows(run: Path, metric: str) -> list[dict[str, str]]:
    return [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get(metric)]


def test_stage1_short_run_validates_and_logs_grids_at_the_last_step(tmp_path):
    argv = ["--base", LITEVAE_TINY, "-t", "-l", str(tmp_path), *STAGE1_TEST_OVERRIDES, *LONG_INTERVALS,
            f"lightning.trainer.max_steps={STEPS}"]
    assert cli.main(argv) == 0
    run = run_folder(tmp_path)
    rows = val_rows(run, "val/psnr")
    assert len(rows) == 1 and int(rows[0]["step"]) == STEPS - 1  # Lightning logs validation at the last step index
    assert [p.name for p in (run / "images" / "train").glob("reconstructions_gs-*.png")] == \
        [f"reconstructions_gs-{STEPS:07d}_e-0000.png"]
    assert list((run / "images" / "val").glob("reconstructions_ema_gs-*.png"))


@pytest.mark.parametrize("val_every", [1000, STEPS])  # due anyway at the last step: still validated once
def test_stage2_short_run_validates_once_and_logs_samples(tmp_path, val_every):
    images, captions = make_images(tmp_path / "images")
    cache = make_cache(make_stage1_run(tmp_path / "stage1"), images, captions, tmp_path / "cache")
    config = write_config(stage2_config(cache, "class"), tmp_path / "ldm.yaml")
    argv = ["--base", config, "-t", "-l", str(tmp_path / "logs"), f"lightning.trainer.max_steps={STEPS}",
            f"lightning.trainer.val_check_interval={val_every}", "lightning.image_logger.every_n_steps=1000"]
    assert cli.main(argv) == 0
    run = run_folder(tmp_path / "logs")
    assert len(val_rows(run, "val/loss_ema")) == 1
    assert list((run / "images" / "train").glob(f"samples_gs-{STEPS:07d}_e-*.png"))
    assert list((run / "images" / "val").glob("samples_gs-*.png"))
