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

Batches are cut from each part's emission order: ``batch_size`` samples at a time, or, with
token-budget batches (:class:`Packing`), as many samples as fit first-fit into ``rows`` rows of
``row_len`` interactions (:func:`pack_stream`); then parts are cut by interactions rather than by
samples, so every rank gets the same number of interactions per step. Either way a part's batches
(:class:`PartPlan`) are a pure function of the layout, so every rank knows how many batches every part
yields without reading a byte.

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


def split_intervals(
    intervals: Sequence[Interval], parts: int, weights: np.ndarray | None = None
) -> list[list[Interval]]:
    """Cut an ordered interval list into ``parts`` pieces whose sizes differ by at most one, or, given
    ``weights`` (per global index), whose summed weights are as equal as contiguous cuts allow."""
    total = sum(e - s for s, e in intervals)
    if weights is None or total == 0:
        q, r = divmod(total, parts)
        sizes = [q + (1 if i < r else 0) for i in range(parts)]
    else:
        cum = np.cumsum(weights[_indices(intervals)], dtype=np.float64)
        cuts = np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts, side="right")
        sizes = np.diff(np.concatenate([[0], cuts, [total]])).tolist()
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


def split_two_level(
    intervals: Sequence[Interval], world_size: int, num_workers: int, weights: np.ndarray | None = None
) -> list[list[Interval]]:
    """Split by rank first, then by worker, so per-rank totals (not only per-part) are balanced."""
    return [
        piece
        for rank_piece in split_intervals(intervals, world_size, weights)
        for piece in split_intervals(rank_piece, num_workers, weights)
    ]


def _indices(intervals: Sequence[Interval]) -> np.ndarray:
    if not intervals:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in intervals])


def merge_intervals(idx: np.ndarray) -> list[Interval]:
    """Sorted unique indices -> minimal interval list."""
    if idx.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [idx.size]])
    return [(int(idx[s]), int(idx[e - 1]) + 1) for s, e in zip(starts, ends)]


@dataclass(frozen=True)
class Packing:
    """Token-budget batches: samples packed into ``rows`` rows of ``row_len`` interactions each.

    ``window``: how many upcoming samples a batch may take from (first-fit), which bounds both how far
    packing reorders the stream and how many read samples a worker holds.
    """

    rows: int
    row_len: int
    window: int

    @property
    def budget(self) -> int:
        return self.rows * self.row_len


def pack_stream(lengths: np.ndarray, packing: Packing) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut a stream of samples (``lengths`` in emission order, each <= ``row_len``) into packed batches.

    Each batch scans the next ``window`` samples in stream order and places every one that still fits
    into the first row with room (first-fit); a sample that does not fit waits for the next batch, which
    sees it first. Returns ``(take, bounds, row, col)``: batch ``b`` is ``take[bounds[b]:bounds[b+1]]``
    (stream positions), sample ``take[i]`` starts at column ``col[i]`` of row ``row[i]``.

    A plain loop (O(rows) per sample, O(window) per batch: about a second per million samples); it runs
    where the layout is made, once per part and epoch.
    """
    n, rows, cap = len(lengths), packing.rows, packing.row_len
    take, row, col = (np.empty(n, np.int64) for _ in range(3))
    bounds, pending, nxt, k = [0], [], 0, 0
    length = lengths.tolist()
    while nxt < n or pending:
        upto = min(n, nxt + max(1, packing.window - len(pending)))
        pending.extend(range(nxt, upto))
        nxt = upto
        used, room, waiting = [0] * rows, cap, []
        for p in pending:
            n_p = length[p]
            if n_p > room:
                waiting.append(p)
                continue
            r = next(r for r in range(rows) if cap - used[r] >= n_p)
            take[k], row[k], col[k] = p, r, used[r]
            used[r] += n_p
            k += 1
            room = cap - min(used)
        pending = waiting
        bounds.append(k)
    return take, np.asarray(bounds, np.int64), row, col


@dataclass
class PartPlan:
    """One part's batches: batch ``b`` reads positions ``take[bounds[b]:bounds[b+1]]`` of
    :meth:`Part.indices`; packed batches also place each of them at ``row``/``col`` (aligned with ``take``)."""

    take: np.ndarray
    bounds: np.ndarray
    row: np.ndarray | None = None
    col: np.ndarray | None = None

    @property
    def num_batches(self) -> int:
        return len(self.bounds) - 1

    def start(self, batch: int) -> int:
        """Position in ``take`` where ``batch`` starts (the end, for padding batches past the last)."""
        return int(self.bounds[min(batch, self.num_batches)])

    def batch(self, b: int) -> slice:
        return slice(self.start(b), self.start(b + 1))


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
        return _indices(self.intervals)

    def order(self, buffer_size: int) -> np.ndarray:
        """Positions (into :meth:`indices`) in emission order."""
        return buffer_order(self.size, buffer_size, _seed(self.seed))

    def plan(
        self, batch_size: int, buffer_size: int, packing: Packing | None = None, lengths: np.ndarray | None = None
    ) -> PartPlan:
        """This part's batches; packed ones need ``lengths`` (every sample's, by global index)."""
        order = self.order(buffer_size)
        if packing is None:
            bounds = np.minimum(np.arange(math.ceil(self.size / batch_size) + 1) * batch_size, self.size)
            return PartPlan(order, bounds)
        if lengths is None:
            raise ValueError("packed batches need the samples' lengths")
        take, bounds, row, col = pack_stream(np.minimum(lengths[self.indices()][order], packing.row_len), packing)
        return PartPlan(order[take], bounds, row, col)

    def remaining(self, buffer_size: int, plan: PartPlan | None = None) -> np.ndarray:
        """Sorted global indices not yet consumed (``plan``: this part's, when its batches are packed)."""
        if plan is None:
            pos = np.sort(self.order(buffer_size)[self.consumed :])
        else:
            pos = np.sort(plan.take[plan.start(self.batches) :])
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
    packing: list[int] | None = None  # [rows, row_len, window] of token-budget batches; None = batch_size

    def packer(self) -> Packing | None:
        return Packing(*self.packing) if self.packing else None

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
    num_samples: int,
    epoch: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    seed: int,
    packing: Packing | None = None,
    lengths: np.ndarray | None = None,
    buffer_size: int = 0,
) -> EpochLayout:
    """Fresh epoch: contiguous parts of ``0..num_samples-1``, equal in samples, or (``packing``) in the
    interactions a row holds (``lengths``: every sample's, by global index)."""
    weights = _weights(packing, lengths)
    pieces = split_two_level([(0, num_samples)] if num_samples else [], world_size, num_workers, weights)
    parts = [Part(intervals=p, seed=_part_seed(seed, epoch, 0, i)) for i, p in enumerate(pieces)]
    layout = EpochLayout(epoch, world_size, num_workers, num_samples, parts, 0, 0, _packing_list(packing))
    layout.batches_per_part = _batches_per_part(layout, batch_size, buffer_size, lengths)
    return layout


def relayout(
    old: EpochLayout,
    world_size: int,
    num_workers: int,
    batch_size: int,
    buffer_size: int,
    seed: int,
    packing: Packing | None = None,
    lengths: np.ndarray | None = None,
) -> EpochLayout:
    """Redistribute every not-yet-consumed sample of ``old`` over a new world size (and batch shape)."""
    old_packing = old.packer()
    remaining = [
        p.remaining(buffer_size, p.plan(batch_size, buffer_size, old_packing, lengths) if old_packing else None)
        for p in old.parts
    ]
    pooled = np.sort(np.concatenate(remaining)) if remaining else np.zeros(0, np.int64)
    if np.unique(pooled).size != pooled.size:
        raise ValueError("corrupt data-loader state: parts overlap")
    gen = old.generation + 1
    pieces = split_two_level(merge_intervals(pooled), world_size, num_workers, _weights(packing, lengths))
    parts = [Part(intervals=p, seed=_part_seed(seed, old.epoch, gen, i)) for i, p in enumerate(pieces)]
    layout = EpochLayout(old.epoch, world_size, num_workers, old.num_samples, parts, gen, 0, _packing_list(packing))
    layout.batches_per_part = _batches_per_part(layout, batch_size, buffer_size, lengths)
    return layout


def _weights(packing: Packing | None, lengths: np.ndarray | None) -> np.ndarray | None:
    if packing is None:
        return None
    if lengths is None:
        raise ValueError("packed batches need the samples' lengths")
    return np.minimum(lengths, packing.row_len)


def _packing_list(packing: Packing | None) -> list[int] | None:
    return [packing.rows, packing.row_len, packing.window] if packing else None


def _batches_per_part(layout: EpochLayout, batch_size: int, buffer_size: int, lengths: np.ndarray | None) -> int:
    packing = layout.packer()
    if packing is None:
        return max((math.ceil(p.size / batch_size) for p in layout.parts), default=0)
    return max((p.plan(batch_size, buffer_size, packing, lengths).num_batches for p in layout.parts), default=0)


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
    "Packing",
    "Part",
    "PartPlan",
    "pack_stream",
    "buffer_order",
    "merge_rank_states",
    "new_layout",
    "relayout",
    "shard_permutation",
    "split_intervals",
    "merge_intervals",
]
