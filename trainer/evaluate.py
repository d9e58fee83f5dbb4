"""`argus eval`: ranking metrics of a checkpoint against the popularity baseline, on any number of ranks.

For every evaluation sample the user state after the last context interaction
(position ``target_start - 1``) scores the whole catalog; each held-out target
is ranked (full ranking when the catalog has at most
``eval.full_ranking_max_items`` items, otherwise among sampled negatives and
reported under ``sampled_`` names). The most-popular baseline (training item
counts) is ranked on the same targets, so every report shows the lift. The
feedback head's normalized entropy is computed on the targets, teacher-forced
(the state before each target, the target's item given); a feedback target the
data never varies (no played ratio, no likes) is left out with a note.

:func:`evaluate` / :func:`rank_model` rank a checkpoint over the sharded table on every rank of a process
group (trainer/ranking.py); :func:`rank_split` ranks any ``scores_fn`` that maps a batch to full catalog scores
in one process: the reference SASRec (``bench/reference_sasrec.py``) and the oracle of synthetic data
(:func:`oracle_report`, the ceiling for ``model / oracle`` NDCG), small catalogs by construction. Both use
trainer/metrics.py's rank rule and metrics.

Deterministic: the same checkpoint and data give the same metrics on any number of ranks (trainer/ranking.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

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
from trainer.model.heads import ne_from_stats, ne_stats
from trainer.model.interaction import history_rows, lookup_interactions

if TYPE_CHECKING:
    from trainer.summary_cache import SummaryCache


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
    state_before: float | None = None,
    items: str = "all",
) -> SplitRanking:
    """Ranks every held-out target of ``loader``'s split under ``scores_fn`` and under popularity.

    ``scores_fn(batch, targets)`` returns (batch.size, num_items) scores from each sample's state after
    its last context interaction (rows of samples without targets are ignored). ``max_users``: exactly
    that many users (the first ones in the loader's fixed order, counted before the ``state_before`` / ``items``
    slices; 0 = all). ``state_before`` and ``items`` as in
    :func:`rank_model` (``argus eval --delay`` / ``--items``): with ``state_before``, ``scores_fn(batch, targets,
    last=last)`` scores from the state after each sample's interaction ``last`` (-1: none, ignored).
    """
    num_items = len(item_counts)
    prefix = "" if full else "sampled_"
    pop_scores = popularity_scores(np.array(item_counts))  # a copy: the counts may be a read-only memmap
    pop_rank = item_ranks(pop_scores)
    acc_model, acc_pop = RankingAccumulator(ks, prefix), RankingAccumulator(ks, prefix)
    gen = torch.Generator().manual_seed(seed)
    out = SplitRanking("full" if full else "sampled")
    check_items(items)
    cold = torch.from_numpy(np.asarray(item_counts) == 0) if items == "cold" else None
    for batch in loader:
        if batch.size == 0:
            continue
        out.users_without_history += int((batch.target_start == 0).sum())
        t = batch_targets(batch, num_items, max_users - out.users if max_users else 0)
        last = None
        if state_before is not None:
            last = context_before(batch, state_before)
            out.users_without_history += int(((last < 0) & (batch.target_start > 0)).sum())
            t = _only(t, last[t.owner] >= 0)
        if cold is not None:
            t = _only(t, cold[t.items])
        if t.users == 0:
            continue
        logits = scores_fn(batch, t) if last is None else scores_fn(batch, t, last=last)
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


def evaluate(
    run_dir: str | Path,
    data_dir: str | Path,
    split: str | None = None,
    ks: list[int] | None = None,
    max_users: int | None = None,
    checkpoint_path: str | Path | None = None,
    device: str = "auto",
    per_target: bool = False,
    delay_s: float = 0.0,
    items: str = "all",
    summary_cache: str | Path | None = None,
) -> dict[str, Any]:
    """The report of ``argus eval``: the run's selected checkpoint (``best`` when the run kept one, else
    ``latest``), or ``checkpoint_path``. ``summary_cache`` (``--summary-cache``): a model.summary run's states
    after the cached summaries of ``split`` (``argus summarize``), each from its most recent window, as export
    serves them (the feedback head's NE is then not reported).
    ``delay_s`` (``--delay``): rank from each user's state ``delay_s``
    before the split's cut (a stale served cache; a temporal holdout only), see :func:`rank_model`. ``items``
    (``--items``): ``all`` targets, or ``cold`` (only targets whose item has no interaction in the train split).

    Collective: every rank of the process group calls it (a plain process, torchrun, the deepspeed launcher, Ray;
    a process group is started for the call when there is none). The item table is sharded over the ranks as in
    training, through :func:`checkpoint.load_model_sharded`; users are split over the ranks and ranked by
    :func:`rank_model` (which training's validation calls with its live model). Every rank returns the same
    report."""
    from trainer.dist import process_group

    path = checkpoint.resolve_checkpoint(checkpoint_path or run_dir, prefer_best=checkpoint_path is None)
    manifest = Manifest.load(data_dir)
    cfg = checkpoint.saved_job(path)
    ev = cfg.eval
    split = split or ev.split
    manifest.split(split)  # an unknown split: one line now, before any process group
    ks = list(ks or ev.ks)
    max_users = ev.max_users if max_users is None else max_users
    if max_users < 0:
        raise ValueError(f"--max-users: must be >= 0, got {max_users}")
    state_before = delayed_state_time(manifest, split, delay_s, data_dir)
    check_items(items)
    cache = None
    if summary_cache is not None:
        from trainer.summary_cache import SummaryCache, summariser_checkpoint

        if not cfg.model.summary.tokens or cfg.finetune.enabled:
            raise ValueError(f"--summary-cache: {path} is not a pre-training run with model.summary")
        n = manifest.split(split).samples
        cache = SummaryCache.load(summary_cache, cfg, split, summariser_checkpoint(cfg, path), n)
    elif cfg.data.summary_cache:
        raise ValueError(f"{path}: the run was trained on cached summaries (data.summary_cache): evaluate it with "
                         "--summary-cache (an argus summarize cache of this split by the same summariser)")  # fmt: skip
    with process_group(device, cfg.train.timeout_s) as info:  # a caller's group (a Ray worker's) is kept
        model = checkpoint.load_model_sharded(path, manifest, info.device, info.world_size)
        report = rank_model(
            model, data_dir, manifest, split, ks, max_users, info.rank, info.world_size, info.device, per_target,
            state_before=state_before, items=items, cache=cache,
        )  # fmt: skip
    if state_before is not None:
        report = {"delay_s": delay_s, **report}
    return {"checkpoint": path.name, **report}


ITEM_SLICES = ("all", "cold")


def check_items(items: str) -> None:
    """``--items``: one line for a slice that does not exist."""
    if items not in ITEM_SLICES:
        raise ValueError(f"--items: must be one of {', '.join(ITEM_SLICES)}, got {items!r}")


def delayed_state_time(manifest: Manifest, split: str, delay_s: float, data_dir: str | Path) -> float | None:
    """``--delay``: the time users' states are taken at, the split's temporal cut minus ``delay_s`` (None for no
    delay); one line naming the dataset when its split has no temporal cut."""
    if not delay_s:
        return None
    if delay_s < 0:
        raise ValueError(f"--delay: must be >= 0, got {delay_s:g} s")
    cut = manifest.holdout_start(split)
    if cut is None:
        raise ValueError(
            f"--delay: needs a temporal holdout, and {data_dir}'s split {split!r} is not one (leave-one-out, or no "
            "cut time recorded); write one with `argus data synth/convert --holdout temporal`"
        )
    return cut - delay_s


@torch.no_grad()
def rank_model(
    model: checkpoint.ShardedModel,
    data_dir: str | Path,
    manifest: Manifest,
    split: str,
    ks: list[int],
    max_users: int,
    rank: int,
    world: int,
    device: torch.device,
    per_target: bool = False,
    state_before: float | None = None,
    items: str = "all",
    cache: SummaryCache | None = None,
) -> dict[str, Any]:
    """Collective: the ranking report of ``model`` on ``split`` (see :func:`evaluate`), the same on every rank.

    Each rank encodes its exactly-once part of the split's users (the state after the last context interaction,
    ``target_start - 1``), ranks the popularity baseline on the same targets, and sums the feedback head's NE
    statistics; the targets are then ranked over the whole catalog (:func:`trainer.ranking.full_ranks`) or among
    sampled items (:func:`trainer.ranking.sampled_ranks`, above ``eval.full_ranking_max_items``), and the metrics
    are computed on every rank over all targets in (user id, position) order, so they do not depend on the number
    of ranks. ``max_users``: exactly that many users, those with the lowest ids among the users with a target
    (with ``items="cold"``, a target on a cold item).
    ``state_before`` (a time, seconds): each user's state is the one after their last interaction before it, and
    the targets stay the split's (``argus eval --delay``: the split's cut minus the delay); a user with no
    interaction before it counts as without history. ``items="cold"``: only the targets whose item has no
    interaction in the train split (cold-start items, ranked against the whole catalog as usual); the report
    then carries ``items`` and the share of the split's targets that are cold (``cold_share``). ``cache``: each
    user's state from its most recent window after its cached summary tokens (:func:`trainer.export.encode_users`,
    as export serves it); the report then counts the users whose summary left older interactions out."""
    import time

    import torch.distributed as dist

    from embeddings.features import lookup_ids
    from trainer import ranking
    from trainer.engine import dummy_batch
    from trainer.export import encode_users, served_items, served_users
    from trainer.summary_cache import cached_context

    t_start = time.perf_counter()
    cfg, tables, item_rows, dense = model
    ev = cfg.eval
    num_items = manifest.num_items
    full = num_items <= ev.full_ranking_max_items
    n_neg = ev.sampled_negatives
    context = cfg.interactions_per_sample()
    loader = ShardLoader.Config(
        path=str(data_dir), split=split, batch_size=ev.batch_size, num_workers=0, shuffle=False,
        max_seq_len=0 if cache is not None else context,  # a cache: the window is cut from the history rows alone
    ).build(rank, world, manifest)  # fmt: skip
    stale = [0, 0]
    counts = np.array(manifest.item_counts("train"))  # a copy: the counts may be a read-only memmap
    pop_scores = popularity_scores(counts)
    pop_rank = item_ranks(pop_scores)
    feedback = cfg.heads.feedback.weight > 0 and cache is None
    cold = torch.from_numpy(counts == 0) if items == "cold" else None
    all_targets = 0  # --items cold: the split's targets before the slice, for cold_share

    def item_vectors(ids: torch.Tensor) -> torch.Tensor:  # collective under DMP, even for no ids
        return served_items(cfg, dense.item_vectors(lookup_ids(tables, ids, device), ids.to(device)))

    chosen = _chosen_users(loader, num_items, max_users, cold) if max_users else None
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("users", "owner", "item", "score", "uid", "pos", "pop")}
    sampled: dict[str, list[torch.Tensor]] = {"model": [], "pop": []}
    stats: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"event": [], "played": []}
    without_history, n_users = 0, 0
    for batch in loader:  # the same number of batches on every rank (padding batches are empty)
        t = batch_targets(batch, num_items) if batch.size else None
        if t is not None and chosen is not None:
            t = _only(t, torch.isin(batch.users[t.owner], chosen))
        without_history += int((batch.target_start == 0).sum()) if batch.size else 0
        last = batch.target_start - 1  # each sample's state: after its last context interaction
        if state_before is not None and batch.size:
            last = context_before(batch, state_before)
            without_history += int(((last < 0) & (batch.target_start > 0)).sum())
            if t is not None:
                t = _only(t, last[t.owner] >= 0)
        if cold is not None and t is not None:
            all_targets += int(t.items.numel())
            t = _only(t, cold[t.items])
        ctx = batch if batch.size else dummy_batch()
        if cache is not None:  # one lookup, as below; the served vectors of the samples with history
            # the history context_before (above) picks: rows at or before floor(state_before), as an integer cutoff
            cut = None if state_before is None else math.floor(state_before) + 1
            rows_c, served = encode_users(batch, cfg, dense, tables, item_rows, cached_context(cfg), cut, True,
                                          device, cache, stale)  # fmt: skip
            at_kept = torch.full((batch.size,), -1, dtype=torch.long)
            at_kept[rows_c.kept] = torch.arange(rows_c.kept.numel())
            if t is not None:
                t = _only(t, at_kept[t.owner] >= 0)
        else:
            if cfg.data.batch_tokens:  # a run trained on packed rows is ranked on packed rows too
                ctx.pack(context)
            item, side, _ = lookup_interactions(tables, ctx, cfg, item_rows, torch.zeros(0, dtype=torch.long), device)
            item = dense.item_vectors(item, history_rows(ctx, item_rows, device))
        none = torch.zeros(0, dtype=torch.long)
        rows = torch.remainder(t.items, item_rows) if t is not None else none
        uid = batch.users[t.owner] if t is not None else none  # each target's user and position in its sample
        pos = t.flat - _starts(batch)[t.owner] if t is not None else none
        target_vecs = item_vectors(rows)  # collective: every batch looks its targets up, even none
        neg = neg_vecs = neg_index = None
        if not full:
            neg = ranking.negatives(cfg.train.seed, uid, pos, rows, n_neg, item_rows)
            uniq, neg_index = torch.unique(neg, return_inverse=True)
            neg_vecs = item_vectors(uniq)  # collective: the sampled items only, each once
        if t is None or t.users == 0:
            if cache is None:  # encode_users ran the cached path's forward, for peers too
                _forward_for_peers(dense, item, side, ctx, feedback, device)
            continue
        first = torch.zeros(t.users, dtype=torch.long).scatter_reduce_(
            0, t.local, t.owner, reduce="amin", include_self=False
        )  # each user's row of the batch
        if cache is not None:
            u = served[at_kept[first]].to(device)
        else:
            states = dense.states(item, side, ctx.lengths.to(device), _on(ctx.grid(), device))
            h = dense.user_vectors(states, ctx.lengths.to(device), last.clamp_min(0).to(device))
            u = served_users(cfg, h[first.to(device)])
        own = ranking.pair_scores(u[t.local.to(device)], target_vecs)
        if feedback:
            fb_states = states[dense.state_rows(t.flat.to(device))[1]]  # bf16 for a live bf16 model (validation)
            fb = dense.feedback(fb_states, item[t.flat.to(device)].to(fb_states.dtype))
            stats["event"].append(ne_stats(fb["event"].float(), ctx.values["event"].long()[t.flat].to(device)))
            played = played_bucket(ctx.values["played"])[t.flat].to(device)
            stats["played"].append(ne_stats(fb["played"].float(), played))
        if full:
            parts["users"].append(u)
            parts["owner"].append(t.local + n_users)
            parts["item"].append(rows)
            parts["score"].append(own.cpu())
            parts["pop"].append(pop_rank[t.items])
        else:
            assert neg is not None and neg_vecs is not None and neg_index is not None
            vecs, dev_rows = u[t.local.to(device)], rows.to(device)
            r = ranking.sampled_ranks(vecs, own, dev_rows, neg.to(device), neg_vecs, neg_index.to(device))
            sampled["model"].append(r.cpu())
            # popularity ranks item ids (the catalog of the counts), among its own draw of the same size
            pop_neg = ranking.negatives(cfg.train.seed + 1, uid, pos, t.items, n_neg, num_items)
            ps, pt = pop_scores[pop_neg], pop_scores[t.items][:, None]
            sampled["pop"].append(((ps > pt) | ((ps == pt) & (pop_neg < t.items[:, None]))).sum(1))
        parts["uid"].append(uid)
        parts["pos"].append(pos)
        n_users += t.users

    def cat(key: str, like: torch.Tensor) -> torch.Tensor:
        return torch.cat(parts[key]) if parts[key] else like

    empty = torch.zeros(0, dtype=torch.long)
    uid, pos = ranking.gather_rows(cat("uid", empty)), ranking.gather_rows(cat("pos", empty))
    if full:
        dim = cfg.embeddings.item_dim
        users = ranking.gather_rows(torch.cat(parts["users"]) if parts["users"] else torch.zeros(0, dim, device=device))
        offset = int(ranking.gather_rows(torch.tensor([n_users]))[:rank].sum())
        targets = ranking.Targets(
            owner=ranking.gather_rows(cat("owner", empty) + offset).to(device),
            item=ranking.gather_rows(cat("item", empty)).to(device),
            score=ranking.gather_rows(cat("score", torch.zeros(0))).to(device),
        )
        model_ranks = ranking.full_ranks(
            users, targets, item_rows, item_vectors, rank, world, ev.item_block, ev.batch_size
        ).cpu()
        pop_ranks = ranking.gather_rows(cat("pop", empty))
    else:
        model_ranks = ranking.gather_rows(torch.cat(sampled["model"]).cpu() if sampled["model"] else empty)
        pop_ranks = ranking.gather_rows(torch.cat(sampled["pop"]) if sampled["pop"] else empty)
    # the same order on any number of ranks: by user id, then target position (float sums then match exactly)
    order = torch.sort(pos, stable=True).indices
    order = order[torch.sort(uid[order], stable=True).indices]
    _, user_index = torch.unique_consecutive(uid[order], return_inverse=True)
    prefix = "" if full else "sampled_"
    acc_model, acc_pop = RankingAccumulator(ks, prefix), RankingAccumulator(ks, prefix)
    acc_model.add(model_ranks[order], user_index)
    acc_pop.add(pop_ranks[order], user_index)
    totals = torch.tensor([without_history, all_targets, *stale], dtype=torch.long, device=ranking.collective_device())
    if dist.is_initialized() and world > 1:
        dist.all_reduce(totals)
    report: dict[str, Any] = {
        "split": split,
        "ranking": "full" if full else f"sampled ({n_neg} uniform negatives per target; optimistic)",
        "users": int(user_index.max()) + 1 if user_index.numel() else 0,
        "users_without_history": int(totals[0]),
        "model": acc_model.compute(),
        "popularity": acc_pop.compute(),
    }
    if cache is not None:
        report["summary_cache"] = {"path": str(cache.root), "stale_users": int(totals[2]),
                                   "interactions_left_out": int(totals[3])}  # fmt: skip
    if cold is not None:
        report = {"items": items, "cold_share": int(model_ranks.numel()) / max(int(totals[1]), 1), **report}
    report["lift"] = {
        k: (v / report["popularity"][k] if report["popularity"][k] else None)
        for k, v in report["model"].items()
        if "@" in k
    }
    seconds, peaks = ranking.cost_over_ranks(t_start, device, world)
    report["cost"] = {
        "ranks": world,
        "seconds": round(seconds, 3),
        "users_per_s": round(report["users"] / max(seconds, 1e-9), 1),
        "peak_memory_gib": [round(x, 3) for x in peaks],
    }
    if per_target:
        items = ranking.gather_rows(torch.cat(parts["item"]) if full and parts["item"] else empty)
        report["per_target"] = {
            "user": uid[order].tolist(),
            "position": pos[order].tolist(),
            "item": items[order].tolist() if full else [],
            "rank": model_ranks[order].tolist(),
            "popularity_rank": pop_ranks[order].tolist(),
        }
    notes = []
    for head, got in stats.items():
        summed = _sum_over_ranks(got, world)
        if summed is None:
            continue
        if int((summed[1] > 0).sum()) < 2:  # one class only: the prior has no entropy, NE is undefined
            notes.append(f"ne/{head} left out: every {head} target in this split has the same value")
            continue
        report[f"ne/{head}"] = ne_from_stats(*summed)
    if notes:
        report["notes"] = notes
    return report


def _sum_over_ranks(
    got: list[tuple[torch.Tensor, torch.Tensor]], world: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Collective: NE statistics (summed cross-entropy, class counts) summed over batches and ranks; None if no
    rank had any (no feedback head)."""
    import torch.distributed as dist

    local = None
    if got:
        local = (torch.stack([c for c, _ in got]).sum().cpu(), torch.stack([n for _, n in got]).sum(0).cpu())
    every = [local]
    if dist.is_initialized() and world > 1:
        every = [None] * world
        dist.all_gather_object(every, local)
    have = [x for x in every if x is not None]
    if not have:
        return None
    return sum(ce for ce, _ in have), sum(n for _, n in have)


def _forward_for_peers(
    dense: torch.nn.Module,
    item: torch.Tensor,
    side: dict[str, torch.Tensor],
    ctx: Batch,
    feedback: bool,
    device: torch.device,
) -> None:
    """The forwards a batch with targets runs, over the first sample of ``ctx`` (a batch without targets, or the
    dummy batch standing for an empty one; ``item`` / ``side``: its looked-up rows), the results dropped. Under
    ZeRO-3 each submodule's forward gathers its weights from every rank together, so a rank that skips one (an
    empty padding batch where a split's batches are uneven across ranks) leaves the others waiting on it: measured
    on 2 gloo ranks as an abort ("collective mismatch") at validation; NCCL hangs instead. One sample is enough:
    the gathers follow the submodules called, not the shapes."""
    n = int(ctx.lengths[0])
    lengths = ctx.lengths[:1].to(device)
    item, side = item[:n], {k: v[:n] for k, v in side.items()}
    states = dense.states(item, side, lengths)
    dense.user_vectors(states, lengths, torch.zeros_like(lengths))
    if feedback:
        rows = dense.state_rows(torch.zeros(1, dtype=torch.long, device=device))[1]
        dense.feedback(states[rows], item[:1].to(states.dtype))


def _starts(batch: Batch) -> torch.Tensor:
    """Flat index of each sample's first interaction."""
    from trainer.data.batch import sample_starts

    return sample_starts(batch.lengths.long())


def _on(grid: Any, device: torch.device) -> Any:
    """A batch's packing grid (Batch.grid) on ``device``."""
    if grid[0] is None:
        return grid
    return (grid[0].to(device), grid[1].to(device), grid[2])


def context_before(batch: Batch, time: float) -> torch.Tensor:
    """Per sample, the position of its last context interaction (before ``target_start``) with a timestamp at or
    before ``time``; -1 when it has none (a sample's timestamps ascend)."""
    sample = torch.repeat_interleave(torch.arange(batch.size), batch.lengths)
    # in int64: a float time would compare in float32, whose steps are 128 s at today's epoch seconds
    at_or_before = batch.values["timestamp"].to(torch.int64) <= math.floor(time)
    before = torch.zeros(batch.size, dtype=torch.long).index_add_(0, sample, at_or_before.to(torch.long))
    return torch.minimum(before, batch.target_start) - 1


def _only(t: EvalTargets, keep: torch.Tensor) -> EvalTargets:
    """The targets ``keep`` selects, users renumbered from 0."""
    users, local = torch.unique(t.owner[keep], return_inverse=True)
    return EvalTargets(t.flat[keep], t.owner[keep], t.items[keep], local, int(users.numel()))


def _chosen_users(
    loader: ShardLoader, num_items: int, max_users: int, cold: torch.Tensor | None = None
) -> torch.Tensor:
    """Collective: the ``max_users`` lowest user ids among the users of the split with a target to rank (with
    ``cold``, a target on a cold item: ``--items cold``) (a pass over the split that reads ids only): the same users
    on any number of ranks."""
    from trainer import ranking

    ids = []
    for batch in loader:
        if batch.size:
            t = batch_targets(batch, num_items)
            owner = t.owner if cold is None else t.owner[cold[t.items]]
            ids.append(torch.unique(batch.users[owner]))
    mine = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
    return torch.sort(ranking.gather_rows(mine)).values[:max_users]
