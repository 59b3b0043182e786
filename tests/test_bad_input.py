"""Bad input found by a probe of new-user mistakes (issue 16): each gets a clear error naming the argument at
fault, before any expensive work."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ldm.evaluation.samples as ev_samples

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def pngs(tmp_path) -> Path:
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("bad_side", ["--samples", "--ref"])
@pytest.mark.parametrize("problem", ["empty folder", "missing path", "empty npz", "not images"])
def test_eval_fid_names_the_bad_input_before_computing_features(tmp_path, pngs, monkeypatch, bad_side, problem):
    monkeypatch.setattr(ev_samples, "compute_features", lambda *a, **k: pytest.fail("features computed"))
    bad = tmp_path / "bad"
    if problem == "empty folder":
        bad.mkdir()
    elif problem == "empty npz":
        bad = tmp_path / "bad.npz"
        np.savez(bad, arr_0=np.zeros((0, 16, 16, 3), np.uint8))
    elif problem == "not images":
        bad = tmp_path / "bad.npz"
        np.savez(bad, arr_0=np.zeros((4, 16, 16, 3), np.float32))
    args = {"--samples": str(pngs), "--ref": str(pngs), bad_side: str(bad)}
    with pytest.raises(SystemExit) as exit_info:
        load_script("eval_fid").main([a for kv in args.items() for a in kv] + ["--detector", "random"])
    message = str(exit_info.value)
    assert message.startswith(f"error: {bad_side} {bad}"), message


# ------------------------------------------------------------------------------------- configs
LITEVAE_TINY = str(ROOT / "configs/autoencoder/litevae_tiny.yaml")
LDM_TINY = str(ROOT / "configs/ldm/fmnist_litevae_tiny.yaml")


def test_misspelt_top_level_section_is_an_error(tmp_path):
    from ldm import cli
    from ldm.util import ConfigError

    with pytest.raises(ConfigError, match="unknown top-level config key 'lightnin'"):
        cli.main(["--base", LITEVAE_TINY, "--print-config", "lightnin.trainer.max_steps=2"])
    typo_file = tmp_path / "typo.yaml"
    typo_file.write_text("lightnin:\n  trainer:\n    max_steps: 2\n")
    with pytest.raises(ConfigError, match="'lightnin' \\(from a config file\\)"):
        cli.load_config([LITEVAE_TINY, str(typo_file)], [])
    # A top-level value the files declare (the stage-2 configs' `latents: ???`) is still settable.
    assert cli.load_config([LDM_TINY], ["latents=/data/cache"]).latents == "/data/cache"


def test_replacing_a_target_replaces_its_params(tmp_path):
    """The README's "Your own data" snippet as a second --base on a Fashion-MNIST config."""
    from ldm import cli

    own = tmp_path / "own.yaml"
    own.write_text("data:\n  params:\n    train: {target: ldm.data.ImageFolder, params: {root: /data/faces, size: 64}}\n")
    config = cli.load_config([LITEVAE_TINY, str(own)], ["data.params.validation.target=ldm.data.ImageFolder",
                                                       "data.params.validation.params.root=/data/val",
                                                       "data.params.validation.params.size=64"])
    assert dict(config.data.params.train.params) == {"root": "/data/faces", "size": 64}
    assert dict(config.data.params.validation.params) == {"root": "/data/val", "size": 64}
    # Same target: params merge as before.
    same = cli.load_config([LITEVAE_TINY], ["data.params.train.params.size=48"])
    assert same.data.params.train.params.size == 48 and "split" in same.data.params.train.params


@pytest.mark.parametrize("flag", ["-r", "--init-from"])
def test_checkpoint_arguments_are_validated_before_anything_is_built(tmp_path, monkeypatch, flag):
    from ldm import cli
    from ldm.util import ConfigError

    bad = tmp_path / "run" / "checkpoints" / "last.ckpt"
    bad.parent.mkdir(parents=True)
    bad.write_text("not a checkpoint\n")
    monkeypatch.setattr(cli, "instantiate_from_config", lambda *a, **k: pytest.fail("built before the check"))
    argv = ["-r", str(bad)] if flag == "-r" else ["--base", LITEVAE_TINY, "-t", "--init-from", str(bad)]
    with pytest.raises(ConfigError, match=f"{flag} {bad} is not a readable checkpoint"):
        cli.main(argv + ["-l", str(tmp_path / "logs")])
