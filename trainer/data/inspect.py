"""`argus data inspect` and `argus data verify`: what a dataset holds, and whether its bytes agree."""

from __future__ import annotations

import io
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.manifest import Manifest, ShardInfo, sha256_file
from trainer.data.schema import EventType, SampleError, decode_sample
from trainer.data.storage import exists, open_read, read_bytes, redact

PERCENTILES = (50, 90, 99, 100)


@dataclass
class ShardScan:
    """Everything counted by reading one shard end to end."""

    path: str
    samples: int = 0
    interactions: int = 0
    users: int = 0
    targets: int = 0
    item_min: int = -1
    item_max: int = -1
    events: list[int] = field(default_factory=lambda: [0] * len(EventType))
    sample_lengths: list[int] = field(default_factory=list)
    user_lengths: list[int] = field(default_factory=list)
    items: np.ndarray | None = None  # sparse: unique items and their counts
    item_counts: np.ndarray | None = None
    offsets: list[int] = field(default_factory=list)  # each member's header offset, then the end of the last
    errors: list[str] = field(default_factory=list)


def scan_shard(root: Any, info: ShardInfo, is_eval: bool, num_items: int, check_hash: bool = True) -> ShardScan:
    """Read every sample of a shard (a local file, or an object at a URL: one sequential read); never raises,
    collects errors naming shard and key."""
    path = root / info.path
    scan = ShardScan(info.path)
    if not exists(path):
        scan.errors.append(f"{info.path}: missing")
        return scan
    if check_hash and info.sha256 and sha256_file(path) != info.sha256:
        scan.errors.append(f"{info.path}: sha256 differs from manifest")
    items: list[np.ndarray] = []
    last_user, user_len = None, 0
    try:
        with open_read(path) as stream, tarfile.open(fileobj=stream, mode="r:") as tar:
            for m in tar:
                tar.members.clear()
                scan.offsets.append(m.offset)
                end = m.offset_data + -(-m.size // 512) * 512
                key = m.name.partition(".")[0]
                try:
                    f = tar.extractfile(m)
                    payload = f.read() if f else b""
                    if len(payload) != m.size:
                        raise SampleError(f"sample {key!r}: cut short ({len(payload)} of {m.size} bytes)")
                    s = decode_sample(key, payload)
                except (SampleError, tarfile.TarError, OSError) as e:
                    scan.errors.append(f"{info.path}: {e}")
                    continue
                n = len(s)
                scan.samples += 1
                scan.interactions += n
                scan.sample_lengths.append(n)
                if s.imps:
                    scan.targets += s.imps  # impression splits: one target per impression
                    shown = s.cols["imp_item"]
                    if shown.size and (shown.min() < 0 or shown.max() >= num_items):
                        scan.errors.append(f"{info.path}: sample {key!r}: shown item id outside [0, {num_items})")
                    if n and s.cols["imp_time"].size and int(s.cols["timestamp"].max()) >= int(s.cols["imp_time"][-1]):
                        scan.errors.append(f"{info.path}: sample {key!r}: history reaches past the last request")
                elif is_eval:
                    scan.targets += n - s.target_start
                if s.user != last_user:
                    if last_user is not None:
                        scan.user_lengths.append(user_len)
                    scan.users += 1
                    last_user, user_len = s.user, 0
                user_len += n
                it, ts = s.cols["item"], s.cols["timestamp"]
                if n:
                    if it.min() < 0 or it.max() >= num_items:
                        scan.errors.append(f"{info.path}: sample {key!r}: item id outside [0, {num_items})")
                    if np.any(np.diff(ts) < 0):
                        scan.errors.append(f"{info.path}: sample {key!r}: timestamps not sorted")
                    scan.item_min = int(it.min()) if scan.item_min < 0 else min(scan.item_min, int(it.min()))
                    scan.item_max = max(scan.item_max, int(it.max()))
                    items.append(it)
                    ev = np.bincount(s.cols["event"], minlength=len(EventType))[: len(EventType)]
                    scan.events = [a + int(b) for a, b in zip(scan.events, ev)]
    except (tarfile.TarError, OSError, EOFError) as e:
        scan.errors.append(f"{info.path}: broken tar after {scan.samples} samples ({e})")
    if scan.offsets:
        scan.offsets.append(end)
    if last_user is not None:
        scan.user_lengths.append(user_len)
    if items:
        scan.items, scan.item_counts = np.unique(np.concatenate(items), return_counts=True)
    if info.lengths:
        _check_side_table(root, info.lengths, info.lengths_sha256, scan, scan.sample_lengths, "sample lengths")
    if info.index:
        _check_side_table(root, info.index, info.index_sha256, scan, scan.offsets, "sample offsets")
    for name in ("samples", "interactions", "users", "targets", "item_min", "item_max"):
        want, got = getattr(info, name), getattr(scan, name)
        if want != got:
            scan.errors.append(f"{info.path}: manifest says {name}={want}, shard has {got}")
    return scan


def _check_side_table(root: Any, rel: str, sha: str, scan: ShardScan, want: list[int], what: str) -> None:
    """A shard's lengths or index table: present, its sha256 the manifest's, its values the shard's."""
    path = root / rel
    if not exists(path):
        scan.errors.append(f"{rel}: missing")
        return
    if sha and sha256_file(path) != sha:
        scan.errors.append(f"{rel}: sha256 differs from manifest")
    if not scan.errors and np.load(io.BytesIO(read_bytes(path))).tolist() != want:
        scan.errors.append(f"{rel}: {what} differ from the shard's contents")


def _scan_job(args: tuple[Any, ShardInfo, bool, int, bool]) -> ShardScan:
    return scan_shard(*args)


def scan_dataset(
    root: str | Path, check_hash: bool = True, workers: int = 1, max_shards: int = 0
) -> tuple[Manifest, dict[str, list[ShardScan]]]:
    """Scan every shard of every split (or the first ``max_shards`` per split)."""
    manifest = Manifest.load(root)
    scans: dict[str, list[ShardScan]] = {}
    for split, info in manifest.splits.items():
        shards = info.shards[:max_shards] if max_shards else info.shards
        jobs = [(manifest.root, sh, info.kind == "eval", manifest.num_items, check_hash) for sh in shards]
        if workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(workers) as ex:
                scans[split] = list(ex.map(_scan_job, jobs))
        else:
            scans[split] = [_scan_job(j) for j in jobs]
    return manifest, scans


def verify(root: str | Path, workers: int = 1) -> dict[str, Any]:
    """Check every shard's bytes, counts and hashes, and every split's item-count table."""
    manifest, scans = scan_dataset(root, check_hash=True, workers=workers)
    errors: list[str] = []
    for split, split_scans in scans.items():
        for sc in split_scans:
            errors.extend(sc.errors)
        info = manifest.splits[split]
        if info.item_counts:
            path = manifest.root / info.item_counts
            if not exists(path):
                errors.append(f"{info.item_counts}: missing")
                continue
            if info.item_counts_sha256 and sha256_file(path) != info.item_counts_sha256:
                errors.append(f"{info.item_counts}: sha256 differs from manifest")
                continue
            table = np.load(io.BytesIO(read_bytes(path)))
            recount = np.zeros(manifest.num_items, np.int64)
            for sc in split_scans:
                if sc.items is not None:
                    np.add.at(recount, sc.items, sc.item_counts)
            if table.shape != recount.shape or not np.array_equal(table, recount):
                errors.append(f"{info.item_counts}: item counts differ from the shards' contents")
    feats = manifest.item_features
    if feats:
        path = manifest.root / feats["path"]
        if not exists(path):
            errors.append(f"{feats['path']}: missing")
        elif feats.get("sha256") and sha256_file(path) != feats["sha256"]:
            errors.append(f"{feats['path']}: sha256 differs from manifest")
    return {
        "root": redact(manifest.root),
        "ok": not errors,
        "errors": errors,
        "shards": sum(len(v) for v in scans.values()),
        "samples": sum(sc.samples for v in scans.values() for sc in v),
        "interactions": sum(sc.interactions for v in scans.values() for sc in v),
    }


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {f"p{p}": 0.0 for p in PERCENTILES}
    arr = np.asarray(values)
    return {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES} | {"mean": float(arr.mean())}


def inspect(root: str | Path, max_shards: int = 0, workers: int = 1) -> dict[str, Any]:
    """Summary of a dataset: counts from the manifest, distributions from reading the shards."""
    manifest, scans = scan_dataset(root, check_hash=False, workers=workers, max_shards=max_shards)
    out: dict[str, Any] = {
        "root": redact(manifest.root),
        "num_items": manifest.num_items,
        "max_len": manifest.max_len,
        "source": manifest.source.get("kind", "?"),
        "item_features": {k: v for k, v in manifest.item_features.items() if k != "sha256"},
        "splits": {},
    }
    for split, info in manifest.splits.items():
        sc = scans[split]
        counts = [s.samples for s in info.shards]
        inter = [s.interactions for s in info.shards]
        events = np.sum([s.events for s in sc], axis=0) if sc else np.zeros(len(EventType))
        total_ev = max(int(events.sum()), 1)
        item_counts = manifest.item_counts(split) if info.item_counts else np.zeros(0)
        out["splits"][split] = {
            "kind": info.kind,
            "shards": len(info.shards),
            "users": sum(s.users for s in info.shards),
            "samples": sum(counts),
            "interactions": sum(inter),
            "targets": sum(s.targets for s in info.shards),
            "items_seen": int(np.count_nonzero(item_counts)),
            "shards_read": len(sc),
            "history_length": _percentiles([n for s in sc for n in s.user_lengths]),
            "sample_length": _percentiles([n for s in sc for n in s.sample_lengths]),
            "events": {e.name.lower(): round(int(events[e.value]) / total_ev, 4) for e in EventType},
            "shard_balance": {
                "samples_min": min(counts, default=0),
                "samples_max": max(counts, default=0),
                "interactions_min": min(inter, default=0),
                "interactions_max": max(inter, default=0),
                "interactions_cv": float(np.std(inter) / np.mean(inter)) if inter and np.mean(inter) else 0.0,
            },
            "stats": info.stats,
        }
    return out
