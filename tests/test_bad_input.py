"""Bad input found by a probe of new-user mistakes: each gets a clear error naming the argument at
fault, before any expensive work."""
from __future__ import annotations

from conftest import command_module
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ldm.evaluation.samples as ev_samples

ROOT = Path(__file__).resolve().parents[1]


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
        command_module("eval_fid").main([a for kv in args.items() for a in kv] + ["--detector", "random"])
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
    """The "Your own data" snippet of docs/stage1.md as a second --base on a Fashion-MNIST config."""
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


# ---------------------------------------------------------------------------------- checkpoints
def test_checkpoint_write_that_fails_keeps_the_old_file_whole(tmp_path, monkeypatch):
    import errno

    import torch

    from ldm.atomic_checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):  # half a checkpoint reaches the disk, then ENOSPC
        real_save(obj, f)
        f.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))


# ------------------------------------------------------------------------ arguments and outputs
@pytest.mark.parametrize("script,argv,message", [
    ("eval_fid", ["--batch-size", "0"], "argument --batch-size/--batch: must be > 0, got 0"),
    ("eval_fid", ["--kid-subsets", "-3"], "argument --kid-subsets: must be > 0, got -3"),
    ("eval_fid", ["--workers", "-1"], "argument --workers: must be >= 0, got -1"),
    ("eval_autoencoder", ["--resolutions", "64", "-32"], "argument --resolutions: must be > 0, got -32"),
    ("compare_encoders", ["--ae-minutes", "0"], "argument --ae-minutes: must be > 0.0, got 0"),
])
def test_out_of_range_arguments_fail_at_parse_time_naming_flag_and_value(pngs, capsys, script, argv, message):
    base = {"eval_fid": ["--samples", str(pngs), "--ref", str(pngs), "--detector", "random"],
            "eval_autoencoder": ["--ae", str(pngs)], "compare_encoders": []}[script]
    with pytest.raises(SystemExit) as exit_info:
        command_module(script).main(base + argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("script", ["eval_fid", "eval_autoencoder"])
def test_unwritable_out_fails_before_any_work(tmp_path, pngs, monkeypatch, script):
    monkeypatch.setattr(ev_samples, "compute_features", lambda *a, **k: pytest.fail("features computed"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "results" / "out.json"  # a path through a regular file: no folder can be made there
    argv = {"eval_fid": ["--samples", str(pngs), "--ref", str(pngs), "--detector", "random"],
            "eval_autoencoder": ["--ae", str(tmp_path / "no_such_run")]}[script]
    with pytest.raises(SystemExit, match=f"--out {out.parent} is not a writable folder"):
        command_module(script).main(argv + ["--out", str(out)])


@pytest.mark.parametrize("base,override,message", [
    (LDM_TINY, "model.params.cond_drop_prob=1.5", "model.params: cond_drop_prob=1.5 is out of range: must be in [0, 1]"),
    (LDM_TINY, "model.params.sample_cfg=-2", "model.params: sample_cfg=-2 is out of range: must be >= 0"),
    (LDM_TINY, "model.params.sample_steps=0", "model.params: sample_steps=0 is out of range: must be >= 1"),
    (LITEVAE_TINY, "model.params.accumulate_grad_batches=0", "accumulate_grad_batches=0 is out of range"),
    (LITEVAE_TINY, "model.params.loss.params.kl_weight=-1e-6", "model.params.loss.params: kl_weight=-1e-06 is out"),
    (LITEVAE_TINY, "data.params.num_workers=-2", "data.params: num_workers=-2 is out of range: must be >= 0"),
])
def test_out_of_range_config_values_fail_at_start_naming_node_and_value(tmp_path, base, override, message):
    from ldm import cli
    from ldm.util import ConfigError, instantiate_from_config

    with pytest.raises(ConfigError) as info:
        if base == LDM_TINY:  # the model alone: without a latent cache or first stage to read
            config = cli.load_config([base], [override, "latents=unused", "model.params.latent_stats=null",
                                              "model.params.first_stage=null"])
            instantiate_from_config(config.model, where="model")
        else:
            cli.main(["--base", base, "-t", "-l", str(tmp_path / "logs"), override])
    assert message in str(info.value)


def test_resuming_a_copied_run_keeps_one_atomic_last_ckpt(tmp_path, monkeypatch):
    """A run folder copied elsewhere and resumed there: one last.ckpt (no last-v1.ckpt beside it), written through
    AtomicCheckpointIO."""
    import shutil

    import pytorch_lightning as pl

    from conftest import STAGE1_TEST_OVERRIDES
    from ldm import cli
    from ldm.atomic_checkpoint_io import AtomicCheckpointIO

    io_used = []
    real_fit = pl.Trainer.fit
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *a, **k: io_used.append(type(self.strategy.checkpoint_io))
                        or real_fit(self, *a, **k))
    monkeypatch.setenv("LITEVAE_RUN_TIME", "2026-01-01T00-00-00")
    small = [*STAGE1_TEST_OVERRIDES, "lightning.trainer.val_check_interval=100", "lightning.image_logger.every_n_steps=100"]
    assert cli.main(["--base", LITEVAE_TINY, "-t", "-l", str(tmp_path / "a"), *small,
                     "lightning.trainer.max_steps=2"]) == 0
    run = next((tmp_path / "a").iterdir())
    copy = tmp_path / "b" / run.name
    shutil.copytree(run, copy)
    assert cli.main(["-r", str(copy), "-t", "lightning.trainer.max_steps=4"]) == 0
    names = sorted(p.name for p in (copy / "checkpoints").iterdir())
    assert "last.ckpt" in names and not any(n.startswith("last-v") or n.endswith(".tmp") for n in names), names
    assert io_used == [AtomicCheckpointIO, AtomicCheckpointIO]
    import torch

    assert torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] == 4


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "argument --steps: must be > 0, got 0"),
    (["--cfg", "-1.5"], "argument --cfg: must be >= 0.0, got -1.5"),
    (["--eta", "-0.1"], "argument --eta: must be >= 0.0, got -0.1"),
    (["--batch", "0"], "argument --batch-size/--batch: must be > 0, got 0"),
    (["--seeds", "9-3"], "argument --seeds: bad seed range '9-3': end before start"),
    (["--seeds", "-5"], "argument --seeds: bad seed '-5' in '-5': seeds are non-negative"),
])
def test_sample_arguments_are_checked_at_parse_time(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        command_module("sample").main([str(tmp_path / "no_run"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_sample_unwritable_out_fails_before_the_model_is_loaded(tmp_path, monkeypatch):
    sample = command_module("sample")
    monkeypatch.setattr(sample, "load_diffusion", lambda *a, **k: pytest.fail("model loaded before the check"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=f"--out {blocker / 'samples'} is not a writable folder"):
        sample.main([str(tmp_path / "run"), "--out", str(blocker / "samples")])


def test_demo_never_calls_a_random_feature_distance_fid():
    demo = command_module("demo")
    random = demo.fid_line({"fid": 1.2e-4, "detector": {"comparable": False, "kind": "random"}})
    assert "FID" not in random.replace("no FID computed", "") and random.startswith("no FID computed")
    result = {"fid": 12.345, "detector": {"comparable": True, "kind": "torchscript"}, "n_samples": 500, "n_ref": 1000,
              "precision": 0.5, "recall": 0.25}
    assert demo.fid_line(result) == ("FID 12.35 (torchscript features, 500 samples vs 1000 real images: biased upward "
                                     "at this n, comparable only at equal n); precision 0.500, recall 0.250")
