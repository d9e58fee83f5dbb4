"""Embedding tables: the catalog-sized item table, as a TorchRec EmbeddingCollection.

``items`` is looked up by the features ``item`` and ``neg_item`` (sampled negatives come from the
same sharded table). Only catalog-sized tables live here: the small side tables (context, event,
played bucket, hour of week, time gap) are dense parameters of the model
(``trainer/model/interaction.py``).

Two backends (``embeddings.backend``, chosen explicitly, never by fallback):

- ``torchrec`` (default): ``DistributedModelParallel`` with the TorchRec planner; row-wise by default
  (table-wise and column-wise selectable). Optimizer: fused into the backward pass (TorchRec's
  ``apply_optimizer_in_backward``), so embeddings are updated by ``backward()`` itself, not by the
  dense optimizer's ``step()``.
- ``torch``: every rank holds the whole table as a plain ``nn.Embedding`` under the same state-dict
  names (``embeddings/replicated.py``): no TorchRec kernels, no all-to-all; its gradient is averaged
  over the ranks and the table updated once per step (``Engine.sparse_step``).

Initial weights are a pure function of (seed, table, row): each rank fills its own shards block by
block, so a 10^9-row table never exists in one process, and the model starts identical whatever the
sharding or world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

ITEM_FEATURES = ("item", "neg_item")
SHARDING_TYPES = ("row_wise", "table_wise", "column_wise")
BACKENDS = ("torchrec", "torch")
OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "adam")
INIT_BLOCK_ROWS = 1 << 16


class ItemEmbeddings:
    """Config and builders for the sparse side of the model."""

    @dataclass
    class Config:
        # torchrec: DMP-sharded, fused optimizer | torch: the whole table on every rank (embeddings/replicated.py)
        backend: str = "torchrec"
        item_dim: int = 64
        item_rows: int = 0  # 0 = the dataset's num_items
        oov: str = "hash"  # ids outside a table: "hash" (id mod rows) or "error"
        sharding: str = "row_wise"  # item table: row_wise | table_wise | column_wise (backend torchrec)
        # rowwise_adagrad | adagrad | sgd | adam (adam: GPU only under backend torchrec)
        optimizer: str = "rowwise_adagrad"
        lr: float = 0.5
        eps: float = 1e-8
        init_std: float = 0.05
        extra_constraints: dict[str, Any] = field(default_factory=dict)

        def validate(self, where: str = "embeddings", device: str = "cpu") -> None:
            def bad(key: str, msg: str) -> ValueError:
                return ValueError(f"{where}.{key}: {msg}")

            if self.backend not in BACKENDS:
                raise bad("backend", f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
            if self.item_dim < 1:
                raise bad("item_dim", f"must be >= 1, got {self.item_dim}")
            if self.item_rows < 0:
                raise bad("item_rows", f"must be >= 0, got {self.item_rows}")
            if self.oov not in ("hash", "error"):
                raise bad("oov", f"must be 'hash' or 'error', got {self.oov!r}")
            if self.sharding not in SHARDING_TYPES:
                raise bad("sharding", f"must be one of {', '.join(SHARDING_TYPES)}, got {self.sharding!r}")
            if self.optimizer not in OPTIMIZERS:
                raise bad("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
            if self.optimizer == "adam" and device == "cpu" and self.backend == "torchrec":
                raise bad(
                    "optimizer",
                    "adam is not supported by TorchRec's fused optimizers on CPU "
                    "('Optimizer adam is not supported in CPU mode'); use rowwise_adagrad, "
                    "adagrad or sgd, train on GPU, or set embeddings.backend=torch",
                )
            if self.lr <= 0:
                raise bad("lr", f"must be > 0, got {self.lr}")


class SparseArch(nn.Module):
    """The item EmbeddingCollection; forward takes the KeyedJaggedTensor from :func:`embeddings.features.featurize`."""

    def __init__(self, cfg: ItemEmbeddings.Config, num_items: int, device: torch.device | str = "meta") -> None:
        from torchrec import EmbeddingCollection, EmbeddingConfig  # imported here: config checks stay fast

        super().__init__()
        self.cfg = cfg
        self.item_rows = cfg.item_rows or num_items
        self.items = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    num_embeddings=self.item_rows,
                    embedding_dim=cfg.item_dim,
                    name="item",
                    feature_names=list(ITEM_FEATURES),
                )
            ],
            device=torch.device(device),
        )

    def forward(self, items: Any) -> Any:
        """Items KJT (features ``item``, ``neg_item``) -> the collection's output."""
        return self.items(items)


def table_rows(cfg: ItemEmbeddings.Config, num_items: int) -> dict[str, tuple[int, int]]:
    """Table name -> (rows, dim) for every TorchRec table (the capacity planner reads this too)."""
    return {"item": (cfg.item_rows or num_items, cfg.item_dim)}


# ---- deterministic, sharding-independent initialisation --------------------------------------------------------
def init_rows(
    table: str, start: int, end: int, dim: int, seed: int, std: float, col_start: int = 0, col_end: int | None = None
) -> torch.Tensor:
    """Rows [start, end) (columns [col_start, col_end)) of a table's initial weights."""
    col_end = dim if col_end is None else col_end
    out = torch.empty(end - start, col_end - col_start)
    salt = sum(ord(c) * 131**i for i, c in enumerate(table)) % (2**31)
    first, last = start // INIT_BLOCK_ROWS, (end - 1) // INIT_BLOCK_ROWS if end > start else -1
    for block in range(first, last + 1):
        b0 = block * INIT_BLOCK_ROWS
        rows = min(INIT_BLOCK_ROWS, max(end, b0 + 1) - b0)
        g = torch.Generator().manual_seed((seed * 1_000_003 + salt * 7919 + block) % (2**63))
        full = torch.randn(INIT_BLOCK_ROWS, dim, generator=g)[:rows] * std
        lo, hi = max(start, b0), min(end, b0 + rows)
        out[lo - start : hi - start] = full[lo - b0 : hi - b0, col_start:col_end]
    return out


def _named_tables(state: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    for key, value in state.items():
        # keys look like "items.embeddings.item.weight"
        parts = key.split(".")
        if len(parts) >= 4 and parts[-1] == "weight" and parts[-3] == "embeddings":
            yield key, parts[-2], value


@torch.no_grad()
def init_sparse_weights(module: nn.Module, cfg: ItemEmbeddings.Config, seed: int) -> None:
    """Fill every (local shard of every) table from :func:`init_rows`; works sharded (DMP) and unsharded."""
    dims = {name: dim for name, (_rows, dim) in table_rows(cfg, 0).items()}
    for _key, table, value in _named_tables(module.state_dict()):
        dim = dims[table]
        shards = value.local_shards() if hasattr(value, "local_shards") else None
        if shards is None:  # a plain tensor: unsharded module
            value.copy_(init_rows(table, 0, value.shape[0], dim, seed, cfg.init_std))
            continue
        for shard in shards:
            r0, c0 = shard.metadata.shard_offsets
            rows, cols = shard.metadata.shard_sizes
            shard.tensor.copy_(init_rows(table, r0, r0 + rows, dim, seed, cfg.init_std, c0, c0 + cols))


def gather_full_tables(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full tables on every rank (for tests and small-model evaluation; collective when sharded)."""
    out = {}
    for _key, table, value in _named_tables(module.state_dict()):
        if not hasattr(value, "local_shards"):
            out[table] = value.detach().clone()
            continue
        full = torch.zeros(value.size())
        for shard in value.local_shards():
            r0, c0 = shard.metadata.shard_offsets
            rows, cols = shard.metadata.shard_sizes
            full[r0 : r0 + rows, c0 : c0 + cols] = shard.tensor.detach().cpu()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(full)  # shards are disjoint: a sum assembles the table
        out[table] = full
    return out


def jagged_values(out: Any) -> dict[str, torch.Tensor]:
    """EmbeddingCollection output (possibly a LazyAwaitable under DMP) -> feature -> (N, dim) values."""
    if hasattr(out, "wait"):
        out = out.wait()
    return {name: jt.values() if hasattr(jt, "values") else jt for name, jt in out.items()}


def optimizer_class(name: str) -> tuple[type, dict[str, Any]]:
    """TorchRec fused optimizer class and extra kwargs for a config name."""
    if name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad, {}
    if name == "adagrad":
        return torch.optim.Adagrad, {}
    if name == "sgd":
        return torch.optim.SGD, {}
    if name == "adam":
        return torch.optim.Adam, {}
    raise ValueError(f"embeddings.optimizer: unknown {name!r}")
