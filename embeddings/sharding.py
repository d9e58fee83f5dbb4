"""Sharding the embedding tables with TorchRec's planner and DistributedModelParallel."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from embeddings.tables import ItemEmbeddings, SparseArch, optimizer_class


def constraints(
    cfg: ItemEmbeddings.Config, lookups: tuple[float, float] | None = None
) -> dict[str, ParameterConstraints]:
    """Per-table planner constraints from the config.

    ``lookups`` = (interactions per sample, negatives per sample): TorchRec sizes its I/O buffers and
    rates its plans by lookups per sample (its "pooling factor", 1 by default), and a history is
    hundreds of lookups, not one.
    """
    pool: dict[str, Any] = {}
    if lookups is not None:
        pool = {"pooling_factors": [float(lookups[0]), max(float(lookups[1]), 1e-3)]}  # features item, neg_item
    out = {"item": ParameterConstraints(sharding_types=[cfg.sharding], **pool)}
    for name, extra in cfg.extra_constraints.items():
        out[name] = ParameterConstraints(**extra)
    return out


def make_planner(
    cfg: ItemEmbeddings.Config,
    world_size: int,
    compute_device: str,
    batch_size: int | None = None,
    local_world_size: int | None = None,
    hbm_cap: int | None = None,
    lookups: tuple[float, float] | None = None,
) -> EmbeddingShardingPlanner:
    """TorchRec's planner for our tables. ``hbm_cap`` given = the HBM left for embeddings after the dense
    side (computed by ``trainer.memory``), so TorchRec's own 15% dense reservation is turned off."""
    topology = Topology(
        world_size=world_size, compute_device=compute_device, local_world_size=local_world_size, hbm_cap=hbm_cap
    )
    reservation = FixedPercentageStorageReservation(percentage=0.0) if hbm_cap is not None else None
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints(cfg, lookups),
        storage_reservation=reservation,
        debug=False,
    )


def plan_offline(
    cfg: ItemEmbeddings.Config,
    num_items: int,
    world_size: int,
    compute_device: str,
    batch_size: int | None = None,
    local_world_size: int | None = None,
    hbm_cap: int | None = None,
    lookups: tuple[float, float] | None = None,
) -> tuple[ShardingPlan, list[Any]]:
    """The plan ``shard()`` would make, without a process group: tables on the meta device, a
    hypothetical topology. Returns the plan and TorchRec's sharding options (with their storage)."""
    sparse = SparseArch(cfg, num_items, device="meta")
    attach_fused_optimizer(sparse, cfg)  # without it TorchRec counts no optimizer state
    planner = make_planner(cfg, world_size, compute_device, batch_size, local_world_size, hbm_cap, lookups)
    plan = planner.plan(sparse, [EmbeddingCollectionSharder()])
    return plan, list(planner._best_plan or [])  # no public accessor for the chosen options' storage


def plan_summary(plan: ShardingPlan) -> dict[str, dict[str, Any]]:
    """table -> {sharding_type, compute_kernel, shards: [[rank, offsets, sizes], ...]}: JSON, comparable."""
    out: dict[str, dict[str, Any]] = {}
    for module_plan in plan.plan.values():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            shards = []
            if ps.sharding_spec is not None:
                shards = [
                    [int(str(m.placement).split("/")[0].split(":")[1]), list(m.shard_offsets), list(m.shard_sizes)]
                    for m in ps.sharding_spec.shards
                ]
            else:
                shards = [[r, None, None] for r in (ps.ranks or [])]
            out[table] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel, "shards": shards}
    return dict(sorted(out.items()))


def attach_fused_optimizer(sparse: SparseArch, cfg: ItemEmbeddings.Config) -> None:
    """Declare the fused (in-backward) optimizer; DMP turns it into fbgemm's fused update."""
    cls, extra = optimizer_class(cfg.optimizer)
    kwargs: dict[str, Any] = {"lr": cfg.lr, **extra}
    if cfg.optimizer in ("rowwise_adagrad", "adagrad", "adam"):
        kwargs["eps"] = cfg.eps
    # DMP rewrites the kwargs dict it is given: always hand it a fresh one.
    apply_optimizer_in_backward(cls, sparse.parameters(), dict(kwargs))


def shard(
    sparse: SparseArch,
    cfg: ItemEmbeddings.Config,
    device: torch.device,
    batch_size: int | None = None,
    group: dist.ProcessGroup | None = None,
    hbm_cap: int | None = None,
    lookups: tuple[float, float] | None = None,
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plan (on rank 0, broadcast) and shard ``sparse`` over the default process group."""
    group = group or dist.GroupMember.WORLD
    world = dist.get_world_size(group)
    attach_fused_optimizer(sparse, cfg)
    sharders = [EmbeddingCollectionSharder()]
    planner = make_planner(
        cfg,
        world,
        device.type,
        batch_size=batch_size,
        local_world_size=torch.cuda.device_count() if device.type == "cuda" else None,
        hbm_cap=hbm_cap,
        lookups=lookups,
    )
    plan = planner.collective_plan(sparse, sharders, group)
    dmp = DistributedModelParallel(
        sparse, env=ShardingEnv.from_process_group(group), device=device, plan=plan, sharders=sharders
    )
    return dmp, plan
