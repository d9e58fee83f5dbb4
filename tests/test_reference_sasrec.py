"""bench/reference_sasrec.py: it learns (beats popularity on planted data), it is causal, and its batched
scores equal a per-user brute force."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # plain `pytest` puts tests/ on sys.path, not the repo root
    sys.path.insert(0, str(REPO))

from bench.reference_sasrec import SASRec, make_scores_fn, run_reference  # noqa: E402
from trainer.data.batch import sample_starts  # noqa: E402
from trainer.data.manifest import Manifest  # noqa: E402
from trainer.evaluate import eval_loader  # noqa: E402


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    from trainer.data.synth import synthesize

    root = tmp_path_factory.mktemp("sasrec") / "data"
    synthesize(root, users=400, items=300, mean_len=40, shards=2, seed=0, holdout="loo", workers=1)
    return root


def tiny_model(num_items: int, max_len: int, seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(num_items, max_len, d=16, blocks=2, heads=2, dropout=0.2).eval()


def first_batch(data: Path, split: str, max_len: int, batch_size: int = 64):
    m = Manifest.load(data)
    return m, next(iter(eval_loader(data, m, split, batch_size, max_len)))


def test_learns_and_beats_popularity(planted, tmp_path):
    opts = dict(batch_size=32, max_len=50, epochs=6, patience=0, threads=1, seed=0)
    r = run_reference(planted, out=str(tmp_path / "run"), **opts)
    assert r["epochs"] == 6 and len(r["history"]) == 6 and r["steps"] > 6
    assert r["train_loss"][-1] < r["train_loss"][0] - 0.5, r["train_loss"]
    test = r["test"]
    assert test["users"] > 300
    for k in ("hr@10", "ndcg@10"):
        assert test["model"][k] > 1.2 * test["popularity"][k], (k, test)
    # Selection: the best epoch's val score is the history's maximum; its state is on disk and was tested.
    best = max(r["history"], key=lambda h: h["val"]["ndcg@10"])
    assert r["best_epoch"] == best["epoch"] and r["best_val"] == best["val"]
    assert (tmp_path / "run" / "best.pt").is_file()
    assert r["train_start_time"] < r["best_time"] <= r["train_start_time"] + r["total_seconds"]
    assert r["seconds_to_best"] == pytest.approx(r["best_time"] - r["train_start_time"])
    # Deterministic given the seed (one epoch is enough to show it).
    a, b = (run_reference(planted, **{**opts, "epochs": 1}) for _ in range(2))
    assert a["train_loss"] == b["train_loss"] and a["history"][0]["val"] == b["history"][0]["val"]
    assert a["test"] == b["test"]


def test_early_stopping_and_eval_every(planted):
    # lr 0: nothing improves after the first evaluation; patience 1 would stop after the second, min_epochs holds on.
    r = run_reference(planted, batch_size=128, max_len=20, epochs=50, lr=0.0, patience=1, min_epochs=3, threads=1)
    assert [h["epoch"] for h in r["history"]] == [0, 1, 2] and r["best_epoch"] == 0
    assert "not better than popularity" in r["notes"][0]  # an untrained model: the report says so
    r = run_reference(planted, batch_size=128, max_len=20, epochs=5, eval_every_epochs=2, patience=0, threads=1)
    assert [h["epoch"] for h in r["history"]] == [1, 3, 4]  # every 2nd epoch, and the last one
    with pytest.raises(TypeError, match="unknown options"):
        run_reference(planted, hiden=8)


def test_model_is_causal():
    model = tiny_model(50, 12)
    torch.manual_seed(1)
    ids = torch.randint(1, 51, (4, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(1, 51, (4, 5))
    with torch.no_grad():
        assert torch.equal(model(ids)[:, :7], model(changed)[:, :7])


def test_scores_ignore_targets_and_later_interactions(planted):
    m, batch = first_batch(planted, "val", max_len=30)
    model = tiny_model(m.num_items, 30)
    scores_fn = make_scores_fn(model)
    with torch.no_grad():
        before = scores_fn(batch)
    # Replace every sample's target (and add up to 3 more interactions after it).
    gen = torch.Generator().manual_seed(0)
    items, starts, parts, lengths = batch.values["item"], sample_starts(batch.lengths), [], []
    for s, n, t in zip(starts.tolist(), batch.lengths.tolist(), batch.target_start.tolist()):
        tail = torch.randint(0, m.num_items, (n - t + int(torch.randint(0, 4, (1,), generator=gen)),), generator=gen)
        parts.append(torch.cat([items[s : s + t], tail]))
        lengths.append(len(parts[-1]))
    assert not torch.equal(torch.cat(parts)[: len(items)], items)
    other = dataclasses.replace(batch, lengths=torch.tensor(lengths), values={"item": torch.cat(parts)})
    with torch.no_grad():
        after = scores_fn(other)
    has_context = batch.target_start > 0
    assert has_context.sum() > 50
    assert torch.equal(before[has_context], after[has_context])


@pytest.mark.parametrize("max_len", [8, 60])  # contexts cut to the most recent interactions, and whole ones
def test_batched_scores_equal_per_user_brute_force(planted, max_len):
    m, batch = first_batch(planted, "test", max_len=max_len, batch_size=48)
    model = tiny_model(m.num_items, max_len, seed=3)
    with torch.no_grad():
        batched = make_scores_fn(model)(batch)
        assert batched.shape == (batch.size, m.num_items)
        items, starts = batch.values["item"], sample_starts(batch.lengths)
        checked = 0
        for b, (s, t) in enumerate(zip(starts.tolist(), batch.target_start.tolist())):
            if t == 0:
                continue
            context = items[s : s + t]  # this user's interactions before the target, nothing else
            h = model(context[None] + 1)[0, -1]
            torch.testing.assert_close(batched[b], h @ model.items.weight[1:].T, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked > 40


def test_independent_of_the_argus_model():
    """The yardstick must not share model code with what it measures."""
    tree = ast.parse((REPO / "bench" / "reference_sasrec.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith(("trainer.model", "embeddings"))], names
