"""The training engine: the item table (TorchRec DMP, or a plain replicated table) + DeepSpeed ZeRO for the
dense model.

Both share the default process group. Under ``embeddings.backend: torchrec`` the sparse side is updated
inside ``backward`` (fused optimizer); under ``torch`` by ``sparse_step()`` right after the backward; the
dense side by ``ds.step()``. Random choices (sampled negatives, in-batch candidates) come from generators
seeded by (seed, step, rank), so a resumed run draws exactly what the uninterrupted one would have, with no
extra state to checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from embeddings.replicated import ReplicatedItemTables, ReplicatedOptimizer, replicated_summary
from embeddings.tables import SparseArch, init_sparse_weights
from trainer.checkpoint_store import latest_checkpoint
from trainer.data.batch import Batch
from trainer.data.manifest import Manifest
from trainer.data.schema import FIELDS, played_bucket
from trainer.dist import DistInfo, together
from trainer.job import JobConfig
from trainer.memory import embedding_hbm_budget, embedding_lookups
from trainer.model.argus import target_index
from trainer.model.build import build_dense, compile_dense
from trainer.model.heads import CandidateLogQ, ne_stats, prediction_pairs
from trainer.model.interaction import history_rows, lookup_interactions
from trainer.model.item_tower import attach_item_data, cold_start_mask, semantic_items
from trainer.optim import decay_groups, lr_multiplier


def _generator(seed: int, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63))


def dummy_batch() -> Batch:
    """Two interactions of item 0: stands in for an empty padding batch so every collective still runs."""
    values = {
        name: torch.zeros(2, dtype=torch.int64 if name in ("item", "timestamp") else torch.int32) for name in FIELDS
    }
    return Batch(
        keys=["<pad>"],
        users=torch.zeros(1, dtype=torch.int64),
        offsets=torch.zeros(1, dtype=torch.int64),
        lengths=torch.tensor([2]),
        target_start=torch.zeros(1, dtype=torch.int64),
        values=values,
        padded=False,
    )


@dataclass
class StepOutput:
    """One step's results. Losses and NE statistics stay on the device (0-d / 1-d tensors): the trainer sums
    them over a logging window and reads them back once per ``train.log_every`` steps, so a step never waits
    for the device. Counts come from the host-side batch."""

    loss: torch.Tensor
    next_item: torch.Tensor
    feedback: torch.Tensor
    targets: int
    interactions: int
    slots: int  # interaction positions the encoder ran over, padding included (Batch.slots)
    # Normalized-entropy sufficient statistics per feedback target (heads.ne_stats); summed over steps
    # and ranks they give the exact NE of the whole window.
    ne: dict[str, tuple[torch.Tensor, torch.Tensor]]
    reconstruction: torch.Tensor | None = None  # model.summary.reconstruction_weight > 0


class Engine:
    def __init__(self, cfg: JobConfig, info: DistInfo, manifest: Manifest, total_steps: int | None = None) -> None:
        """``total_steps``: where the learning-rate schedule ends (default ``train.steps``)."""
        import deepspeed

        # DeepSpeed builds a shared-memory comm op (~30 s) on first init on a new machine; gloo/nccl suffice.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.cfg, self.info = cfg, info
        self.num_items = manifest.num_items
        # self.tables: what lookups read (a DMP, or a ReplicatedItemTables); self.sparse_optimizer: its optimizer
        # (the DMP's fused one, or the ReplicatedOptimizer sparse_step() runs); both are what checkpoints save.
        self.tables: Any
        self.sparse_optimizer: Any
        self.plan: Any = None  # TorchRec's ShardingPlan (backend torchrec)
        if cfg.embeddings.backend == "torch":  # the whole table on every rank: no planner, no DMP
            self.tables = ReplicatedItemTables(cfg.embeddings, manifest.num_items, device=info.device)
            self.item_rows = self.tables.item_rows
            self.sparse_optimizer = ReplicatedOptimizer(self.tables, cfg.embeddings)
        else:
            from embeddings.sharding import shard

            sparse = SparseArch(cfg.embeddings, manifest.num_items, device="meta")
            self.item_rows = sparse.item_rows
            hbm_cap = None
            if info.device.type == "cuda":  # embeddings get what the dense side leaves (the planner's arithmetic)
                hbm_cap = embedding_hbm_budget(
                    cfg,
                    info.world_size,
                    torch.cuda.get_device_properties(info.device).total_memory,
                    gpus_per_node=torch.cuda.device_count(),
                    item_rows=self.item_rows,
                )
            self.tables, self.plan = shard(
                sparse,
                cfg.embeddings,
                info.device,
                batch_size=cfg.rows_per_batch(),
                hbm_cap=hbm_cap,
                lookups=embedding_lookups(cfg, self.item_rows),
            )
            self.sparse_optimizer = self.tables.fused_optimizer

        torch.manual_seed(cfg.train.seed)  # dense init identical on every rank and across launchers
        dense = build_dense(cfg)
        # model.item_tower semantic / both: the item metadata and cold flags (fine-tuning's init replaces the flags
        # with the pre-trained run's)
        attach_item_data(dense, manifest, self.item_rows, cfg.data.split)
        self.init_weights(dense)
        # parallel.tp / parallel.sp: consecutive ranks share each block's weights (tp: DeepSpeed's AutoTP shards them
        # in deepspeed.initialize below) or each row's tokens (sp: trainer/model/sequence_parallel.py); a group sees
        # the same batch and draws the same negatives (the data-parallel rank), and its first rank counts its tokens
        self.group = cfg.parallel.group
        self.dp_rank, self.lead = info.rank // self.group, info.rank % self.group == 0
        if cfg.parallel.sp > 1:
            from trainer.model.sequence_parallel import enable_sequence_parallel, sequence_groups

            enable_sequence_parallel(dense.encoder, sequence_groups(self.group, cfg.train.timeout_s), info.device)
        if cfg.train.compile:
            compile_dense(dense)
        o = cfg.optim
        optim = torch.optim.AdamW(
            decay_groups(dense, o.weight_decay), lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps
        )
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_multiplier(o, total_steps or cfg.train.steps))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=dense,
            optimizer=optim,
            lr_scheduler=sched,
            config=cfg.deepspeed_config(info.world_size),
            dist_init_required=False,
        )
        if cfg.parallel.tp > 1 and self.ds.first_dataloader_check is not None:
            # AutoTP's one-time check that a tp group got the same inputs compares non-tensor values with `!=` and
            # fails on the side features' dict of tensors; here a group's ranks build their inputs from one
            # data-parallel rank's batch (tested against data parallelism: tests/test_parallel_training.py)
            self.ds.first_dataloader_check.remove()
        if cfg.parallel.sp > 1 and not self.lead:
            # every rank seeded alike (the dense init above): the ranks of an sp group would draw the same dropout
            # masks for their different chunks; the rest of the step draws from its own generator (_generator).
            # A tp group keeps one seed: its ranks hold the same residual stream and must drop the same units
            # (attention-probability dropout then draws alike for each rank's own heads).
            torch.manual_seed(cfg.train.seed * 1_000_003 + info.rank % self.group)
        self.bf16 = cfg.deepspeed.precision == "bf16"
        self.full_softmax = cfg.heads.next_item.full(self.item_rows)
        # model.item_tower semantic / both: uniform negatives (and a full softmax's candidates) come from the items
        # the run trains on, never from its cold items. A cold item drawn only ever as a negative would teach the
        # tower to push down its metadata, which is the very item it must score from metadata later (in production
        # a new item is not in the training catalog at all). The ID tower keeps sampling the whole table.
        tower = semantic_items(dense)
        self.uniform_pool = None
        if tower is not None and bool(tower.cold.any()) and not bool(tower.cold.all()):
            self.uniform_pool = torch.nonzero(~tower.cold.cpu()).squeeze(1)
        uniform_over = self.item_rows if self.uniform_pool is None else int(self.uniform_pool.numel())
        self.log_q = CandidateLogQ(manifest.item_counts("train"), uniform_over)
        # data.summary_cache: every sample is one window read after its user's cached summary tokens (written by any
        # summariser of this shape: they are inputs here, projected to d_model by the model's own trainable layer)
        self.summary_cache = None
        self.summary_stale = [0, 0]  # samples whose summary left older interactions out, and how many
        if cfg.data.summary_cache:
            from trainer.summary_cache import SummaryCache

            # fine-tuning reads impressions, and summaries of the history members of the train split
            history = "train" if cfg.finetune.enabled else cfg.train_split()
            n = manifest.split(history).samples
            self.summary_cache = SummaryCache.load(cfg.data.summary_cache, cfg, history, samples=n)

    def init_weights(self, dense: torch.nn.Module) -> None:
        """Initial weights, before DeepSpeed takes ``dense``: the tables' deterministic init and the dense
        model's fresh one, or ``train.init_from``'s weights (fine-tuning loads the pre-trained weights instead).
        Under a process group every rank calls it (DCP reshards the tables for this world size)."""
        cfg = self.cfg
        if cfg.train.init_from and not (cfg.resume and latest_checkpoint(Path(cfg.out)) is not None):
            from trainer import checkpoint

            path = checkpoint.resolve_checkpoint(cfg.train.init_from, prefer_best=True)
            checkpoint.load_weights(path, self.tables, dense, skip=("reconstruction.",))
            return
        init_sparse_weights(self.tables, self.cfg.embeddings, self.cfg.train.seed)

    # ---- one step ----------------------------------------------------------------------------------------------
    def lookup(self, batch: Batch, neg_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        return lookup_interactions(self.tables, batch, self.cfg, self.item_rows, neg_ids, self.info.device)

    def inputs(self, batch: Batch, step: int) -> tuple[tuple[Any, ...], torch.Tensor]:
        """Everything the dense forward takes, for one micro-batch, and the (host) target indices.

        Index bookkeeping runs on the host, where the batch and the sampled ids are born: the log-counts
        logQ needs are gathered there from the memory-mapped count table (only the batch's ids, so a 10^9-item
        catalog costs no device memory) and every tensor goes to the device with a non-blocking copy;
        nothing here reads a device tensor back.
        """
        ni = self.cfg.heads.next_item
        dev = self.info.device
        g = _generator(self.cfg.train.seed, step, self.dp_rank)
        if self.full_softmax:  # every item once (a semantic tower: every warm item): expected count 1, logQ = 0
            neg_ids = torch.arange(self.item_rows) if self.uniform_pool is None else self.uniform_pool
            k_u = int(neg_ids.numel())
        else:
            k_u = ni.uniform_negatives
            if self.uniform_pool is None:
                neg_ids = torch.randint(0, self.item_rows, (k_u,), generator=g)
            else:
                neg_ids = self.uniform_pool[torch.randint(0, self.uniform_pool.numel(), (k_u,), generator=g)]
        item, side, neg = self.lookup(batch, neg_ids)
        tgt = target_index(batch.lengths, total=batch.num_interactions)
        k_b = 0 if self.full_softmax else min(ni.in_batch_negatives, int(tgt.numel()))
        sel = torch.randperm(int(tgt.numel()), generator=g)[:k_b]
        item_ids = history_rows(batch, self.item_rows)
        pos_ids = item_ids[tgt]
        pairs = None
        if ni.multi_token:  # heads.next_item.horizon / half_life_s / utility: weighted (context, target) pairs
            v = batch.values
            pairs = prediction_pairs(batch.lengths, tgt, v["timestamp"], v["event"], v["played"], ni)
        masked = None
        if self.cfg.model.cold_start_mask_rate > 0:  # ids scored from the OOV vector, alike on both sides
            salt, rate = int(torch.randint(0, 1 << 62, (1,), generator=g)), self.cfg.model.cold_start_mask_rate
            masked = (cold_start_mask(item_ids, salt, rate), cold_start_mask(neg_ids, salt, rate))
        pos_log_q = self.log_q(pos_ids if pairs is None else item_ids[pairs[1]], k_b, k_u)
        cand_log_q = self.log_q(torch.cat([pos_ids[sel], neg_ids]), k_b, k_u)
        pack = batch.grid()

        def to(t: Any) -> Any:
            if isinstance(t, tuple):
                return tuple(to(x) for x in t)
            return t.to(dev, non_blocking=True) if isinstance(t, torch.Tensor) else t

        host = (batch.lengths, tgt, sel, item_ids, neg_ids)
        fb = (batch.values["event"].long(), batch.values["played"].long())  # raw percent: the head buckets it
        args = (item, side, neg, *to(host), *to(fb), to(pos_log_q), to(cand_log_q), to(pack), to(pairs), to(masked))
        if self.summary_cache is not None:
            args = (*args, to(self.cached_summaries(batch)))
        return args, tgt

    def cached_summaries(self, batch: Batch) -> torch.Tensor:
        """(samples, tokens, model.summary.dim) summary tokens each sample of ``batch`` reads (``data.summary_cache``):
        its user's freshest summary of the interactions before its first row; stale ones are counted."""
        cache = self.summary_cache
        assert cache is not None

        def read() -> np.ndarray:
            if batch.keys == dummy_batch().keys:  # a rank without data: its stand-in reads an empty history's summary
                return np.repeat(cache.empty[None], batch.size, 0)
            stale = self.summary_stale if self.lead else None  # a tp or sp group's batch is counted once
            return cache.for_batch(batch, strict=not self.cfg.finetune.enabled, stale=stale)[0]

        # every rank agrees before the step's collectives (a summary newer than its window stops them all)
        return torch.from_numpy(together(read, self.info.device))

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        real = batch.size > 0
        if not real:
            batch = dummy_batch()
        args, tgt = self.inputs(batch, step)
        out = self.ds(*args)
        loss = out["loss"] if real else out["loss"] * 0.0
        self.ds.backward(loss)
        self.sparse_step()
        self.ds.step()
        ne = {}
        if real and "logits/event" in out and tgt.numel():
            _, _, _, _, t, _, _, _, event, played, *_ = args  # on the device already
            ne["event"] = ne_stats(out["logits/event"], event[t])
            ne["played"] = ne_stats(out["logits/played"], played_bucket(played[t]))
        zero = loss.detach() * 0.0
        counts = real and self.lead  # a tp or sp group's batch is counted once
        return StepOutput(
            loss=loss.detach(),
            next_item=out["loss/next_item"].detach() if real else zero,
            feedback=out["loss/feedback"].detach() if real else zero,
            targets=int(tgt.numel()) if counts else 0,
            interactions=batch.num_interactions if counts else 0,
            slots=self.slots(batch) if counts else 0,
            ne=ne if self.lead else {},
            reconstruction=(out["loss/reconstruction"].detach() if real else zero)
            if "loss/reconstruction" in out
            else None,
        )

    def slots(self, batch: Batch) -> int:
        """Interaction positions the encoder ran over for ``batch`` (``tokens/padding_share``): the batch's grid, or
        with ``model.summary`` (or ``model.windows``) on unpacked rows its windows of the context, one per row."""
        if self.cfg.model.windowed() and not self.cfg.data.batch_tokens:
            from trainer.model.interaction import window_slots

            return window_slots(batch.lengths.numpy(), self.cfg.window())
        return batch.slots

    def sparse_step(self) -> None:
        """The item table's update under ``embeddings.backend: torch`` (a collective: gradient averaged over the
        ranks, then the optimizer step); a no-op under TorchRec, whose fused optimizer already ran in backward.

        Called once per step after ``ds.backward`` and before ``ds.step()``: where the fused update happens under
        TorchRec (end of backward, before the dense step), so both backends order the two updates alike. The
        table's update reads nothing of the dense side, so the order does not change the numbers."""
        if isinstance(self.sparse_optimizer, ReplicatedOptimizer):
            self.sparse_optimizer.step()

    def after_inference(self) -> None:
        """Collective, after forwards outside training (validation) under ZeRO-3: release what they gathered and
        make every rank record ZeRO-3's module trace anew. Validation calls submodules in an order of its own, and
        a rank whose trace that invalidated checks it against the others (a collective) at the next training
        forward, while a rank that kept its trace (an empty padding batch) does not: measured as a hang at the
        step after a mid-run validation on 2 ranks. Invalidating it on every rank keeps them in step."""
        if not self.ds.zero_optimization_partition_weights():
            return
        self.ds.empty_partition_cache()
        coordinator = self.ds.optimizer.parameter_offload.get_param_coordinator()
        if not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()

    def sharding_summary(self) -> dict[str, Any]:
        """What ``RUN/sharding_plan.json`` records: TorchRec's plan, or every table replicated on every rank."""
        if self.plan is None:
            return replicated_summary(self.cfg.embeddings, self.num_items, self.info.world_size)
        from embeddings.sharding import plan_summary

        return plan_summary(self.plan)

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.info.world_size > 1:
            t = t.to(self.info.device, torch.float64)
            dist.all_reduce(t)
        return t.cpu()

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``t`` on every rank (collective)."""
        if self.info.world_size > 1:
            t = t.to(self.info.device, torch.float64)
            dist.broadcast(t, src)
        return t.cpu()

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        t = self.all_reduce_sum(torch.tensor(list(values.values()), dtype=torch.float64))
        return {k: float(v) / self.info.world_size for k, v in zip(values, t.tolist())}

    def flops_per_interaction(self) -> float:
        """Dense FLOPs per interaction (training), embedding lookups excluded (shared with the planner)."""
        from trainer.flops import flops_per_interaction

        return flops_per_interaction(self.cfg, self.item_rows)
