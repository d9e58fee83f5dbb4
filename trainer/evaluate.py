"""`argus eval`: ranking metrics of a checkpoint against the popularity baseline, in one process.

For every evaluation sample the user state after the last context interaction
(position ``target_start - 1``) scores the whole catalog; each held-out target
is ranked (full ranking when the catalog has at most
``eval.full_ranking_max_items`` items, otherwise among sampled negatives and
reported under ``sampled_`` names). The most-popular baseline (training item
counts) is ranked on the same targets, so every report shows the lift. The
feedback head's normalized entropy is computed on the targets, teacher-forced
(the state before each target, the target's item given); a feedback target the
data never varies (no played ratio, no likes) is left out with a note.

:func:`rank_split` is the ranking core, shared with the reference SASRec
(``bench/reference_sasrec.py``) and the oracle of synthetic data
(:func:`oracle_report`, the ceiling for ``model / oracle`` NDCG): any model
that maps a batch to catalog scores is scored by exactly the same code.

Deterministic: the same checkpoint and data give byte-identical JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trainer import checkpoint
from trainer.data.batch import Batch
from trainer.data.loader import ShardLoader
from trainer.data.manifest import Manifest
from trainer.data.oracle import SynthOracle
from trainer.data.schema import played_bucket
from trainer.metrics import RankingAccumulator, item_ranks, popularity_scores, ranks_of_targets, sampled_ranks
from trainer.model.argus import target_index
from trainer.model.heads import ne_from_stats, ne_stats, score
from trainer.model.interaction import lookup_interactions


@dataclass
class EvalTargets:
    """The held-out targets of one batch that have a context to rank from."""

    flat: torch.Tensor  # flat interaction index of each target in the batch
    owner: torch.Tensor  # its sample (row of the batch)
    items: torch.Tensor  # its item id
    local: torch.Tensor  # its user, numbered 0.. within the batch's users with targets
    users: int = 0  # users with targets in this batch


@dataclass
class SplitRanking:
    ranking: str  # "full" | "sampled"
    users: int = 0
    users_without_history: int = 0
    model: dict[str, float] = field(default_factory=dict)
    popularity: dict[str, float] = field(default_factory=dict)


def eval_loader(data_dir: str | Path, manifest: Manifest, split: str, batch_size: int, max_seq_len: int) -> ShardLoader:
    """The evaluation loader: one process, fixed order, the training sample length."""
    return ShardLoader.Config(
        path=str(data_dir), split=split, batch_size=batch_size, num_workers=0, shuffle=False, max_seq_len=max_seq_len
    ).build(0, 1, manifest)


def batch_targets(batch: Batch, num_items: int, max_users: int = 0) -> EvalTargets:
    """Targets at or after ``target_start`` of samples with a context; at most ``max_users`` users (0 = all)."""
    lengths = batch.lengths
    tgt = target_index(lengths, batch.target_start)
    owner = torch.repeat_interleave(torch.arange(batch.size), lengths)[tgt]
    kept = batch.target_start[owner] > 0  # a user with no history before the window has no state to rank from
    tgt, owner = tgt[kept], owner[kept]
    users, local = torch.unique(owner, return_inverse=True)
    if max_users and users.numel() > max_users:
        keep = local < max_users
        tgt, owner, local, users = tgt[keep], owner[keep], local[keep], users[:max_users]
    items = torch.remainder(batch.values["item"][tgt], num_items)
    return EvalTargets(tgt, owner, items, local, int(users.numel()))


def rank_split(
    loader: ShardLoader,
    scores_fn: Callable[[Batch, EvalTargets], torch.Tensor],
    item_counts: Any,
    ks: list[int],
    full: bool = True,
    sampled_negatives: int = 1000,
    seed: int = 0,
    max_users: int = 0,
) -> SplitRanking:
    """Ranks every held-out target of ``loader``'s split under ``scores_fn`` and under popularity.

    ``scores_fn(batch, targets)`` returns (batch.size, num_items) scores from each sample's state after
    its last context interaction (rows of samples without targets are ignored). ``max_users``: exactly
    that many users (the first ones in the loader's fixed order; 0 = all).
    """
    num_items = len(item_counts)
    prefix = "" if full else "sampled_"
    pop_scores = popularity_scores(np.array(item_counts))  # a copy: the counts may be a read-only memmap
    pop_rank = item_ranks(pop_scores)
    acc_model, acc_pop = RankingAccumulator(ks, prefix), RankingAccumulator(ks, prefix)
    gen = torch.Generator().manual_seed(seed)
    out = SplitRanking("full" if full else "sampled")
    for batch in loader:
        if batch.size == 0:
            continue
        out.users_without_history += int((batch.target_start == 0).sum())
        t = batch_targets(batch, num_items, max_users - out.users if max_users else 0)
        if t.users == 0:
            continue
        logits = scores_fn(batch, t)
        if full:
            ranks = ranks_of_targets(logits, t.items, t.owner)
            pranks = pop_rank[t.items]
        else:
            ranks = sampled_ranks(logits, t.items, sampled_negatives, gen, t.owner)
            pranks = sampled_ranks(pop_scores.expand(batch.size, -1), t.items, sampled_negatives, gen, t.owner)
        acc_model.add(ranks, t.local)
        acc_pop.add(pranks, t.local)
        out.users += t.users
        if max_users and out.users >= max_users:
            break
    out.model, out.popularity = acc_model.compute(), acc_pop.compute()
    return out


def oracle_report(
    data_dir: str | Path,
    split: str = "test",
    ks: list[int] | None = None,
    batch_size: int = 0,
    max_users: int = 0,
    taste: str = "drifted",
) -> dict[str, Any]:
    """Ranking metrics of the oracle of a synthetic ``loo`` dataset (``trainer.data.oracle``), next to popularity.

    The oracle ranks each user's catalog by their true distribution of the held-out row; it goes through
    :func:`rank_split` like any model, on the same targets and with the same tie rule, so ``model / oracle``
    of the same metric is meaningful. ``expected`` holds HR@K and NDCG@K averaged over the oracle's own
    distribution (what the realised targets estimate, without their sampling noise). ``taste="initial"``
    ranks with the users' initial instead of drifted taste (a diagnostic). Always full ranking.
    """
    ks = list(ks or [10, 100])
    oracle = SynthOracle(data_dir, taste=taste)
    manifest = oracle.manifest
    batch_size = batch_size or max(1, min(256, (1 << 24) // max(1, manifest.num_items)))
    loader = eval_loader(data_dir, manifest, split, batch_size, 2)  # the oracle needs no context beyond the last row
    expected = {f"{m}@{k}": 0.0 for m in ("hr", "ndcg") for k in ks}
    gains = 1.0 / torch.log2(torch.arange(max(ks), dtype=torch.float64) + 2.0)
    target_p: list[torch.Tensor] = []

    def scores_fn(batch: Batch, t: EvalTargets) -> torch.Tensor:
        probs = torch.from_numpy(oracle.probs(batch.users.numpy(), split))
        prev = batch.values["item"][t.flat - 1]  # the row before each target (one target per sample under loo)
        if not torch.equal(prev, torch.from_numpy(oracle.state(batch.users[t.owner].numpy(), split)["prev_item"])):
            raise ValueError(f"{data_dir}: the truth files do not match the {split} shards (previous items differ)")
        top = probs[t.owner].topk(max(ks), dim=1).values
        for k in ks:
            expected[f"hr@{k}"] += float(top[:, :k].sum())
            expected[f"ndcg@{k}"] += float((top[:, :k] * gains[:k]).sum())
        target_p.append(probs[t.owner, t.items])
        return probs

    r = rank_split(loader, scores_fn, np.array(manifest.item_counts("train")), ks, max_users=max_users)
    tp = torch.cat(target_p) if target_p else torch.zeros(0, dtype=torch.float64)
    return {
        "split": split,
        "ranking": r.ranking,
        "taste": taste,
        "users": r.users,
        "users_without_history": r.users_without_history,
        "oracle": r.model,
        "popularity": r.popularity,
        "lift": {k: (v / r.popularity[k] if r.popularity[k] else None) for k, v in r.model.items() if "@" in k},
        "expected": {k: v / max(1, int(tp.numel())) for k, v in expected.items()},
        "mean_target_p": float(tp.mean()) if tp.numel() else float("nan"),
    }


@torch.no_grad()
def evaluate(
    run_dir: str | Path,
    data_dir: str | Path,
    split: str | None = None,
    ks: list[int] | None = None,
    max_users: int | None = None,
    checkpoint_path: str | Path | None = None,
) -> dict[str, Any]:
    """The report of ``argus eval``: the run's selected checkpoint (``best`` when the run kept one, else
    ``latest``), or ``checkpoint_path``."""
    path = checkpoint.resolve_checkpoint(checkpoint_path or run_dir, prefer_best=checkpoint_path is None)
    manifest = Manifest.load(data_dir)
    cfg, sparse, dense = checkpoint.load_model(path, manifest.num_items)
    ev = cfg.eval
    split = split or ev.split
    ks = list(ks or ev.ks)
    max_users = ev.max_users if max_users is None else max_users
    loader = eval_loader(data_dir, manifest, split, ev.batch_size, cfg.interactions_per_sample())
    items = sparse.items.embeddings["item"].weight
    ni = cfg.heads.next_item
    feedback = cfg.heads.feedback.weight > 0
    stats: dict[str, list[tuple[float, torch.Tensor]]] = {"event": [], "played": []}

    def scores_fn(batch: Batch, t: EvalTargets) -> torch.Tensor:
        if cfg.data.batch_tokens:  # a run trained on packed rows is ranked on packed rows too
            batch.pack(cfg.interactions_per_sample())
        item, side, _ = lookup_interactions(
            sparse, batch, cfg, sparse.item_rows, torch.zeros(0, dtype=torch.long), torch.device("cpu")
        )
        states = dense.states(item, side, batch.lengths, batch.grid())
        h = dense.user_vectors(states, batch.lengths, (batch.target_start - 1).clamp_min(0))
        if feedback:
            fb = dense.feedback(states[dense.state_rows(t.flat)[1]], item[t.flat])
            stats["event"].append(ne_stats(fb["event"].float(), batch.values["event"].long()[t.flat]))
            stats["played"].append(ne_stats(fb["played"].float(), played_bucket(batch.values["played"])[t.flat]))
        return score(h, items, ni.normalize, ni.temperature)

    full = manifest.num_items <= ev.full_ranking_max_items
    r = rank_split(
        loader, scores_fn, manifest.item_counts("train"), ks, full, ev.sampled_negatives, cfg.train.seed, max_users
    )
    report: dict[str, Any] = {
        "checkpoint": path.name,
        "split": split,
        "ranking": r.ranking,
        "users": r.users,
        "users_without_history": r.users_without_history,
        "model": r.model,
        "popularity": r.popularity,
    }
    report["lift"] = {
        k: (v / report["popularity"][k] if report["popularity"][k] else None) for k, v in r.model.items() if "@" in k
    }
    notes = []
    for head, parts in stats.items():
        if not parts:
            continue
        counts = sum(c for _, c in parts)
        if int((counts > 0).sum()) < 2:  # one class only: the prior has no entropy, NE is undefined
            notes.append(f"ne/{head} left out: every {head} target in this split has the same value")
            continue
        report[f"ne/{head}"] = ne_from_stats(sum(ce for ce, _ in parts), counts)
    if notes:
        report["notes"] = notes
    return report
