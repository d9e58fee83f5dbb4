"""Sharding the embedding tables with TorchRec's planner and DistributedModelParallel."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from embeddings.tables import SIDE_FEATURES, ItemEmbeddings, SparseArch, optimizer_class


def constraints(cfg: ItemEmbeddings.Config) -> dict[str, ParameterConstraints]:
    """Per-table planner constraints from the config (item table and side tables)."""
    out = {"item": ParameterConstraints(sharding_types=[cfg.sharding])}
    for name in SIDE_FEATURES:
        out[name] = ParameterConstraints(sharding_types=[cfg.side_sharding])
    for name, extra in cfg.extra_constraints.items():
        out[name] = ParameterConstraints(**extra)
    return out


def make_planner(cfg: ItemEmbeddings.Config, world_size: int, compute_device: str, batch_size: int | None = None,
                 local_world_size: int | None = None, hbm_cap: int | None = None) -> EmbeddingShardingPlanner:
    topology = Topology(world_size=world_size, compute_device=compute_device, local_world_size=local_world_size,
                        hbm_cap=hbm_cap)
    return EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=constraints(cfg),
                                    debug=False)


def attach_fused_optimizer(sparse: SparseArch, cfg: ItemEmbeddings.Config) -> None:
    """Declare the fused (in-backward) optimizer; DMP turns it into fbgemm's fused update."""
    cls, extra = optimizer_class(cfg.optimizer)
    kwargs: dict[str, Any] = {"lr": cfg.lr, **extra}
    if cfg.optimizer in ("rowwise_adagrad", "adagrad", "adam"):
        kwargs["eps"] = cfg.eps
    # DMP rewrites the kwargs dict it is given: always hand it a fresh one.
    apply_optimizer_in_backward(cls, sparse.parameters(), dict(kwargs))


def shard(sparse: SparseArch, cfg: ItemEmbeddings.Config, device: torch.device, batch_size: int | None = None,
          group: dist.ProcessGroup | None = None) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plan (on rank 0, broadcast) and shard ``sparse`` over the default process group."""
    group = group or dist.GroupMember.WORLD
    world = dist.get_world_size(group)
    attach_fused_optimizer(sparse, cfg)
    sharders = [EmbeddingCollectionSharder()]
    planner = make_planner(cfg, world, device.type, batch_size=batch_size,
                           local_world_size=torch.cuda.device_count() if device.type == "cuda" else None)
    plan = planner.collective_plan(sparse, sharders, group)
    dmp = DistributedModelParallel(sparse, env=ShardingEnv.from_process_group(group), device=device, plan=plan,
                                   sharders=sharders)
    return dmp, plan
