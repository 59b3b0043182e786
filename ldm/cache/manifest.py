"""The latent cache's ``manifest.json``: one schema, validated on read, versioned on write.

``{"format": FORMAT, "splits": {split: SplitEntry}, "updated"}``; ``scripts/cache_latents.py`` writes it
(``ldm.cache.writer.merge_manifest``), everything else reads it through ``Manifest.read``, which also checks
the values stage 2 computes with (a finite, positive ``scale_factor``; counts and shapes that agree).
``Manifest.check_shards`` checks that the shards are whole: present, of the recorded size, and (on request)
of the recorded SHA-256. Version 2 records each shard's size and hash; version 1 caches (without them) are
read with a warning, and their shards checked for presence only.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_NAME, VERSION = "litevae-latent-cache", 2
FORMAT = f"{FORMAT_NAME}/{VERSION}"
READABLE_VERSIONS = (1, 2)  # 1: no shard sizes or hashes


class ManifestError(ValueError):
    """A manifest.json that is not one this code wrote: names the file and the bad key."""


def _json(kind: type | tuple[type, ...], optional: bool = False, **kw: Any) -> Any:
    """A dataclass field stored in the JSON, whose value must be a ``kind`` (or null where ``optional``)."""
    return field(metadata={"kind": kind, "optional": optional}, **kw)


_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number"}


def _kind(kind: type | tuple[type, ...]) -> str:
    return " or ".join(_JSON_NAMES.get(k, k.__name__) for k in (kind if isinstance(kind, tuple) else (kind,)))


def _check(data: Any, spec: Mapping[str, tuple[Any, bool, bool]], where: str, strict: bool = True) -> dict:
    """``data`` checked against ``{key: (kind, required, optional)}``; ``strict``: no other keys."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected an object, got {data!r:.60}")
    unknown = sorted(set(data) - set(spec)) if strict else []
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown} for format {FORMAT}")
    for key, (kind, required, optional) in spec.items():
        if key not in data:
            if required:
                raise ManifestError(f"{where}: missing key {key!r}")
        elif not (data[key] is None and optional) and not isinstance(data[key], kind):
            raise ManifestError(f"{where}.{key}: expected {_kind(kind)}, got {data[key]!r}")
    return dict(data)


def _values(cls: type, data: Any, where: str) -> dict[str, Any]:
    """``data`` checked against the JSON fields of dataclass ``cls``."""
    spec = {f.name: (f.metadata["kind"], f.default is MISSING and f.default_factory is MISSING,
                     f.metadata["optional"]) for f in fields(cls) if "kind" in f.metadata}
    return _check(data, spec, where)


def _check_stats(stats: dict, where: str) -> None:
    """What stage 2 normalises with: ``shift`` and ``scale_factor``, once any sample was cached; a zero, negative
    or non-finite scale would train on (or decode) garbage without an error, so it is refused here."""
    number = (int, float)
    _check(stats, {"count": (int, True, False)}, where, strict=False)
    if stats["count"] < 0:
        raise ManifestError(f"{where}.count: {stats['count']} is negative")
    if stats["count"] > 0:
        _check(stats, {"shift": (number, True, False), "scale_factor": (number, True, False)}, where, strict=False)
        if not (math.isfinite(stats["scale_factor"]) and stats["scale_factor"] > 0):
            raise ManifestError(f"{where}.scale_factor: {stats['scale_factor']} must be a finite positive number "
                                "(1 / the latents' std); the manifest is damaged: re-run cache_latents.py into a "
                                "new folder, or set model.params.scale_factor explicitly")
        if not math.isfinite(stats["shift"]):
            raise ManifestError(f"{where}.shift: {stats['shift']} must be finite")


def file_digest(path: str | Path) -> tuple[int, str]:
    """``(bytes, SHA-256 hex)`` of a file."""
    from ldm.util import sha256_file

    return Path(path).stat().st_size, sha256_file(path)


@dataclass(frozen=True)
class ShardEntry:
    name: str = _json(str)  # the tar file, relative to the cache folder
    rank: int = _json(int)
    index: int = _json(int)
    count: int = _json(int)
    bytes: int | None = _json(int, optional=True, default=None)  # None: written by format 1
    sha256: str | None = _json(str, optional=True, default=None)

    def damage(self, root: Path, hashes: bool = False) -> str | None:
        """Why this shard in ``root`` is not the one recorded (missing, another size, another hash); None if whole
        as far as the record says (a format-1 entry records no size)."""
        path = root / self.name
        if not path.is_file():
            return "missing"
        if self.bytes is not None and path.stat().st_size != self.bytes:
            return f"{path.stat().st_size} bytes, {self.bytes} recorded (truncated or overwritten)"
        if hashes and self.sha256 is not None and file_digest(path)[1] != self.sha256:
            return "SHA-256 differs from the recorded one (corrupted)"
        return None


@dataclass(frozen=True, kw_only=True)
class SplitEntry:
    """One cached split: descriptive fields (``manifest_info``), then shards, counts and statistics."""

    autoencoder: dict = _json(dict, default_factory=dict)  # config, ckpt_path, sha256, weights
    data: dict = _json(dict, default_factory=dict)
    latent: dict = _json(dict, default_factory=dict)  # dtype, fields, flip
    precision: str | None = _json(str, optional=True, default=None)
    samples_per_shard: int | None = _json(int, optional=True, default=None)
    git: str | None = _json(str, optional=True, default=None)
    created: str | None = _json(str, optional=True, default=None)
    latent_shape: list[int] | None = _json(list, optional=True, default=None)  # None: no sample cached
    image_shape: list[int] | None = _json(list, optional=True, default=None)
    world_size: int = _json(int)
    shards: tuple[ShardEntry, ...] = _json(list)
    total: int = _json(int)
    total_skipped: int = _json(int)
    skipped: list[dict] = _json(list)  # {"index", "source", "reason"[, "count"]} per bad input
    stats: dict = _json(dict)  # ldm.cache.stats.LatentStats.summary()

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "SplitEntry":
        values = _values(cls, data, where)
        values["shards"] = tuple(ShardEntry(**_values(ShardEntry, s, f"{where}.shards[{i}]"))
                                 for i, s in enumerate(values["shards"]))
        _check_stats(values["stats"], f"{where}.stats")
        counted = sum(s.count for s in values["shards"])
        if counted != values["total"] or any(s.count < 0 for s in values["shards"]):
            raise ManifestError(f"{where}: total {values['total']} but the shards hold {counted} samples")
        shape = values.get("latent_shape")
        if shape is not None and (len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape)):
            raise ManifestError(f"{where}.latent_shape: {shape} is not (channels, height, width) of positive integers")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"shards": [asdict(s) for s in self.shards]}

    @property
    def scale_factor(self) -> float:
        return float(self._stat("scale_factor"))

    @property
    def shift(self) -> float:
        return float(self._stat("shift"))

    def _stat(self, key: str) -> Any:
        if self.stats.get("count", 0) == 0:
            raise ManifestError("a split without cached samples has no latent statistics to normalise with")
        return self.stats[key]

    def describe(self) -> str:
        """One line: counts, shapes, normalisation and the autoencoder's hash."""
        s = self.stats
        return (f"{self.total} samples in {len(self.shards)} shards, {self.total_skipped} skipped; "
                f"latent {self.latent_shape} {self.latent.get('dtype')} from images {self.image_shape}; "
                f"shift {s.get('shift', float('nan')):.4g}, scale_factor {s.get('scale_factor', float('nan')):.4g}, "
                f"channel std {[round(v, 3) for v in s.get('channel_std', [])]}; "
                f"autoencoder sha256 {str(self.autoencoder.get('sha256'))[:12]}")


def _check_format(value: Any, where: str) -> int:
    """The format's version; a ManifestError for another format or a newer version."""
    name, _, version = str(value).rpartition("/")
    if name == FORMAT_NAME and version.isdigit() and int(version) > VERSION:
        raise ManifestError(f"{where}: format {value!r} is newer than this code reads ({FORMAT}); update the code")
    if name != FORMAT_NAME or not version.isdigit() or int(version) not in READABLE_VERSIONS:
        raise ManifestError(f"{where}: unknown format {value!r} (this code reads {FORMAT})")
    return int(version)


@dataclass(frozen=True)
class Manifest:
    """A cache's ``manifest.json``. ``path``: where it was read from (for messages); not stored."""

    format: str = _json(str)
    splits: dict[str, SplitEntry] = _json(dict)
    updated: str | None = _json(str, optional=True, default=None)
    path: Path | None = field(default=None, compare=False)

    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        """From a cache folder or its ``manifest.json``."""
        path = Path(path)
        path = path if path.suffix == ".json" else path / MANIFEST_NAME  # a folder, existing or not
        if not path.is_file():
            raise FileNotFoundError(f"no {path.name} in {path.parent}: is it a latent cache "
                                    "(scripts/cache_latents.py)? An unfinished cache gets its manifest when the same "
                                    "command is re-run to the end")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Any, path: Path | None = None) -> "Manifest":
        where = str(path or MANIFEST_NAME)
        values = _values(cls, data, where)
        if _check_format(values["format"], where) < VERSION:
            log.warning("%s: format %s records no shard sizes or hashes: shards are checked for presence only (a "
                        "re-run of cache_latents.py on the folder records them)", where, values["format"])
        splits = {name: SplitEntry.from_dict(e, f"{where}: splits.{name}") for name, e in values["splits"].items()}
        return cls(values["format"], splits, values.get("updated"), path)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "splits": {k: e.to_dict() for k, e in self.splits.items()},
                "updated": self.updated}

    def check_shards(self, split: str, hashes: bool = False) -> None:
        """Every shard of ``split`` present and of its recorded size (and SHA-256 with ``hashes``), before any
        training step: else a ManifestError naming each damaged shard and the command that repairs them."""
        root = Path(self.path).parent if self.path is not None else Path(".")
        damaged = [f"{s.name} ({problem})" for s in self.split(split).shards
                   if (problem := s.damage(root, hashes)) is not None]
        if damaged:
            raise ManifestError(f"{root}: {len(damaged)} shard(s) of split {split!r} damaged: {', '.join(damaged[:5])}"
                                f"{' ...' if len(damaged) > 5 else ''}; re-run the cache_latents.py command that made "
                                "the cache (it re-encodes damaged and missing shards)")

    def split(self, name: str) -> SplitEntry:
        if name not in self.splits:
            raise KeyError(f"{self.path or MANIFEST_NAME} has no split {name!r} (has {sorted(self.splits)})")
        return self.splits[name]

    def normalisation(self, split: str | None = None) -> SplitEntry:
        """The split whose statistics normalise every split: ``train`` when cached (one normalisation for
        training, validation, sampling and diagnostics), else ``split``, else the first one."""
        if not self.splits:
            raise ManifestError(f"{self.path or MANIFEST_NAME}: the latent cache manifest has no splits")
        for name in ("train", split):
            if name in self.splits:
                return self.splits[name]
        return next(iter(self.splits.values()))


def read_latent_stats(path: str | Path) -> dict[str, Any]:
    """``{"scale_factor", "shift", "latent_shape", "autoencoder", "manifest"}`` from a cache folder or its
    manifest.json, of the split that normalises every split (``Manifest.normalisation``)."""
    manifest = Manifest.read(path)
    entry = manifest.normalisation()
    return {"scale_factor": entry.scale_factor, "shift": entry.shift, "latent_shape": entry.latent_shape,
            "autoencoder": entry.autoencoder, "manifest": str(manifest.path)}
