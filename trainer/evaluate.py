"""`argus eval`: ranking metrics of a checkpoint against the popularity baseline, in one process.

For every evaluation sample the user state after the last context interaction
(position ``target_start - 1``) scores the whole catalog; each held-out target
is ranked (full ranking when the catalog has at most
``eval.full_ranking_max_items`` items, otherwise among sampled negatives and
reported under ``sampled_`` names). The most-popular baseline (training item
counts) is ranked on the same targets, so every report shows the lift. The
feedback head's normalized entropy is computed on the targets, teacher-forced
(the state before each target, the target's item given).

Deterministic: the same checkpoint and data give byte-identical JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint
from trainer.data.loader import ShardLoader
from trainer.data.manifest import Manifest
from trainer.data.schema import played_bucket
from trainer.metrics import RankingAccumulator, item_ranks, popularity_scores, ranks_of_targets, sampled_ranks
from trainer.model.argus import target_index
from trainer.model.heads import normalized_entropy, score
from trainer.model.interaction import lookup_interactions


@torch.no_grad()
def evaluate(
    run_dir: str | Path,
    data_dir: str | Path,
    split: str | None = None,
    ks: list[int] | None = None,
    max_users: int | None = None,
) -> dict[str, Any]:
    path = checkpoint.resolve_checkpoint(run_dir)
    manifest = Manifest.load(data_dir)
    cfg, sparse, dense = checkpoint.load_model(path, manifest.num_items)
    ev = cfg.eval
    split = split or ev.split
    ks = list(ks or ev.ks)
    max_users = ev.max_users if max_users is None else max_users
    loader = ShardLoader.Config(
        path=str(data_dir),
        split=split,
        batch_size=ev.batch_size,
        num_workers=0,
        shuffle=False,
        max_seq_len=cfg.interactions_per_sample(),
    ).build(0, 1, manifest)
    items = sparse.items.embeddings["item"].weight
    full = manifest.num_items <= ev.full_ranking_max_items
    prefix = "" if full else "sampled_"
    pop_scores = popularity_scores(manifest.item_counts("train"))  # once: the same for every user and batch
    pop_rank = item_ranks(pop_scores)
    acc_model, acc_pop = RankingAccumulator(ks, prefix), RankingAccumulator(ks, prefix)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    ev_logits, ev_targets, pl_logits, pl_targets = [], [], [], []
    users = no_context = 0
    ni = cfg.heads.next_item
    for batch in loader:
        keep = batch.target_start > 0  # a user with no history before the window has no state to rank from
        no_context += int((~keep).sum())
        if batch.size == 0 or not bool(keep.any()):
            continue
        item, side, _ = lookup_interactions(
            sparse, batch, cfg, sparse.item_rows, torch.zeros(0, dtype=torch.long), torch.device("cpu")
        )
        lengths = batch.lengths
        states = dense.states(item, side, lengths)
        h = dense.user_vectors(states, lengths, (batch.target_start - 1).clamp_min(0))
        tgt = target_index(lengths, batch.target_start)
        owner = torch.repeat_interleave(torch.arange(batch.size), lengths)[tgt]
        target_items = torch.remainder(batch.values["item"][tgt], sparse.item_rows)
        kept = keep[owner]
        tgt, owner, target_items = tgt[kept], owner[kept], target_items[kept]
        logits = score(h, items, ni.normalize, ni.temperature)
        if full:
            ranks = ranks_of_targets(logits, target_items, owner)
            pranks = pop_rank[target_items]
        else:
            ranks = sampled_ranks(logits, target_items, ev.sampled_negatives, gen, owner)
            pranks = sampled_ranks(pop_scores.expand(batch.size, -1), target_items, ev.sampled_negatives, gen, owner)
        # user indices local to the batch, compacted to users with targets
        _, local = torch.unique(owner, return_inverse=True)
        acc_model.add(ranks, local)
        acc_pop.add(pranks, local)
        users += int(local.max()) + 1 if local.numel() else 0
        if cfg.heads.feedback.weight > 0:
            out = dense.feedback(states[dense.state_rows(tgt)[1]], item[tgt])
            ev_logits.append(out["event"].float())
            ev_targets.append(batch.values["event"].long()[tgt])
            pl_logits.append(out["played"].float())
            pl_targets.append(played_bucket(batch.values["played"])[tgt].long())
        if max_users and users >= max_users:
            break
    report: dict[str, Any] = {
        "checkpoint": path.name,
        "split": split,
        "ranking": "full" if full else "sampled",
        "users": users,
        "users_without_history": no_context,
        "model": acc_model.compute(),
        "popularity": acc_pop.compute(),
    }
    report["lift"] = {
        k: (v / report["popularity"][k] if report["popularity"][k] else None)
        for k, v in report["model"].items()
        if "@" in k
    }
    if ev_logits:
        report["ne/event"] = normalized_entropy(torch.cat(ev_logits), torch.cat(ev_targets))
        report["ne/played"] = normalized_entropy(torch.cat(pl_logits), torch.cat(pl_targets))
    return report
