"""trainer.data.oracle: the true next-item distribution of planted synthetic data, checked against the generator.

Correctness is checked empirically, away from the oracle's own code: at every row of a regenerated shard
(``synth.probe_states``: the same state the truth files store for the held-out rows, at every position) the
oracle's distribution is calibrated against the item the generator actually drew, and it has a higher
log-likelihood than every variant that drops one piece of the state (drift, successor, stay, repeat rows,
hour of week, session surface): a proper scoring rule, so the true distribution wins in expectation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.data import oracle, synth
from trainer.evaluate import oracle_report

LOO = dict(users=1500, items=1000, mean_len=40.0, shards=2, seed=5, holdout="loo")


@pytest.fixture(scope="module")
def loo_ds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("oracle") / "ds"
    synth.synthesize(root, workers=1, **LOO)
    return root


@pytest.fixture(scope="module")
def last_items() -> dict[int, np.ndarray]:
    """Each user's last two items (val, test targets), from the generator itself."""
    cfg = synth.make_config(**LOO)
    return {u: c["item"][-2:] for i in range(cfg.shards) for u, c in synth.iter_histories(cfg, i)}


@pytest.fixture(scope="module")
def probe():
    """The oracle state before every row of a shard with long histories (~40k rows), and the item truth."""
    cfg = synth.make_config(users=400, items=300, mean_len=120.0, shards=1, seed=2)
    states = synth.probe_states(cfg, 0)
    world = oracle.ItemTruth(synth.World(cfg.items, cfg.clusters, cfg.seed).truth_arrays())
    return states, world


@pytest.fixture(scope="module")
def true_log_lik(probe) -> np.ndarray:
    states, world = probe
    return _log_lik(world, _state(states), states["item"])


def _state(states: dict[str, np.ndarray], **replace: np.ndarray) -> dict[str, np.ndarray]:
    return {k: replace.get(k, states[k]) for k in oracle.STATE_KEYS}


def _probs_at(world, state: dict[str, np.ndarray], y: np.ndarray, chunk: int = 4000):
    """Yield (probs, targets) over chunks of rows."""
    for b in range(0, y.shape[0], chunk):
        yield oracle.next_item_probs(world, {k: v[b : b + chunk] for k, v in state.items()}), y[b : b + chunk]


def _log_lik(world, state, y) -> np.ndarray:
    return np.concatenate([np.log(p[np.arange(t.size), t]) for p, t in _probs_at(world, state, y)])


# ---- a distribution ---------------------------------------------------------------------------------------------
def test_probabilities_are_distributions(loo_ds):
    _, users_truth = synth.load_truth(loo_ds)
    eligible = users_truth["user"][users_truth["length"] >= 3]
    o = oracle.SynthOracle(loo_ds)
    for split in ("val", "test"):
        seen = []
        for users, p in oracle.oracle_scores(loo_ds, split, batch_users=300):
            assert p.shape == (users.size, LOO["items"]) and p.dtype == np.float64
            assert np.all(np.isfinite(p)) and p.min() >= 0.0
            np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
            st = o.state(users, split)
            assert np.all(p[np.arange(users.size), st["prev_item"]] >= st["repeat_p"] - 1e-9)
            seen.append(users)
        np.testing.assert_array_equal(np.concatenate(seen), eligible)


def test_stored_state_is_the_generators_state_before_the_heldout_rows(loo_ds):
    cfg = synth.make_config(**LOO)
    probe = synth.probe_states(cfg, 0)
    _, truth = synth.load_truth(loo_ds)
    lo, hi = cfg.user_range(0)
    length = truth["length"][lo:hi]
    for row in (0, 1):  # val, test
        want_pos = length - 2 + row  # position of the held-out row in each user's history
        pick = probe["pos"] == want_pos[probe["user"] - lo]
        users = probe["user"][pick]
        assert np.array_equal(users, np.flatnonzero(length >= 2 + (row == 0)) + lo)
        t = users - lo
        assert np.array_equal(truth["oracle_prev_item"][t, row], probe["prev_item"][pick])
        assert np.array_equal(truth["oracle_how"][t, row], probe["how"][pick])
        assert np.array_equal(truth["oracle_context"][t, row], probe["context"][pick])
        np.testing.assert_allclose(truth["oracle_repeat_p"][t, row], probe["repeat_p"][pick], rtol=1e-6)
        np.testing.assert_allclose(truth["oracle_taste"][t, row], probe["taste"][pick], rtol=1e-5, atol=1e-30)
        assert np.all(truth["oracle_prev_item"][lo:hi][length < 2 + (row == 0), row] == -1)
        # what is stored is the drifted taste, not the initial one
        moved = np.abs(truth["oracle_taste"][t, row] - truth["taste"][t]).sum(axis=1)
        assert np.median(moved) > 0.02
    assert synth.GENERATOR_VERSION >= oracle.ORACLE_VERSION


# ---- correct: against what the generator draws --------------------------------------------------------------------
def test_calibrated_at_every_row(probe):
    """Bin (row, item) pairs by predicted probability: the items drawn match the predicted mass in every bin,
    and so do the masses on the previous item, its successor and its cluster."""
    states, world = probe
    y = states["item"]
    edges = np.array([-np.inf, -5.0, -4.0, -3.0, -2.5, -2.0, -1.5, -1.0, 0.01])
    exp, obs, var = (np.zeros(edges.size - 1) for _ in range(3))
    prev = states["prev_item"]
    cl = world.item_cluster
    parts = {"prev": [], "successor": [], "cluster": []}
    for b, (p, t) in enumerate(_probs_at(world, _state(states), y)):
        rows = np.arange(t.size)
        hit = np.zeros(p.shape, bool)
        hit[rows, t] = True
        bins = np.digitize(np.log10(np.maximum(p, 1e-300)), edges) - 1
        exp += np.bincount(bins.ravel(), p.ravel(), exp.size)
        obs += np.bincount(bins.ravel(), hit.ravel(), exp.size)
        var += np.bincount(bins.ravel(), (p * (1 - p)).ravel(), exp.size)
        pv = prev[b * 4000 : b * 4000 + t.size]
        succ = world.successor[pv]
        same = cl[None, :] == cl[pv][:, None]
        parts["prev"].append((p[rows, pv], t == pv))
        parts["successor"].append((p[rows, succ], t == succ))
        parts["cluster"].append(((p * same).sum(axis=1), cl[t] == cl[pv]))
    z = (obs - exp) / np.sqrt(var)
    assert np.all(np.abs(z) < 4.5), np.round(z, 1)
    for name, chunks in parts.items():
        pred = np.concatenate([c[0] for c in chunks])
        seen = np.concatenate([c[1] for c in chunks])
        se = np.sqrt(np.sum(pred * (1 - pred))) / pred.size
        assert abs(seen.mean() - pred.mean()) < 4.5 * se, (name, seen.mean(), pred.mean(), se)


@pytest.mark.parametrize("ablation", ["initial_taste", "no_successor", "no_stay", "no_repeat", "hour", "surface"])
def test_every_piece_of_state_matters(probe, true_log_lik, monkeypatch, ablation):
    """The true distribution has a higher log-likelihood at the drawn items than any variant missing a piece
    (by > 4 standard errors of the paired difference): the drift, the successor and stay rules, the
    LIKE/DISLIKE repeat rows, the weekly modulation and the session surface all carry information."""
    states, world = probe
    y = states["item"]
    replace: dict[str, np.ndarray] = {}
    if ablation == "initial_taste":
        replace["taste"] = states["initial_taste"]
    elif ablation == "no_successor":
        monkeypatch.setattr(synth, "SUCCESSOR_P", np.zeros_like(synth.SUCCESSOR_P))
    elif ablation == "no_stay":
        monkeypatch.setattr(synth, "STAY_P", 0.0)
    elif ablation == "no_repeat":
        replace["repeat_p"] = np.zeros_like(states["repeat_p"])
    elif ablation == "hour":
        replace["how"] = (states["how"] + 84) % 168
    else:
        replace["context"] = np.where(states["context"] == 1, 4, 1)
    wrong = _log_lik(world, _state(states, **replace), y)
    d = true_log_lik - wrong
    assert d.mean() > 4.0 * d.std() / np.sqrt(d.size), (ablation, d.mean(), d.std() / np.sqrt(d.size))


def test_calibrated_at_the_heldout_rows(loo_ds, last_items):
    """At the real targets: the oracle's expected hit rate sum(p^2) matches the mean p(target), and the
    predicted mass on the previous item its observed frequency (the end of the history is not conditioned on,
    see trainer/data/oracle.py: a small effect, inside the tolerance)."""
    o = oracle.SynthOracle(loo_ds)
    for split, col in (("val", 0), ("test", 1)):
        p_y, p2, p_prev, is_prev = [], [], [], []
        for users, p in oracle.oracle_scores(loo_ds, split):
            y = np.array([last_items[u][col] for u in users.tolist()])
            prev = o.state(users, split)["prev_item"]
            rows = np.arange(users.size)
            p_y.append(p[rows, y])
            p2.append((p * p).sum(axis=1))
            p_prev.append(p[rows, prev])
            is_prev.append(y == prev)
        p_y, p2, p_prev, is_prev = map(np.concatenate, (p_y, p2, p_prev, is_prev))
        assert abs(p_y.mean() - p2.mean()) < 4.5 * p_y.std() / np.sqrt(p_y.size), (split, p_y.mean(), p2.mean())
        se = np.sqrt(np.sum(p_prev * (1 - p_prev))) / p_prev.size
        assert abs(is_prev.mean() - p_prev.mean()) < 4.5 * se, (split, is_prev.mean(), p_prev.mean())


# ---- the ranking ------------------------------------------------------------------------------------------------
def test_oracle_report_beats_popularity_and_matches_a_direct_ranking(loo_ds, last_items):
    rep = oracle_report(loo_ds, "test", [10, 50])
    assert rep["users"] == int((synth.load_truth(loo_ds)[1]["length"] >= 3).sum())
    o, pop = rep["oracle"], rep["popularity"]
    assert o["ndcg@10"] > 2.5 * pop["ndcg@10"] and o["hr@10"] > 1.8 * pop["hr@10"], (o, pop)
    assert abs(rep["expected"]["ndcg@10"] - o["ndcg@10"]) < 0.05  # realised targets vs the oracle's own mean

    # the same numbers from a direct numpy ranking (ties: lower item id ahead), through oracle_scores
    ndcg, hr, n = 0.0, 0.0, 0
    for users, p in oracle.oracle_scores(loo_ds, "test"):
        y = np.array([last_items[u][1] for u in users.tolist()])
        py = p[np.arange(users.size), y][:, None]
        rank = ((p > py) | ((p == py) & (np.arange(p.shape[1])[None, :] < y[:, None]))).sum(axis=1)
        ndcg += float(np.sum(np.where(rank < 10, 1.0 / np.log2(rank + 2.0), 0.0)))
        hr += float(np.sum(rank < 10))
        n += users.size
    assert n == rep["users"]
    assert o["ndcg@10"] == pytest.approx(ndcg / n, abs=1e-12) and o["hr@10"] == pytest.approx(hr / n, abs=1e-12)

    # the initial-taste variant: still an oracle for everything else, so far above popularity; the drift is
    # too slow (median step 0.08 per session) to move NDCG@10 measurably here -- it shows in the likelihood
    init = oracle_report(loo_ds, "test", [10], taste="initial")
    assert init["oracle"]["ndcg@10"] > 2.5 * pop["ndcg@10"]
    assert abs(init["oracle"]["ndcg@10"] - o["ndcg@10"]) < 0.02


# ---- clear errors -----------------------------------------------------------------------------------------------
def test_clear_errors(tmp_path, dataset_factory):
    small = dict(users=40, items=50, mean_len=10.0, shards=2, workers=1)
    tmp = synth.synthesize(tmp_path / "temporal", holdout="temporal", days=30, **small)
    with pytest.raises(ValueError, match="loo only"):
        oracle.SynthOracle(tmp.root)

    root = tmp_path / "v1"
    synth.synthesize(root, holdout="loo", **small)
    with pytest.raises(ValueError, match="val and test"):
        oracle.SynthOracle(root).probs(np.array([0]), "train")
    # a version-2 manifest whose truth lacks the oracle state (e.g. copied from an older dataset)
    f = root / "truth" / "users-000001.npz"
    with np.load(f) as z:
        synth.save_npz(f, **{k: z[k] for k in z.files if not k.startswith("oracle_")})
    with pytest.raises(ValueError, match=r"users-000001\.npz: no oracle state"):
        list(oracle.oracle_scores(root, "test"))
    # a dataset written by generator version 1
    m = json.loads((root / "manifest.json").read_text())
    m["source"]["generator_version"] = 1
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"users-000000\.npz: no oracle state .*version 1") as e:
        oracle_report(root, "test")
    assert "\n" not in str(e.value)

    other = dataset_factory(shards=1, users=5)
    with pytest.raises(ValueError, match="synth dataset"):
        oracle.SynthOracle(other.root)
