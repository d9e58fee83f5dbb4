"""Ranking over a sharded catalog: exact full ranking and real sampled ranking, on any number of ranks.

`argus eval` and validation during training rank every held-out target of a split (trainer/evaluate.py says
which targets and from which user state). This module is the scoring part, written so that no process ever holds
a (users x catalog) score matrix or the unsharded item table:

* **Full ranking** counts, for every target, the catalog items ahead of it (trainer/metrics.py's rule: a higher
  score, or an equal one with a lower item id). A count is summed over item blocks and over ranks, so it is exact
  whatever the split: rank r scores the item rows ``[r * ceil(M / W), (r + 1) * ceil(M / W))`` in blocks of
  ``item_block`` rows, looked up from the sharded table (one collective lookup per block, the same number on
  every rank), against the vectors of every evaluated user (gathered once: ``4 * dim`` bytes per user), and one
  all-reduce adds the counts. A count needs no top-K list: every target gets its exact integer rank, not only
  those inside the top K.
* **Scores are float64 sums of fp32 products, rounded once to fp32** (:func:`scores`, :func:`pair_scores`). A
  target's own score is computed apart from the block its item falls in, and blocks have other shapes on another
  number of ranks; float32 matmuls of different shapes may differ in the last bit, and a one-ulp difference would
  move a near-tie (or count the target ahead of itself). Summed in float64 the products are exact and the sums
  differ by ~1e-16 relative; rounded to fp32 they are the same number but for a sum within ~1e-14 of an fp32
  rounding boundary (about one target in 10^7). So the ranks, and the metrics, are the same on 1, 2 or 3 ranks
  (tests/test_eval_distributed.py). Exact ties (identical vectors) stay exact ties, broken by item id.
* **Sampled ranking** scores only the sampled items: per target ``n`` negatives drawn uniformly from the catalog
  minus the target by a counter-based hash of (seed, user, target position, j) (:func:`negatives`), so the draw
  does not depend on batches or ranks either; their vectors are looked up, nothing else is scored.

Memory per rank (full ranking): its shard of the item table, the evaluated users' vectors (``4 * dim`` bytes each,
every rank), the targets (~40 bytes each), and one ``batch x item_block`` float64 score block with its fp32 and
bool copies (``17 * batch * item_block`` bytes: 1.1 GB at 256 x 2^18, 0.28 GB at the default 256 x 2^16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from trainer.metrics import ahead_count

ItemVectors = Callable[[Tensor], Tensor]  # item table rows (ids) -> their served vectors; a collective lookup


def scores(users: Tensor, items: Tensor) -> Tensor:
    """(U, d) x (M, d) -> (U, M) dot products: fp32 products summed in float64, rounded once to fp32."""
    return (users.double() @ items.double().T).float()


def pair_scores(users: Tensor, items: Tensor) -> Tensor:
    """Row-wise dot products of (T, d) x (T, d) -> (T,), rounded the way :func:`scores` rounds."""
    return (users.double() * items.double()).sum(-1).float()


def item_range(item_rows: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous item rows rank ``rank`` of ``world`` scores (and `argus export` writes)."""
    per_rank = -(-item_rows // world)
    return min(rank * per_rank, item_rows), min((rank + 1) * per_rank, item_rows)


@dataclass
class Targets:
    """Held-out targets to rank: each one's user vector (a row of the users matrix), item row and own score."""

    owner: Tensor  # (T,) row of the users matrix
    item: Tensor  # (T,) item table row
    score: Tensor  # (T,) fp32, pair_scores of its user vector and its item vector


def full_ranks(
    users: Tensor,
    targets: Targets,
    item_rows: int,
    item_vectors: ItemVectors,
    rank: int,
    world: int,
    item_block: int,
    batch: int,
) -> Tensor:
    """Collective: the exact 0-based rank of every target among all ``item_rows`` items (int64, (T,)).

    ``users`` and ``targets`` are the same on every rank (all evaluated users, gathered); each rank scores its
    :func:`item_range` in blocks of ``item_block`` rows, ``batch`` targets at a time, and the counts are summed
    over ranks. A NaN target score ranks last, as in trainer/metrics.py.
    """
    lo, hi = item_range(item_rows, rank, world)
    per_rank = -(-item_rows // world)
    device = users.device
    counts = torch.zeros(targets.item.numel(), dtype=torch.long, device=device)
    for b0 in range(0, per_rank, item_block):  # the same number of lookups on every rank (some empty)
        ids = torch.arange(min(lo + b0, hi), min(lo + b0 + item_block, hi), device=device)
        block = item_vectors(ids)
        if ids.numel() == 0:
            continue
        block64 = block.double()
        for t0 in range(0, targets.item.numel(), batch):
            sl = slice(t0, t0 + batch)
            s = scores(users[targets.owner[sl]], block64)  # block64.double() is itself: the block is cast once
            item = targets.item[sl]
            s[item[:, None] == ids[None, :]] = -torch.inf  # the target itself is never ahead of itself
            counts[sl] += ahead_count(s, targets.score[sl], item, int(ids[0]))
    if dist.is_initialized() and dist.get_world_size() > 1:
        summed = counts.to(collective_device())
        dist.all_reduce(summed)
        counts = summed.to(device)
    return torch.where(torch.isnan(targets.score), torch.full_like(counts, item_rows - 1), counts)


def mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 lanes (wrapping arithmetic): a counter-based hash."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as a signed int64
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def negatives(seed: int, user: Tensor, position: Tensor, target: Tensor, n: int, item_rows: int) -> Tensor:
    """(T, n) item rows drawn uniformly with replacement from the catalog minus each target, a pure function of
    (seed, user id, target position, j): the same draw on any number of ranks, in any batch."""
    if item_rows < 2:
        raise ValueError("sampled ranking needs at least 2 items")
    key = mix64(mix64(user.long() * 1_000_003 + position.long() + seed * 0x9E3779B97F4A7C15 % (1 << 62)))
    j = torch.arange(n, dtype=torch.long, device=user.device)
    draw = mix64(key[:, None] + j[None, :] * -7046029254386353131)  # 0x9e3779b97f4a7c15
    draw = torch.remainder(draw, item_rows - 1)
    return draw + (draw >= target.long()[:, None]).long()  # skip the target: uniform over the other items


def sampled_ranks(
    user_vecs: Tensor, target_score: Tensor, target: Tensor, neg: Tensor, item_vecs: Tensor, neg_index: Tensor
) -> Tensor:
    """Rank of each target among its sampled negatives (0..n), same tie rule: (T, d) user vectors of the targets,
    (T, n) negative ids, and their vectors as rows ``neg_index`` (T, n) of ``item_vecs`` (the batch's distinct
    sampled items). Scores only those items, 64 targets at a time (a 64 x n x d float64 temporary)."""
    ranks = torch.zeros(target.numel(), dtype=torch.long, device=target.device)
    for t0 in range(0, target.numel(), 64):
        sl = slice(t0, t0 + 64)
        v = item_vecs[neg_index[sl]].double()  # (t, n, d)
        s = (user_vecs[sl].double()[:, None, :] @ v.transpose(1, 2)).squeeze(1).float()
        ts = target_score[sl, None]
        ranks[sl] = ((s > ts) | ((s == ts) & (neg[sl] < target[sl, None]))).sum(1)
    return torch.where(torch.isnan(target_score), torch.full_like(ranks, neg.shape[1]), ranks)


def collective_device() -> torch.device:
    """Where the process group's collectives need their tensors: the current CUDA device under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(t: Tensor) -> Tensor:
    """Collective: every rank's ``t`` (rows may differ in number) concatenated in rank order, on every rank
    (returned on ``t``'s device)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    dev = collective_device()
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    most = int(max(int(s) for s in sizes))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).to(t.device)


def cost_over_ranks(t_start: float, device: torch.device, world: int) -> tuple[float, list[float]]:
    """Collective: (the slowest rank's seconds since ``t_start``, every rank's peak memory in GiB: RSS on CPU,
    the CUDA allocator's peak on GPU, whatever the process did before), the same on every rank."""
    import time

    from trainer.logger import peak_memory_bytes

    mine = (time.perf_counter() - t_start, peak_memory_bytes(device) / 2**30)
    every: list = [mine]
    if dist.is_initialized() and world > 1:
        every = [None] * world
        dist.all_gather_object(every, mine)
    return max(x[0] for x in every), [x[1] for x in every]
