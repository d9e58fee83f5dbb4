"""Writing datasets: user histories -> held-out splits -> chunked samples -> shards + manifest.

``synth`` and ``convert`` both produce whole user histories; everything after
that (holding out evaluation targets, cutting long histories into chunks,
one tar member per sample, counts, hashes, item frequencies, the manifest) is
shared and lives here. Each shard is written by one process from a disjoint
set of users, so generation parallelises per shard and the parent only merges
small summaries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping

import numpy as np

from trainer.data.manifest import Manifest, ShardInfo, SplitInfo, sha256_file
from trainer.data.schema import FIELDS, IMPRESSION_FIELDS, MEMBER_EXT, SHOWN_FIELDS, encode_sample, make_key

Columns = Mapping[str, np.ndarray]


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:06d}.tar"


def lengths_name(shard: str) -> str:
    """The per-sample lengths table beside a shard (``train/shard-000000.lengths.npy``)."""
    return shard.removesuffix(".tar") + ".lengths.npy"


def index_name(shard: str) -> str:
    """The per-sample byte offsets beside a shard (``train/shard-000000.index.npy``)."""
    return shard.removesuffix(".tar") + ".index.npy"


@dataclass
class Holdout:
    """How evaluation targets are held out of each user's history.

    - ``none``: everything is training data.
    - ``loo`` (leave-one-out): the last interaction is the test target, the
      second-to-last the validation target; users with fewer than 3
      interactions stay entirely in train.
    - ``temporal`` (global temporal split): training rows have
      ``timestamp < val_start - gap``; validation targets are rows in
      ``[val_start, test_start)``, test targets rows ``>= test_start``. Rows
      inside the gap are context only (counted as ``gap_interactions``).
      ``val_start == test_start`` means no validation split.
    """

    kind: str = "none"
    val_start: int = 0
    test_start: int = 0
    gap: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "loo", "temporal"):
            raise ValueError(f"holdout kind {self.kind!r}: expected none, loo or temporal")
        if self.kind == "temporal" and not (self.val_start <= self.test_start and self.gap >= 0):
            raise ValueError(f"temporal holdout needs val_start <= test_start and gap >= 0 (got {self})")

    @property
    def splits(self) -> tuple[str, ...]:
        if self.kind == "none":
            return ("train",)
        if self.kind == "temporal" and self.val_start == self.test_start:
            return ("train", "test")
        return ("train", "val", "test")


@dataclass
class EvalPiece:
    rows: slice  # rows of the full history that form the sample (context + targets)
    target_start: int  # first target position inside the sample
    targets_cut: int = 0  # targets that did not fit in max_len


def split_history(ts: np.ndarray, holdout: Holdout, max_len: int) -> tuple[int, dict[str, EvalPiece], int]:
    """Return (number of leading rows that are training data, eval pieces by split, gap rows).

    ``ts`` is the user's time-ordered timestamp column.
    """
    n = int(ts.shape[0])
    if holdout.kind == "none" or n == 0:
        return n, {}, 0
    if holdout.kind == "loo":
        if n < 3:
            return n, {}, 0
        return n - 2, {"val": _eval_piece(0, n - 1, n - 2, max_len), "test": _eval_piece(0, n, n - 1, max_len)}, 0
    val_i, test_i = np.searchsorted(ts, [holdout.val_start, holdout.test_start], side="left")
    train_end = int(np.searchsorted(ts, holdout.val_start - holdout.gap, side="left"))
    pieces = {}
    if "val" in holdout.splits and test_i > val_i:
        pieces["val"] = _eval_piece(0, int(test_i), int(val_i), max_len)
    if n > test_i:
        pieces["test"] = _eval_piece(0, n, int(test_i), max_len)
    return train_end, pieces, int(val_i) - train_end


def _eval_piece(start: int, end: int, first_target: int, max_len: int) -> EvalPiece:
    lo = max(start, end - max_len)
    cut = max(0, lo - first_target)
    return EvalPiece(rows=slice(lo, end), target_start=max(first_target, lo) - lo, targets_cut=cut)


def chunk_bounds(n: int, max_len: int) -> list[tuple[int, int]]:
    """Cut [0, n) into chunks of at most max_len, from the end, so the most recent chunk is full."""
    bounds = []
    end = n
    while end > 0:
        start = max(0, end - max_len)
        bounds.append((start, end))
        end = start
    return bounds[::-1]


class ItemCounter:
    """Sparse per-item counts with bounded memory (catalogs can have 10^9+ items)."""

    def __init__(self, flush_every: int = 1 << 22) -> None:
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        self._flush_every = flush_every
        self.items = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)

    def add(self, items: np.ndarray) -> None:
        self._pending.append(np.asarray(items, np.int64))
        self._n_pending += items.shape[0]
        if self._n_pending >= self._flush_every:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        new_items, new_counts = np.unique(np.concatenate(self._pending), return_counts=True)
        self._pending, self._n_pending = [], 0
        self.merge(new_items, new_counts)

    def merge(self, items: np.ndarray, counts: np.ndarray) -> None:
        all_items = np.concatenate([self.items, items])
        all_counts = np.concatenate([self.counts, counts])
        self.items, inv = np.unique(all_items, return_inverse=True)
        self.counts = np.bincount(inv, weights=all_counts, minlength=self.items.shape[0]).astype(np.int64)

    def sparse(self) -> tuple[np.ndarray, np.ndarray]:
        self._flush()
        return self.items, self.counts


_BLOCK = 512


def _ustar_template() -> bytearray:
    h = bytearray(_BLOCK)
    h[100:108] = b"0000444\0"  # mode r--r--r--
    h[108:116] = b"0000000\0"  # uid
    h[116:124] = b"0000000\0"  # gid
    h[136:148] = b"00000000000\0"  # mtime fixed at 0: byte-identical shards for the same input
    h[156:157] = b"0"  # regular file
    h[257:265] = b"ustar\x0000"
    h[265:270] = h[297:302] = b"argus"  # uname, gname
    return h


class UstarWriter:
    """Plain ustar members, one header + payload each (POSIX.1-1988; any tar reader opens them).

    Python's tarfile spends ~100 us building each header (pax checks, TarInfo copies), which capped
    writing at ~7k samples/s/core; filling a fixed template costs a few microseconds.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self._template = _ustar_template()
        self.offsets = [0]  # where each member starts, and where the next would: the shard's sample index

    def add(self, name: str, payload: bytes) -> None:
        raw = name.encode()
        if len(raw) > 100:
            raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
        h = self._template[:]
        h[0 : len(raw)] = raw
        h[124:136] = b"%011o\0" % len(payload)
        h[148:156] = b"        "
        h[148:156] = b"%06o\0 " % sum(h)
        self.stream.write(h)
        self.stream.write(payload)
        pad = -len(payload) % _BLOCK
        if pad:
            self.stream.write(bytes(pad))
        self.offsets.append(self.offsets[-1] + _BLOCK + len(payload) + pad)

    def close(self) -> None:
        self.stream.write(bytes(2 * _BLOCK))  # end-of-archive marker
        self.stream.close()


class ShardSink:
    """One tar shard, one member per sample, fixed mtime; published by rename on close."""

    def __init__(self, root: Path, relpath: str, is_eval: bool = False) -> None:
        self.root, self.relpath, self.is_eval = root, relpath, is_eval
        self.final = root / relpath
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self._tar = UstarWriter(open(self.tmp, "wb", buffering=1 << 20))
        self.info = ShardInfo(path=relpath, samples=0, interactions=0, users=0)
        self.counter = ItemCounter()
        self.lengths: list[int] = []
        self._last_user: int | None = None

    def write(
        self, user: int, offset: int, cols: Columns, target_start: int = 0, impressions: Columns | None = None
    ) -> None:
        payload = encode_sample(user, offset, cols, target_start, impressions)
        self._tar.add(f"{make_key(user, offset)}.{MEMBER_EXT}", payload)
        n = int(cols["item"].shape[0])
        info = self.info
        info.samples += 1
        info.interactions += n
        self.lengths.append(n)
        if impressions is not None:
            info.targets += int(impressions["imp_time"].shape[0])  # impressions are this split's targets
        elif self.is_eval:
            info.targets += n - target_start
        if user != self._last_user:
            info.users += 1
            self._last_user = user
        if n:
            lo, hi = int(cols["item"].min()), int(cols["item"].max())
            info.item_min = lo if info.item_min < 0 else min(info.item_min, lo)
            info.item_max = max(info.item_max, hi)
            self.counter.add(cols["item"])

    def close(self) -> ShardInfo:
        self._tar.close()
        os.replace(self.tmp, self.final)
        self.info.bytes = self.final.stat().st_size
        self.info.sha256 = sha256_file(self.final)
        self.info.lengths = lengths_name(self.relpath)
        np.save(self.root / self.info.lengths, np.asarray(self.lengths, np.int32))
        self.info.lengths_sha256 = sha256_file(self.root / self.info.lengths)
        # Byte offset of every sample's header (and the end of the last): a reader of remote data starts at its
        # exact sample with one range read, without walking the headers before it.
        self.info.index = index_name(self.relpath)
        np.save(self.root / self.info.index, np.asarray(self._tar.offsets, np.int64))
        self.info.index_sha256 = sha256_file(self.root / self.info.index)
        return self.info


@dataclass
class ShardResult:
    """What one shard-writing process reports back to the parent (small)."""

    index: int
    shards: dict[str, ShardInfo]
    item_counts: dict[str, tuple[np.ndarray, np.ndarray]]
    stats: dict[str, dict[str, int]] = field(default_factory=dict)


IMPRESSION_SPLITS = ("impressions", "impressions_test")


def split_kind(split: str) -> str:
    return "train" if split == "train" else "impressions" if split in IMPRESSION_SPLITS else "eval"


class ShardSetWriter:
    """Writes shard ``index`` of every split from whole user histories, in user order.

    With ``impressions_test_start`` set, users' impressions go to the ``impressions`` split (request
    time before it) and ``impressions_test`` (at or after it): one sample per user and split, holding
    the history before the split's last request (its most recent ``max_len`` interactions) and the
    impressions. Fine-tuning cuts each impression's history at request time minus a lag itself.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        index: int,
        holdout: Holdout,
        max_len: int,
        impressions_test_start: int | None = None,
    ) -> None:
        self.root, self.index, self.holdout, self.max_len = Path(root), index, holdout, max_len
        self.imp_test_start = impressions_test_start
        splits = holdout.splits + (IMPRESSION_SPLITS if impressions_test_start is not None else ())
        self.sinks = {s: ShardSink(self.root, shard_name(s, index), is_eval=s != "train") for s in splits}
        self.stats: dict[str, dict[str, int]] = {s: {} for s in splits}

    def _bump(self, split: str, key: str, value: int) -> None:
        if value:
            self.stats[split][key] = self.stats[split].get(key, 0) + value

    def add_user(self, user: int, cols: Columns, impressions: Columns | None = None) -> None:
        """Add one user's full, time-ordered history (all FIELDS columns, equal length) and, for
        impression datasets, the user's impressions (IMPRESSION_FIELDS + SHOWN_FIELDS, by request time)."""
        if impressions is not None and impressions["imp_time"].shape[0]:
            self._add_impressions(user, cols, impressions)
        n_train, pieces, gap_rows = split_history(cols["timestamp"], self.holdout, self.max_len)
        self._bump("train", "gap_interactions", gap_rows)
        for start, end in chunk_bounds(n_train, self.max_len):
            self.sinks["train"].write(user, start, {k: cols[k][start:end] for k in FIELDS})
        for split, piece in pieces.items():
            sub = {k: cols[k][piece.rows] for k in FIELDS}
            self.sinks[split].write(user, piece.rows.start, sub, target_start=piece.target_start)
            self._bump(split, "targets_cut_to_max_len", piece.targets_cut)

    def _add_impressions(self, user: int, cols: Columns, imps: Columns) -> None:
        if self.imp_test_start is None:
            raise ValueError("impressions given to a writer made without impressions_test_start")
        t = np.asarray(imps["imp_time"], np.int64)
        if np.any(np.diff(t) < 0):
            raise ValueError(f"user {user}: impressions are not in request-time order")
        size = np.asarray(imps["imp_size"], np.int64)
        ends = np.cumsum(size)
        cut = int(np.searchsorted(t, self.imp_test_start, side="left"))
        for split, lo, hi in (("impressions", 0, cut), ("impressions_test", cut, t.shape[0])):
            if hi <= lo:
                continue
            s0, s1 = int(ends[lo - 1]) if lo else 0, int(ends[hi - 1])
            part = {k: np.asarray(imps[k])[lo:hi] for k in IMPRESSION_FIELDS}
            part.update({k: np.asarray(imps[k])[s0:s1] for k in SHOWN_FIELDS})
            end = int(np.searchsorted(cols["timestamp"], t[hi - 1], side="left"))  # strictly before the request
            start = max(0, end - self.max_len)
            self._bump(split, "history_cut_to_max_len", start)
            self._bump(split, "shown", s1 - s0)
            self.sinks[split].write(user, start, {k: cols[k][start:end] for k in FIELDS}, impressions=part)

    def close(self) -> ShardResult:
        shards = {s: sink.close() for s, sink in self.sinks.items()}
        counts = {s: sink.counter.sparse() for s, sink in self.sinks.items()}
        return ShardResult(self.index, shards, counts, self.stats)


def finalize(
    root: str | os.PathLike,
    results: list[ShardResult],
    holdout: Holdout,
    num_items: int,
    max_len: int,
    source: dict[str, Any],
) -> Manifest:
    """Merge per-shard summaries into item-count tables and the manifest (written last)."""
    root = Path(root)
    results = sorted(results, key=lambda r: r.index)
    splits = {}
    extra = tuple(s for s in IMPRESSION_SPLITS if results and s in results[0].shards)
    for split in holdout.splits + extra:
        counts = np.zeros(num_items, np.int64)
        stats: dict[str, int] = {}
        for r in results:
            items, c = r.item_counts[split]
            if items.size and (items[0] < 0 or items[-1] >= num_items):
                raise ValueError(f"{r.shards[split].path}: item ids outside [0, {num_items})")
            np.add.at(counts, items, c)
            for k, v in r.stats.get(split, {}).items():
                stats[k] = stats.get(k, 0) + v
        rel = f"{split}/item_counts.npy"
        np.save(root / rel, counts)
        splits[split] = SplitInfo(
            kind=split_kind(split),
            shards=[r.shards[split] for r in results],
            item_counts=rel,
            item_counts_sha256=sha256_file(root / rel),
            stats=stats,
        )
    manifest = Manifest(num_items=num_items, max_len=max_len, splits=splits, source=source, root=root)
    manifest.save(root)
    return manifest


def iter_users(cols: Columns, users: np.ndarray) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Group rows already sorted by (user, timestamp) into per-user column dicts."""
    if users.shape[0] == 0:
        return
    cuts = np.flatnonzero(np.diff(users)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [users.shape[0]]])
    for s, e in zip(starts, ends):
        yield int(users[s]), {k: cols[k][s:e] for k in FIELDS}
