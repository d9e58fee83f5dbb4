"""``embeddings.backend: torch``: the item table as a plain ``nn.Embedding``, whole on every rank.

For GPUs without TorchRec's CUDA kernels (CUDA fbgemm-gpu), one-process runs and small catalogs. Nothing
here imports TorchRec or calls an fbgemm op: a lookup is host ids -> one non-blocking copy -> ``F.embedding``
(``embeddings/features.py`` branches on the table type).

- **Names.** The table is registered under the state-dict name TorchRec's ``EmbeddingCollection`` has inside
  ``SparseArch`` (``items.embeddings.item.weight``), and :class:`ReplicatedOptimizer` lays its state out like
  TorchRec's fused optimizer (``{"state": {"items.embeddings.item.weight": {"item.momentum1": ...}}}``), so a
  checkpoint written by either backend loads into the other (and into ``argus eval`` / ``export``).
- **Updates.** ``backward`` leaves a dense gradient of the whole table on each rank;
  :meth:`ReplicatedOptimizer.step` (called by ``Engine.sparse_step`` once per step, after the backward) sums
  it over the ranks, divides by the world size (what TorchRec's gradient division does, and what the
  one-process reference of ``tests/test_sharded_equivalence.py`` computes) and applies the update to every
  row; rows no rank looked up have a zero gradient and do not move (except under ``adam``, see below).
- **Memory per rank.** rows x dim x 4 bytes for the table, as much again for its gradient, plus the
  optimizer state (row-wise Adagrad: 4 bytes a row); ``cluster/planner.py`` counts the same.
- **adam** here is dense Adam (torch.optim.Adam's update, betas 0.9/0.999 like TorchRec's default): every
  row moves with its momentum on every step, where TorchRec's fused Adam updates only the rows a batch looked
  up. Its state (``momentum1``, ``momentum2``, ``step``) does not load across backends.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from embeddings.tables import ItemEmbeddings, table_rows

ADAM_BETAS = (0.9, 0.999)


class _Collection(nn.Module):
    """Stands where TorchRec's ``EmbeddingCollection`` stands in ``SparseArch``: ``.embeddings[table]``."""

    def __init__(self, tables: dict[str, nn.Embedding]) -> None:
        super().__init__()
        self.embeddings = nn.ModuleDict(tables)


class ReplicatedItemTables(nn.Module):
    """The item table, whole, on ``device``; ``forward(ids)`` -> (len(ids), dim) vectors."""

    def __init__(self, cfg: ItemEmbeddings.Config, num_items: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.item_rows = cfg.item_rows or num_items
        tables = {
            # _weight: no random init of a table that init_sparse_weights / a checkpoint overwrites next
            name: nn.Embedding(rows, dim, _weight=torch.zeros(rows, dim, device=device))
            for name, (rows, dim) in table_rows(cfg, num_items).items()
        }
        self.items = _Collection(tables)

    @property
    def weight(self) -> nn.Parameter:
        return self.items.embeddings["item"].weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (already on the table's device and inside the table) of the item table."""
        return F.embedding(ids, self.weight)


def replicated_summary(cfg: ItemEmbeddings.Config, num_items: int, world: int) -> dict[str, dict[str, Any]]:
    """``sharding_plan.json`` under the torch backend: every table whole on every rank (the layout of
    ``embeddings.sharding.plan_summary``, so readers of the file need no second format)."""
    return {
        name: {
            "sharding_type": "replicated",
            "compute_kernel": "torch",
            "shards": [[r, [0, 0], [rows, dim]] for r in range(world)],
        }
        for name, (rows, dim) in sorted(table_rows(cfg, num_items).items())
    }


class ReplicatedOptimizer:
    """``embeddings.optimizer`` for :class:`ReplicatedItemTables`, same ``lr`` / ``eps`` as the fused path.

    - ``rowwise_adagrad``: ``s += mean(g**2, dim=1)`` per row; ``w -= lr * g / (sqrt(s) + eps)``
    - ``adagrad``: ``s += g**2`` per element; ``w -= lr * g / (sqrt(s) + eps)`` (torch.optim.Adagrad)
    - ``sgd``: ``w -= lr * g``
    - ``adam``: torch.optim.Adam's update (bias-corrected, betas 0.9 / 0.999), dense

    ``step()`` is a collective when the process group has more than one rank: every rank calls it once per step.
    """

    def __init__(self, tables: ReplicatedItemTables, cfg: ItemEmbeddings.Config) -> None:
        self.cfg = cfg
        self.params: dict[str, tuple[str, nn.Parameter]] = {
            key: (key.split(".")[-2], p) for key, p in tables.named_parameters()
        }
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        for key, (table, p) in self.params.items():
            rows, dim = p.shape
            opt = cfg.optimizer
            zeros: dict[str, torch.Tensor] = {}
            if opt == "rowwise_adagrad":
                zeros["momentum1"] = p.new_zeros(rows)
            elif opt in ("adagrad", "adam"):
                zeros["momentum1"] = p.new_zeros(rows, dim)
            if opt == "adam":
                zeros["momentum2"] = p.new_zeros(rows, dim)
                zeros["step"] = torch.zeros((), dtype=torch.float64)  # checkpointed; step() reads self.adam_steps
            self.state[key] = {f"{table}.{name}": t for name, t in zeros.items()}
        self.adam_steps = dict.fromkeys(self.params, 0)  # adam's step count as an int: step() reads no tensor

    def zero_grad(self) -> None:
        for _table, p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        lr, eps = self.cfg.lr, self.cfg.eps
        for key, (table, p) in self.params.items():
            g = p.grad if p.grad is not None else torch.zeros_like(p)  # a rank that looked nothing up still reduces
            if world > 1:
                dist.all_reduce(g)
                g.div_(world)
            s = self.state[key]
            opt = self.cfg.optimizer
            if opt == "rowwise_adagrad":
                m = s[f"{table}.momentum1"]
                m.add_(g.pow(2).mean(dim=1))
                p.addcdiv_(g, m.sqrt().add_(eps).unsqueeze(1), value=-lr)
            elif opt == "adagrad":
                m = s[f"{table}.momentum1"]
                m.addcmul_(g, g)
                p.addcdiv_(g, m.sqrt().add_(eps), value=-lr)
            elif opt == "sgd":
                p.add_(g, alpha=-lr)
            else:  # adam
                b1, b2 = ADAM_BETAS
                m1, m2 = s[f"{table}.momentum1"], s[f"{table}.momentum2"]
                self.adam_steps[key] += 1
                s[f"{table}.step"].fill_(self.adam_steps[key])
                t = self.adam_steps[key]
                m1.lerp_(g, 1 - b1)
                m2.mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1, bc2 = 1 - b1**t, 1 - b2**t
                p.addcdiv_(m1, (m2.sqrt() / math.sqrt(bc2)).add_(eps), value=-lr / bc1)
        self.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {param key: {"<table>.<state>": tensor}}}``: the layout of TorchRec's fused optimizer."""
        return {"state": {key: dict(s) for key, s in self.state.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, s in state_dict["state"].items():
            for name, t in s.items():
                self.state[key][name].copy_(t)
                if name.endswith(".step"):
                    self.adam_steps[key] = int(t)  # a host tensor, read once at load
