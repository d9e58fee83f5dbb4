"""Full-catalog ranking metrics (HR, NDCG, Recall @K) and the popularity baseline.

Conventions, shared by every function here:

* A rank is 0-based: the number of items placed ahead of the target.
* An item is ahead of the target when its score is strictly higher, or when it
  ties and has a lower item id. Ties therefore never favour the model by
  accident (a constant scorer ranks item ``i`` at ``i``, not at 0), and the
  result does not depend on sort stability or the device.
* A NaN target score ranks last (``M - 1``); other NaN scores are never ahead.
* With several targets per user every target is ranked against the whole
  catalog, other targets included, so "rank < K" is exactly "in the top-K list".
  Targets must be distinct per user, or a duplicate counts twice.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


def ahead_count(scores: Tensor, target_scores: Tensor, targets: Tensor, col0: int) -> Tensor:
    """Items of a column block ``[col0, col0 + width)`` that are ahead of each row's target."""
    ids = torch.arange(col0, col0 + scores.shape[1], device=scores.device)
    ts = target_scores[:, None]
    ahead = (scores > ts) | ((scores == ts) & (ids[None, :] < targets[:, None]))
    return ahead.sum(dim=1)


def ranks_of_targets(
    scores: Tensor, targets: Tensor, user_index: Tensor | None = None, chunk_size: int | None = None
) -> Tensor:
    """0-based rank of each target in its user's score row (ties: lower item id ranks ahead).

    scores: (U, M) over the full catalog. targets: (P,) item ids. user_index: (P,)
    row of ``scores`` for each target; omitted means one target per row (P == U).
    chunk_size bounds the (P, chunk) temporaries (and repeated rows) for large catalogs.
    Returns int64 (P,) on ``scores.device``.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (U, M), got shape {tuple(scores.shape)}")
    device = scores.device
    targets = targets.to(device=device, dtype=torch.long).reshape(-1)
    if user_index is None:
        if targets.numel() != scores.shape[0]:
            raise ValueError(f"{targets.numel()} targets for {scores.shape[0]} score rows; pass user_index")
    else:
        user_index = user_index.to(device=device, dtype=torch.long).reshape(-1)
        if user_index.numel() != targets.numel():
            raise ValueError("user_index and targets must have the same length")
    m = scores.shape[1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= m):
        raise ValueError(f"target ids must lie in [0, {m})")
    row_of = user_index if user_index is not None else torch.arange(targets.numel(), device=device)
    target_scores = scores[row_of, targets]
    step = m if chunk_size is None else max(1, int(chunk_size))
    ranks = torch.zeros(targets.numel(), dtype=torch.long, device=device)
    for c0 in range(0, m, step):
        block = scores[:, c0 : c0 + step]
        # Rows are repeated per target only one column block at a time.
        block = block if user_index is None else block.index_select(0, user_index)
        ranks += ahead_count(block, target_scores, targets, c0)
    return torch.where(torch.isnan(target_scores), torch.full_like(ranks, m - 1), ranks)


def _ideal_dcg(n: Tensor, k: int) -> Tensor:
    """Ideal DCG of ``min(n, k)`` relevant items: sum_{i < min(n,k)} 1/log2(i+2)."""
    gains = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=n.device) + 2.0)
    table = torch.cat([torch.zeros(1, dtype=torch.float64, device=n.device), gains.cumsum(0)])
    return table[n.clamp(max=k)]


def _metric_sums(ranks: Tensor, ks: Sequence[int], num_targets: Tensor | None, user_index: Tensor | None) -> Tensor:
    """Per-batch sums ``[users, hr@k..., ndcg@k..., recall@k...]`` as a float64 tensor.

    Sums (not means) so that batches and ranks can be added before dividing.
    """
    if any(k < 1 for k in ks):
        raise ValueError(f"cutoffs must be >= 1, got {tuple(ks)}")
    ranks = ranks.reshape(-1).to(torch.float64)
    device = ranks.device
    if user_index is None:
        user_index = torch.arange(ranks.numel(), device=device)
        n_users = ranks.numel()
    else:
        user_index = user_index.to(device=device, dtype=torch.long).reshape(-1)
        if user_index.numel() != ranks.numel():
            raise ValueError("user_index and ranks must have the same length")
        n_users = int(user_index.max()) + 1 if user_index.numel() else 0
    counts = torch.zeros(n_users, dtype=torch.long, device=device).index_add_(
        0, user_index, torch.ones_like(user_index)
    )
    if num_targets is None:
        n = counts
    else:
        # Larger than the ranked count when some targets could not be ranked
        # (e.g. items outside the catalog): those count as misses.
        n = num_targets.to(device=device, dtype=torch.long).reshape(-1)
        if n.numel() < n_users:
            raise ValueError(f"num_targets has {n.numel()} users but user_index reaches {n_users - 1}")
        counts = torch.cat([counts, counts.new_zeros(n.numel() - n_users)])
        if bool((counts > n).any()):
            raise ValueError("a user has more ranked targets than num_targets says")
    # Users without any target have no defined metric; they are left out of the mean.
    valid = n > 0
    denom = n.clamp(min=1).to(torch.float64)
    out = [valid.sum().to(torch.float64)]
    hr, ndcg, rec = [], [], []
    for k in ks:
        hit = (ranks < k).to(torch.float64)
        hits = torch.zeros(n.numel(), dtype=torch.float64, device=device).index_add_(0, user_index, hit)
        dcg = torch.zeros_like(hits).index_add_(0, user_index, hit / torch.log2(ranks + 2.0))
        hr.append(((hits > 0) & valid).to(torch.float64).sum())
        ndcg.append(torch.where(valid, dcg / _ideal_dcg(n, k).clamp(min=1e-300), 0.0).sum())
        rec.append(torch.where(valid, hits / denom, 0.0).sum())
    return torch.stack(out + hr + ndcg + rec)


def _sums_to_dict(sums: Tensor, ks: Sequence[int], prefix: str = "") -> dict[str, float]:
    values = sums.double().cpu().tolist()
    users = values[0]
    nk = len(ks)
    out: dict[str, float] = {}
    for j, name in enumerate(("hr", "ndcg", "recall")):
        for i, k in enumerate(ks):
            out[f"{prefix}{name}@{k}"] = values[1 + j * nk + i] / users if users else math.nan
    out[f"{prefix}users"] = users
    return out


def ranking_metrics(
    ranks: Tensor, ks: Sequence[int] = (10, 100), num_targets: Tensor | None = None, user_index: Tensor | None = None
) -> dict[str, float]:
    """HR@K, NDCG@K and Recall@K averaged over users, plus ``users`` (their count).

    ranks: flat 0-based ranks of all (user, target) pairs; user_index: (P,) user of
    each pair, 0..U-1 (omitted: one target per user). num_targets: (U,) targets per
    user when some were not ranked (they count as misses); defaults to the pairs seen.
    Per user: HR = any target in top K; Recall = hits / #targets;
    NDCG = sum_{hits} 1/log2(rank+2) / sum_{i < min(#targets, K)} 1/log2(i+2).
    Values are NaN when there are no users.
    """
    ks = tuple(int(k) for k in ks)
    return _sums_to_dict(_metric_sums(ranks, ks, num_targets, user_index), ks)


class RankingAccumulator:
    """Streams :func:`ranking_metrics` over batches of users; exact, sums kept in float64 on-device."""

    def __init__(self, ks: Sequence[int] = (10, 100), prefix: str = "") -> None:
        self.ks = tuple(int(k) for k in ks)
        self.prefix = prefix
        self._sums: Tensor | None = None

    def add(self, ranks: Tensor, user_index_local: Tensor | None = None, num_targets: Tensor | None = None) -> None:
        """One batch; ``user_index_local`` numbers this batch's users from 0."""
        sums = _metric_sums(ranks, self.ks, num_targets, user_index_local)
        self._sums = sums if self._sums is None else self._sums + sums.to(self._sums.device)

    def reset(self) -> None:
        self._sums = None

    def compute(self, all_reduce: bool = False, device: torch.device | None = None) -> dict[str, float]:
        """The metrics so far; ``all_reduce`` sums over all ranks first (a collective: call it on every rank).

        ``device`` is where an empty accumulator's zeros live for the collective
        (the NCCL device); it defaults to the CUDA device when one is available.
        """
        sums = self._sums
        if sums is None:
            if device is None:
                device = (
                    torch.device("cuda", torch.cuda.current_device())
                    if torch.cuda.is_available()
                    else torch.device("cpu")
                )
            sums = torch.zeros(1 + 3 * len(self.ks), dtype=torch.float64, device=device)
        if all_reduce and dist.is_available() and dist.is_initialized():
            sums = sums.clone()
            dist.all_reduce(sums)
        return _sums_to_dict(sums, self.ks, self.prefix)


def popularity_scores(item_counts: np.ndarray | Tensor) -> Tensor:
    """Most-popular baseline: every user gets the item counts as scores, float64 (M,).

    float64 keeps counts above 2**24 distinct. Equal counts tie and fall back to
    the item-id rule above. Expand to (U, M) with ``.expand(U, -1)`` (no copy).
    """
    counts = torch.as_tensor(item_counts)
    if counts.dim() != 1:
        raise ValueError("item_counts must be 1-D (M,)")
    return counts.to(torch.float64)


def item_ranks(scores: Tensor) -> Tensor:
    """Rank of every item under one shared score vector (M,), same tie rule; int64 (M,).

    With the popularity baseline a target's rank is then a lookup: ``item_ranks(s)[targets]``.
    """
    # A stable sort of the negated scores keeps tied items in ascending id order.
    key = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)
    order = torch.sort(-key, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks


def sampled_ranks(
    scores: Tensor,
    targets: Tensor,
    num_negatives: int,
    generator: torch.Generator | None = None,
    user_index: Tensor | None = None,
) -> Tensor:
    """Rank of each target among ``num_negatives`` sampled items (0..num_negatives), same tie rule.

    Negatives are drawn uniformly with replacement from the catalog minus the
    target (other positives of the user may be drawn). Draws happen on the
    generator's device and are moved to ``scores.device``.
    Sampled ranks are optimistic estimates; report them under a "sampled_" name.
    """
    device = scores.device
    targets = targets.to(device=device, dtype=torch.long).reshape(-1)
    rows = scores if user_index is None else scores.index_select(0, user_index.to(device=device, dtype=torch.long))
    m = rows.shape[1]
    if m < 2:
        raise ValueError("sampling negatives needs at least 2 items")
    gen_device = generator.device if generator is not None else device
    draw = torch.randint(0, m - 1, (targets.numel(), num_negatives), generator=generator, device=gen_device)
    neg = draw.to(device)
    # Shifting ids >= target by one makes the draw uniform over the other m-1 items.
    neg = neg + (neg >= targets[:, None]).long()
    ts = rows.gather(1, targets[:, None])
    ns = rows.gather(1, neg)
    ahead = (ns > ts) | ((ns == ts) & (neg < targets[:, None]))
    ranks = ahead.sum(dim=1)
    return torch.where(torch.isnan(ts.squeeze(1)), torch.full_like(ranks, num_negatives), ranks)


def sampled_ranking_metrics(
    scores: Tensor,
    targets: Tensor,
    ks: Sequence[int] = (10, 100),
    num_negatives: int = 100,
    generator: torch.Generator | None = None,
    user_index: Tensor | None = None,
    num_targets: Tensor | None = None,
) -> dict[str, float]:
    """:func:`ranking_metrics` over :func:`sampled_ranks`; every key is prefixed ``sampled_``.

    Also returns ``sampled_negatives``. K >= num_negatives + 1 is a trivial 1.0.
    """
    ranks = sampled_ranks(scores, targets, num_negatives, generator, user_index)
    ks = tuple(int(k) for k in ks)
    out = _sums_to_dict(_metric_sums(ranks, ks, num_targets, user_index), ks, prefix="sampled_")
    out["sampled_negatives"] = float(num_negatives)
    return out
