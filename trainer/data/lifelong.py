"""Lifelong histories: every interaction a user had before each sample of a split, streamed in bounded memory.

The writer stores a long history as consecutive members (trainer/data/writer.py: ``chunk_bounds``, train samples of
at most ``max_len`` interactions keyed by their first row's offset in the whole history) and an eval sample as its
most recent ``max_len`` rows; shard ``i`` of every split holds the same users in the same order. :func:`pieces`
walks a split's shards (for an eval split, the train shard beside each too, for the rows older than the sample)
and cuts each user's history into pieces of at most ``piece`` interactions in time order: what a summariser reads
(``argus summarize``, trainer/export.py). The piece that brings a user up to the start of a sample's most recent
``window`` history rows carries an :class:`Emit`: the summary read so far is that sample's. One member is decoded at
a time and at most one member's rows wait per user, so memory does not grow with the history's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from trainer.data.manifest import Manifest
from trainer.data.reader import ShardTable
from trainer.data.schema import FIELDS, Sample, decode_sample

Columns = dict[str, np.ndarray]


@dataclass
class Emit:
    """A sample's summary point: every history row read before it."""

    offset: int  # the sample's key offset (its first row's index in the whole history)
    before: int  # the history index the summary stops at: every row it read comes before it (the window's start)
    covered: int = 0  # history interactions read before it (fewer than ``before`` when rows are in no split read)
    until: int = -1  # time of the last of them; -1 when none


@dataclass
class Piece:
    """Rows of one user's history to read next, in time order."""

    user: int
    cols: Columns  # FIELDS columns: ``lead`` leading rows, then the rows to read
    lead: int  # 0 or 1: a row read before, there only to give the first new row its time gap
    emit: Emit | None = None  # the summary after this piece (and the user's earlier ones) is this sample's

    @property
    def rows(self) -> int:
        return int(self.cols["item"].shape[0]) - self.lead


def _history_rows(s: Sample, eval_split: bool, at: int | None) -> int:
    """A sample's leading rows that are history: before its held-out targets (eval) and before ``at``."""
    h = s.target_start if eval_split else s.n
    if at is not None:
        h = min(h, int(np.searchsorted(s.cols["timestamp"], at, side="left")))  # time-ordered: a prefix
    return h


class _User:
    """One user's stream: rows waiting to be read (``buf`` at history indices ``idx``) and the last row read."""

    def __init__(self, user: int, piece: int) -> None:
        self.user, self.piece = user, piece
        self.buf: Columns = {k: np.zeros(0, dt) for k, dt in FIELDS.items()}
        self.idx = np.zeros(0, np.int64)
        self.end = 0  # one past the highest history index buffered or read
        self.prev: Columns | None = None
        self.read = 0
        self.until = -1

    def add(self, offset: int, cols: Columns, rows: int) -> None:
        """Buffer a member's first ``rows`` rows, skipping those already buffered or read (overlapping members)."""
        lo = max(self.end - offset, 0)
        if rows <= lo:
            return
        fresh = {k: cols[k][lo:rows] for k in FIELDS}
        self.buf = {k: np.concatenate([self.buf[k], fresh[k]]) for k in FIELDS} if self.idx.size else fresh
        self.idx = np.concatenate([self.idx, np.arange(offset + lo, offset + rows)])
        self.end = offset + rows

    def take(self, before: int, emit: Emit | None = None) -> Iterator[Piece]:
        """Pieces of the buffered rows at history indices < ``before``; ``emit`` (its counts filled in) rides on the
        last one, or on an empty piece when there is nothing to read."""
        k = int(np.searchsorted(self.idx, before, side="left"))
        for s in range(0, k, self.piece):
            e = min(s + self.piece, k)
            part = {f: self.buf[f][s:e] for f in FIELDS}
            lead = 0 if self.prev is None else 1
            cols = part if self.prev is None else {f: np.concatenate([self.prev[f], part[f]]) for f in FIELDS}
            self.read += e - s
            self.until = int(part["timestamp"][-1])
            self.prev = {f: part[f][-1:] for f in FIELDS}
            last = e == k
            yield Piece(self.user, cols, lead, self._fill(emit) if last else None)
        if k == 0 and emit is not None:
            yield Piece(self.user, {f: self.buf[f][:0] for f in FIELDS}, 0, self._fill(emit))
        self.buf = {f: v[k:] for f, v in self.buf.items()}
        self.idx = self.idx[k:]

    def _fill(self, emit: Emit | None) -> Emit | None:
        if emit is not None:
            emit.covered, emit.until = self.read, self.until
        return emit


def _members(table: ShardTable, i: int) -> Iterator[Sample]:
    for _, key, payload in table.members(i, np.arange(int(table.counts[i]))):
        yield decode_sample(key, payload)


def pieces(
    manifest: Manifest, split: str, shards: list[int], window: int, piece: int, at: int | None = None
) -> Iterator[Piece]:
    """Each user's lifelong history in ``split``'s shards ``shards``, in pieces of at most ``piece`` interactions, and
    for every sample an :class:`Emit` after the history rows before its most recent ``window`` history rows (rows at
    or after ``at`` are never history). A train split is its own history; an eval split's older rows come from the
    train shard of the same index."""
    kind = manifest.split(split).kind
    if kind not in ("train", "eval"):
        raise ValueError(f"split {split!r}: a {kind} split has no per-user summary point (use train or an eval split)")
    table = ShardTable.from_manifest(manifest, split)
    train = ShardTable.from_manifest(manifest, "train") if kind == "eval" else None
    for i in shards:
        older = None
        if train is not None:
            order = {u.user: j for j, u in enumerate(_members(table, i))}  # one decode pass over a small eval shard
            older = _Older(train, i, order)
        user: _User | None = None
        for s in _members(table, i):
            if user is None or user.user != s.user:
                user = _User(s.user, piece)
                if older is not None:
                    for t in older.of(s.user):  # train members before this sample: history, read now
                        user.add(t.offset, t.cols, min(_history_rows(t, False, at), s.offset - t.offset))
                        yield from user.take(user.end)
            h = _history_rows(s, kind == "eval", at)
            user.add(s.offset, s.cols, h)
            before = s.offset + max(0, h - window)
            yield from user.take(before, Emit(s.offset, before))


class _Older:
    """The train shard beside an eval shard, walked once alongside it: the same users in the same order, the train
    shard holding some more (users with no eval sample), which are passed over."""

    def __init__(self, table: ShardTable, i: int, order: dict[int, int]) -> None:
        self.it = _members(table, i)
        self.head: Sample | None = next(self.it, None)
        self.order = order  # eval user -> its place in the eval shard
        self.path = table.paths[i]

    def of(self, user: int) -> Iterator[Sample]:
        """The train members of ``user`` (none when the shard holds none)."""
        here = self.order[user]
        while self.head is not None and self.head.user != user:
            there = self.order.get(self.head.user)
            if there is not None and there > here:  # a later eval user: this one has no train rows
                return
            if there is not None and there < here:
                raise ValueError(f"{self.path}: user {self.head.user} comes later here than in its eval shard")
            self.head = next(self.it, None)
        while self.head is not None and self.head.user == user:
            yield self.head
            self.head = next(self.it, None)
