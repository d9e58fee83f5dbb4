"""The ARGUS interaction token: (context, item, feedback, time) of one interaction -> transformer token(s).

The item vector comes from the catalog-sized item table (TorchRec, ``embeddings/``). Everything else
about an interaction takes a handful of values — context, event type, played bucket, hour of week,
time-gap bucket: 6 to 168 rows — and is embedded here by plain ``nn.Embedding`` tables that belong to
the dense model: DeepSpeed trains them with the encoder (AdamW, partitioned by ZeRO like any dense
weight), and no TorchRec sharding or all-to-all is spent on them.

``merged`` (the ARGUS default): one token per interaction, an MLP over the concatenated item, context,
feedback (event, played bucket) and time (hour of week, gap) embeddings. ``interleaved``: two tokens
per interaction — an item token (item, context, time) followed by a feedback token (event, played) —
so the state after the item token can predict that item's feedback and the state after the feedback
token the next item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from trainer.data.batch import Batch, sample_starts
from trainer.data.schema import HOURS_PER_WEEK, NUM_PLAYED_BUCKETS, EventType, played_bucket

if TYPE_CHECKING:
    from trainer.job import JobConfig

TOKEN_LAYOUTS = ("merged", "interleaved")
ITEM_SIDE = ("context", "hour", "gap")
FEEDBACK_SIDE = ("event", "played")
SIDE_FEATURES = ITEM_SIDE + FEEDBACK_SIDE
GAP_BUCKETS = 32  # log2(seconds since previous interaction), 0 = first in sample
EPOCH_HOUR_OF_WEEK = 72  # 1970-01-01 00:00 UTC was a Thursday: hour 72 of a week starting on Monday


def side_table_rows(num_contexts: int) -> dict[str, int]:
    """Rows of each small side table (the planner counts them as dense parameters)."""
    return {
        "context": num_contexts,
        "hour": HOURS_PER_WEEK,
        "gap": GAP_BUCKETS,
        "event": len(EventType),
        "played": NUM_PLAYED_BUCKETS,
    }


def hour_of_week(ts: torch.Tensor) -> torch.Tensor:
    return torch.remainder(torch.div(ts, 3600, rounding_mode="floor") + EPOCH_HOUR_OF_WEEK, HOURS_PER_WEEK)


def gap_bucket(ts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """log2 bucket of seconds since the previous interaction of the same sample; 0 for a sample's first."""
    gap = torch.zeros_like(ts)
    if ts.numel() > 1:
        gap[1:] = (ts[1:] - ts[:-1]).clamp_min(0)
    first = torch.zeros(ts.numel(), dtype=torch.bool, device=ts.device)
    first[sample_starts(lengths)[lengths > 0]] = True
    bucket = (torch.log2(gap.double() + 1).floor().long() + 1).clamp(1, GAP_BUCKETS - 1)
    return torch.where(first, torch.zeros_like(bucket), bucket)


def side_features(batch: Batch, num_contexts: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Row ids into the side tables, one per interaction of a jagged batch (contexts beyond the table hash
    to id mod rows)."""
    v = batch.values
    event_max = int(v["event"].numpy().max()) if v["event"].numel() else 0  # checked on the host, before the copy
    if event_max >= len(EventType):
        raise ValueError(f"feature 'event': value {event_max} is not an EventType")

    def to(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    ts = to(v["timestamp"])
    return {
        "context": torch.remainder(to(v["context"]).long(), num_contexts),
        "hour": hour_of_week(ts),
        "gap": gap_bucket(ts, to(batch.lengths)),
        "event": to(v["event"]).long(),
        "played": played_bucket(to(v["played"])).long(),
    }


def history_rows(batch: Batch, item_rows: int, device: torch.device | None = None) -> torch.Tensor:
    """Item table rows of a jagged batch's interactions (ids beyond the table hash to id mod rows, as the lookup
    does); the ids the item tower (trainer/model/item_tower.py) reads its metadata by."""
    rows = torch.remainder(batch.values["item"].to(torch.int64), item_rows)
    return rows if device is None else rows.to(device, non_blocking=True)


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class SideTable(nn.Embedding):
    """A small side table; N(0, std) rows set in its own ``reset_parameters`` (ZeRO-3 ``zero.Init`` safe)."""

    def __init__(self, rows: int, dim: int, std: float) -> None:
        self.init_std = std  # read by reset_parameters, which nn.Embedding.__init__ calls
        super().__init__(rows, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.init_std)


class InteractionEmbedding(nn.Module):
    def __init__(
        self,
        layout: str,
        item_dim: int,
        side_dim: int,
        num_contexts: int,
        d_model: int,
        hidden: int = 0,
        init_std: float = 0.05,
    ) -> None:
        super().__init__()
        self.layout = layout
        hidden = hidden or d_model
        self.side = nn.ModuleDict(
            {name: SideTable(rows, side_dim, init_std) for name, rows in side_table_rows(num_contexts).items()}
        )
        if layout == "merged":
            self.merged = _mlp(item_dim + side_dim * len(SIDE_FEATURES), hidden, d_model)
        else:
            self.item_token = _mlp(item_dim + side_dim * len(ITEM_SIDE), hidden, d_model)
            self.feedback_token = _mlp(side_dim * len(FEEDBACK_SIDE), hidden, d_model)

    @property
    def tokens_per_interaction(self) -> int:
        return 1 if self.layout == "merged" else 2

    def forward(self, item: torch.Tensor, side: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, item_dim) item vectors + side-feature ids of N interactions -> (N * tokens_per_interaction,
        d_model) tokens, in sequence order."""
        emb = {k: self.side[k](side[k]) for k in SIDE_FEATURES}
        item_part = torch.cat([item.to(emb["event"].dtype)] + [emb[k] for k in ITEM_SIDE], dim=-1)
        feedback_part = torch.cat([emb[k] for k in FEEDBACK_SIDE], dim=-1)
        if self.layout == "merged":
            return self.merged(torch.cat([item_part, feedback_part], dim=-1))
        it, fb = self.item_token(item_part), self.feedback_token(feedback_part)
        return torch.stack([it, fb], dim=1).reshape(-1, it.shape[-1])  # item_0, fb_0, item_1, fb_1, ...


def jagged_to_padded(
    values: torch.Tensor, lengths: torch.Tensor, max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(N, d) jagged rows -> (B, T, d) right-padded, the (B, T) mask, and each row's (b, t) index."""
    b, n = lengths.numel(), values.shape[0]
    t = int(lengths.max()) if b and max_len is None else (max_len or 0)
    row = torch.repeat_interleave(torch.arange(b, device=values.device), lengths, output_size=n)
    col = torch.arange(n, device=values.device) - torch.repeat_interleave(
        sample_starts(lengths), lengths, output_size=n
    )
    out = values.new_zeros(b, t, values.shape[-1])
    out = out.index_put((row, col), values)
    mask = torch.zeros(b, t, dtype=torch.bool, device=values.device)
    mask[row, col] = True
    return out, mask, (row, col)


@dataclass
class Packed:
    """Where a jagged batch's tokens sit in a packed (rows, row_len) grid (see :func:`jagged_to_packed`)."""

    rows: torch.Tensor  # (B,) row of each sample
    cols: torch.Tensor  # (B,) first column of each sample, in tokens
    shape: tuple[int, int]  # (rows, row_len) in tokens


def packed_order(packed: Packed) -> torch.Tensor:
    """The samples in (row, column) order: sample ``packed_order(p)[i]`` is the one :func:`jagged_to_packed` gives
    segment id ``i``."""
    return torch.argsort(packed.rows * (packed.shape[1] + 1) + packed.cols)


def jagged_to_packed(
    values: torch.Tensor, lengths: torch.Tensor, packed: Packed
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(N, d) jagged rows -> the (R, T, d) packed grid, its (R, T) mask, each token's position inside its own
    sample (restarting at 0), its segment (samples numbered in row-major grid order; -1 = padding), and each
    jagged row's (r, t) index. Shapes come from ``packed.shape``, so nothing here waits on the device."""
    n, (R, T) = values.shape[0], packed.shape
    dev = values.device
    sample = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), lengths, output_size=n)
    pos = torch.arange(n, device=dev) - torch.repeat_interleave(sample_starts(lengths), lengths, output_size=n)
    row = packed.rows[sample]
    col = packed.cols[sample] + pos
    # Segment ids that grow along each row: the rank of each sample in (row, col) order.
    rank = torch.empty_like(lengths)
    rank[packed_order(packed)] = torch.arange(lengths.numel(), device=dev)
    out = values.new_zeros(R, T, values.shape[-1]).index_put((row, col), values)
    mask = torch.zeros(R, T, dtype=torch.bool, device=dev).index_put((row, col), torch.ones_like(pos, dtype=torch.bool))
    positions = torch.zeros(R, T, dtype=torch.int64, device=dev).index_put((row, col), pos)
    segments = torch.full((R, T), -1, dtype=torch.int64, device=dev).index_put((row, col), rank[sample])
    return out, mask, positions, segments, (row, col)


@dataclass
class Windows:
    """A jagged batch cut into windows of the encoder's context (:func:`jagged_to_windows`), one window per row."""

    grid: torch.Tensor  # (R, W, d) tokens, each row right-padded
    mask: torch.Tensor  # (R, W) bool, True = real token
    index: tuple[torch.Tensor, torch.Tensor]  # each jagged token's (row, column)
    sample: torch.Tensor  # (R,) the sample of each row
    back: torch.Tensor  # (R,) how many later windows its sample has (0: the sample's most recent window)
    count: torch.Tensor  # (B,) windows per sample
    most: int  # the largest count


def window_counts(lengths: np.ndarray, window: int) -> np.ndarray:
    """Windows of ``window`` each sample is cut into (:func:`jagged_to_windows`; an empty sample still gets one)."""
    return np.maximum((np.asarray(lengths, np.int64) + window - 1) // window, 1)


def window_slots(lengths: np.ndarray, window: int) -> int:
    """Positions the encoder runs over when every sample is cut into windows of ``window`` (:func:`jagged_to_windows`:
    rows x window, padding included; summary tokens not counted), from host-side lengths."""
    return int(window_counts(lengths, window).sum()) * window


def jagged_to_windows(values: torch.Tensor, lengths: torch.Tensor, window: int) -> Windows:
    """(N, d) jagged tokens -> every sample cut into windows of ``window`` tokens, from its end (so the most recent
    window is full and only the oldest one short, as the shard writer cuts histories), one window per row, in
    sample order, oldest first. Reads the lengths on the host (a device sync on CUDA)."""
    n, dev = values.shape[0], values.device
    count_host = torch.from_numpy(window_counts(lengths.detach().cpu().numpy(), window))
    rows = int(count_host.sum())
    count = count_host.to(dev)
    lengths = lengths.to(dev, torch.long)
    sample_ix = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), lengths, output_size=n)
    pos = torch.arange(n, device=dev) - torch.repeat_interleave(sample_starts(lengths), lengths, output_size=n)
    shift = (count * window - lengths)[sample_ix]  # the oldest window's missing tokens
    j = (pos + shift) // window
    col = torch.where(j == 0, pos, pos + shift - j * window)  # the oldest window is right-padded like the others
    row = (torch.cumsum(count, 0) - count)[sample_ix] + j
    grid = values.new_zeros(rows, window, values.shape[-1]).index_put((row, col), values)
    mask = torch.zeros(rows, window, dtype=torch.bool, device=dev).index_put(
        (row, col), torch.ones_like(pos, dtype=torch.bool)
    )
    sample = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), count, output_size=rows)
    first = torch.repeat_interleave(torch.cumsum(count, 0) - count, count, output_size=rows)
    back = count[sample] - 1 - (torch.arange(rows, device=dev) - first)
    return Windows(grid, mask, (row, col), sample, back, count, int(count_host.max()) if rows else 0)


def lookup_interactions(
    tables: Any, batch: Batch, cfg: JobConfig, item_rows: int, extra_ids: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """What the dense model reads for a jagged batch: (item vectors of the history, side-feature ids,
    item vectors of ``extra_ids``). ``tables``: the DMP-sharded or a plain ``SparseArch``; ``cfg``: the
    JobConfig. Under DMP this is a collective: every rank must call it the same number of times."""
    from embeddings.features import lookup_batch

    item, extra = lookup_batch(tables, batch, cfg.embeddings, item_rows, extra_ids, device)
    return item, side_features(batch, cfg.model.num_contexts, device), extra
