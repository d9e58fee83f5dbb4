"""Batches: jagged (KeyedJaggedTensor-ready) or padded, assembled inside loader workers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from trainer.data.schema import FIELDS, Sample

# Column dtypes inside batches: torch has no useful uint16, so played widens to int32.
BATCH_DTYPES: dict[str, np.dtype] = {
    "item": np.dtype(np.int64),
    "timestamp": np.dtype(np.int64),
    "event": np.dtype(np.uint8),
    "played": np.dtype(np.int32),
    "organic": np.dtype(np.uint8),
    "context": np.dtype(np.int32),
}


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

    @property
    def size(self) -> int:
        return len(self.keys)

    @property
    def num_interactions(self) -> int:
        return int(self.lengths.sum())

    def to_kjt(self, fields: Sequence[str] = ("item",)) -> Any:
        """The jagged columns as a torchrec KeyedJaggedTensor (keys = field names)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        if self.padded:
            raise ValueError("to_kjt needs batch_format='jagged'")
        values = torch.cat([self.values[f].to(torch.int64) for f in fields])
        lengths = self.lengths.repeat(len(fields))
        return KeyedJaggedTensor.from_lengths_sync(keys=list(fields), values=values, lengths=lengths)


def collate(samples: Sequence[Sample], padded: bool, max_seq_len: int = 0, pad_to: int = 0) -> Batch:
    """Stack samples into a Batch; ``max_seq_len > 0`` keeps each sample's most recent positions."""
    lengths = np.array([len(s) for s in samples], np.int64)
    starts = np.zeros(len(samples), np.int64)
    if max_seq_len > 0:
        starts = np.maximum(lengths - max_seq_len, 0)
    kept = lengths - starts
    truncated = int(starts.sum())
    target_start = np.array([max(s.target_start - int(c), 0) for s, c in zip(samples, starts)], np.int64)
    offsets = np.array([s.offset for s in samples], np.int64) + starts
    values: dict[str, torch.Tensor] = {}
    mask = None
    if not padded:
        for name in FIELDS:
            parts = [s.cols[name][c:] for s, c in zip(samples, starts)]
            arr = np.concatenate(parts) if parts else np.zeros(0)
            values[name] = torch.from_numpy(arr.astype(BATCH_DTYPES[name], copy=False))
    else:
        t = max(int(kept.max()) if len(samples) else 0, pad_to)
        m = np.arange(t)[None, :] < kept[:, None]
        for name in FIELDS:
            out = np.zeros((len(samples), t), BATCH_DTYPES[name])
            for b, (s, c) in enumerate(zip(samples, starts)):
                out[b, : kept[b]] = s.cols[name][c:]
            values[name] = torch.from_numpy(out)
        mask = torch.from_numpy(m)
    return Batch(
        keys=[s.key for s in samples],
        users=torch.tensor([s.user for s in samples], dtype=torch.int64),
        offsets=torch.from_numpy(offsets),
        lengths=torch.from_numpy(kept),
        target_start=torch.from_numpy(target_start),
        values=values,
        padded=padded,
        mask=mask,
        truncated=truncated,
    )
