"""`argus train` with tensor parallelism (``parallel.tp``) and sequence parallelism (``parallel.sp``) against data
parallelism: the same losses, validation and (consolidated) weights; checkpoints that resume bitwise on the same
layout and continue on another; layouts that cannot run refused with one line before any rank starts. The kernels'
own checks against the one-process encoder: tests/test_tensor_parallel.py, tests/test_sequence_parallel.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL, argus_ranks, losses, shard_shape

REPO = Path(__file__).resolve().parents[1]


def _weights(run: Path, num_items: int, step: int) -> dict[str, torch.Tensor]:
    """Item tables and dense weights of a run's checkpoint, through the one model loader (tp shards merged)."""
    from trainer.checkpoint import load_model

    _, sparse, dense = load_model(run / "checkpoints" / f"step_{step:08d}", num_items)
    return {**sparse.state_dict(), **dense.state_dict()}


def _records(run: Path, key: str) -> list[dict]:
    return [r for x in (run / "metrics.jsonl").read_text().splitlines() if key in (r := json.loads(x))]


def _same_training(ref: Path, par: Path, num_items: int) -> None:
    """Validation at steps 2 and 3 (the live model, each rank its own users; training goes on after the first), the
    loss curve and the weights after 3 steps of ``par`` equal ``ref``'s within fp32 tolerance."""
    va, vb = _records(ref, "eval/ndcg@10"), _records(par, "eval/ndcg@10")
    assert [r["step"] for r in va] == [r["step"] for r in vb] == [2, 3]
    assert [r["eval/ndcg@10"] for r in vb] == pytest.approx([r["eval/ndcg@10"] for r in va], abs=1e-6)
    a, b = losses(ref), losses(par)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert [b[s] for s in a] == pytest.approx([a[s] for s in a], rel=1e-5), (ref.name, par.name)
    wa, wb = _weights(ref, num_items, 3), _weights(par, num_items, 3)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=2e-5, rtol=1e-4, msg=f"{ref.name} vs {par.name}: {k}")


def _resume(src: Path, dst: Path, *argv: str, nproc: int) -> Path:
    """A copy of run ``src`` (its step-3 checkpoint) resumed to step 5 with ``argv`` on ``nproc`` ranks."""
    shutil.copytree(src, dst)
    argus_ranks("train", *argv, "train.steps=5", f"out={dst}", "resume=true", nproc=nproc)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True])
def test_training_with_tp_or_sp_equals_data_parallel_training(data, tmp_path, packed):
    """On 2 ranks (one tp or sp group) training is 1 rank's; on 4 (a group x dp=2, under ZeRO-3) it is 2
    data-parallel ranks' under ZeRO-1 (padded rows; packed rows of several histories: sp, whose attention layout
    differs).
    Resumed, a tp or sp run continues bitwise; its checkpoint continues on 1 rank, and a 1-rank checkpoint under
    tp=2, as the run would have gone on."""
    num_items = json.loads((data / "manifest.json").read_text())["num_items"]
    common = ["configs/mini.yaml", f"data.path={data}", *TINY_MODEL, "data.num_workers=0", "optim.warmup_steps=2",
              "optim.schedule=constant", "train.steps=3", "model.dropout=0", "model.n_heads=4", "deepspeed.stage=1",
              "eval.every=2", "eval.val_max_users=20"]  # fmt: skip
    layouts = [("dp1", 1, []), ("sp2", 2, ["parallel.sp=2"]), ("dp2", 2, []),
               ("sp2dp2", 4, ["parallel.sp=2", "deepspeed.stage=3"])]  # fmt: skip
    if packed:
        common.append("data.batch_tokens=48")
    else:
        layouts += [("tp2", 2, ["parallel.tp=2"]), ("tp2dp2", 4, ["parallel.tp=2", "deepspeed.stage=3"])]
    runs = {}
    for name, nproc, extra in layouts:
        runs[name] = tmp_path / name
        argus_ranks("train", *common, *extra, f"out={runs[name]}", nproc=nproc, env={"OMP_NUM_THREADS": "1"})
    groups = [k for k in ("sp", "tp") if f"{k}2" in runs]
    if "tp2" in runs:  # AutoTP split the blocks: each rank's file holds half of qkv's rows, half of ff2's columns
        assert [shard_shape(runs["tp2"], 3, r, "encoder.blocks.0.attn.qkv.weight") for r in (0, 1)] == [(48, 32)] * 2
        assert shard_shape(runs["tp2"], 3, 1, "encoder.blocks.1.ff2.weight") == (32, 32)
    for k in groups:
        _same_training(runs["dp1"], runs[f"{k}2"], num_items)
        _same_training(runs["dp2"], runs[f"{k}2dp2"], num_items)
        # a group reads one batch and counts it once: the 4-rank run's token metrics are the 2 dp ranks'
        ref, par = _records(runs["dp2"], "loss/total"), _records(runs[f"{k}2dp2"], "loss/total")
        assert [r["tokens/padding_share"] for r in par] == [r["tokens/padding_share"] for r in ref]
        assert [r.get("ne/event") for r in par] == pytest.approx([r.get("ne/event") for r in ref])
    if packed:
        return
    # eval on 2 ranks reads the tp run's shards merged once (rank 0 converts, the others receive): one process's report
    from helpers import argus_own_process

    code, out, err = argus_own_process("eval", str(runs["tp2"]), "--data", str(data), "--json")
    assert code == 0, err[-2000:]
    outs = argus_ranks("eval", str(runs["tp2"]), "--data", str(data), "--json", nproc=2)
    printed = [json.loads(o[o.index("{") :]) for o in outs if "{" in o]
    assert len(printed) == 1 and printed[0]["model"] == json.loads(out)["model"]
    for k in groups:
        flag = f"parallel.{k}=2"
        whole = tmp_path / f"{k}2_whole"
        argus_ranks("train", *common, flag, "train.steps=5", f"out={whole}", nproc=2)
        again = _resume(runs[f"{k}2"], tmp_path / f"{k}2_resumed", *common, flag, nproc=2)
        assert losses(again) == losses(whole) and sorted(losses(again)) == [1, 2, 3, 4, 5]
        wa, wb = _weights(whole, num_items, 5), _weights(again, num_items, 5)
        assert all(torch.equal(wa[n], wb[n]) for n in wa), k
        # elastic: the group's checkpoint (one loader state for the group; tp: its shards merged through a
        # universal checkpoint) continues on 1 rank as the 2-rank run went on
        one = _resume(runs[f"{k}2"], tmp_path / f"{k}2_then_1", *common, nproc=1)
        assert losses(one) == pytest.approx(losses(whole), rel=1e-5), k
    # and the other way: a 1-rank checkpoint split over a tp group
    split = _resume(runs["dp1"], tmp_path / "dp1_then_tp2", *common, "parallel.tp=2", nproc=2)
    assert losses(split) == pytest.approx(losses(tmp_path / "tp2_whole"), rel=1e-5)
    # a tp change without ZeRO partitions to convert through: one line, the checkpoints untouched
    from helpers import one_line_error, tree_digest

    before = tree_digest(runs["tp2"] / "checkpoints")
    code, _, err = argus_own_process("train", *common, "deepspeed.stage=0", "train.steps=5", f"out={runs['tp2']}",
                                     "resume=true")  # fmt: skip
    assert code != 0 and "as parallel.tp=1 needs deepspeed.stage >= 1 on both sides (was 1, now 0)" in one_line_error(
        err
    ), err
    assert tree_digest(runs["tp2"] / "checkpoints") == before


def test_a_layout_that_does_not_fit_is_one_line(data, tmp_path, capsys):
    """Checked where every launcher checks a run (trainer/run.py: load_job), before any rank starts."""
    from helpers import argus_inproc, one_line_error

    base = ["train", "configs/mini.yaml", f"data.path={data}", *TINY_MODEL, f"out={tmp_path / 'r'}"]
    for extra, message in (
        (["parallel.sp=2"], "parallel.sp: 2 does not divide the world size 1"),
        (["parallel.tp=2"], "parallel.tp: 2 does not divide the world size 1"),
        (["parallel.sp=2", "parallel.tp=2"],
         "parallel.tp=2 with parallel.sp=2: one of the two at a time (not tested together)"),
        (["parallel.sp=4", "model.n_heads=2"], "parallel.sp: 4 does not divide model.n_heads 2"),
        (["parallel.tp=4", "model.n_heads=2"], "parallel.tp: 4 does not divide model.n_heads 2"),
    ):  # fmt: skip
        code, _, err = argus_inproc(capsys, *base, *extra)
        assert code == 2 and one_line_error(err) == f"argus: error: {message}", err
    for key in ("sp", "tp"):
        for launcher in (  # the launchers check the layout against the world they would start, before starting it
            ["launch", "ray", *base[1:], f"parallel.{key}=2", "--local", "--num-workers", "3", "--storage-path",
             str(tmp_path / "st")],
            ["launch", "deepspeed", *base[1:], f"parallel.{key}=2", "--num-gpus", "3"],
        ):  # fmt: skip
            code, _, err = argus_inproc(capsys, *launcher)
            assert (
                code == 2 and one_line_error(err) == f"argus: error: parallel.{key}: 2 does not divide the world size 3"
            )
    assert not (tmp_path / "r").exists() and not (tmp_path / "st").exists()
    # the longest context grows with sp: 8,192 tokens per rank's share
    from trainer.config import ConfigError, load_config
    from trainer.job import JobConfig

    def check(*o: str) -> None:
        load_config(JobConfig, REPO / "configs" / "large.yaml", [f"data.path={data}", "out=/x", *o]).validate(4)

    for extra, message in (  # on a world the layout divides
        (["parallel.tp=4", "model.d_ff=8190"], "parallel.tp: 4 does not divide model.d_ff 8190"),
        (["parallel.tp=2", "deepspeed.stage=0"], "parallel.tp: needs deepspeed.stage >= 1 (its checkpoints merge "
                                                 "their shards through DeepSpeed's universal checkpoint)"),
        (["parallel.tp=2", "train.compile=true"], "parallel.tp: needs train.compile=false (compiled AutoTP blocks "
                                                  "are not tested)"),
    ):  # fmt: skip
        with pytest.raises(ConfigError) as e:
            check(*extra)
        assert str(e.value) == message
    check("parallel.tp=4", "deepspeed.stage=3")
    check("parallel.sp=4", "model.max_seq_len=32768")
    with pytest.raises(ConfigError, match="model.max_seq_len: 32768 exceeds the longest context 16384"):
        check("parallel.sp=2", "model.max_seq_len=32768")
    with pytest.raises(ConfigError, match=r"exceeds the longest context 8192 \(parallel.sp=N allows N times more\)"):
        check("model.max_seq_len=9000")
