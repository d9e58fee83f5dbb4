"""Evaluation over the sharded table on any number of ranks (trainer/ranking.py, trainer/evaluate.py).

- The ranking core on 1, 2 and 3 ranks (in-process, gloo) equals a brute-force rank over the whole score matrix
  (trainer/metrics.py's ``ranks_of_targets``), exact ties (duplicated item vectors) included, across item blocks.
- `argus eval` of a trained run on 1 process, 2 and 3 ranks: the same metrics (to 1e-9) and every target's
  integer rank identical; they equal the unsharded, one-process model's brute-force ranks.
- Sampled ranking scores only the sampled items (the full path is never called) and draws the same negatives on
  any number of ranks; ``max_users`` ranks exactly that many users, the lowest ids, on any number of ranks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import argus_inproc, argus_ranks, free_port, rank_env, start_ranks

ITEMS, DIM, USERS, TARGETS = 101, 8, 23, 40


def _core_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    items = torch.randn(ITEMS, DIM, generator=g)
    items[[5, 17, 60, 99]] = items[40].clone()  # exact ties with item 40, on both sides of it and in other blocks
    items[70] = items[3].clone()
    users = torch.randn(USERS, DIM, generator=g)
    owner = torch.randint(0, USERS, (TARGETS,), generator=g)
    item = torch.randint(0, ITEMS, (TARGETS,), generator=g)
    item[:6] = torch.tensor([40, 5, 99, 3, 70, 0])
    owner[:6] = 0  # one user: its tied targets rank by item id
    return users, items, owner, item


def _core_rank(rank: int, world: int, port: int, out: str) -> None:
    rank_env(rank, world, port)
    import torch.distributed as dist

    from trainer import ranking

    dist.init_process_group("gloo", rank=rank, world_size=world)
    users, items, owner, item = _core_case()
    score = ranking.pair_scores(users[owner], items[item])
    calls = []

    def item_vectors(ids: torch.Tensor) -> torch.Tensor:
        calls.append(ids.numel())
        return items[ids]

    got = ranking.full_ranks(users, ranking.Targets(owner, item, score), ITEMS, item_vectors, rank, world, 7, 9)
    if rank == 0:
        torch.save({"ranks": got, "calls": calls}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_full_ranks_equal_brute_force_with_ties_on_any_number_of_ranks(tmp_path, world):
    from trainer import ranking
    from trainer.metrics import ranks_of_targets

    out = tmp_path / "ranks.pt"
    start_ranks(_core_rank, (world, free_port(), str(out)), world, timeout=120)
    res = torch.load(out)
    users, items, owner, item = _core_case()
    want = ranks_of_targets(ranking.scores(users, items), item, owner)
    assert torch.equal(res["ranks"], want)
    # 5, 17, 40, 60, 99 tie (and 3, 70): ahead of each, whatever is ahead of the tie plus the tied lower ids
    assert int(want[0]) == int(want[1]) + 2 and int(want[2]) == int(want[1]) + 4 and int(want[4]) == int(want[3]) + 1
    per_rank = -(-ITEMS // world)
    assert len(res["calls"]) == -(-per_rank // 7), "blocks of item_block rows of this rank's range"
    assert max(res["calls"]) <= 7


def test_negatives_are_uniform_over_the_other_items_and_do_not_depend_on_batching():
    from trainer.ranking import negatives

    user = torch.arange(2000) % 37
    pos = torch.arange(2000) // 37
    target = torch.arange(2000) % 10
    neg = negatives(3, user, pos, target, 50, 10)
    assert not bool((neg == target[:, None]).any()) and int(neg.min()) >= 0 and int(neg.max()) <= 9
    freq = torch.bincount(neg[target == 0].reshape(-1), minlength=10)[1:].double()
    assert float(freq.std() / freq.mean()) < 0.05  # uniform over the 9 others
    again = torch.cat(
        [negatives(3, user[i : i + 7], pos[i : i + 7], target[i : i + 7], 50, 10) for i in range(0, 2000, 7)]
    )
    assert torch.equal(neg, again)
    assert not torch.equal(neg, negatives(4, user, pos, target, 50, 10))


# ---- argus eval end to end --------------------------------------------------------------------------------------
def _eval_rank(rank: int, world: int, port: int, run: str, data: str, out: str, max_users: int) -> None:
    rank_env(rank, world, port)
    from trainer.evaluate import evaluate

    rep = evaluate(run, data, max_users=max_users, per_target=True, device="cpu")
    Path(f"{out}.rank{rank}").write_text(json.dumps(rep))


_EVALS: dict = {}  # (world, run, max_users) -> report: the tests below share the 1-rank evaluation


def eval_on(world: int, run: Path, data: Path, tmp: Path, max_users: int = 0) -> dict:
    key = (world, str(run), max_users)
    if key not in _EVALS:
        _EVALS[key] = _eval_on(world, run, data, tmp, max_users)
    return _EVALS[key]


def _eval_on(world: int, run: Path, data: Path, tmp: Path, max_users: int) -> dict:
    out = tmp / f"eval_{world}_{max_users}"
    start_ranks(_eval_rank, (world, free_port(), str(run), str(data), str(out), max_users), world, timeout=300)
    reps = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(world)]
    assert all(r == reps[0] for r in reps), "every rank returns the same report"
    return reps[0]


def brute_force(run: Path, data: Path) -> dict[tuple[int, int], int]:
    """(user, position) -> rank from the unsharded model in one process and the whole score matrix."""
    from trainer import checkpoint
    from trainer.data.manifest import Manifest
    from trainer.evaluate import batch_targets, eval_loader
    from trainer.export import served_items, served_users
    from trainer.metrics import ranks_of_targets
    from trainer.model.interaction import lookup_interactions
    from trainer.ranking import scores

    manifest = Manifest.load(data)
    cfg, sparse, dense = checkpoint.load_model(run, manifest.num_items)
    items = served_items(cfg, sparse.items.embeddings["item"].weight)
    out = {}
    with torch.no_grad():
        for batch in eval_loader(data, manifest, "test", 7, cfg.interactions_per_sample()):
            t = batch_targets(batch, manifest.num_items)
            item, side, _ = lookup_interactions(
                sparse, batch, cfg, sparse.item_rows, torch.zeros(0, dtype=torch.long), "cpu"
            )
            states = dense.states(item, side, batch.lengths, batch.grid())
            h = served_users(cfg, dense.user_vectors(states, batch.lengths, (batch.target_start - 1).clamp_min(0)))
            ranks = ranks_of_targets(scores(h, items), t.items, t.owner)
            starts = torch.cumsum(batch.lengths, 0) - batch.lengths
            for u, p, r in zip(batch.users[t.owner], t.flat - starts[t.owner], ranks):
                out[(int(u), int(p))] = int(r)
    return out


@pytest.mark.slow
def test_eval_on_one_two_and_three_ranks_is_the_same_and_exact(torchrun_run, data, tmp_path, capsys):
    reps = {w: eval_on(w, torchrun_run, data, tmp_path) for w in (1, 2, 3)}
    one = reps[1]
    assert one["ranking"] == "full" and one["users"] == len(set(one["per_target"]["user"])) > 0
    for w in (2, 3):
        assert reps[w]["per_target"] == one["per_target"], w  # every target's integer rank, in the same order
        for part in ("model", "popularity"):
            for k, v in one[part].items():
                assert reps[w][part][k] == pytest.approx(v, rel=0, abs=1e-9), (w, part, k)
    t = one["per_target"]
    want = brute_force(torchrun_run, data)
    assert {(u, p): r for u, p, r in zip(t["user"], t["position"], t["rank"])} == want
    # the CLI on 2 ranks prints the report once (rank 0) and the same numbers
    outs = argus_ranks("eval", str(torchrun_run), "--data", str(data), "--json", nproc=2)
    printed = [json.loads(o[o.index("{") :]) for o in outs if "{" in o]
    assert len(printed) == 1 and printed[0]["model"] == pytest.approx(one["model"], abs=1e-9)


@pytest.mark.slow
def test_max_users_is_exact_and_the_same_users_on_any_number_of_ranks(torchrun_run, data, tmp_path):
    every = eval_on(1, torchrun_run, data, tmp_path)["per_target"]["user"]
    lowest = sorted(set(every))[:5]
    for w in (1, 2):
        rep = eval_on(w, torchrun_run, data, tmp_path, max_users=5)
        assert rep["users"] == 5 and sorted(set(rep["per_target"]["user"])) == lowest, w


@pytest.mark.slow
def test_sampled_ranking_scores_only_the_samples(torchrun_run, data, tmp_path, monkeypatch, capsys):
    """A catalog above eval.full_ranking_max_items: the full path is never called; each target is scored against
    exactly sampled_negatives items; the draw, and so the report, is the same on 2 ranks."""
    from trainer import ranking
    from trainer.checkpoint import resolve_checkpoint

    run = tmp_path / "run"
    shutil.copytree(torchrun_run, run)
    ckpt = resolve_checkpoint(run)
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["eval"].update(full_ranking_max_items=10, sampled_negatives=20)
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))

    def no_full(*a, **k):
        raise AssertionError("the full-catalog path was called in sampled mode")

    shapes = []
    real = ranking.sampled_ranks

    def spy(user_vecs, target_score, target, neg, item_vecs, neg_index):
        # the vectors looked up are the batch's distinct sampled items, nothing else
        shapes.append((tuple(neg.shape), tuple(neg_index.shape), item_vecs.shape[0] == torch.unique(neg).numel()))
        return real(user_vecs, target_score, target, neg, item_vecs, neg_index)

    monkeypatch.setattr(ranking, "full_ranks", no_full)
    monkeypatch.setattr(ranking, "scores", no_full)
    monkeypatch.setattr(ranking, "sampled_ranks", spy)
    code, out, err = argus_inproc(capsys, "eval", str(run), "--data", str(data), "--json")
    assert code == 0, err[-2000:]
    rep = json.loads(out)
    assert rep["ranking"].startswith("sampled (20 uniform negatives") and "sampled_hr@10" in rep["model"]
    assert shapes and all(n[1] == 20 and i == n and only for n, i, only in shapes)
    monkeypatch.undo()
    two = eval_on(2, run, data, tmp_path)
    assert two["model"] == pytest.approx(rep["model"], abs=1e-9)
    assert all(0 <= r <= 20 for r in two["per_target"]["rank"])
