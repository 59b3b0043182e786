"""The LDM-style command line: config merging, overrides, errors that come before any compute."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ldm import cli
from ldm.util import ConfigError, instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/autoencoder/litevae_tiny.yaml")


def test_print_config_merges_bases_and_overrides(tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("data:\n  params:\n    batch_size: 3\n    num_workers: 5\n")
    assert cli.main(["--base", TINY, str(extra), "--print-config", "data.params.batch_size=7",
                     "lightning.trainer.max_steps=11", "model.params.loss.params.disc_start=99"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["params"]["batch_size"] == 7  # dotlist beats both files
    assert config["data"]["params"]["num_workers"] == 5  # second file beats the first
    assert config["lightning"]["trainer"]["max_steps"] == 11
    assert config["model"]["params"]["loss"]["params"]["disc_start"] == 99
    assert config["model"]["params"]["autoencoder"]["params"]["z_channels"] == 4  # untouched keys survive
    assert not (tmp_path / "logs").exists()


def test_full_config_prints_and_fails_fast_without_data(tmp_path):
    full = str(ROOT / "configs/autoencoder/litevae.yaml")
    out = subprocess.run([sys.executable, "main.py", "--base", full, "--print-config"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "LiteVAEEncoder" in out.stdout
    missing = tmp_path / "no-such-imagenet"
    out = subprocess.run([sys.executable, "main.py", "--base", full, "-t", "-l", str(tmp_path / "logs"),
                          f"data.params.train.params.root={missing}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert str(missing) in out.stderr
    assert not (tmp_path / "logs").exists()  # nothing was created before the data check


@pytest.mark.parametrize("argv", [["--base", TINY, "--bogus-flag"], ["--base", TINY, "-t", "notakeyvalue"]])
def test_unknown_arguments_are_errors(argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2


def test_resume_and_init_from_are_exclusive():
    with pytest.raises(SystemExit):
        cli.main(["-r", "x", "--init-from", "y.ckpt"])


def test_instantiate_errors_name_the_config_path():
    with pytest.raises(ConfigError, match=r"model\.params\.loss.*no attribute 'Nope'"):
        instantiate_from_config({"target": "autoencoder.losses.Nope"}, where="model.params.loss")
    with pytest.raises(ConfigError, match=r"data: unexpected keys \['batchsize'\]"):
        instantiate_from_config({"target": "ldm.data.DataModule", "batchsize": 2}, where="data")
    with pytest.raises(ConfigError, match=r"data\.params\.train: cannot build .*FashionMNIST.*bogus"):
        instantiate_from_config({"target": "ldm.data.FashionMNIST", "params": {"bogus": 1}},
                                where="data.params.train")


def test_resume_rejects_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        cli.resolve_resume(str(tmp_path))


def test_training_output_is_free_of_known_third_party_noise(tmp_path, caplog):
    """The demo used to print Lightning's warning with a pasted ``def training_step`` example (manual optimisation
    + periodic checkpoints: harmless here) and a cloud-logger advertisement at every run; real warnings still show."""
    import logging
    import warnings

    from conftest import STAGE1_TEST_OVERRIDES

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        assert cli.main(["--base", TINY, "-t", "-l", str(tmp_path), *STAGE1_TEST_OVERRIDES,
                         "lightning.trainer.max_steps=2", "lightning.checkpoint.every_n_train_steps=1"]) == 0
        warnings.warn("a real warning", UserWarning)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "def training_step" in m or "IterableDataset` has `__len__`" in m], messages
    assert not [r for r in caplog.records if "Tip:" in r.getMessage()]
    assert "a real warning" in messages
