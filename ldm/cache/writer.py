"""Write first-stage latents to WebDataset shards (+ per-shard sidecars) and merge them into ``manifest.json``.

Layout of an output folder (one ``manifest.json`` for all splits)::

    {split}-r{rank:02d}-{index:06d}.tar    samples: __key__, mean.npy, std.npy[, mean_flip.npy, std_flip.npy]
                                           [, cls][, txt], json ({"key", "source", "size"})
    {split}-r{rank:02d}-{index:06d}.json   sidecar: count, skipped inputs, latent statistics, run plan, keys
    {split}-r{rank:02d}.done.json          the rank finished: its list of shards
    manifest.json                          ``ldm.cache.manifest.Manifest``, written once every rank is done
    .lock-{split}-r{rank:02d}              held while that rank writes (``ldm.locks``: one writer per rank)

Crash safety: a shard is written to ``.tar.tmp``; its sidecar (with the tar's size and SHA-256) is written, then
the tar is renamed to ``.tar``. A shard is complete iff its ``.tar`` exists and matches its sidecar's size and
hash: a re-run checks every finished shard and re-encodes the damaged or missing ones. Rank ``r`` owns the dataset indices ``range(n)[r::world]`` and
its shard ``i`` holds the fixed slice ``[i*N, (i+1)*N)`` of them, so a re-run knows which samples are
already cached and each sample lands in exactly one shard. Streaming (WebDataset) sources have no index:
shard ``i`` is then the ``i``-th run of N good samples of the rank's (unshuffled) stream; keep the number of
workers when resuming (checked), and note that the stream's bad samples are only counted (the dataset drops
them), attributed to the shard being written — exactly in a fresh run, approximately after a resume.

Keys: ``__key__ = tar_key(key)`` escapes ``%`` and ``.`` (reversible: ``key_from_tar``; the key as given is also
in each sample's ``json``), so distinct keys stay distinct; two samples of a split with one key are refused
while writing (one run) and when merging (all ranks), naming both sources. Before anything is written, a run is
refused if the folder holds latents of another first stage (other splits or this split's shards: checkpoint
SHA-256 *and* weights, EMA or raw) or shards of this split made with other settings, or if another process is
writing the same rank of the split.

Statistics are of the posterior MEAN as stored (after the fp16/fp32 cast), unflipped, in float64 sufficient
statistics (count, sum, sum of squares, min, max per channel) merged exactly across shards and ranks.
Normalisation convention: ``z_norm = (z - shift) * scale_factor`` with ``shift`` = global mean and
``scale_factor = 1 / global std`` (the std over all channels and positions).
"""
from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import subprocess
import tarfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.cache.keys import KEY_SCHEME, tar_key
from ldm.cache.manifest import FORMAT, MANIFEST_NAME, Manifest, ShardEntry, SplitEntry, file_digest
from ldm.cache.records import IndexedRecords, Item, StreamRecords, StreamSkips, collate_records
from ldm.cache.stats import LatentStats
from ldm.io import write_json_atomic
from ldm.locks import output_lock
from ldm.precision import PRECISIONS, GuardedAutoencoder
from ldm.tiling import DEFAULT_OVERLAP, TiledAutoencoder, tiled

log = logging.getLogger(__name__)

FAIL_AFTER_ENV = "LITEVAE_CACHE_FAIL_AFTER"  # test hook: crash mid-shard after this many shards were closed


class SimulatedCrash(RuntimeError):
    """Raised by the ``LITEVAE_CACHE_FAIL_AFTER`` test hook."""


class CacheError(RuntimeError):
    """The output folder or the data cannot make one consistent cache (another autoencoder or plan, a key twice)."""


# ---------------------------------------------------------------------------------------------- names
def shard_name(split: str, rank: int, index: int) -> str:
    return f"{split}-r{rank:02d}-{index:06d}"


def done_name(split: str, rank: int) -> str:
    return f"{split}-r{rank:02d}.done.json"


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- writing
@dataclass
class CacheOptions:
    out_dir: str
    split: str = "train"
    samples_per_shard: int = 1000
    batch_size: int = 32
    num_workers: int = 0
    flip: bool = False
    dtype: str = "float16"
    precision: str = "fp32"  # encoder autocast; fp16 batches that overflow are redone in fp32 (ldm.precision)
    tile: int | None = None  # encode by tiles of this many pixels (ldm.tiling); None: whole images
    tile_overlap: int = DEFAULT_OVERLAP

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be float16 or float32, got {self.dtype!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.samples_per_shard < 1 or self.batch_size < 1:
            raise ValueError("samples_per_shard and batch_size must be positive")
        if "-" in self.split or "/" in self.split:
            raise ValueError(f"split name {self.split!r} must not contain '-' or '/'")


class _Shard:
    """One shard being written: ``.tar.tmp`` + statistics; ``close`` writes the sidecar, then renames."""

    def __init__(self, out: Path, name: str, index: int, rank: int):
        self.out, self.name, self.index, self.rank = out, name, index, rank
        self.tmp = out / f"{name}.tar.tmp"
        self.writer = wds.TarWriter(str(self.tmp), encoder=False)
        # GNU headers instead of tarfile's default PAX: PAX builds an extended header per member in Python and
        # was half of the writer's time per sample (profile in docs/benchmarks.md); long keys still work.
        self.writer.tarstream.format = tarfile.GNU_FORMAT
        self.stats, self.count, self.skipped = LatentStats(), 0, []
        self.keys: list[tuple[str, str | None]] = []  # (key, source) per sample: merge checks keys across ranks
        self.latent_shape: list[int] | None = None
        self.image_shape: list[int] | None = None

    def write(self, sample: dict[str, bytes], latent_shape: list[int], image_shape: list[int]) -> None:
        self.writer.write(sample)
        self.latent_shape, self.image_shape = latent_shape, image_shape
        self.count += 1

    def close(self, plan: dict) -> dict:
        self.writer.close()
        size, sha256 = file_digest(self.tmp)  # what a reader checks the finished shard against
        record = {"name": self.name, "rank": self.rank, "index": self.index, "count": self.count,
                  "bytes": size, "sha256": sha256,
                  "skipped": self.skipped, "latent_shape": self.latent_shape, "image_shape": self.image_shape,
                  "stats": self.stats.to_dict(), "plan": plan, "keys": self.keys}
        write_json_atomic(self.out / f"{self.name}.json", record)
        os.replace(self.tmp, self.out / f"{self.name}.tar")  # the commit point
        return record


def _encode(model: GuardedAutoencoder | TiledAutoencoder, x: torch.Tensor, flip: bool, device: torch.device,
            dtype: str) -> tuple[torch.Tensor | None, ...]:
    """``(mean, std, mean_flip, std_flip)`` of a batch, on the CPU, already in the storage ``dtype``.

    The cast happens here, once per batch in torch: per-sample numpy float16 casts were the largest CPU cost
    of caching on a GPU machine (docs/benchmarks.md).
    """
    x = x.to(device, non_blocking=True)
    n = len(x)
    if flip:
        x = torch.cat([x, x.flip(-1)])
    with torch.no_grad():
        posterior = model.encode(x)  # autocast (and the fp16 guard) inside the wrapper
    store = getattr(torch, dtype)
    mean, std = posterior.mean.float().to(store).cpu(), posterior.std.float().to(store).cpu()
    return (mean[:n], std[:n], mean[n:], std[n:]) if flip else (mean, std, None, None)


def _sample_bytes(record: dict, mean, std, mean_f, std_f) -> dict[str, bytes]:
    sample, meta = record["sample"], record["meta"]
    out = {"__key__": tar_key(sample["key"]), "mean.npy": npy_bytes(mean.numpy()), "std.npy": npy_bytes(std.numpy())}
    if mean_f is not None:
        out["mean_flip.npy"] = npy_bytes(mean_f.numpy())
        out["std_flip.npy"] = npy_bytes(std_f.numpy())
    if "cls" in sample:
        out["cls"] = str(int(sample["cls"])).encode()
    if "txt" in sample:
        out["txt"] = str(sample["txt"]).encode("utf-8")
    info = {"key": str(sample["key"]), "source": meta["source"], "size": meta["size"]}
    out["json"] = json.dumps(info).encode()
    return out


class UniqueKeys:
    """The tar keys of a split and where each came from: stage 2 cannot read a key twice ("duplicate file name
    in tar file"), so a second sample with a key already seen is an error naming both sources."""

    def __init__(self, split: str):
        self.split, self.seen = split, {}

    def add(self, key: str, source: str | None, shard: str) -> None:
        name, where = tar_key(key), f"{source or 'a sample without a source file'} (shard {shard})"
        if name in self.seen:
            raise CacheError(f"split {self.split!r}: two samples have the key {key!r}: {self.seen[name]} and "
                             f"{where}; keys must be unique within a split: fix the dataset (or its keys) and "
                             "cache it again into a new folder")
        self.seen[name] = where


def complete_sidecars(out: Path, split: str) -> Iterator[tuple[str, dict]]:
    """``(shard name, sidecar)`` of the complete shards (``.tar`` + sidecar) of ``split`` in ``out``."""
    for side in sorted(out.glob(f"{split}-r[0-9][0-9]-[0-9]*.json")):
        if (out / f"{side.stem}.tar").exists():
            yield side.stem, json.loads(side.read_text())


def shard_damage(tar: Path, side: Mapping[str, Any], hashes: bool = True) -> str | None:
    """Why the finished shard ``tar`` does not match its sidecar (size, then SHA-256 with ``hashes``); None when
    it does, or when the sidecar predates these records (nothing to check against)."""
    entry = ShardEntry(tar.name, side.get("rank", 0), side.get("index", 0), side.get("count", 0), side.get("bytes"),
                       side.get("sha256"))
    return entry.damage(tar.parent, hashes)


def remove_damaged_shards(out: Path, split: str, rank: int) -> list[str]:
    """Check this rank's finished shards against their sidecars; remove the damaged ones (tar, sidecar and the
    rank's done file), so that this run encodes them again. Returns their names."""
    damaged = []
    for name, side in complete_sidecars(out, split):
        if side.get("rank") not in (None, rank) or not name.startswith(f"{split}-r{rank:02d}-"):
            continue
        problem = shard_damage(out / f"{name}.tar", side)
        if problem:
            log.warning("shard %s.tar is damaged (%s): encoding it again", name, problem)
            (out / f"{name}.tar").unlink()
            (out / f"{name}.json").unlink()
            damaged.append(name)
    if damaged:
        (out / done_name(split, rank)).unlink(missing_ok=True)
    return damaged


def existing_plans_check(out: Path, split: str, plan: dict) -> None:
    """Refuse to mix shards of a different plan (world size, shard size, model and its weights, key scheme...)
    into one split. A key a shard's plan does not record (written before it was recorded) is not compared."""
    for name, side in complete_sidecars(out, split):
        other = side.get("plan", {})
        diff = {k: (other.get(k), v) for k, v in plan.items() if k in other and other.get(k) != v}
        if diff:
            raise CacheError(f"{out} already holds {split} shards made with different settings {diff} "
                             f"(e.g. {name}.tar): (recorded, now); re-run with the same settings or use a new "
                             "output folder")


def check_autoencoder(out: Path, split: str, sha256: str | None, weights: str | None = None) -> None:
    """Refuse to cache ``split`` with a first stage other than the one of the folder's other splits (manifest)
    or of this split's shards already there: the same checkpoint SHA-256 and the same weights (EMA or raw) of
    it. Stage 2 normalises every split with the train split's statistics, so one folder holds one latent space.
    Called before anything is written."""
    path = out / MANIFEST_NAME
    held = [(f"split {name!r} in {path}", e.autoencoder.get("sha256"), e.autoencoder.get("weights"))
            for name, e in (Manifest.read(path).splits.items() if path.exists() else ()) if name != split]
    held += [(f"shard {out / name}.tar", side.get("plan", {}).get("ckpt_sha256"), side.get("plan", {}).get("weights"))
             for name, side in complete_sidecars(out, split)]
    for where, other, other_weights in held:
        if sha256 and other and other != sha256:
            raise CacheError(f"{where} was cached with the autoencoder of sha256 {other}, but this one's is "
                             f"{sha256}; one cache folder holds one autoencoder's latents. Cache {split!r} into "
                             f"another folder, or with the autoencoder {other[:12]}...")
        if weights and other_weights and other_weights != weights:
            raise CacheError(f"{where} was cached with the {other_weights} weights of this autoencoder, but this run "
                             f"uses its {weights} weights (--no-ema decides); one cache folder holds one latent "
                             f"space: re-run with the same choice, or cache into another folder")


# ------------------------------------------------------------------------------------------- shard writer
class ShardWriter:
    """Writes items into shard files: a shard opens at its first item and closes (sidecar, then rename) when an
    item of another shard comes, or at ``close``. Counts what it wrote, skipped and closed."""

    def __init__(self, out: Path, split: str, rank: int, plan: dict, skips: StreamSkips | None = None):
        self.out, self.split, self.rank, self.plan, self.skips = out, split, rank, plan, skips
        self.shard: _Shard | None = None
        self.keys = UniqueKeys(split)  # this run's; merge_manifest checks across runs and ranks
        self.last_index: int | None = None
        self.written = self.skipped = self.closed = 0
        self.fail_after = int(os.environ[FAIL_AFTER_ENV]) if os.environ.get(FAIL_AFTER_ENV) else None

    def write_batch(self, items: list[Item], encoded: tuple | None, image_shape: list[int] | None) -> None:
        """One batch: ``encoded`` = ``_encode``'s moments; statistics are added once per (batch, shard)."""
        stats64 = [t.double().numpy() for t in encoded[:2]] if encoded is not None else None
        rows: list[int] = []
        for index, record, row in items:
            if self.shard is None or self.shard.index != index:
                self._add_stats(rows, stats64)
                rows = []
                self._open(index)
            if row is None:
                self._skip(record)
            else:
                self._write(record, [t[row] if t is not None else None for t in encoded], image_shape)
                rows.append(row)
        self._add_stats(rows, stats64)

    def close(self) -> None:
        if self.shard is None:
            return
        if self.skips is not None:
            self._stream_skips(self.skips.take())
        self.shard.close(self.plan)
        self.shard, self.closed = None, self.closed + 1

    def abort(self) -> None:
        """On an error: close the open shard's ``.tar.tmp`` without committing it (a re-run removes it)."""
        if self.shard is not None:
            self.shard.writer.close()
            self.shard = None

    def _open(self, index: int) -> None:
        self.close()
        self.shard = _Shard(self.out, shard_name(self.split, self.rank, index), index, self.rank)
        self.last_index = index

    def _write(self, record: dict, latents: list, image_shape: list[int]) -> None:
        key, source = str(record["sample"]["key"]), record["meta"]["source"]
        self.keys.add(key, source, self.shard.name)
        self.shard.keys.append((key, source))
        self.shard.write(_sample_bytes(record, *latents), list(latents[0].shape), image_shape)
        self.written += 1
        if self.fail_after is not None and self.closed >= self.fail_after:
            raise SimulatedCrash(f"{FAIL_AFTER_ENV}={self.fail_after}: simulated crash inside {self.shard.name}")

    def _skip(self, record: dict) -> None:
        self.shard.skipped.append({"index": record["index"], "source": record["meta"]["source"],
                                   "reason": record["reason"]})
        self.skipped += 1

    def _stream_skips(self, new: int) -> None:
        """Streaming sources drop bad samples themselves; attribute the new ones to the shard being closed."""
        if new > 0:
            self.shard.skipped.append({"index": None, "source": None, "count": new, "reason":
                                       "undecodable sample(s) in the stream (names and errors are in the log)"})
            self.skipped += new

    def _add_stats(self, rows: list[int], stats64: list[np.ndarray] | None) -> None:
        if rows:
            self.shard.stats.update(stats64[0][rows], stats64[1][rows])


# ------------------------------------------------------------------------------------------------ a rank
def cache_rank(model: torch.nn.Module, dataset: Dataset, opts: CacheOptions, rank: int = 0, world: int = 1,
               device: str | torch.device = "cpu", plan_extra: Mapping | None = None,
               progress: bool = False, info: Mapping | None = None) -> dict:
    """Encode this rank's part of ``dataset`` into its shards, skipping shards already complete.

    Returns ``{"written", "skipped", "shards", "seconds"}`` for this call (complete shards from an earlier run
    are not counted). Writes ``{split}-r{rank}.done.json`` at the end, holding ``info`` (manifest fields).
    """
    out, device = Path(opts.out_dir), torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    # One writer per (split, rank): a second one would delete this one's live .tar.tmp as "interrupted".
    with output_lock(out, f".lock-{opts.split}-r{rank:02d}", what=f"split {opts.split!r}, rank {rank}"):
        plan = _prepare_folder(dataset, opts, rank, world, plan_extra)
        records = _records(dataset, opts, rank, world)
        if records.finished:
            log.info("%s rank %d: all %d shards already complete", opts.split, rank, records.num_shards)
            return {"written": 0, "skipped": 0, "shards": 0, "seconds": 0.0}
        writer, t0 = ShardWriter(out, opts.split, rank, plan, records.skips), time.time()
        _encode_into(model, records, writer, opts, device, progress, desc=f"{opts.split} r{rank}")
        num_shards = records.shard_count(writer.last_index)
        shards = [shard_name(opts.split, rank, i) for i in range(num_shards)]
        write_json_atomic(out / done_name(opts.split, rank), {"rank": rank, "world_size": world,
                                                              "num_shards": num_shards, "info": dict(info or {}),
                                                              "shards": shards})
    return {"written": writer.written, "skipped": writer.skipped, "shards": writer.closed,
            "seconds": time.time() - t0}


def _prepare_folder(dataset: Dataset, opts: CacheOptions, rank: int, world: int, plan_extra: Mapping | None) -> dict:
    """The run plan every sidecar records, checked against what the folder holds before anything is written;
    partial shards removed."""
    out, streaming = Path(opts.out_dir), isinstance(dataset, IterableDataset)
    plan = {"world_size": world, "samples_per_shard": opts.samples_per_shard, "flip": opts.flip, "dtype": opts.dtype,
            "dataset_len": None if streaming else len(dataset), "tar_keys": KEY_SCHEME,
            # Tiled and whole-image latents differ slightly: a resumed run must not mix them in one split.
            "tile": opts.tile, "tile_overlap": opts.tile_overlap if opts.tile else None, **dict(plan_extra or {})}
    if streaming:
        plan["num_workers"] = opts.num_workers  # the stream order depends on it
    check_autoencoder(out, opts.split, plan.get("ckpt_sha256"), plan.get("weights"))
    existing_plans_check(out, opts.split, plan)
    remove_damaged_shards(out, opts.split, rank)
    for stale in out.glob(f"{opts.split}-r{rank:02d}-*.tar.tmp"):
        log.info("removing partial shard %s from an interrupted run", stale.name)
        stale.unlink()
    return plan


def _records(dataset: Dataset, opts: CacheOptions, rank: int, world: int) -> IndexedRecords | StreamRecords:
    """What this rank still has to cache, given the complete shards (``.tar`` + sidecar) in the output folder."""
    out = Path(opts.out_dir)

    def complete(i: int) -> bool:
        name = shard_name(opts.split, rank, i)
        return (out / f"{name}.tar").exists() and (out / f"{name}.json").exists()

    if not isinstance(dataset, IterableDataset):
        return IndexedRecords(dataset, opts.samples_per_shard, rank, world, complete)
    done = out / done_name(opts.split, rank)
    num_shards = json.loads(done.read_text())["num_shards"] if done.exists() else None
    return StreamRecords(dataset, opts.samples_per_shard, complete, num_shards)


def _encode_into(model: torch.nn.Module, records: IndexedRecords | StreamRecords, writer: ShardWriter,
                 opts: CacheOptions, device: torch.device, progress: bool, desc: str) -> None:
    """Encode the batches of ``records.source`` that hold items to write, and hand those to ``writer``."""
    from tqdm import tqdm

    # One wrapper for the whole run: the fp16 guard warns once, not once per batch.
    encoder = tiled(GuardedAutoencoder(model, opts.precision), opts.tile, opts.tile_overlap)
    loader = DataLoader(records.source, batch_size=opts.batch_size, num_workers=opts.num_workers, shuffle=False,
                        collate_fn=collate_records, pin_memory=device.type == "cuda")
    try:
        with tqdm(total=records.total, unit="img", disable=not progress, desc=desc, dynamic_ncols=True) as bar:
            for batch in loader:
                items, images = records.items(batch["records"]), batch["image"]
                if items:
                    encoded = _encode(encoder, images, opts.flip, device, opts.dtype) \
                        if images is not None else None
                    writer.write_batch(items, encoded, list(images.shape[1:]) if images is not None else None)
                bar.update(len(batch["records"]))
                bar.set_postfix(shards=writer.closed, skipped=writer.skipped)
    except BaseException:
        writer.abort()
        raise
    writer.close()


# ------------------------------------------------------------------------------------------ manifest
def ranks_done(out: Path, split: str, world: int) -> bool:
    return all((out / done_name(split, r)).exists() for r in range(world))


def merge_manifest(out_dir: str | os.PathLike, split: str, world: int, info: Mapping | None = None) -> SplitEntry:
    """Merge all ranks' sidecars of ``split`` into ``manifest.json`` (atomically); returns the split entry.

    ``info``: the descriptive fields (``manifest_info``); by default those rank 0 stored in its done file.
    Call once every rank is done.
    """
    out = Path(out_dir)
    missing = [r for r in range(world) if not (out / done_name(split, r)).exists()]
    if missing:
        raise RuntimeError(f"{out}: ranks {missing} of {world} have not finished split {split!r}; re-run them")
    if info is None:
        info = json.loads((out / done_name(split, 0)).read_text()).get("info", {})
    entry = _merge_split(out, split, world, info)
    path = out / MANIFEST_NAME
    check_autoencoder(out, split, entry.autoencoder.get("sha256"), entry.autoencoder.get("weights"))
    # Splits merged at once (two cache runs into one folder) must not drop each other's entry: read-modify-write
    # under an exclusive lock, waiting for the other (it is short).
    with open(out / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = Manifest.read(path) if path.exists() else Manifest(FORMAT, {})
        manifest = replace(manifest, format=FORMAT, splits={**manifest.splits, split: entry},
                           updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_json_atomic(path, manifest.to_dict())
    return entry


def _merge_split(out: Path, split: str, world: int, info: Mapping) -> SplitEntry:
    """The split's entry from every rank's shard sidecars: shards, counts, skipped inputs, exact statistics;
    keys checked unique across all shards (sidecars written before keys were recorded are not checked)."""
    stats, shards, skipped, shapes, keys = LatentStats(), [], [], {}, UniqueKeys(split)
    first: tuple[str, dict] | None = None  # every shard of a split shares one plan (keys both record compared)
    for r in range(world):
        for name in json.loads((out / done_name(split, r)).read_text())["shards"]:
            side = json.loads((out / f"{name}.json").read_text())
            problem = shard_damage(out / f"{name}.tar", side, hashes=False)
            if problem:
                raise RuntimeError(f"{out}: shard {name}.tar is {problem}; re-run the same command to encode it again")
            for key, source in side.get("keys", []):
                keys.add(key, source, name)
            plan = side.get("plan", {})
            first = first or (name, plan)
            diff = {k: (first[1][k], plan[k]) for k in first[1].keys() & plan.keys() if first[1][k] != plan[k]}
            if diff:
                raise CacheError(f"{out}: shards {first[0]}.tar and {name}.tar of split {split!r} were made with "
                                 f"different settings {diff}; one split is one run's settings: cache into a new "
                                 "folder")
            stats.merge(LatentStats.from_dict(side["stats"]))
            # A shard finished before sizes and hashes were recorded is taken as it is now.
            size, sha256 = (side["bytes"], side.get("sha256")) if side.get("bytes") is not None \
                else file_digest(out / f"{name}.tar")
            shards.append(ShardEntry(f"{name}.tar", r, side["index"], side["count"], size, sha256))
            skipped += side["skipped"]
            if side.get("latent_shape") and not shapes:
                shapes = {"latent_shape": side["latent_shape"], "image_shape": side["image_shape"]}
    return SplitEntry(**info, **shapes, world_size=world, shards=tuple(shards), total=sum(s.count for s in shards),
                      total_skipped=sum(s.get("count", 1) for s in skipped), skipped=skipped, stats=stats.summary())


def manifest_info(model_info: Mapping, opts: CacheOptions, data_config: Mapping | None = None,
                  dataset: Any = None) -> dict:
    """The descriptive part of a split's manifest entry (everything but shards, totals and statistics)."""
    fields = ["mean.npy", "std.npy"] + (["mean_flip.npy", "std_flip.npy"] if opts.flip else []) + \
        ["cls (if labelled)", "txt (if captioned)", "json"]
    return {"autoencoder": dict(model_info),
            "data": {"config": dict(data_config or {}), "dataset": type(dataset).__name__ if dataset is not None
                     else None, "transform": repr(getattr(dataset, "transform", None)),
                     "preprocessing": "the dataset's deterministic transform (no flip, center crop), images in "
                                      "[-1, 1]; flipped copies encode the horizontally flipped image"},
            "latent": {"dtype": opts.dtype, "fields": fields, "flip": opts.flip, "tar_keys": KEY_SCHEME,
                       "what": "posterior mean and std of q(z|x) per sample, (C, h, w)"},
            "precision": opts.precision, "samples_per_shard": opts.samples_per_shard,
            "git": git_revision(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def cache_latents(model: torch.nn.Module, model_info: Mapping, dataset: Dataset, opts: CacheOptions,
                  data_config: Mapping | None = None, rank: int = 0, world: int = 1,
                  device: str | torch.device = "cpu", barrier=None, progress: bool = False
                  ) -> tuple[dict, dict | None]:
    """Cache this rank's part, wait for the others (``barrier``), and let rank 0 write the manifest.

    Without a process group (``barrier=None``, e.g. ``--rank/--world-size``) whichever rank finds every rank
    done writes it. Returns ``(this rank's counts, the split's manifest entry as written (JSON) or None)``.
    """
    info = manifest_info(model_info, opts, data_config, dataset)
    plan_extra = {"ckpt_sha256": model_info.get("sha256"), "weights": model_info.get("weights"), "split": opts.split}
    result = cache_rank(model, dataset, opts, rank, world, device, plan_extra, progress, info)
    if barrier is not None:
        barrier()
    out, entry = Path(opts.out_dir), None
    if (rank == 0 or barrier is None) and ranks_done(out, opts.split, world):
        entry = merge_manifest(out, opts.split, world, info).to_dict()
    elif barrier is None:
        log.info("manifest not written yet: not every rank of %d has finished %s; the last one writes it "
                 "(or run with --merge-only)", world, opts.split)
    return result, entry


def git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except Exception:  # noqa: BLE001 - not a git checkout: fine
        return None
