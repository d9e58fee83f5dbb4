"""Batch -> the KeyedJaggedTensor the item table reads, and the lookup itself."""

from __future__ import annotations

from typing import Any

import torch
from torchrec import KeyedJaggedTensor

from embeddings.tables import ITEM_FEATURES, ItemEmbeddings, jagged_values
from trainer.data.batch import Batch


def apply_oov(ids: torch.Tensor, rows: int, policy: str, feature: str) -> torch.Tensor:
    """Ids outside [0, rows): 'hash' maps them to id mod rows (documented, deterministic); 'error' refuses.
    ``ids``: a host tensor (checked through numpy: no device round trip)."""
    if ids.numel() == 0:
        return ids
    bad = ((ids < 0) | (ids >= rows)).numpy()
    if not bad.any():
        return ids
    if policy == "error":
        raise ValueError(
            f"feature {feature!r}: id {ids.numpy()[bad][0]} outside the table's {rows} rows "
            f"(set embeddings.oov=hash to map ids beyond the table by id mod rows)"
        )
    return torch.remainder(ids, rows)


def featurize(
    batch: Batch, cfg: ItemEmbeddings.Config, item_rows: int, neg_ids: torch.Tensor, device: torch.device
) -> KeyedJaggedTensor:
    """The items KJT (features ``item`` and ``neg_item``) of one jagged batch.

    Sampled negatives ride in the ``neg_item`` feature of the first sample, so they are looked up
    in the same sharded item table in the same all-to-all. Built where the batch is (the host, from the
    loader), checked there, then copied without waiting: no device-to-host sync.
    """
    if batch.padded:
        raise ValueError("featurize needs jagged batches (data.batch_format=jagged)")
    host = batch.lengths.device
    lengths = batch.lengths
    b = lengths.numel()
    item = apply_oov(batch.values["item"].to(torch.int64), item_rows, cfg.oov, "item")
    neg = apply_oov(neg_ids.to(device=host, dtype=torch.int64), item_rows, cfg.oov, "neg_item")
    neg_lengths = torch.zeros(max(b, 1), dtype=torch.int64, device=host)
    neg_lengths[0] = neg.numel()
    if b == 0:  # an empty padding batch still takes part in the collectives
        lengths = torch.zeros(1, dtype=torch.int64, device=host)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(ITEM_FEATURES), values=torch.cat([item, neg]), lengths=torch.cat([lengths, neg_lengths])
    )
    return kjt.to(device, non_blocking=True)


def lookup_ids(tables: Any, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Vectors of item table rows ``ids`` (may be empty: the lookup still runs, as a collective)."""
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(ITEM_FEATURES), values=ids.to(device), lengths=torch.tensor([ids.numel(), 0], device=device)
    )
    return jagged_values(tables(kjt))[ITEM_FEATURES[0]]


def lookup_batch(
    tables: Any, batch: Batch, cfg: ItemEmbeddings.Config, item_rows: int, extra_ids: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Look a batch up in the item table (a DMP-sharded or a plain SparseArch: anything taking the KJT).

    Returns (item vectors of the history, vectors of ``extra_ids``: sampled negatives in training,
    shown items in fine-tuning). Under DMP this is a collective: every rank must call it the same
    number of times.
    """
    out = jagged_values(tables(featurize(batch, cfg, item_rows, extra_ids, device)))
    return out[ITEM_FEATURES[0]], out[ITEM_FEATURES[1]]
