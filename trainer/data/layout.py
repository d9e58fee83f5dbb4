"""Epoch layout: which (rank, worker) reads which samples, exactly once, in equal amounts.

Stock webdataset splits *shards* across ranks, which gives unequal per-rank
counts when shards don't divide and fails with fewer shards than workers.
Here an epoch is a sequence of *samples*:

1. every rank permutes the shard list with the same epoch seed and
   concatenates the shards' samples (counts come from the manifest), giving
   global indices ``0..N-1``;
2. that sequence is cut into ``world_size`` contiguous ranges whose sizes
   differ by at most one, and each of those into ``num_workers`` *parts*; part ``rank * num_workers + worker``
   belongs to that worker;
3. each part is read in a shuffled order produced by a shuffle buffer that
   runs on *indices* (:func:`buffer_order`), so the order is a pure function of
   the seed and the position in it is one integer (``consumed``).

Resuming with the same world size continues every part at ``consumed``: the
continuation is identical to an uninterrupted run. Resuming with a different
world size pools every part's not-yet-consumed indices (kept as intervals) and
cuts them again into equal parts (:func:`relayout`): each remaining sample is
read exactly once more.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

Interval = tuple[int, int]  # [start, end) of global sample indices


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


def shard_permutation(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Shard order for an epoch; identical on every rank, different per epoch."""
    if not shuffle:
        return np.arange(num_shards)
    return _seed(seed, epoch, 0x5A4D).permutation(num_shards)


def buffer_order(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a shuffle buffer of ``buffer_size`` fed positions 0..n-1.

    Position ``i`` is never emitted before position ``i - buffer_size`` has
    been read, so a sequential reader needs to hold at most ``buffer_size``
    samples to produce this order.
    """
    if buffer_size <= 1 or n <= 1:
        return np.arange(n)
    s = min(buffer_size, n)
    buf = np.arange(s)
    out = np.empty(n, np.int64)
    picks = (rng.random(n - s) * s).astype(np.int64)
    for t in range(n - s):  # plain loop: O(n) with tiny constant, runs once per part per epoch
        j = picks[t]
        out[t] = buf[j]
        buf[j] = s + t
    rng.shuffle(buf)
    out[n - s :] = buf
    return out


def split_intervals(intervals: Sequence[Interval], parts: int) -> list[list[Interval]]:
    """Cut an ordered interval list into ``parts`` pieces whose sizes differ by at most one."""
    total = sum(e - s for s, e in intervals)
    q, r = divmod(total, parts)
    sizes = [q + (1 if i < r else 0) for i in range(parts)]
    out: list[list[Interval]] = []
    it = iter(intervals)
    cur: Interval | None = next(it, None)
    for size in sizes:
        piece: list[Interval] = []
        need = size
        while need > 0 and cur is not None:
            s, e = cur
            take = min(need, e - s)
            piece.append((s, s + take))
            need -= take
            cur = (s + take, e) if s + take < e else next(it, None)
        out.append(piece)
    return out


def split_two_level(intervals: Sequence[Interval], world_size: int, num_workers: int) -> list[list[Interval]]:
    """Split by rank first, then by worker, so per-rank totals (not only per-part) differ by at most one."""
    return [
        piece
        for rank_piece in split_intervals(intervals, world_size)
        for piece in split_intervals(rank_piece, num_workers)
    ]


def merge_intervals(idx: np.ndarray) -> list[Interval]:
    """Sorted unique indices -> minimal interval list."""
    if idx.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [idx.size]])
    return [(int(idx[s]), int(idx[e - 1]) + 1) for s, e in zip(starts, ends)]


@dataclass
class Part:
    """One worker's share of an epoch, and how far it has been read."""

    intervals: list[Interval]
    seed: int
    consumed: int = 0  # samples handed to the training loop
    batches: int = 0  # batches handed to the training loop (padding batches included)

    @property
    def size(self) -> int:
        return sum(e - s for s, e in self.intervals)

    def indices(self) -> np.ndarray:
        if not self.intervals:
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in self.intervals])

    def order(self, buffer_size: int) -> np.ndarray:
        """Positions (into :meth:`indices`) in emission order."""
        return buffer_order(self.size, buffer_size, _seed(self.seed))

    def remaining(self, buffer_size: int) -> np.ndarray:
        """Sorted global indices not yet consumed."""
        pos = np.sort(self.order(buffer_size)[self.consumed :])
        return self.indices()[pos]


@dataclass
class EpochLayout:
    epoch: int
    world_size: int
    num_workers: int  # parts per rank (DataLoader workers, or 1 without workers)
    num_samples: int  # samples in the epoch's sequence
    parts: list[Part]
    generation: int = 0  # bumped by every re-layout (new seeds for the new parts)
    batches_per_part: int = 0  # every part yields exactly this many batches (short/empty ones pad)

    def part_index(self, rank: int, worker: int) -> int:
        return rank * self.num_workers + worker

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EpochLayout":
        d = dict(d)
        d["parts"] = [
            Part(
                intervals=[tuple(iv) for iv in p["intervals"]],
                seed=p["seed"],
                consumed=p["consumed"],
                batches=p["batches"],
            )
            for p in d["parts"]
        ]
        return cls(**d)


def _part_seed(seed: int, epoch: int, generation: int, index: int) -> int:
    return int(_seed(seed, epoch, generation, index).integers(2**62))


def new_layout(
    num_samples: int, epoch: int, world_size: int, num_workers: int, batch_size: int, seed: int
) -> EpochLayout:
    """Fresh epoch: equal contiguous parts of ``0..num_samples-1``."""
    pieces = split_two_level([(0, num_samples)] if num_samples else [], world_size, num_workers)
    parts = [Part(intervals=p, seed=_part_seed(seed, epoch, 0, i)) for i, p in enumerate(pieces)]
    return EpochLayout(epoch, world_size, num_workers, num_samples, parts, 0, _batches_per_part(parts, batch_size))


def relayout(
    old: EpochLayout, world_size: int, num_workers: int, batch_size: int, buffer_size: int, seed: int
) -> EpochLayout:
    """Redistribute every not-yet-consumed sample of ``old`` over a new world size."""
    remaining = [old_part.remaining(buffer_size) for old_part in old.parts]
    pooled = np.sort(np.concatenate(remaining)) if remaining else np.zeros(0, np.int64)
    if np.unique(pooled).size != pooled.size:
        raise ValueError("corrupt data-loader state: parts overlap")
    gen = old.generation + 1
    pieces = split_two_level(merge_intervals(pooled), world_size, num_workers)
    parts = [Part(intervals=p, seed=_part_seed(seed, old.epoch, gen, i)) for i, p in enumerate(pieces)]
    return EpochLayout(
        old.epoch, world_size, num_workers, old.num_samples, parts, gen, _batches_per_part(parts, batch_size)
    )


def _batches_per_part(parts: list[Part], batch_size: int) -> int:
    return max((math.ceil(p.size / batch_size) for p in parts), default=0)


def merge_rank_states(states: Sequence[dict[str, Any]]) -> EpochLayout:
    """Combine the per-rank loader states of one checkpoint into one layout.

    Each rank knows the whole layout but only its own parts' progress.
    """
    layouts = [EpochLayout.from_dict(s["layout"]) for s in states]
    base = layouts[0]
    ranks = sorted(s["rank"] for s in states)
    if ranks != list(range(base.world_size)):
        raise ValueError(f"data-loader state: expected states of ranks 0..{base.world_size - 1}, got {ranks}")
    for s, lay in zip(states, layouts):
        if (lay.epoch, lay.generation, lay.num_samples) != (base.epoch, base.generation, base.num_samples):
            raise ValueError(f"data-loader state of rank {s['rank']} is from another epoch/layout")
        for w in range(base.num_workers):
            i = base.part_index(s["rank"], w)
            base.parts[i].consumed = lay.parts[i].consumed
            base.parts[i].batches = lay.parts[i].batches
    return base


__all__ = [
    "EpochLayout",
    "Part",
    "buffer_order",
    "merge_rank_states",
    "new_layout",
    "relayout",
    "shard_permutation",
    "split_intervals",
    "merge_intervals",
]
