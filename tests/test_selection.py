"""Model selection: validation every `eval.every` steps keeps `checkpoints/best`, early stopping, eval uses best.

The validation metric is made to peak early: the ranks run the real validation (checkpoint, `evaluate` on the
val split) and a scripted value replaces the selected metric, so the expected best step and stopping step are
known in advance whatever the model learns.
"""

from __future__ import annotations

import json

import pytest
from helpers import TINY_MODEL, argus_own_process, free_port, losses, rank_env, start_ranks

SCRIPT = {2: 0.10, 4: 0.30, 6: 0.20, 8: 0.25, 10: 0.40}  # peaks at step 4 until step 10 (which never runs)


def eval_json(*argv: str) -> dict:
    """`argus eval ARGV --json` in a process of its own (it makes a process group: helpers.argus_own_process)."""
    code, out, err = argus_own_process("eval", *argv, "--json")
    assert code == 0, err[-2000:]
    return json.loads(out)


def _worker(rank: int, world: int, overrides: list[str], port: int) -> None:
    rank_env(rank, world, port)
    import trainer.evaluate as ev
    from trainer.run import load_job, train

    real, calls = ev.rank_model, []

    def scripted(*args, **kw):
        rep = real(*args, **kw)  # the real validation runs; only the selected value is scripted
        calls.append(1)
        rep["model"]["ndcg@10"] = SCRIPT[2 * len(calls)]  # eval.every=2: the n-th validation is at step 2n
        return rep

    ev.rank_model = scripted
    train(load_job("configs/mini.yaml", overrides, world))


@pytest.mark.slow
def test_best_checkpoint_early_stopping_and_eval_uses_best(data, tmp_path) -> None:
    from trainer import checkpoint

    run = tmp_path / "run"
    common = [f"data.path={data}", f"out={run}", *TINY_MODEL, "data.batch_size=4", "train.log_every=1"]
    # retention (train.keep_last=1): the newest checkpoint and best; the checkpoints of validations that lost go
    common.append("train.keep_last=1")
    start_ranks(_worker, (2, [*common, "train.steps=20", "eval.every=2", "eval.patience=2"], free_port()), 2)
    recs = [json.loads(x) for x in (run / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 6, 8], "stops after 2 validations without improvement"
    assert [r["ndcg@10"] for r in recs] == [SCRIPT[s] for s in (2, 4, 6, 8)]
    assert recs[-1]["stop"] and recs[-1]["best_step"] == 4
    assert max(losses(run)) == 8, "no step after the early stop"
    assert checkpoint.best_checkpoint(run).name == "step_00000004"
    assert checkpoint.latest_checkpoint(run).name == "step_00000008"
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000008"], "validation checkpoints that lost are removed"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    best_curve = [m["eval/best_ndcg@10"] for m in metrics if "eval/best_ndcg@10" in m]
    assert best_curve == [0.10, 0.30, 0.30, 0.30]
    # validation ranks the live model (no checkpoint read back): what it logged is what `argus eval` gives for the
    # checkpoint it wrote at that step (every metric but the scripted one)
    for step in (4, 8):
        logged = next(m for m in metrics if m["step"] == step and "eval/hr@10" in m)
        ckpt = run / "checkpoints" / f"step_{step:08d}"
        again = eval_json(str(ckpt), "--data", str(data), "--split", "val")["model"]
        assert {k: logged[f"eval/{k}"] for k in ("hr@10", "hr@100", "ndcg@100")} == pytest.approx(
            {k: again[k] for k in ("hr@10", "hr@100", "ndcg@100")}, abs=1e-9
        )
    # argus eval scores `best` and says so; an explicit checkpoint still wins
    assert eval_json(str(run), "--data", str(data), "--max-users", "5")["checkpoint"] == "step_00000004"
    rep = eval_json(str(run / "checkpoints" / "step_00000008"), "--data", str(data), "--max-users", "5")
    assert rep["checkpoint"] == "step_00000008" and rep["users"] == 5
    # a resumed run replays validation.jsonl: it is already stopped, so it trains no further
    start_ranks(
        _worker, (2, [*common, "train.steps=20", "eval.every=2", "eval.patience=2", "resume=true"], free_port()), 2
    )
    assert max(losses(run)) == 8 and checkpoint.best_checkpoint(run).name == "step_00000004"
