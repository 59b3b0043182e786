"""ldm.data: odd and bad image files, Fashion-MNIST IDX parsing, WebDataset splitting, the DataModule.

All inputs are generated here with PIL / numpy; references are PIL's own decoding and resizing.
"""
from __future__ import annotations

import collections
import gzip
import io
import json
import multiprocessing as mp
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from ldm.data import (DataModule, FashionMNIST, ImageFolder, ImageTransform, WebDatasetImages,
                      collate_skip_bad, collate_train)
from ldm.data.sampler import ResumableSampler
from ldm.util import ConfigError, is_empty_batch

GOOD = ["cat/a.jpg", "cat/b.png", "dog/c_cmyk.jpg", "dog/d_rgba.png", "dog/e_palette.png", "dog/puppies/f16.png"]
BAD = ["cat/empty.jpg", "cat/trunc.jpg", "dog/text.jpg", "dog/tiny.png"]
SIZE = 32


def rand_rgb(h: int, w: int, seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


def as_unit(a: np.ndarray) -> torch.Tensor:
    """HWC uint8 reference -> CHW float in [-1, 1], computed independently of the library."""
    return torch.from_numpy(a.astype(np.float64) / 127.5 - 1.0).permute(2, 0, 1).float()


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "images"
    for d in ("cat", "dog/puppies"):
        (root / d).mkdir(parents=True)
    Image.fromarray(rand_rgb(32, 48, 0)).save(root / "cat/a.jpg", quality=95)
    Image.fromarray(rand_rgb(64, 64, 1)).save(root / "cat/b.png")
    Image.fromarray(rand_rgb(40, 40, 2)).convert("CMYK").save(root / "dog/c_cmyk.jpg")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, 16:] = (255, 0, 0, 255)  # right half opaque red, left half transparent black
    Image.fromarray(rgba, "RGBA").save(root / "dog/d_rgba.png")
    pal = Image.fromarray(np.repeat([[0] * 16 + [1] * 16], 32, axis=0).astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.save(root / "dog/e_palette.png", transparency=0)  # index 0 transparent, index 1 blue
    sixteen = np.zeros((32, 48), np.uint16)
    sixteen[:, :16], sixteen[:, 16:32], sixteen[:, 32:] = 65535, 32768, 1000
    Image.fromarray(sixteen).save(root / "dog/puppies/f16.png")
    (root / "cat/empty.jpg").write_bytes(b"")
    full = io.BytesIO()
    Image.fromarray(rand_rgb(64, 64, 3)).save(full, "JPEG")
    (root / "cat/trunc.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (root / "dog/text.jpg").write_text("this is not an image\n")
    Image.fromarray(rand_rgb(8, 8, 4)).save(root / "dog/tiny.png")
    (root / "dog/notes.txt").write_text("not listed: wrong extension")
    return root


def test_image_folder_skips_exactly_the_bad_files(tree):
    ds = ImageFolder(tree, SIZE, labels_from_subfolders=True)
    assert ds.files == sorted(GOOD + BAD) and ds.classes == ["cat", "dog"]
    samples = {f: ds[i] for i, f in enumerate(ds.files)}
    assert {f for f, s in samples.items() if s is None} == set(BAD)
    assert ds.skipped == len(BAD) and ds.bad_files == sorted(BAD)
    for f in GOOD:
        s = samples[f]
        assert s["key"] == f and s["cls"] == ("cat", "dog").index(f.split("/")[0])
        assert s["image"].shape == (3, SIZE, SIZE) and s["image"].dtype == torch.float32
        assert s["image"].min() >= -1 and s["image"].max() <= 1
    assert ds[ds.files.index("cat/trunc.jpg")] is None and ds.skipped == len(BAD)  # counted once per file


def test_converted_values_match_pil(tree):
    ds = ImageFolder(tree, SIZE)
    get = lambda f: ds[ds.files.index(f)]["image"]  # noqa: E731
    # 48x32 JPEG at size 32: no resize, centre crop keeps columns 8..40 of PIL's own decode.
    ref = np.asarray(Image.open(tree / "cat/a.jpg").convert("RGB"))[:, 8:40]
    torch.testing.assert_close(get("cat/a.jpg"), as_unit(ref), atol=1e-6, rtol=0)
    # 64 -> 32 downscale: torchvision antialiased bicubic on uint8 agrees with PIL's bicubic within 1 level.
    ref = np.asarray(Image.open(tree / "cat/b.png").resize((SIZE, SIZE), Image.BICUBIC))
    torch.testing.assert_close(get("cat/b.png"), as_unit(ref), atol=2 / 255 + 1e-6, rtol=0)
    ref = np.asarray(Image.open(tree / "dog/c_cmyk.jpg").convert("RGB").resize((SIZE, SIZE), Image.BICUBIC))
    torch.testing.assert_close(get("dog/c_cmyk.jpg"), as_unit(ref), atol=2 / 255 + 1e-6, rtol=0)
    white, red, blue = torch.tensor([1.0, 1, 1]), torch.tensor([1.0, -1, -1]), torch.tensor([-1.0, -1, 1])
    for f, right in (("dog/d_rgba.png", red), ("dog/e_palette.png", blue)):
        x = get(f)  # transparency composited on white, not black
        assert torch.equal(x[:, :, :16], white[:, None, None].expand(3, SIZE, 16))
        assert torch.equal(x[:, :, 16:], right[:, None, None].expand(3, SIZE, 16))
    x = get("dog/puppies/f16.png")  # 48x32 16-bit: crop keeps 8..40, so 8 columns of 65535, 16 of 32768, 8 of 1000
    torch.testing.assert_close(x[:, :, :8], torch.ones(3, SIZE, 8))
    torch.testing.assert_close(x[:, :, 8:24], torch.full((3, SIZE, 16), 32768 / 65535 * 2 - 1))
    torch.testing.assert_close(x[:, :, 24:], torch.full((3, SIZE, 8), 1000 / 65535 * 2 - 1))


def test_random_crop_and_flip_are_windows_of_the_image(tree):
    img = Image.open(tree / "cat/a.jpg")
    ref = as_unit(np.asarray(img.convert("RGB")))
    torch.manual_seed(0)
    t = ImageTransform(SIZE, crop="random", flip=True)
    seen_flip, offsets = set(), set()
    for _ in range(20):
        x = t(img)
        matches = [(o, fl) for o in range(17) for fl in (False, True)
                   if torch.allclose(x, ref[:, :, o:o + SIZE].flip(-1) if fl else ref[:, :, o:o + SIZE], atol=1e-6)]
        assert len(matches) >= 1
        offsets.add(matches[0][0])
        seen_flip.add(matches[0][1])
    assert seen_flip == {False, True} and len(offsets) > 1


def test_workers_count_bad_files_and_collate_drops_them(tree):
    ds = ImageFolder(tree, SIZE, labels_from_subfolders=True)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_skip_bad)
    keys = [k for batch in loader if batch is not None for k in batch["key"]]
    assert sorted(keys) == sorted(GOOD)
    assert ds.skipped == len(BAD)  # counted in the worker processes, visible here through shared memory
    assert collate_skip_bad([None, None]) is None
    assert collate_train([None, None]) == {"all_bad": 2}  # training loaders never yield None (DDP, see there)


def test_captions_json_and_tsv(tree, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"cat/a.jpg": "a cat", "dog/d_rgba.png": "red, half"}))
    (tmp_path / "c.tsv").write_text("cat/a.jpg\ta cat\ndog/d_rgba.png\tred, half\n")
    for name in ("c.json", "c.tsv"):
        ds = ImageFolder(tree, SIZE, captions=tmp_path / name)
        assert ds[ds.files.index("cat/a.jpg")]["txt"] == "a cat"
        assert ds[ds.files.index("dog/d_rgba.png")]["txt"] == "red, half"
        assert ds[ds.files.index("cat/b.png")]["txt"] == ""


def test_folder_errors_at_start(tmp_path, tree, monkeypatch):
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        ImageFolder(missing, SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty", SIZE)
    Image.fromarray(rand_rgb(32, 32, 5)).save(tree / "loose.png")
    with pytest.raises(ValueError, match="loose.png"):
        ImageFolder(tree, SIZE, labels_from_subfolders=True)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        ImageFolder(tree, SIZE)


def write_idx(path, array: np.ndarray, magic_type: int = 0x08) -> None:
    header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fmnist_root(tmp_path):
    root = tmp_path / "fmnist"
    root.mkdir()
    images = np.random.RandomState(0).randint(0, 256, (5, 28, 28)).astype(np.uint8)
    images[2] = 255
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1, 5]))
    return root, images


def test_fashion_mnist_synthetic_idx(fmnist_root):
    root, images = fmnist_root
    ds = FashionMNIST.from_files(root, split="test", size=28)
    assert len(ds) == 5 and [ds[i]["cls"] for i in range(5)] == [3, 1, 4, 1, 5]
    s = ds[3]
    assert s["key"] == "fmnist-test-00003" and s["image"].shape == (3, 28, 28)
    ref = torch.from_numpy(images[3].astype(np.float64) / 127.5 - 1).float()
    for c in range(3):
        torch.testing.assert_close(s["image"][c], ref, atol=1e-6, rtol=0)
    assert torch.equal(ds[2]["image"], torch.ones(3, 28, 28))  # pixel 255 -> exactly 1.0
    big = FashionMNIST.from_files(root, size=56, limit=2)
    assert len(big) == 2 and big[0]["image"].shape == (3, 56, 56)
    ref = np.asarray(Image.fromarray(images[0]).resize((56, 56), Image.BICUBIC)).astype(np.float64) / 127.5 - 1
    torch.testing.assert_close(big[0]["image"][0], torch.from_numpy(ref).float(), atol=2 / 255 + 1e-6, rtol=0)


def test_fashion_mnist_errors(tmp_path, fmnist_root):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*download: true"):
        FashionMNIST.from_files(tmp_path / "nothing")
    root, images = fmnist_root
    write_idx(root / "train-images-idx3-ubyte.gz", images, magic_type=0x09)
    with pytest.raises(ValueError, match="not an IDX file"):
        FashionMNIST.from_files(root)
    raw = bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(7)  # says 10 labels, holds 7
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(raw)
    with pytest.raises(ValueError, match="truncated"):
        FashionMNIST.from_files(root, split="test")


class _FakeTorchvisionDownload:
    """Stands in for torchvision's downloader: records the call, takes a while, writes torchvision's layout."""

    def __init__(self, root: str, train: bool, download: bool):
        with open(Path(root).parent / "downloads.txt", "a") as f:
            f.write("1\n")
        time.sleep(0.5)
        raw = Path(root) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for prefix in ("train", "t10k"):
            write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
            write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.array([0, 1]))


def _build_with_download(root: str) -> None:
    import torchvision.datasets

    torchvision.datasets.FashionMNIST = _FakeTorchvisionDownload
    assert len(FashionMNIST.from_files(root, split="train", size=28, download=True)) == 2


def test_fashion_mnist_download_once_for_concurrent_ranks(tmp_path):
    """Three processes (as DDP ranks would) asking for download=True at once: one downloads, all load."""
    root = tmp_path / "fmnist_dl"
    procs = [mp.get_context("fork").Process(target=_build_with_download, args=(str(root),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert (tmp_path / "downloads.txt").read_text().count("1") == 1


def test_fashion_mnist_real_files():
    ds = FashionMNIST.from_files(split="train", size=32, limit=10)  # the Debian package's files (CI installs them)
    assert len(ds) == 10 and ds[0]["image"].shape == (3, 32, 32)
    # The published first ten training labels of Fashion-MNIST.
    assert [ds[i]["cls"] for i in range(10)] == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
    arrays = {}
    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{shard:06d}.tar")) as sink:
            for j in range(4):
                key = f"s{shard}_{j}"
                if (shard, j) == (1, 2):
                    sink.write({"__key__": key, "jpg": b"\xff\xd8\xff\xe0 corrupt jpeg"})
                    continue
                arrays[key] = rand_rgb(SIZE, SIZE, 10 * shard + j)
                sink.write({"__key__": key, "png": png_bytes(arrays[key]), "cls": j, "txt": f"caption {key}"})
    return str(tmp_path / "shard-{000000..000001}.tar"), arrays


def test_webdataset_two_workers_see_each_sample_once(shards):
    urls, arrays = shards
    ds = WebDatasetImages(urls, SIZE, shuffle=4)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skip_bad)
    seen = collections.Counter()
    for batch in loader:
        for key, image, cls, txt in zip(batch["key"], batch["image"], batch["cls"], batch["txt"]):
            seen[key] += 1
            torch.testing.assert_close(image, as_unit(arrays[key]), atol=1e-6, rtol=0)
            assert cls == int(key[-1]) and txt == f"caption {key}"
    assert seen == collections.Counter(list(arrays))  # every good sample exactly once, the corrupt one never
    assert ds.skipped == 1


def test_webdataset_epoch_length(shards):
    urls, arrays = shards
    for resampled in (False, True):
        ds = WebDatasetImages(urls, SIZE, shuffle=0, resampled=resampled, epoch_length=11)
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        keys = [s["key"] for s in loader]
        assert len(keys) == len(ds) == 11 and set(keys) <= set(arrays)


def data_config(tree, fmnist_root, **extra):
    return OmegaConf.create({
        "target": "ldm.data.DataModule",
        "params": {"batch_size": 4, "val_batch_size": 2, **extra,
                   "train": {"target": "ldm.data.ImageFolder",
                             "params": {"root": str(tree), "size": SIZE, "labels_from_subfolders": True}},
                   "validation": {"target": "ldm.data.FashionMNIST",
                                  "params": {"root": str(fmnist_root), "split": "test", "size": SIZE}}}})


def test_datamodule_from_config(tree, fmnist_root):
    from ldm.util import instantiate_from_config

    dm = instantiate_from_config(data_config(tree, fmnist_root[0]), where="data")
    train = dm.train_dataloader()
    assert isinstance(train.sampler, ResumableSampler) and train.sampler.shuffle and train.pin_memory is False
    batches = [b for b in train if not is_empty_batch(b)]  # an all-bad training batch is {"all_bad": n}
    assert sum(len(b["key"]) for b in batches) == len(GOOD) and dm.skipped() == {"train": len(BAD)}
    assert all(b["image"].shape[1:] == (3, SIZE, SIZE) for b in batches)
    val = dm.val_dataloader()
    assert isinstance(val.sampler, SequentialSampler)
    first = next(iter(val))
    assert first["image"].shape == (2, 3, SIZE, SIZE) and first["key"] == ["fmnist-test-00000", "fmnist-test-00001"]
    from pytorch_lightning.utilities.model_helpers import is_overridden
    assert is_overridden("val_dataloader", dm) and not is_overridden("test_dataloader", dm)


def test_webdataset_missing_shards_fail_at_start(tmp_path, shards):
    urls, _ = shards
    with pytest.raises(FileNotFoundError, match="set data"):
        WebDatasetImages("???", SIZE)  # OmegaConf's placeholder for a required value
    paths = wds.shardlists.expand_urls(urls)
    with pytest.raises(FileNotFoundError, match="1 of 3 shard"):
        WebDatasetImages([*paths, str(tmp_path / "gone.tar")], SIZE)
    with pytest.raises(FileNotFoundError, match="1 of 2 shard"):
        WebDatasetImages([f"file:{paths[0]}", f"file:{tmp_path}/gone.tar"], SIZE)
    # Remote and stream URLs are not checked here (webdataset opens them lazily).
    assert len(WebDatasetImages([*paths, "pipe:cat /nonexistent.tar", "s3://bucket/x.tar"], SIZE).urls) == 4


def test_datamodule_iterable_and_errors(tree, fmnist_root, shards, tmp_path):
    urls, arrays = shards
    dm = DataModule(batch_size=3, train={"target": "ldm.data.WebDatasetImages", "params": {"urls": urls, "size": SIZE}})
    loader = dm.train_dataloader()
    assert not isinstance(loader.sampler, (RandomSampler, ResumableSampler))
    assert sorted(k for b in loader for k in b["key"]) == sorted(arrays)
    cfg = data_config(tree, fmnist_root[0])
    cfg.params.train.params.root = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing") as e:
        DataModule(**cfg.params)
    assert "data.params.train" in " ".join(e.value.__notes__)
    cfg.params.train.target = "ldm.data.NoSuchDataset"
    with pytest.raises(ConfigError, match="data.params.train"):
        DataModule(**cfg.params)
