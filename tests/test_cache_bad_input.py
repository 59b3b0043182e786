"""Bad input and faults of the latent cache: keys that collided under the old escaping, a dataset
reporting one key twice, a second autoencoder in one cache folder, and numbers or outputs checked at start.
Each is refused or handled before any encoding where it can be, with a message naming what is at fault."""
from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset

from conftest import command_module
from ldm.checkpoints import sha256_file
from ldm.cache import writer as latent_cache
from ldm.data.images import ImageFolder
from ldm.cache.writer import CacheOptions, cache_latents
from ldm.cache.reader import LatentShards
from helpers import SIZE

ROOT = Path(__file__).resolve().parents[1]
# Pairs the old "." -> "_" escaping mapped to one key, and a pair that only escaping "%" as well keeps apart.
COLLIDING = ["a.b.png", "a_b.png", "v1.2/x.png", "v1_2/x.png", "50%2E.png", "50..png"]


@pytest.fixture(autouse=True)
def _rank_env(monkeypatch):
    """cache_latents.py sets RANK/WORLD_SIZE for webdataset: keep them from leaking into the next test."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")


def make_images(root: Path, names: list[str]) -> Path:
    rng = np.random.default_rng(1)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / name)
    return root


def cache(ae: tuple, dataset: Dataset, out: Path, rank: int = 0, world: int = 1) -> tuple[dict, dict | None]:
    opts = CacheOptions(out_dir=str(out), samples_per_shard=4, batch_size=4)
    return cache_latents(ae[0], ae[1], dataset, opts, {}, rank, world)


def member_names(out: Path) -> list[str]:
    names = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    return names


def folder_state(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# ------------------------------------------------------------------------------------------------ keys
def test_tar_key_is_injective_and_reversible():
    from ldm.cache.keys import key_from_tar, tar_key  # key_from_tar: new with the reversible escaping

    keys = COLLIDING + ["%", "%%2E", "a%25b", "%2", "x.%2e", "dir.v/%.y"]
    assert len({tar_key(k) for k in keys}) == len(keys)
    assert all("." not in tar_key(k) and key_from_tar(tar_key(k)) == k for k in keys)


def test_names_differing_by_dot_or_underscore_get_distinct_keys(tmp_path, model):
    folder = make_images(tmp_path / "images", COLLIDING)
    out = tmp_path / "cache"
    _, entry = cache(model, ImageFolder(folder, size=SIZE), out)
    names = member_names(out)
    assert len(names) == len(set(names)), [n for n, c in Counter(names).items() if c > 1]
    assert entry["total"] == len(COLLIDING)
    reader = LatentShards.from_cache(str(out), sample=False, flip=False, scale_factor=1.0, shift=0.0, shuffle=0)
    assert Counter(s["key"] for s in reader) == Counter(COLLIDING)


def test_caches_of_the_old_key_scheme_still_read(tmp_path, model, monkeypatch):
    """Shards whose __key__ replaced '.' by '_' (written by the old key scheme) read back with their original keys;
    a sample without json falls back to unescaping __key__."""
    folder = make_images(tmp_path / "images", ["x.1.png", "y.png"])
    out = tmp_path / "cache"
    monkeypatch.setattr(latent_cache, "tar_key", lambda key: str(key).replace(".", "_"))
    cache(model, ImageFolder(folder, size=SIZE), out)
    monkeypatch.undo()
    assert {n.split(".")[0] for n in member_names(out)} == {"x_1_png", "y_png"}
    reader = LatentShards.from_cache(str(out), sample=False, flip=False, scale_factor=1.0, shift=0.0, shuffle=0)
    assert sorted(s["key"] for s in reader) == ["x.1.png", "y.png"]
    raw = next(iter(reader.samples()))
    raw = {"__key__": latent_cache.tar_key("dir.v/x.1.png"), "mean.npy": raw["mean.npy"], "std.npy": raw["std.npy"]}
    assert reader.decode(raw)["key"] == "dir.v/x.1.png"


class OneKey(Dataset):
    """An image folder whose samples all report the same key: a dataset bug the cache must not write."""

    def __init__(self, root: Path):
        self.folder = ImageFolder(root, size=SIZE)
        self.root, self.files = self.folder.root, self.folder.files

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> dict:
        return {**self.folder[i], "key": "same"}


@pytest.mark.parametrize("world", [1, 2], ids=["one run", "two ranks"])
def test_a_key_seen_twice_fails_naming_both_sources(tmp_path, model, world):
    """One run: the writer refuses the second sample; ranks: merging refuses before the manifest is written."""
    folder = make_images(tmp_path / "images", ["p.png", "q.png"])
    out = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="'same'") as error:
        for rank in range(world):
            cache(model, OneKey(folder), out, rank, world)
    assert str(folder / "p.png") in str(error.value) and str(folder / "q.png") in str(error.value)
    assert not (out / "manifest.json").exists()


# ------------------------------------------------------------------------------------------ autoencoders
@pytest.fixture()
def other_run(tmp_path, run_dir) -> Path:
    """A copy of the stage-1 run whose checkpoint differs (another SHA-256)."""
    other = tmp_path / "other_run"
    shutil.copytree(run_dir, other)
    ckpt = other / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "global_step": state["global_step"] + 1}, ckpt)
    return other


@pytest.mark.parametrize("second_split", ["validation", "train"])
def test_another_autoencoder_is_refused_before_encoding(tmp_path, run_dir, other_run, monkeypatch,
                                                        second_split):
    """``validation``: the manifest's train split came from another autoencoder; ``train``: this split's shards."""
    data = tmp_path / "data.yaml"
    folder = make_images(tmp_path / "images", ["p.png", "q.png", "r.png"])
    data.write_text(yaml.safe_dump({"target": "ldm.data.ImageFolder", "params": {"root": str(folder), "size": SIZE}}))
    out = tmp_path / "cache"
    common = ["--data", str(data), "--out", str(out), "--workers", "0", "--device", "cpu", "--batch-size", "2",
              "--samples-per-shard", "2"]
    script = command_module("cache_latents")
    script.main(["--ae", str(run_dir), "--split", "train", *common])
    before = folder_state(out)
    monkeypatch.setattr(latent_cache, "_encode", lambda *a, **k: pytest.fail("encoded before refusing"))
    with pytest.raises(SystemExit) as refused:
        script.main(["--ae", str(other_run), "--split", second_split, *common])
    message = str(refused.value)
    for run in (run_dir, other_run):
        assert sha256_file(run / "checkpoints" / "last.ckpt") in message, message
    assert "another folder" in message
    assert folder_state(out) == before  # no shard, sidecar, done file or manifest change
    assert set(json.loads((out / "manifest.json").read_text())["splits"]) == {"train"}


# --------------------------------------------------------------------------------- arguments at start
def refuse_work(monkeypatch, module, *names: str) -> None:
    for name in names:
        monkeypatch.setattr(module, name, lambda *a, name=name, **k: pytest.fail(f"{name} ran before the arguments "
                                                                                 "were checked"))


@pytest.mark.parametrize("bad, named", [
    (["--batch-size", "0"], "argument --batch-size"), (["--workers", "-1"], "argument --workers"),
    (["--samples-per-shard", "0"], "argument --samples-per-shard"), (["--batch-size", "two"], "argument --batch-size"),
    (["--rank", "-1", "--world-size", "2"], "argument --rank"), (["--rank", "0", "--world-size", "0"],
                                                                 "argument --world-size"),
    (["--rank", "2", "--world-size", "2"], "--rank 2 must be < --world-size 2"),
    (["--world-size", "2"], "--world-size 2 needs --rank"), (["--rank", "1"], "--rank 1 needs --world-size")])
def test_cache_latents_checks_numbers_before_loading(tmp_path, monkeypatch, capsys, bad, named):
    script = command_module("cache_latents")
    refuse_work(monkeypatch, script, "load_data_config", "load_first_stage")
    with pytest.raises(SystemExit) as refused:
        script.main(["--ae", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--device", "cpu", *bad])
    assert refused.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cache_latents_checks_out_before_loading(tmp_path, monkeypatch):
    script = command_module("cache_latents")
    refuse_work(monkeypatch, script, "load_data_config", "load_first_stage")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as refused:
        script.main(["--ae", str(tmp_path / "run"), "--out", str(tmp_path / "file" / "cache"), "--device", "cpu"])
    assert str(refused.value).startswith(f"error: --out {tmp_path / 'file' / 'cache'}")


@pytest.mark.parametrize("bad, named", [
    (["--n", "0"], "argument --n"), (["--n", "1"], "argument --n"), (["--repeats", "0"], "argument --repeats"),
    (["--bandwidths", "1", "0"], "argument --bandwidths"), (["--bandwidths", "-2"], "argument --bandwidths")])
def test_latent_stats_checks_numbers_before_computing(tmp_path, monkeypatch, capsys, bad, named):
    script = command_module("latent_stats")
    refuse_work(monkeypatch, script, "latent_diagnostics")
    with pytest.raises(SystemExit) as refused:
        script.main(["--cache", str(tmp_path), *bad])
    assert refused.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_latent_stats_checks_out_before_computing(tmp_path, monkeypatch, where):
    script = command_module("latent_stats")
    refuse_work(monkeypatch, script, "latent_diagnostics")
    (tmp_path / "file").write_text("")
    out = tmp_path if where == "a folder" else tmp_path / "file" / "stats.json"
    with pytest.raises(SystemExit) as refused:
        script.main(["--cache", str(tmp_path), "--out", str(out)])
    assert str(refused.value).startswith("error: --out ") and str(out.parent) in str(refused.value)
