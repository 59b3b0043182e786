"""ldm.data.photos and the resize-then-crop transform: the split by photo, fixed validation crops, random training
crops, bad photos. Synthetic photo folders (PNG, so references are exact) plus the real endless-sky folder.

References are computed here: torchvision's resize called directly (and PIL's resize, within one level) and an
exhaustive search over all crop windows.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from ldm.data import ImageFolder, ImageTransform, PhotoCrops, collate_skip_bad, split_photos
from ldm.cache.records import IndexedSource
from ldm.data.configs import dataset_config, deterministic
from ldm.data.photos import ENDLESS_SKY_PHOTOS, fixed_positions
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
SIZE, RESIZE = 16, 24
SHAPES = [(36, 72), (48, 40), (30, 60), (40, 90), (64, 48), (32, 32), (45, 80), (50, 50), (34, 68), (40, 60)]


def rand_rgb(h: int, w: int, seed: int) -> np.ndarray:
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i, (h, w) in enumerate(SHAPES):
        Image.fromarray(rand_rgb(h, w, i)).save(root / ("sub" if i % 3 == 0 else ".") / f"p{i:02d}.png")
    return root


def scaled_reference(path: Path, resize: int) -> torch.Tensor:
    """The photo resized so its shorter side is ``resize``: torchvision's resize called directly, uint8 CHW."""
    x = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).contiguous()
    return v2.functional.resize(x, resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def window_offsets(crop: torch.Tensor, ref: torch.Tensor, flips: bool = False) -> list[tuple[int, int, bool]]:
    """Every (top, left, flipped) at which ``crop`` (in [-1, 1]) is exactly a window of ``ref`` (uint8)."""
    as_unit = ref.float() / 255.0 * 2.0 - 1.0
    s, (h, w) = crop.shape[-1], ref.shape[-2:]
    found = []
    for top in range(h - s + 1):
        for left in range(w - s + 1):
            window = as_unit[:, top:top + s, left:left + s]
            found += [(top, left, fl) for fl in ((False, True) if flips else (False,))
                      if torch.equal(crop, window.flip(-1) if fl else window)]
    return found


# --- the split ----------------------------------------------------------------------------------------------------

def test_split_is_a_partition_by_the_stated_hash_rule():
    names = [f"dir{i % 3}/photo{i}.jpg" for i in range(101)]
    split = split_photos(names, val_fraction=0.2, seed=0)
    train, val = set(split["train"]), set(split["validation"])
    assert not train & val and train | val == set(names)
    assert len(val) == round(0.2 * 101) == 20
    assert split["train"] == sorted(train) and split["validation"] == sorted(val)
    # The rule, computed independently: the 20 names with the smallest sha256("<seed>/<name>") are validation.
    digests = sorted(names, key=lambda n: hashlib.sha256(f"0/{n}".encode()).hexdigest())
    assert val == set(digests[:20])


def test_split_is_deterministic_and_independent_of_order_and_of_other_photos():
    names = [f"p{i}.jpg" for i in range(60)]
    a = split_photos(names, 0.25, seed=3)
    assert a == split_photos(list(reversed(names)), 0.25, seed=3)
    assert split_photos(names, 0.25, seed=4) != a  # the seed moves photos
    # A photo's rank depends on its name only: validation sets are nested, and with more photos the old ones that
    # stay in validation are exactly the top-ranked old ones.
    assert set(split_photos(names, val_count=7, seed=3)["validation"]) < set(a["validation"])
    more = split_photos(names + [f"new{i}.jpg" for i in range(40)], val_count=40, seed=3)["validation"]
    old_in_val = [n for n in more if n in set(names)]
    assert 0 < len(old_in_val) < len(names)
    assert old_in_val == split_photos(names, val_count=len(old_in_val), seed=3)["validation"]
    assert len(split_photos(names, val_count=7)["validation"]) == 7


@pytest.mark.parametrize("kwargs", [{"val_fraction": 0.0}, {"val_fraction": 1.0}, {"val_count": 0},
                                    {"val_count": 10}])
def test_split_refuses_an_empty_split(kwargs):
    with pytest.raises(ValueError):
        split_photos([f"p{i}.jpg" for i in range(10)], **kwargs)


def test_photo_crops_split_covers_every_photo_once(photos):
    train = PhotoCrops(photos, "train", SIZE, RESIZE, val_fraction=0.3)
    val = PhotoCrops(photos, "validation", SIZE, RESIZE, val_fraction=0.3, val_crops=3)
    assert not set(train.photos) & set(val.photos)
    assert sorted(train.photos + val.photos) == sorted(str(p.relative_to(photos).as_posix())
                                                       for p in photos.rglob("*.png"))
    assert (len(train.photos), len(val.photos)) == (7, 3)
    assert len(train) == 7 and len(val) == 9  # one random crop per training photo, 3 fixed crops per validation one
    assert val.keys == [f"{p}#{j}" for p in val.photos for j in range(3)]


# --- crops ----------------------------------------------------------------------------------------------------------

def test_validation_crops_are_fixed_windows_of_the_resized_photo(photos):
    make = lambda: PhotoCrops(photos, "validation", SIZE, RESIZE, val_fraction=0.3, val_crops=3)  # noqa: E731
    a, b = make(), make()
    torch.manual_seed(0)
    first = [a[i]["image"] for i in range(len(a))]
    torch.manual_seed(1)  # the global RNG plays no part
    assert all(torch.equal(x, b[i]["image"]) for i, x in enumerate(first))
    for i, x in enumerate(first):
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        ref = scaled_reference(photos / a.files[i], RESIZE)
        assert min(ref.shape[-2:]) == RESIZE
        offsets = window_offsets(x, ref)
        y, xx = a.positions[i]
        expected = (round(y * (ref.shape[-2] - SIZE)), round(xx * (ref.shape[-1] - SIZE)), False)
        assert expected in offsets
    # Three distinct windows per photo (x is stratified), and another seed places them elsewhere.
    assert len({tuple(p) for p in a.positions}) == len(a)
    assert fixed_positions("p01.png", 3, seed=0) != fixed_positions("p01.png", 3, seed=1)
    assert [int(3 * x) for _, x in fixed_positions("p01.png", 3)] == [0, 1, 2]


def test_training_crops_are_random_reproducible_windows(photos):
    ds = PhotoCrops(photos, "train", SIZE, RESIZE, flip=True, val_fraction=0.3)
    i = max(range(len(ds)), key=lambda j: SHAPES[int(Path(ds.files[j]).stem[1:])][1])  # the widest photo
    ref = scaled_reference(photos / ds.files[i], RESIZE)

    def draws(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [ds[i]["image"] for _ in range(12)]

    a, b = draws(0), draws(0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # reproducible under a seed
    assert not all(torch.equal(x, y) for x, y in zip(a, draws(1)))
    found = [window_offsets(x, ref, flips=True) for x in a]
    assert all(found)  # every crop is a (possibly flipped) window of the resized photo
    assert len({f[0][:2] for f in found}) > 3 and {f[0][2] for f in found} == {False, True}


def test_cache_gives_the_same_samples(photos):
    plain = PhotoCrops(photos, "train", SIZE, RESIZE, flip=True, val_fraction=0.3)
    cached = PhotoCrops(photos, "train", SIZE, RESIZE, flip=True, val_fraction=0.3, cache=True)
    for epoch in range(2):
        torch.manual_seed(epoch)
        x = [plain[i]["image"] for i in range(len(plain))]
        torch.manual_seed(epoch)
        assert all(torch.equal(a, cached[i]["image"]) for i, a in enumerate(x))
    assert len(cached._cache) == len(cached.photos)


def test_image_folder_resize_then_crop(photos):
    files = ImageFolder(photos, SIZE).files
    i = files.index("p01.png")  # 48x40 (h x w)
    torch.manual_seed(0)
    ds = ImageFolder(photos, SIZE, crop="random", resize=RESIZE)
    ref = scaled_reference(photos / "p01.png", RESIZE)
    assert tuple(ref.shape) == (3, int(48 * RESIZE / 40), RESIZE)
    crops = [ds[i]["image"] for _ in range(10)]
    assert all(x.shape == (3, SIZE, SIZE) for x in crops) and all(window_offsets(x, ref) for x in crops)
    assert len({window_offsets(x, ref)[0] for x in crops}) > 1
    # Independent check of the resize: PIL's bicubic agrees with torchvision's within one level.
    pil = np.asarray(Image.open(photos / "p01.png").resize(tuple(ref.shape[:0:-1]), Image.BICUBIC))
    assert np.abs(pil.astype(int) - ref.permute(1, 2, 0).numpy().astype(int)).max() <= 2
    # Centre crop of the resized image; resize=None (or = size) is the old behaviour.
    centre = ImageFolder(photos, SIZE, resize=RESIZE)[i]["image"]
    assert window_offsets(centre, ref) == [(round((ref.shape[-2] - SIZE) / 2), (RESIZE - SIZE) // 2, False)]
    assert torch.equal(ImageFolder(photos, SIZE)[i]["image"], ImageFolder(photos, SIZE, resize=SIZE)[i]["image"])
    assert ImageTransform(SIZE, resize=None).resize is None
    with pytest.raises(ValueError, match="resize"):
        ImageFolder(photos, SIZE, resize=SIZE - 1)


# --- bad input and errors -------------------------------------------------------------------------------------------

@pytest.fixture
def photos_with_bad(photos) -> Path:
    full = io.BytesIO()
    Image.fromarray(rand_rgb(40, 80, 99)).save(full, "JPEG")
    (photos / "bad_trunc.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (photos / "bad_empty.jpg").write_bytes(b"")
    (photos / "sub" / "bad_text.png").write_text("not an image")
    return photos


BAD = {"bad_trunc.jpg", "bad_empty.jpg", "sub/bad_text.png"}


def test_bad_photos_are_skipped_and_counted_once(photos_with_bad):
    seen_bad = set()
    for split in ("train", "validation"):
        ds = PhotoCrops(photos_with_bad, split, SIZE, RESIZE, val_fraction=0.4, val_crops=3, cache=True)
        samples = [ds[i] for i in range(len(ds))]
        bad_here = BAD & set(ds.photos)
        assert {ds.files[i] for i, s in enumerate(samples) if s is None} == bad_here
        assert sum(s is None for s in samples) == len(bad_here) * (3 if split == "validation" else 1)
        assert ds.skipped == len(bad_here) and set(ds.bad_files) == bad_here  # per photo, not per crop
        assert all(s["image"].shape == (3, SIZE, SIZE) for s in samples if s is not None)
        seen_bad |= bad_here
    assert seen_bad == BAD


def test_bad_photos_are_counted_across_workers(photos_with_bad):
    ds = PhotoCrops(photos_with_bad, "validation", SIZE, RESIZE, val_count=12, val_crops=2)
    bad_here = BAD & set(ds.photos)
    assert len(bad_here) >= 2
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_skip_bad)
    keys = [k for batch in loader if batch is not None for k in batch["key"]]
    assert sorted(keys) == sorted(k for k in ds.keys if k.split("#")[0] not in bad_here)
    assert ds.skipped == len(bad_here)


def test_errors_at_start(tmp_path, photos):
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        PhotoCrops(tmp_path / "no-such-folder")
    with pytest.raises(ValueError, match="split"):
        PhotoCrops(photos, "test")
    with pytest.raises(ValueError, match="crop"):
        PhotoCrops(photos, crop="corner")
    with pytest.raises(TypeError, match="seed"):
        PhotoCrops(photos, seed="${data.params.train.params.seed}")
    (tmp_path / "one").mkdir()
    Image.fromarray(rand_rgb(32, 32, 0)).save(tmp_path / "one" / "a.png")
    with pytest.raises(ValueError, match="at least 2 photos"):
        PhotoCrops(tmp_path / "one")


def test_latent_cache_names_the_source_photo_of_each_crop(photos):
    ds = PhotoCrops(photos, "validation", SIZE, RESIZE, val_fraction=0.3, val_crops=3)
    records = IndexedSource(ds, list(range(len(ds))))
    for j in (0, 4, len(ds) - 1):
        record = records[j]
        assert record["sample"]["key"].split("#")[0] == Path(record["meta"]["source"]).relative_to(photos).as_posix()


# --- the real photos and the config ---------------------------------------------------------------------------------

def test_endless_sky_photos_and_config():
    assert Path(ENDLESS_SKY_PHOTOS).is_dir(), (f"{ENDLESS_SKY_PHOTOS} is missing: run `make data` (installs Debian's "
                                               "endless-sky-data) or `sudo apt-get install endless-sky-data`")
    config = OmegaConf.load(ROOT / "configs/data/photos64.yaml")
    train = instantiate_from_config(dataset_config(config, "train"))
    val = instantiate_from_config(dataset_config(config, "validation"))
    assert len(train.photos) + len(val.photos) == 273 and not set(train.photos) & set(val.photos)
    assert (len(train.photos), len(val.photos), len(val)) == (218, 55, 220)
    assert train.crop_mode == "random" and val.crop_mode == "fixed"
    # cache_latents / eval_autoencoder make the data deterministic: the validation tiles stay the fixed ones.
    det_val = instantiate_from_config(deterministic(dataset_config(config, "validation")))
    assert det_val.keys == val.keys and torch.equal(det_val[7]["image"], val[7]["image"])
    assert instantiate_from_config(deterministic(dataset_config(config, "train"))).crop_mode == "center"


def test_photos_config_merges_after_a_stage_one_config():
    from ldm import cli

    for base in ("litevae_tiny", "sd_vae_tiny"):
        config = cli.load_config([str(ROOT / f"configs/autoencoder/{base}.yaml"),
                                  str(ROOT / "configs/data/photos64.yaml")], [])
        for split in ("train", "validation"):
            node = config.data.params[split]
            assert node.target == "ldm.data.PhotoCrops" and node.params.split == split
            assert "limit" not in node.params  # the Fashion-MNIST params are dropped with their target
        own = OmegaConf.load(ROOT / f"configs/autoencoder/{base}.yaml")
        assert config.data.params.batch_size == own.data.params.batch_size  # the photos config sets no loader sizes
