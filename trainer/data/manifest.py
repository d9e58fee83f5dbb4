"""``manifest.json``: what a dataset directory holds, with counts and hashes.

The reader never lists a directory: it trusts the manifest's per-shard sample
counts to lay out each epoch (exactly-once, equal counts per rank), and
``argus data verify`` checks those counts and hashes against the bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.schema import FIELDS, SCHEMA_VERSION
from trainer.data.storage import PipeError, local_copy, location, open_read, read_bytes, redact

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "argus-shards"
# 2: shards carry a sample index (ShardInfo.index). Version 1 manifests (no key) still read.
MANIFEST_VERSION = 2
READS_VERSIONS = (1, 2)


class ManifestError(ValueError):
    """A missing or malformed manifest; the message names the file and key."""


@dataclass
class ShardInfo:
    path: str  # relative to the dataset root
    samples: int
    interactions: int
    users: int
    targets: int = 0  # held-out interactions (evaluation splits)
    item_min: int = -1
    item_max: int = -1
    bytes: int = 0
    sha256: str = ""
    # Relative path of an int32 .npy with each sample's interaction count, in shard order (token-budget batches
    # are laid out from it without reading the shard); "" in datasets written before it existed.
    lengths: str = ""
    lengths_sha256: str = ""
    # Relative path of an int64 .npy of samples + 1 byte offsets: where each sample's tar header starts, then the
    # end of the last sample (manifest version 2; "" before: remote reads then fetch the shard whole).
    index: str = ""
    index_sha256: str = ""


@dataclass
class SplitInfo:
    kind: str  # "train" (every position is a target) or "eval" (positions >= target_start)
    shards: list[ShardInfo] = field(default_factory=list)
    item_counts: str = ""  # relative path of an int64 .npy of length num_items
    item_counts_sha256: str = ""
    # Interactions written nowhere as targets by design (temporal gap, eval samples cut to max_len);
    # counted so nothing disappears silently.
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def interactions(self) -> int:
        return sum(s.interactions for s in self.shards)


@dataclass
class Manifest:
    num_items: int
    max_len: int
    splits: dict[str, SplitInfo]
    source: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=lambda: dict(FIELDS))
    schema_version: int = SCHEMA_VERSION
    format: str = FORMAT_NAME
    version: int = MANIFEST_VERSION
    # Item metadata vectors beside the shards (trainer/data/item_features.py): path, sha256, dim, rows, missing;
    # empty when the dataset has none.
    item_features: dict[str, Any] = field(default_factory=dict)
    root: Any = field(default=Path("."), repr=False, compare=False)  # a Path, or a UPath for a URL (storage.py)

    def holdout_start(self, split: str) -> int | None:
        """When ``split``'s held-out targets begin (seconds) under a temporal holdout; None under another holdout
        or when the dataset did not record it (``source.holdout``: `argus data convert`'s dict, or synth's kind
        beside ``val_start`` / ``test_start``)."""
        h = self.source.get("holdout")
        kind, starts = (h.get("kind"), h) if isinstance(h, dict) else (h, self.source)
        key = {"test": "test_start", "val": "val_start"}.get(split)
        if kind != "temporal" or key is None or key not in starts:
            return None
        return int(starts[key])

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(f"{redact(self.root / MANIFEST_NAME)}: no split {name!r} (has {sorted(self.splits)})")
        return self.splits[name]

    def item_counts(self, split: str = "train") -> np.ndarray:
        """Per-item interaction counts of a split (the logQ correction's frequencies)."""
        info = self.split(split)
        if not info.item_counts:
            raise ManifestError(f"{redact(self.root / MANIFEST_NAME)}: splits.{split}.item_counts is empty")
        return np.load(local_copy(self.root / info.item_counts, info.item_counts_sha256), mmap_mode="r")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("root")
        if not d["item_features"]:  # a dataset without metadata keeps the manifest it had before the field existed
            d.pop("item_features")
        return d

    def save(self, root: str | os.PathLike) -> Path:
        """Write atomically: a reader never sees a half-written manifest."""
        root = Path(root)
        tmp = root / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, root / MANIFEST_NAME)
        return root / MANIFEST_NAME

    @classmethod
    def load(cls, root: str | os.PathLike) -> "Manifest":
        """The manifest of a dataset directory, or of a dataset URL (``s3://bucket/prefix``, ...: storage.py)."""
        root = location(root)
        path = root / MANIFEST_NAME
        shown = redact(path)
        try:  # one read (an object store's request, a pipe's command run), no separate existence check
            raw = read_bytes(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PipeError):
            raise ManifestError(
                f"{shown}: not found (is {redact(root)} a dataset written by `argus data synth/convert`?)"
            ) from None
        except OSError as e:
            raise ManifestError(redact(f"{shown}: cannot read ({e})")) from None
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{shown}: invalid JSON ({e})") from None
        return cls.from_json(d, root, shown)

    @classmethod
    def from_json(cls, d: dict[str, Any], root: Any, path: Any) -> "Manifest":
        def need(obj: dict[str, Any], key: str, where: str) -> Any:
            if key not in obj:
                raise ManifestError(f"{path}: missing key {where}{key}")
            return obj[key]

        if d.get("format") != FORMAT_NAME:
            raise ManifestError(f"{path}: key format is {d.get('format')!r}, expected {FORMAT_NAME!r}")
        if d.get("version", 1) not in READS_VERSIONS:
            raise ManifestError(
                f"{path}: version {d['version']} is not supported (this build reads {list(READS_VERSIONS)})"
            )
        if need(d, "schema_version", "") != SCHEMA_VERSION:
            raise ManifestError(
                f"{path}: schema_version {d['schema_version']} is not supported (this build reads {SCHEMA_VERSION})"
            )
        splits = {}
        for name, s in need(d, "splits", "").items():
            shard_fields = {f.name for f in dataclasses.fields(ShardInfo)}
            shards = []
            for i, sh in enumerate(need(s, "shards", f"splits.{name}.")):
                unknown = set(sh) - shard_fields
                if unknown:
                    raise ManifestError(f"{path}: unknown keys {sorted(unknown)} in splits.{name}.shards[{i}]")
                for k in ("path", "samples", "interactions", "users"):
                    need(sh, k, f"splits.{name}.shards[{i}].")
                shards.append(ShardInfo(**sh))
            splits[name] = SplitInfo(
                kind=need(s, "kind", f"splits.{name}."),
                shards=shards,
                item_counts=s.get("item_counts", ""),
                item_counts_sha256=s.get("item_counts_sha256", ""),
                stats=dict(s.get("stats", {})),
            )
        canonical = ("train", "val", "test")
        splits = dict(
            sorted(splits.items(), key=lambda kv: (canonical.index(kv[0]) if kv[0] in canonical else 9, kv[0]))
        )
        return cls(
            num_items=int(need(d, "num_items", "")),
            max_len=int(need(d, "max_len", "")),
            splits=splits,
            source=d.get("source", {}),
            fields=need(d, "fields", ""),
            schema_version=d["schema_version"],
            format=d["format"],
            version=int(d.get("version", 1)),
            item_features=dict(d.get("item_features", {})),
            root=root,
        )


def sha256_file(path: Any, bufsize: int = 1 << 22) -> str:
    """sha256 of a local file or of an object at a URL (a ``UPath``: read sequentially)."""
    h = hashlib.sha256()
    with open_read(location(path) if isinstance(path, str) else path) as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()
