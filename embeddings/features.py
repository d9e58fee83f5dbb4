"""Batch -> the KeyedJaggedTensors the embedding tables read (one value per interaction and feature)."""

from __future__ import annotations

from typing import Any

import torch
from torchrec import KeyedJaggedTensor

from embeddings.tables import GAP_BUCKETS, HOURS_PER_WEEK, ITEM_FEATURES, SIDE_FEATURES, ItemEmbeddings, jagged_values
from trainer.data.batch import Batch
from trainer.data.schema import EventType, played_bucket

EPOCH_HOUR_OF_WEEK = 72  # 1970-01-01 00:00 UTC was a Thursday: hour 72 of a week starting on Monday


def apply_oov(ids: torch.Tensor, rows: int, policy: str, feature: str) -> torch.Tensor:
    """Ids outside [0, rows): 'hash' maps them to id mod rows (documented, deterministic); 'error' refuses."""
    if ids.numel() == 0:
        return ids
    bad = (ids < 0) | (ids >= rows)
    if not bool(bad.any()):
        return ids
    if policy == "error":
        raise ValueError(f"feature {feature!r}: id {int(ids[bad][0])} outside the table's {rows} rows "
                         f"(set embeddings.oov=hash to map ids beyond the table by id mod rows)")
    return torch.remainder(ids, rows)


def hour_of_week(ts: torch.Tensor) -> torch.Tensor:
    return torch.remainder(torch.div(ts, 3600, rounding_mode="floor") + EPOCH_HOUR_OF_WEEK, HOURS_PER_WEEK)


def gap_bucket(ts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """log2 bucket of seconds since the previous interaction of the same sample; 0 for a sample's first."""
    gap = torch.zeros_like(ts)
    if ts.numel() > 1:
        gap[1:] = (ts[1:] - ts[:-1]).clamp_min(0)
    starts = torch.cumsum(lengths, 0) - lengths
    first = torch.zeros(ts.numel(), dtype=torch.bool, device=ts.device)
    first[starts[lengths > 0]] = True
    bucket = (torch.log2(gap.double() + 1).floor().long() + 1).clamp(1, GAP_BUCKETS - 1)
    return torch.where(first, torch.zeros_like(bucket), bucket)


def featurize(batch: Batch, cfg: ItemEmbeddings.Config, item_rows: int, neg_ids: torch.Tensor,
              device: torch.device) -> tuple[KeyedJaggedTensor, KeyedJaggedTensor]:
    """(items KJT: item + neg_item, side KJT: context, event, played, hour, gap) for one jagged batch.

    Sampled negatives ride in the ``neg_item`` feature of the first sample, so they are looked up
    in the same sharded item table in the same all-to-all.
    """
    if batch.padded:
        raise ValueError("featurize needs jagged batches (data.batch_format=jagged)")
    v = batch.values
    lengths = batch.lengths.to(device)
    b = lengths.numel()
    item = apply_oov(v["item"].to(device), item_rows, cfg.oov, "item")
    neg = apply_oov(neg_ids.to(device=device, dtype=torch.int64), item_rows, cfg.oov, "neg_item")
    neg_lengths = torch.zeros(max(b, 1), dtype=torch.int64, device=device)
    neg_lengths[0] = neg.numel()
    if b == 0:  # an empty padding batch still takes part in the collectives
        lengths = torch.zeros(1, dtype=torch.int64, device=device)
    items = KeyedJaggedTensor.from_lengths_sync(
        keys=list(ITEM_FEATURES), values=torch.cat([item, neg]), lengths=torch.cat([lengths, neg_lengths]))
    event = v["event"].to(device).long()
    if event.numel() and int(event.max()) >= len(EventType):
        raise ValueError(f"feature 'event': value {int(event.max())} is not an EventType")
    ts = v["timestamp"].to(device)
    side_values = [
        apply_oov(v["context"].to(device).long(), cfg.num_contexts, "hash", "context"),
        event,
        played_bucket(v["played"].to(device)).long(),
        hour_of_week(ts),
        gap_bucket(ts, lengths if b else lengths[:0]),
    ]
    side = KeyedJaggedTensor.from_lengths_sync(keys=list(SIDE_FEATURES), values=torch.cat(side_values),
                                               lengths=lengths.repeat(len(SIDE_FEATURES)))
    return items, side


def lookup_batch(tables: Any, batch: Batch, cfg: ItemEmbeddings.Config, item_rows: int, extra_ids: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Look a batch up in the tables (a DMP-sharded or a plain SparseArch: anything taking the two KJTs).

    Returns (item embeddings of the history, side-feature embeddings by name, embeddings of
    ``extra_ids``: sampled negatives in training, shown items in fine-tuning). Under DMP this is a
    collective: every rank must call it the same number of times.
    """
    items_kjt, side_kjt = featurize(batch, cfg, item_rows, extra_ids, device)
    out_items, out_side = tables(items_kjt, side_kjt)
    iv, sv = jagged_values(out_items), jagged_values(out_side)
    return iv[ITEM_FEATURES[0]], {k: sv[k] for k in SIDE_FEATURES}, iv[ITEM_FEATURES[1]]
