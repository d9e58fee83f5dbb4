"""Batches: jagged (KeyedJaggedTensor-ready) or padded, assembled inside loader workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from trainer.data.schema import FIELDS, IMPRESSION_FIELDS, SHOWN_FIELDS, Sample

# Column dtypes inside batches: torch has no useful uint16, so played widens to int32.
BATCH_DTYPES: dict[str, np.dtype] = {
    "item": np.dtype(np.int64),
    "timestamp": np.dtype(np.int64),
    "event": np.dtype(np.uint8),
    "played": np.dtype(np.int32),
    "organic": np.dtype(np.uint8),
    "context": np.dtype(np.int32),
}


def sample_starts(lengths: torch.Tensor) -> torch.Tensor:
    """Flat index of each sample's first row in a jagged layout (exclusive prefix sum of ``lengths``)."""
    return torch.cumsum(lengths, 0) - lengths


@dataclass
class Batch:
    """A batch of user-history chunks.

    Jagged layout: ``values[name]`` is 1-D, all samples concatenated, and
    ``lengths[b]`` says how many belong to sample ``b``. Padded layout:
    ``values[name]`` is ``(B, T)``, right-padded with zeros, ``mask`` marks real
    positions. ``target_start[b]`` is the first position of sample ``b`` that is
    a prediction target (0 for training data).
    """

    keys: list[str]
    users: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    target_start: torch.Tensor
    values: dict[str, torch.Tensor]
    padded: bool
    mask: torch.Tensor | None = None
    # Bookkeeping for exactly-once accounting (filled by the loader).
    part: int = -1
    skipped: int = 0  # samples in this batch's slot that could not be read (on_error="skip")
    truncated: int = 0  # interactions cut by max_seq_len (most recent ones are kept)
    meta: dict[str, Any] = field(default_factory=dict)
    # Impression splits: per impression "sample" (row in this batch), "time", "size"; per shown item
    # "item", "event", "played", "score" (impressions concatenated). None for history-only splits.
    impressions: dict[str, torch.Tensor] | None = None
    # Token-budget batches: sample b occupies columns pack_col[b] .. pack_col[b] + lengths[b] - 1 of row
    # pack_row[b] of a (rows, row_len) grid (trainer/data/layout.py: pack_stream). None: one sample per row.
    pack_row: torch.Tensor | None = None
    pack_col: torch.Tensor | None = None
    pack_shape: tuple[int, int] | None = None

    @property
    def size(self) -> int:
        return len(self.keys)

    # Counts read the host-side lengths through numpy: the training step never asks the dispatcher for a
    # scalar (tests/test_hot_path.py counts those).
    @property
    def num_interactions(self) -> int:
        return int(self.lengths.numpy().sum())

    @property
    def slots(self) -> int:
        """Interaction positions the encoder runs over: rows x row length when packed, else samples x the
        longest sample (padding included); ``1 - num_interactions / slots`` is the padding share."""
        rows, row_len = self.grid_shape
        return rows * row_len

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, row length) of the grid the encoder runs over: the packed one, else (samples, longest)."""
        if self.pack_shape is not None:
            return self.pack_shape
        return (self.size, int(self.lengths.numpy().max()) if self.size else 0)

    def grid(self) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[int, int]]:
        """Where the encoder puts each sample: (row, first column, (rows, row length)) when packed, else
        (None, None, (samples, longest)): one sample per row. Host values, so the model needs no read-back."""
        return self.pack_row, self.pack_col, self.grid_shape

    def pack(self, row_len: int) -> "Batch":
        """Pack this batch's own samples first-fit decreasing into as few rows of ``row_len`` interactions as
        that finds (evaluation and export: one batch, one grid; training packs across the stream instead,
        ``trainer/data/layout.py``). Returns self."""
        from trainer.data.layout import Packing, pack_stream

        n = self.lengths.numpy()
        if n.size and int(n.max()) > row_len:
            raise ValueError(f"a sample of {int(n.max())} interactions does not fit a row of {row_len}")
        order = np.argsort(-n, kind="stable")
        width = max(n.size, 1)
        take, _, row, col = pack_stream(n[order], Packing(rows=width, row_len=row_len, window=width))
        rows, cols = np.zeros(n.size, np.int64), np.zeros(n.size, np.int64)
        rows[order[take]], cols[order[take]] = row, col
        self.place(rows, cols, int(rows.max()) + 1 if n.size else 1, row_len)
        return self

    def place(self, row: np.ndarray, col: np.ndarray, rows: int, row_len: int) -> None:
        """Pack the samples into a (rows, row_len) grid at the planned ``row``; columns are recomputed from the
        kept lengths in planned order, so a sample dropped from the plan (unreadable, skipped) leaves no gap."""
        n = self.lengths.numpy()
        order = np.lexsort((col, row))
        r, ln = row[order], n[order]
        end = np.cumsum(ln)
        row_start = np.flatnonzero(np.r_[True, r[1:] != r[:-1]]) if r.size else np.zeros(0, np.int64)
        base = np.repeat(end[row_start] - ln[row_start], np.diff(np.r_[row_start, r.size]))
        packed = np.empty_like(n)
        packed[order] = end - ln - base
        if r.size and (packed + n > row_len).any():
            raise ValueError(f"a packed row holds more than {row_len} interactions (sample-length table out of date?)")
        self.pack_row, self.pack_col = torch.from_numpy(np.asarray(row, np.int64)), torch.from_numpy(packed)
        self.pack_shape = (rows, row_len)

    def to_kjt(self, fields: Sequence[str] = ("item",)) -> Any:
        """The jagged columns as a torchrec KeyedJaggedTensor (keys = field names)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        if self.padded:
            raise ValueError("to_kjt needs batch_format='jagged'")
        values = torch.cat([self.values[f].to(torch.int64) for f in fields])
        lengths = self.lengths.repeat(len(fields))
        return KeyedJaggedTensor.from_lengths_sync(keys=list(fields), values=values, lengths=lengths)


def _column(samples: Sequence[Sample], name: str, starts: np.ndarray) -> np.ndarray:
    """All samples' (kept) values of one column, concatenated, in the batch dtype."""
    dtype = FIELDS[name]
    if all(s.raw[name][0] == dtype for s in samples):
        size = np.dtype(dtype).itemsize
        if starts.any():
            parts = [memoryview(s.raw[name][1])[int(c) * size :] for s, c in zip(samples, starts)]
        else:
            parts = [s.raw[name][1] for s in samples]
        flat = np.frombuffer(bytearray().join(parts), dtype=dtype)  # one copy, writable
    else:  # a dataset written with other column dtypes: convert sample by sample
        flat = np.concatenate([s.cols[name][int(c) :] for s, c in zip(samples, starts)] or [np.zeros(0, dtype)])
    return flat.astype(BATCH_DTYPES[name], copy=False)


def collate_impressions(samples: Sequence[Sample]) -> dict[str, torch.Tensor] | None:
    """The impressions of an impression-split batch, flat, with each impression's batch row."""
    if not samples or "imp_time" not in samples[0].raw:
        return None
    cols = {k: np.concatenate([s.cols[k] for s in samples]) for k in (*IMPRESSION_FIELDS, *SHOWN_FIELDS)}
    rows = np.repeat(np.arange(len(samples), dtype=np.int64), [s.imps for s in samples])
    return {
        "sample": torch.from_numpy(rows),
        "time": torch.from_numpy(cols["imp_time"].astype(np.int64)),
        "size": torch.from_numpy(cols["imp_size"].astype(np.int64)),
        "item": torch.from_numpy(cols["imp_item"].astype(np.int64)),
        "event": torch.from_numpy(cols["imp_event"].astype(np.int64)),
        "played": torch.from_numpy(cols["imp_played"].astype(np.int32)),
        "score": torch.from_numpy(cols["imp_score"].astype(np.float32)),
    }


def collate(samples: Sequence[Sample], padded: bool, max_seq_len: int = 0, pad_to: int = 0) -> Batch:
    """Stack samples into a Batch; ``max_seq_len > 0`` keeps each sample's most recent positions."""
    lengths = np.fromiter((s.n for s in samples), np.int64, len(samples))
    starts = np.maximum(lengths - max_seq_len, 0) if max_seq_len > 0 else np.zeros(len(samples), np.int64)
    kept = lengths - starts
    target_start = np.maximum(np.fromiter((s.target_start for s in samples), np.int64, len(samples)) - starts, 0)
    offsets = np.fromiter((s.offset for s in samples), np.int64, len(samples)) + starts
    mask = None
    flat = {name: _column(samples, name, starts) for name in FIELDS}
    if padded:
        t = max(int(kept.max()) if len(samples) else 0, pad_to)
        m = np.arange(t)[None, :] < kept[:, None]  # row-major order of m == concatenation order
        for name, arr in flat.items():
            out = np.zeros((len(samples), t), BATCH_DTYPES[name])
            out[m] = arr
            flat[name] = out
        mask = torch.from_numpy(m)
    return Batch(
        keys=[s.key for s in samples],
        users=torch.from_numpy(np.fromiter((s.user for s in samples), np.int64, len(samples))),
        offsets=torch.from_numpy(offsets),
        lengths=torch.from_numpy(kept),
        target_start=torch.from_numpy(target_start),
        values={name: torch.from_numpy(arr) for name, arr in flat.items()},
        padded=padded,
        mask=mask,
        truncated=int(starts.sum()),
        impressions=collate_impressions(samples),
    )
