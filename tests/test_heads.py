"""Heads: sampled softmax vs a brute-force reference, logQ, full-catalog equivalence, NE, played buckets, feedback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.data.schema import NUM_PLAYED_BUCKETS, PLAYED_NA, played_bucket
from trainer.model.heads import (
    EVENT_CLASSES,
    FeedbackHead,
    NextItemHead,
    NextItemLossConfig,
    mixed_log_q,
    normalized_entropy,
    sampled_softmax_loss,
    score,
)


def ref_loss_value(h, pos, pos_ids, cand, cand_ids, pos_lq, cand_lq, cfg) -> float:
    """Brute force on Python floats: one row and one candidate at a time."""
    h, pos, cand = h.tolist(), pos.tolist(), cand.tolist()
    pos_ids, cand_ids, pos_lq, cand_lq = pos_ids.tolist(), cand_ids.tolist(), pos_lq.tolist(), cand_lq.tolist()

    def s(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b))
        if cfg.normalize:
            dot /= max(math.sqrt(sum(x * x for x in a)), 1e-12) * max(math.sqrt(sum(y * y for y in b)), 1e-12)
        return dot / cfg.temperature

    total = 0.0
    for i in range(len(h)):
        l0 = s(h[i], pos[i]) - (pos_lq[i] if cfg.logq and cfg.correct_positive else 0.0)
        ls = [l0] + [
            s(h[i], cand[k]) - (cand_lq[k] if cfg.logq else 0.0) for k in range(len(cand)) if cand_ids[k] != pos_ids[i]
        ]
        m = max(ls)
        total += m + math.log(sum(math.exp(v - m) for v in ls)) - l0
    return total / len(h)


def ref_loss_torch(h, pos, pos_ids, cand, cand_ids, pos_lq, cand_lq, cfg) -> torch.Tensor:
    """Same brute force on float64 scalars, differentiable."""
    total = h.new_zeros(())
    for i in range(h.shape[0]):

        def s(b: torch.Tensor, i: int = i) -> torch.Tensor:
            dot = (h[i] * b).sum()
            if cfg.normalize:
                dot = dot / (h[i].pow(2).sum().sqrt() * b.pow(2).sum().sqrt())
            return dot / cfg.temperature

        l0 = s(pos[i]) - (pos_lq[i] if cfg.logq and cfg.correct_positive else 0.0)
        ls = [l0] + [
            s(cand[k]) - (cand_lq[k] if cfg.logq else 0.0)
            for k in range(cand.shape[0])
            if int(cand_ids[k]) != int(pos_ids[i])
        ]
        total = total + torch.log(sum(torch.exp(v) for v in ls)) - l0
    return total / h.shape[0]


CASES = [
    (logq, cp, norm) for logq in (False, True) for cp in (False, True) for norm in (False, True) if logq or cp
]  # correct_positive is moot without logq


def random_problem(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    rint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    N, K, d, num_items = rint(1, 9), rint(0, 14), rint(2, 12), rint(3, 12)  # small catalog: many accidental hits
    table = torch.randn(num_items, d, generator=g, dtype=dtype)
    pos_ids = torch.randint(0, num_items, (N,), generator=g)
    cand_ids = torch.randint(0, num_items, (K,), generator=g)
    h = torch.randn(N, d, generator=g, dtype=dtype)
    freq = torch.randint(0, 20, (num_items,), generator=g).to(dtype) + 0.5
    pos_lq = mixed_log_q(pos_ids, freq, N, K, num_items).to(dtype)
    cand_lq = mixed_log_q(cand_ids, freq, N, K, num_items).to(dtype)
    return h, table[pos_ids].clone(), pos_ids, table[cand_ids].clone(), cand_ids, pos_lq, cand_lq


@pytest.mark.parametrize("logq, correct_positive, normalize", CASES)
def test_sampled_softmax_matches_brute_force(logq: bool, correct_positive: bool, normalize: bool) -> None:
    hits = 0
    for seed in range(25):
        cfg = NextItemLossConfig(
            logq=logq, correct_positive=correct_positive, normalize=normalize, temperature=[0.05, 0.3, 1.0][seed % 3]
        )
        args = random_problem(seed)
        hits += int((args[4][None, :] == args[2][:, None]).sum())
        got = sampled_softmax_loss(*args, cfg)
        assert got.dim() == 0
        assert got.item() == pytest.approx(ref_loss_value(*args, cfg), rel=1e-9, abs=1e-9)
    assert hits > 10  # accidental hits really were exercised


@pytest.mark.parametrize("logq, correct_positive, normalize", CASES)
def test_sampled_softmax_gradients_match_reference(logq: bool, correct_positive: bool, normalize: bool) -> None:
    cfg = NextItemLossConfig(logq=logq, correct_positive=correct_positive, normalize=normalize, temperature=0.2)
    for seed in range(4):
        h, pos, pos_ids, cand, cand_ids, pos_lq, cand_lq = random_problem(100 + seed)
        grads = []
        for fn in (sampled_softmax_loss, ref_loss_torch):
            leaves = [t.clone().requires_grad_(True) for t in (h, pos, cand)]
            fn(leaves[0], leaves[1], pos_ids, leaves[2], cand_ids, pos_lq, cand_lq, cfg).backward()
            grads.append([t.grad for t in leaves])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_accidental_hit_is_masked_not_counted() -> None:
    cfg = NextItemLossConfig(logq=False, normalize=False, temperature=1.0)
    h = torch.tensor([[1.0, 0.0]])
    e = torch.tensor([[2.0, 0.0]])
    # The same item as a candidate must not compete with itself: loss is log(1 + exp(0 - 2)).
    loss = sampled_softmax_loss(
        h,
        e,
        torch.tensor([7]),
        torch.cat([e, torch.zeros(1, 2)]),
        torch.tensor([7, 3]),
        torch.zeros(1),
        torch.zeros(2),
        cfg,
    )
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)


def test_empty_rows_give_zero_with_grad() -> None:
    h = torch.zeros(0, 4, requires_grad=True)
    loss = sampled_softmax_loss(
        h,
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.long),
        torch.randn(3, 4),
        torch.arange(3),
        torch.zeros(0),
        torch.zeros(3),
        NextItemLossConfig(),
    )
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_bf16_inputs_give_float32_loss() -> None:
    args = list(random_problem(5, dtype=torch.float32))
    for i in (0, 1, 3):
        args[i] = args[i].bfloat16()
    loss = sampled_softmax_loss(*args, NextItemLossConfig())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_mixed_log_q_formula() -> None:
    g = torch.Generator().manual_seed(0)
    num_items = 30
    freq = torch.randint(0, 50, (num_items,), generator=g)
    freq[3] = 0
    ids = torch.cat([torch.randint(0, num_items, (40,), generator=g), torch.tensor([3])])
    for nb, nu in ((64, 128), (0, 17), (5, 0)):
        got = mixed_log_q(ids, freq, nb, nu, num_items)
        total = sum(freq.tolist())
        want = [math.log(max(nb * freq[i].item() / total + nu / num_items, 1e-12)) for i in ids.tolist()]
        torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # Never-seen item and no uniform draws: clamped, not -inf.
    assert torch.isfinite(mixed_log_q(torch.tensor([3]), freq, 10, 0, num_items)).all()


def test_full_catalog_equals_full_softmax() -> None:
    g = torch.Generator().manual_seed(1)
    num_items, d, N = 40, 8, 6
    table = torch.randn(num_items, d, generator=g, dtype=torch.float64)
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    freq = torch.rand(num_items, generator=g)
    all_ids = torch.arange(num_items)
    full = score(h, table, normalize=True, temperature=0.1)  # (N, num_items)
    full_logp = torch.log_softmax(full, dim=-1)

    def probs(num_uniform: int, correct_positive: bool) -> torch.Tensor:
        """p[i, j] = exp(-loss) with item j as row i's positive and the whole catalog as candidates."""
        cfg = NextItemLossConfig(logq=True, correct_positive=correct_positive, normalize=True, temperature=0.1)
        lq = mixed_log_q(all_ids, freq, 0, num_uniform, num_items).double()  # uniform only: a constant
        out = torch.empty(N, num_items, dtype=torch.float64)
        for i in range(N):
            for j in range(num_items):
                loss = sampled_softmax_loss(
                    h[i : i + 1], table[j : j + 1], torch.tensor([j]), table, all_ids, lq[j : j + 1], lq, cfg
                )
                out[i, j] = torch.exp(-loss)
        return out

    exact = probs(num_items, True)  # log q = log 1 = 0
    torch.testing.assert_close(exact, full_logp.exp(), rtol=1e-10, atol=1e-12)
    shifted = probs(3 * num_items, True)  # log q = log 3 for everyone: a shift softmax ignores
    torch.testing.assert_close(shifted, full_logp.exp(), rtol=1e-10, atol=1e-12)
    assert torch.equal(shifted.argmax(-1), full.argmax(-1))
    # Positive left uncorrected: probabilities change, but the ranking over items does not.
    uncorrected = probs(3 * num_items, False)
    assert not torch.allclose(uncorrected, full_logp.exp())
    assert torch.equal(uncorrected.argsort(-1), full.argsort(-1))
    # The mean loss over targets is the full-softmax cross-entropy.
    targets = torch.randint(0, num_items, (N,), generator=g)
    lq = mixed_log_q(all_ids, freq, 0, num_items, num_items).double()
    loss = sampled_softmax_loss(
        h, table[targets], targets, table, all_ids, lq[targets], lq, NextItemLossConfig(temperature=0.1)
    )
    assert loss.item() == pytest.approx(F.cross_entropy(full, targets).item(), rel=1e-10)


def test_score_shapes_and_values() -> None:
    h, items = torch.randn(3, 5), torch.randn(7, 5)
    torch.testing.assert_close(score(h, items, False, 0.5), h @ items.T / 0.5)
    cos = F.cosine_similarity(h[:, None, :], items[None, :, :], dim=-1)
    torch.testing.assert_close(score(h, items, True, 0.05), cos / 0.05, rtol=1e-5, atol=1e-5)


def test_engine_log_q_equals_mixed_log_q() -> None:
    """The engine's memory-mapped logQ (only the asked-for counts) == mixed_log_q over the full table."""
    import numpy as np

    from trainer.model.heads import CandidateLogQ

    num_items = 1000
    counts = np.arange(num_items, dtype=np.int64) * 3 + 1
    ids = torch.randint(0, num_items, (200,))
    got = CandidateLogQ(counts, num_items)(ids, 37, 64)
    want = mixed_log_q(ids, torch.from_numpy(counts).float(), 37, 64, num_items)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="loss.next_item.temperature"):
        NextItemHead.Config(temperature=0).validate()


def test_normalized_entropy_multiclass() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 4, generator=g)
    targets = torch.randint(0, 4, (200,), generator=g)
    targets[:3] = 3
    ce = (
        -sum(
            math.log(math.exp(logits[i, t]) / sum(math.exp(v) for v in logits[i].tolist()))
            for i, t in enumerate(targets.tolist())
        )
        / 200
    )
    counts = [targets.tolist().count(c) for c in range(4)]
    ent = -sum(c / 200 * math.log(c / 200) for c in counts if c)
    assert normalized_entropy(logits, targets) == pytest.approx(ce / ent, rel=1e-9)
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4])
    ent_p = -sum(p * math.log(p) for p in prior.tolist())
    assert normalized_entropy(logits, targets, prior) == pytest.approx(ce / ent_p, rel=1e-6)
    # Predicting exactly the empirical base rate gives NE = 1.
    base = torch.tensor(counts, dtype=torch.float64).div(200).log().expand(200, 4)
    assert normalized_entropy(base, targets) == pytest.approx(1.0, rel=1e-9)


def test_normalized_entropy_binary_matches_classic_formula() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(500, generator=g, dtype=torch.float64) * 2
    y = (torch.rand(500, generator=g) < torch.sigmoid(z + 0.3)).long()
    p = torch.sigmoid(z).tolist()
    ctr = sum(y.tolist()) / 500
    num = -sum(yi * math.log(pi) + (1 - yi) * math.log(1 - pi) for yi, pi in zip(y.tolist(), p)) / 500
    den = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    logits = torch.stack([torch.zeros_like(z), z], dim=1)
    assert normalized_entropy(logits, y) == pytest.approx(num / den, rel=1e-9)
    bg = 0.3  # background CTR from elsewhere (e.g. the training set)
    den_bg = -(bg * math.log(bg) + (1 - bg) * math.log(1 - bg))
    assert normalized_entropy(logits, y, torch.tensor([1 - bg, bg])) == pytest.approx(num / den_bg, rel=1e-6)
    assert math.isnan(normalized_entropy(logits, torch.ones(500, dtype=torch.long)))


def test_played_bucket_edges() -> None:
    raw = [0, 24, 25, 49, 50, 74, 75, 99, 100, 150, PLAYED_NA - 1, PLAYED_NA]
    want = [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5, 0]
    for dtype in (torch.int32, torch.int64, torch.uint16):
        got = played_bucket(torch.tensor(raw, dtype=dtype))
        assert got.dtype == torch.int64 and got.tolist() == want
    assert played_bucket(torch.tensor([[0, PLAYED_NA]], dtype=torch.int32)).tolist() == [[1, 0]]
    assert max(want) == NUM_PLAYED_BUCKETS - 1


def _synthetic_feedback(n: int, d: int, k: int, g: torch.Generator):
    """A learnable rule: event = argmax of a linear map; played from a smooth score, n/a for likes."""
    h, item = torch.randn(n, d, generator=g), torch.randn(n, k, generator=g)
    wa, wb = torch.randn(d, EVENT_CLASSES, generator=g), torch.randn(k, EVENT_CLASSES, generator=g)
    event = (h @ wa + item @ wb).argmax(-1)
    played = (torch.sigmoid(2 * (h[:, 0] * item[:, 0] + h[:, 1])) * 130).long()
    played = torch.where(event == 1, torch.full_like(played, PLAYED_NA), played)
    return h, item, event.to(torch.uint8), played.to(torch.int32)


def test_feedback_head_shapes_and_learns() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    d, k = 16, 8
    h, item, event, played = _synthetic_feedback(2048, d, k, g)
    head = FeedbackHead.Config(hidden=64).build(d, k)
    out = head(h[:3], item[:3])
    assert out["event"].shape == (3, EVENT_CLASSES) and out["played"].shape == (3, NUM_PLAYED_BUCKETS)
    assert FeedbackHead.Config().build(d, k).fc.out_features == d  # hidden 0 = d_model

    def nes() -> tuple[float, float]:
        with torch.no_grad():
            o = head(h, item)
        return normalized_entropy(o["event"], event.long()), normalized_entropy(o["played"], played_bucket(played))

    before = nes()
    assert min(before) > 0.9
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = head.loss(head(h, item), event, played)
        loss.backward()
        opt.step()
    after = nes()
    assert max(after) < 0.8, (before, after)
    # loss is the mean of the two cross-entropies
    o = head(h, item)
    want = 0.5 * (F.cross_entropy(o["event"], event.long()) + F.cross_entropy(o["played"], played_bucket(played)))
    torch.testing.assert_close(head.loss(o, event, played), want)


def test_feedback_empty_batch() -> None:
    head = FeedbackHead.Config().build(4, 4)
    out = head(torch.zeros(0, 4), torch.zeros(0, 4))
    loss = head.loss(out, torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int32))
    assert loss.item() == 0.0
    loss.backward()


def test_logits_stay_float32_under_autocast() -> None:
    g = torch.Generator().manual_seed(7)
    ids = torch.arange(64)
    args = [
        torch.randn(32, 64, generator=g),
        torch.randn(32, 64, generator=g),
        ids[:32],
        torch.randn(64, 64, generator=g),
        ids,
        torch.zeros(32),
        torch.zeros(64),
    ]
    want = sampled_softmax_loss(*args, NextItemLossConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sampled_softmax_loss(*args, NextItemLossConfig())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # bf16 matmuls would be off by ~1e-2


def test_engine_ne_statistics_equal_normalized_entropy() -> None:
    """NE from summed (cross-entropy, class count) statistics == normalized_entropy over the concatenation."""
    from trainer.model.heads import ne_from_stats, ne_stats

    g = torch.Generator().manual_seed(3)
    parts = [(torch.randn(n, 6, generator=g), torch.randint(0, 6, (n,), generator=g)) for n in (5, 17, 9)]
    ce, counts = 0.0, torch.zeros(6, dtype=torch.float64)
    for logits, targets in parts:
        c, k = ne_stats(logits, targets)
        ce, counts = ce + c, counts + k
    want = normalized_entropy(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    assert abs(ne_from_stats(ce, counts) - want) < 1e-6
