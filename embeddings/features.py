"""Batch -> the ids the item table reads, and the lookup itself, for either backend.

``lookup_batch`` / ``lookup_ids`` are the one entry point (engine, fine-tuning, eval, export). They branch on
the table type: a ``ReplicatedItemTables`` (``embeddings.backend: torch``) gets the ids as one tensor copied
to the device and looked up with ``F.embedding`` (no KeyedJaggedTensor, no fbgemm op); anything else (a DMP or
a plain ``SparseArch``) gets TorchRec's KeyedJaggedTensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from embeddings.replicated import ReplicatedItemTables
from embeddings.tables import ITEM_FEATURES, ItemEmbeddings, jagged_values
from trainer.data.batch import Batch

if TYPE_CHECKING:
    from torchrec import KeyedJaggedTensor


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
    from torchrec import KeyedJaggedTensor

    item, neg = _host_ids(batch, cfg, item_rows, neg_ids)
    host = batch.lengths.device
    lengths = batch.lengths
    b = lengths.numel()
    neg_lengths = torch.zeros(max(b, 1), dtype=torch.int64, device=host)
    neg_lengths[0] = neg.numel()
    if b == 0:  # an empty padding batch still takes part in the collectives
        lengths = torch.zeros(1, dtype=torch.int64, device=host)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(ITEM_FEATURES), values=torch.cat([item, neg]), lengths=torch.cat([lengths, neg_lengths])
    )
    return kjt.to(device, non_blocking=True)


def _host_ids(
    batch: Batch, cfg: ItemEmbeddings.Config, item_rows: int, extra_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(history item ids, extra ids) as int64 host tensors inside the table (``embeddings.oov``)."""
    if batch.padded:
        raise ValueError("featurize needs jagged batches (data.batch_format=jagged)")
    host = batch.lengths.device
    item = apply_oov(batch.values["item"].to(torch.int64), item_rows, cfg.oov, "item")
    neg = apply_oov(extra_ids.to(device=host, dtype=torch.int64), item_rows, cfg.oov, "neg_item")
    return item, neg


def lookup_ids(tables: Any, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Vectors of item table rows ``ids`` (may be empty: under DMP the lookup still runs, as a collective)."""
    if isinstance(tables, ReplicatedItemTables):
        return tables(ids.to(device, non_blocking=True))
    from torchrec import KeyedJaggedTensor

    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(ITEM_FEATURES), values=ids.to(device), lengths=torch.tensor([ids.numel(), 0], device=device)
    )
    return jagged_values(tables(kjt))[ITEM_FEATURES[0]]


def lookup_batch(
    tables: Any, batch: Batch, cfg: ItemEmbeddings.Config, item_rows: int, extra_ids: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Look a batch up in the item table: a ``ReplicatedItemTables`` (backend torch), or a DMP-sharded or a plain
    ``SparseArch`` (anything taking the KJT).

    Returns (item vectors of the history, vectors of ``extra_ids``: sampled negatives in training,
    shown items in fine-tuning). Under DMP this is a collective: every rank must call it the same
    number of times.
    """
    if isinstance(tables, ReplicatedItemTables):
        # ids checked on the host where the batch is, then one non-blocking copy and one F.embedding
        item, extra = _host_ids(batch, cfg, item_rows, extra_ids)
        vecs = tables(torch.cat([item, extra]).to(device, non_blocking=True))
        return vecs[: item.numel()], vecs[item.numel() :]
    out = jagged_values(tables(featurize(batch, cfg, item_rows, extra_ids, device)))
    return out[ITEM_FEATURES[0]], out[ITEM_FEATURES[1]]
