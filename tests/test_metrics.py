"""Ranking metrics against hand-computed rankings and a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.metrics import (
    RankingAccumulator,
    item_ranks,
    popularity_scores,
    ranking_metrics,
    ranks_of_targets,
    sampled_ranking_metrics,
    sampled_ranks,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
L3 = math.log2(3)  # DCG discount of rank 1


def test_ranks_with_ties_by_hand() -> None:
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.5, 0.2],  # target 3: item 1 higher, item 2 ties with a lower id -> 2
            [1.0, 1.0, 1.0, 1.0, 1.0],  # target 4: all tie, ids 0..3 ahead -> 4
            [0.3, 0.2, 0.1, 0.0, -1.0],  # target 0: best -> 0
            [0.0, 0.0, 5.0, 0.0, 0.0],  # target 0: item 2 higher, tied items have higher ids -> 1
        ]
    )
    ranks = ranks_of_targets(scores, torch.tensor([3, 4, 0, 0]))
    assert ranks.tolist() == [2, 4, 0, 1]
    assert ranks.dtype == torch.long

    m = ranking_metrics(ranks, ks=(1, 3))
    assert m["users"] == 4
    assert m["hr@1"] == pytest.approx(1 / 4)
    assert m["hr@3"] == pytest.approx(3 / 4)
    assert m["recall@1"] == pytest.approx(1 / 4)
    assert m["recall@3"] == pytest.approx(3 / 4)
    assert m["ndcg@1"] == pytest.approx(1 / 4)
    # Ranks 2, 0, 1 are in the top 3: discounts 1/log2(4), 1/log2(2), 1/log2(3).
    assert m["ndcg@3"] == pytest.approx((0.5 + 1.0 + 1 / L3) / 4)
    assert set(m) == {"hr@1", "hr@3", "ndcg@1", "ndcg@3", "recall@1", "recall@3", "users"}


def test_default_ks_and_single_target_ndcg() -> None:
    m = ranking_metrics(torch.tensor([1, 50, 100, 0]))
    assert m["hr@10"] == pytest.approx(2 / 4)
    assert m["hr@100"] == pytest.approx(3 / 4)  # rank 100 is the 101st item
    assert m["ndcg@10"] == pytest.approx((1 / L3 + 1) / 4)
    assert m["ndcg@100"] == pytest.approx((1 / L3 + 1 / math.log2(52) + 1) / 4)
    assert m["recall@100"] == m["hr@100"]


@pytest.mark.parametrize("device", DEVICES)
def test_multi_target_by_hand(device: str) -> None:
    # user 0: ranks 0, 3, 7; user 1: rank 1; user 2: ranks 5, 2
    ranks = torch.tensor([0, 3, 7, 1, 5, 2], device=device)
    users = torch.tensor([0, 0, 0, 1, 2, 2], device=device)
    m = ranking_metrics(ranks, ks=(2, 5), user_index=users)
    assert m["users"] == 3
    # K=2: u0 hits rank 0 (ideal: 2 targets), u1 hits rank 1 (ideal: 1), u2 misses.
    assert m["hr@2"] == pytest.approx(2 / 3)
    assert m["recall@2"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert m["ndcg@2"] == pytest.approx((1 / (1 + 1 / L3) + (1 / L3) / 1 + 0) / 3)
    # K=5: u0 hits ranks 0, 3 of 3 targets; u1 rank 1; u2 rank 2 of 2 targets.
    assert m["hr@5"] == pytest.approx(1.0)
    assert m["recall@5"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    ndcg_u0 = (1 + 1 / math.log2(5)) / (1 + 1 / L3 + 1 / 2)
    ndcg_u1 = 1 / L3
    ndcg_u2 = (1 / 2) / (1 + 1 / L3)
    assert m["ndcg@5"] == pytest.approx((ndcg_u0 + ndcg_u1 + ndcg_u2) / 3)


def test_num_targets_counts_unranked_targets_as_misses() -> None:
    ranks = torch.tensor([0, 3, 7, 1, 5, 2])
    users = torch.tensor([0, 0, 0, 1, 2, 2])
    # user 2 had a third target that could not be ranked; user 3 had two, none ranked; user 4 had none.
    m = ranking_metrics(ranks, ks=(5,), user_index=users, num_targets=torch.tensor([3, 1, 3, 2, 0]))
    assert m["users"] == 4
    assert m["hr@5"] == pytest.approx(3 / 4)
    assert m["recall@5"] == pytest.approx((2 / 3 + 1 + 1 / 3 + 0) / 4)
    ndcg_u2 = (1 / 2) / (1 + 1 / L3 + 1 / 2)
    ndcg_u0 = (1 + 1 / math.log2(5)) / (1 + 1 / L3 + 1 / 2)
    assert m["ndcg@5"] == pytest.approx((ndcg_u0 + 1 / L3 + ndcg_u2 + 0) / 4)
    with pytest.raises(ValueError):
        ranking_metrics(ranks, ks=(5,), user_index=users, num_targets=torch.tensor([1, 1, 2]))


def test_ndcg_is_one_for_a_perfect_multi_target_ranking() -> None:
    m = ranking_metrics(torch.tensor([0, 1, 2, 0]), ks=(2, 10), user_index=torch.tensor([0, 0, 0, 1]))
    assert m["ndcg@2"] == pytest.approx(1.0)
    assert m["ndcg@10"] == pytest.approx(1.0)
    assert m["recall@2"] == pytest.approx((2 / 3 + 1) / 2)


def test_multi_target_ranks_count_other_targets_ahead() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7], [0.0, 0.5, 0.5, 0.2]])
    for chunk_size in (None, 1, 3):
        ranks = ranks_of_targets(
            scores, torch.tensor([0, 1, 3, 2]), user_index=torch.tensor([0, 0, 0, 1]), chunk_size=chunk_size
        )
        assert ranks.tolist() == [0, 1, 2, 1]


def _brute_force_ranks(scores: np.ndarray, targets: np.ndarray) -> list[int]:
    out = []
    for row, t in zip(scores, targets):
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        out.append(order.index(int(t)))
    return out


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_ranks_match_brute_force(chunk_size: int | None) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        u, m = int(rng.integers(1, 25)), int(rng.integers(1, 40))
        scores = rng.integers(0, 4, (u, m)).astype(np.float32)  # few values: many ties
        targets = rng.integers(0, m, u)
        got = ranks_of_targets(torch.from_numpy(scores), torch.from_numpy(targets), chunk_size=chunk_size)
        assert got.tolist() == _brute_force_ranks(scores, targets)


def test_nan_target_ranks_last() -> None:
    scores = torch.tensor([[0.1, float("nan"), 0.3], [float("nan"), 0.2, 0.3]])
    assert ranks_of_targets(scores, torch.tensor([1, 1])).tolist() == [2, 1]


def test_bad_targets_raise() -> None:
    with pytest.raises(ValueError):
        ranks_of_targets(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        ranks_of_targets(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


def test_accumulator_over_chunks_equals_one_shot() -> None:
    rng = np.random.default_rng(1)
    n_users = 37
    per_user = rng.integers(1, 5, n_users)
    user_index = np.repeat(np.arange(n_users), per_user)
    ranks = rng.integers(0, 60, user_index.size)
    ks = (1, 5, 20)
    one_shot = ranking_metrics(torch.from_numpy(ranks), ks, user_index=torch.from_numpy(user_index))

    acc = RankingAccumulator(ks)
    for chunk in np.array_split(np.arange(n_users), 6):
        sel = np.isin(user_index, chunk)
        acc.add(torch.from_numpy(ranks[sel]), torch.from_numpy(user_index[sel] - chunk[0]))
    streamed = acc.compute()
    assert streamed.keys() == one_shot.keys()
    for key in one_shot:
        assert streamed[key] == pytest.approx(one_shot[key], rel=1e-12)
    assert streamed["users"] == n_users

    acc.reset()
    assert math.isnan(acc.compute()["hr@1"])


def test_popularity_baseline_ranks() -> None:
    counts = np.array([5, 10, 10, 0, 7])
    s = popularity_scores(counts)
    assert s.dtype == torch.float64
    # 10 (item 1), 10 (item 2: tie, higher id), 7 (item 4), 5 (item 0), 0 (item 3)
    assert item_ranks(s).tolist() == [3, 0, 1, 4, 2]
    targets = torch.tensor([0, 1, 2, 3, 4, 2])
    assert ranks_of_targets(s.expand(6, -1), targets).tolist() == [3, 0, 1, 4, 2, 1]
    m = ranking_metrics(ranks_of_targets(s.expand(6, -1), targets), ks=(2,))
    assert m["hr@2"] == pytest.approx(3 / 6)
    # Counts beyond float32's exact range stay distinct.
    big = popularity_scores(torch.tensor([2**24 + 1, 2**24]))
    assert item_ranks(big).tolist() == [0, 1]


def test_sampled_metrics_prefix_and_bounds() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(8, 50, generator=g)
    targets = torch.randint(0, 50, (8,), generator=g)
    out = sampled_ranking_metrics(
        scores, targets, ks=(1, 10), num_negatives=20, generator=torch.Generator().manual_seed(1)
    )
    assert set(out) == {
        "sampled_hr@1",
        "sampled_hr@10",
        "sampled_ndcg@1",
        "sampled_ndcg@10",
        "sampled_recall@1",
        "sampled_recall@10",
        "sampled_users",
        "sampled_negatives",
    }
    assert out["sampled_users"] == 8 and out["sampled_negatives"] == 20
    again = sampled_ranking_metrics(
        scores, targets, ks=(1, 10), num_negatives=20, generator=torch.Generator().manual_seed(1)
    )
    assert again == out
    ranks = sampled_ranks(scores, targets, 20, torch.Generator().manual_seed(2))
    assert ((ranks >= 0) & (ranks <= 20)).all()


def test_sampled_ranks_never_draw_the_target() -> None:
    # The target scores lowest, so every drawn negative is ahead of it: rank == N exactly.
    # A drawn copy of the target would tie with itself and not count, giving < N.
    scores = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0]])
    ranks = sampled_ranks(scores, torch.tensor([1, 0]), 200, torch.Generator().manual_seed(0))
    assert ranks.tolist() == [200, 200]
    # And a best-scored target is never passed.
    best = sampled_ranks(scores, torch.tensor([2, 2]), 200, torch.Generator().manual_seed(0))
    assert best.tolist() == [0, 0]


def test_sampled_ranks_match_brute_force_with_known_draws() -> None:
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 3, (6, 9), generator=g).float()
    targets = torch.randint(0, 9, (6,), generator=g)
    ranks = sampled_ranks(scores, targets, 15, torch.Generator().manual_seed(4))
    # Recreate the draws: uniform over the 8 non-target items.
    draw = torch.randint(0, 8, (6, 15), generator=torch.Generator().manual_seed(4))
    for u in range(6):
        t = int(targets[u])
        others = [i for i in range(9) if i != t]
        negs = [others[int(d)] for d in draw[u]]
        ahead = sum(1 for j in negs if (scores[u, j] > scores[u, t]) or (scores[u, j] == scores[u, t] and j < t))
        assert int(ranks[u]) == ahead
