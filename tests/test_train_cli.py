"""`argus train` / `argus eval` through the real CLI: torchrun, bitwise resume, deterministic eval, bad configs.

The launchers themselves are under test in test_plain_and_torchrun_give_the_same_curve (plain process,
torchrun), tests/test_launch_deepspeed.py (DeepSpeed's launcher) and tests/test_ray_fault_tolerance.py (Ray);
elsewhere the ranks run `launch.cli.main` forked in-process (helpers.argus_ranks: torchrun's environment, none of
its start-up) and eval runs in this process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY_MODEL,
    argus_inproc,
    argus_own_process,
    argus_ranks,
    assert_training_plan_matches,
    free_port,
    losses,
)

REPO = Path(__file__).resolve().parents[1]
ARGUS = [sys.executable, "-m", "launch.cli"]
TINY = [*TINY_MODEL, "data.num_workers=1", "optim.warmup_steps=2"]


# The shorter run (train.steps=3) is continued to train.steps=6: a schedule that depends on train.steps (cosine,
# the default) would differ between the two, so these resume checks hold the learning rate constant. Resuming
# with an unchanged config under cosine is checked bitwise by the Ray fault drill.
CONSTANT_LR = "optim.schedule=constant"


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """The real `torchrun -m launch.cli train ARGS` (for the launcher test)."""
    port = str(free_port())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={port}",
        "-m",
        "launch.cli",
        "train",
        *args,
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def train_ranks(*args: str, nproc: int = 2) -> None:
    """`argus train ARGS` on nproc ranks, forked in-process."""
    argus_ranks("train", *args, nproc=nproc)


@pytest.mark.slow
def test_torchrun_resume_is_bitwise_identical_and_eval_deterministic(data, tmp_path, capsys):
    from trainer.checkpoint import load_model

    common = ["configs/mini.yaml", f"data.path={data}", *TINY, "deepspeed.stage=2", CONSTANT_LR]
    full, part = tmp_path / "full", tmp_path / "part"
    train_ranks(*common, f"out={full}", "train.steps=6")
    train_ranks(*common, f"out={part}", "train.steps=3")
    train_ranks(*common, f"out={part}", "train.steps=6", "resume=true")
    lf, lp = losses(full), losses(part)
    assert sorted(lf) == [1, 2, 3, 4, 5, 6] and sorted(lp) == [1, 2, 3, 4, 5, 6]
    assert [lf[s] for s in range(1, 7)] == [lp[s] for s in range(1, 7)], "bitwise equal loss curve"
    assert (part / "checkpoints" / "step_00000003" / "loader.json").is_file()
    assert_training_plan_matches(full, data, world=2)  # row-wise item table
    num_items = json.loads((data / "manifest.json").read_text())["num_items"]
    _, s_full, d_full = load_model(full / "checkpoints" / "step_00000006", num_items)
    _, s_part, d_part = load_model(part / "checkpoints" / "step_00000006", num_items)
    for (name, a), (_, b) in zip(
        sorted(s_full.state_dict().items()) + sorted(d_full.state_dict().items()),
        sorted(s_part.state_dict().items()) + sorted(d_part.state_dict().items()),
    ):
        assert torch.equal(a, b), name
    _, s3, _ = load_model(part / "checkpoints" / "step_00000003", num_items)
    assert not torch.equal(
        s3.state_dict()["items.embeddings.item.weight"], s_part.state_dict()["items.embeddings.item.weight"]
    )
    # eval: one JSON object with model and popularity metrics; twice -> the same report but for its cost (seconds,
    # peak memory)
    runs = [argus_own_process("eval", str(full), "--data", str(data), "--json") for _ in range(2)]
    assert runs[0][0] == 0, runs[0][2][-2000:]
    reps = [json.loads(r[1]) for r in runs]
    assert [sorted(r.pop("cost")) for r in reps] == [["peak_memory_gib", "ranks", "seconds", "users_per_s"]] * 2
    assert reps[0] == reps[1]
    rep = reps[0]
    for who in ("model", "popularity"):
        for key in ("hr@10", "ndcg@10", "recall@10"):
            assert 0.0 <= rep[who][key] <= 1.0


@pytest.mark.slow
def test_interrupted_checkpoint_write_leaves_previous_loadable(data, tmp_path):
    from trainer import checkpoint

    run = tmp_path / "run"
    train_ranks("configs/mini.yaml", f"data.path={data}", *TINY, f"out={run}", "train.steps=2", nproc=1)
    good = checkpoint.latest_checkpoint(run)
    # a writer killed mid-way leaves only a .tmp directory (and never flips `latest`)
    shutil.copytree(good, run / "checkpoints" / "step_00000004.tmp")
    (run / "checkpoints" / "step_00000004.tmp" / "meta.json").unlink()
    assert checkpoint.latest_checkpoint(run) == good
    train_ranks("configs/mini.yaml", f"data.path={data}", *TINY, f"out={run}", "train.steps=3", "resume=true", nproc=1)
    assert checkpoint.latest_checkpoint(run).name == "step_00000003"
    assert sorted(losses(run)) == [1, 2, 3]


@pytest.mark.parametrize(
    "override,message",
    [
        (["model.max_seq_len=9000"], "model.max_seq_len: 9000 exceeds the longest context 8192"),
        (["model.n_laers=3"], "unknown config key model.n_laers"),
        (["embeddings.optimizer=adam", "train.device=cpu"], "embeddings.optimizer: adam is not supported"),
        (["train.global_batch_size=100"], "train.global_batch_size: 100 != data.batch_size"),
        (["train.gradient_accumulation_steps=2"], "train.gradient_accumulation_steps: must be 1"),
        (["data.max_seq_len=400"], "data.max_seq_len: 400 interactions x 1 tokens exceed model.max_seq_len 256"),
        (["deepspeed.stage=5"], "deepspeed.stage: must be 0, 1, 2 or 3"),
        (["train.steps=abc"], "train.steps: expected an integer"),
    ],
)
def test_bad_config_fails_before_any_process_group(data, tmp_path, override, message, monkeypatch, capsys):
    """In this process, as rank 0 of 2 (the exit code of a real process: test_missing_config_file_and_bad_yaml)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WORLD_SIZE", "2")
    t0 = time.perf_counter()
    code, _, err = argus_inproc(
        capsys, "train", "configs/mini.yaml", f"data.path={data}", f"out={tmp_path / 'r'}", *override
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "r").exists(), "nothing written"
    assert not torch.distributed.is_initialized(), "no process group"
    assert time.perf_counter() - t0 < 60


def test_missing_config_file_and_bad_yaml(tmp_path, capsys):
    # a real process: its exit status and its one line on stderr
    out = subprocess.run(
        [*ARGUS, "train", str(tmp_path / "nope.yaml")], cwd=REPO, env=env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "nope.yaml: config file not found" in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    code, _, err = argus_inproc(capsys, "train", str(bad))
    assert code == 2 and "bad.yaml: invalid YAML" in err


@pytest.mark.slow
def test_a_run_in_out_is_refused_without_resume_or_overwrite(imp_pretrained, imp_data, tmp_path, monkeypatch, capsys):
    """A run in `out` (a copy of a real one) without resume=true or train.overwrite=true: one line naming `out` and
    both settings, before any process group, every file byte-identical. A directory that holds anything else (a
    file of the user's, a dataset) is refused whatever is passed."""
    from helpers import one_line_error, tree_digest

    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    shutil.copytree(imp_pretrained, run)
    before = tree_digest(run)
    common = ["train", "configs/mini.yaml", f"data.path={imp_data}", *TINY]
    code, _, err = argus_inproc(capsys, *common, f"out={run}")
    assert code == 2 and one_line_error(err) == (
        f"argus: error: out {run}: holds a run (checkpoints up to step 3); "
        "pass resume=true to continue it or train.overwrite=true to start over"
    )
    code, _, err = argus_inproc(capsys, *common, f"out={run}", "resume=true", "train.overwrite=true")
    assert code == 2 and one_line_error(err) == (
        "argus: error: resume=true and train.overwrite=true: pick one (continue the run in out, or start it over)"
    )
    assert tree_digest(run) == before
    foreign, own_config = tmp_path / "foreign", tmp_path / "exp"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    own_config.mkdir()
    shutil.copy(REPO / "configs" / "mini.yaml", own_config / "config.yaml")  # `argus train exp/config.yaml out=exp`
    for out, why in (
        (foreign, "notes.txt is not one of the files a run holds"),
        (imp_data, "impressions/ is not one of the files a run holds"),
        (own_config, "config.yaml has no run beside it"),
    ):
        before = tree_digest(out)
        for setting in ("train.overwrite=true", "resume=true"):
            code, _, err = argus_inproc(capsys, *common, f"out={out}", setting)
            assert code == 2 and one_line_error(err) == (
                f"argus: error: out {out}: not empty and not an argus run ({why}); refusing to write into it, "
                "even with train.overwrite=true: choose a new or empty directory"
            )
        assert tree_digest(out) == before
    assert not torch.distributed.is_initialized(), "no process group"


@pytest.mark.slow
def test_overwrite_starts_a_run_over(imp_pretrained, imp_data, tmp_path):
    """train.overwrite=true on 2 ranks: rank 0 removes the old run (checkpoints, metrics, TensorBoard, validation,
    sample keys) while rank 1 checks `out`; the new run starts at step 0 and nothing of the old one is left."""
    import yaml

    from trainer import checkpoint
    from trainer.rundir import RUN

    run = tmp_path / "run"
    shutil.copytree(imp_pretrained, run)
    assert RUN.foreign(run) is None, "RunLayout lists everything a run writes"
    (run / "validation.jsonl").write_text('{"step": 3}\n')
    (run / "sample_keys").mkdir()
    (run / "sample_keys" / "rank00000.jsonl").write_text('{"step": 3, "keys": []}\n')
    assert sorted(losses(run)) == [1, 2, 3] and len(list((run / "tb").iterdir())) == 1
    train_ranks(
        "configs/mini.yaml", f"data.path={imp_data}", *TINY, f"out={run}", "train.steps=2", "train.overwrite=true"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert checkpoint.latest_checkpoint(run).name == "step_00000002"
    assert sorted(losses(run)) == [1, 2], "metrics.jsonl started over"
    assert not (run / "validation.jsonl").exists() and not (run / "sample_keys").exists()
    assert len(list((run / "tb").iterdir())) == 1, "only the new run's TensorBoard events"
    for saved in (run / "config.yaml", run / "checkpoints" / "step_00000002" / "config.yaml"):
        assert yaml.safe_load(saved.read_text())["train"]["overwrite"] is False, "re-running it must not start over"


@pytest.mark.slow
def test_eval_writes_nothing_to_stderr(torchrun_run, data, capfd):
    """`argus eval` prints its report and nothing else: no library warnings (fbgemm_gpu's three deprecation
    warnings at import, shown under -W default, -X dev or PYTHONWARNINGS), no DeepSpeed banner, no tqdm bar.

    First in a fresh interpreter with every warning shown: warnings at import fire once per process, and this one
    imported those libraries long ago. Then in this process, capturing the file descriptors (whatever a library
    writes there directly) and recording every warning raised while it runs."""
    import warnings

    cmd = [sys.executable, "-W", "default", "-m", "launch.cli", "eval", str(torchrun_run), "--data", str(data)]
    out = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stderr == "", out.stderr[-3000:]
    assert "hr@10" in out.stdout
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, stdout, stderr = argus_inproc(capfd, "eval", str(torchrun_run), "--data", str(data), "--json")
    assert code == 0 and stderr == "", stderr[-3000:]
    assert json.loads(stdout)["users"] > 0
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]


@pytest.mark.slow
def test_short_mini_run_beats_popularity(mini_run, capsys):
    """Planted structure (synth): a short `mini` run must clearly beat the most-popular baseline on HR@10.

    The run (conftest.mini_run: 600 users, 100 steps of configs/mini.yaml on 1 rank) trains in the background
    from the start of the session."""
    data, run = mini_run
    code, out, err = argus_own_process("eval", str(run), "--data", str(data), "--json")
    assert code == 0, err[-2000:]
    rep = json.loads(out)
    model, pop = rep["model"]["hr@10"], rep["popularity"]["hr@10"]
    assert model > 1.5 * pop and model - pop > 0.05, rep


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        [
            "model.token_layout=interleaved",
            "embeddings.sharding=column_wise",
            "deepspeed.stage=0",
            "model.activation_checkpointing=true",
            "heads.feedback.weight=0",
            "data.batch_tokens=48",  # packed rows of 16 interactions (32 tokens)
        ],
        [
            "deepspeed.stage=3",
            "deepspeed.precision=bf16",
            "embeddings.sharding=table_wise",
            "heads.next_item.weight=0",
            "embeddings.optimizer=sgd",
            "data.batch_tokens=64",
            "model.attention=mask",
        ],
    ],
    ids=[
        "interleaved-colwise-zero0-ckpt-nextonly-packed",
        "bf16-zero3-tablewise-feedbackonly-sgd-packed-mask",
    ],
)
def test_options_train_and_evaluate(data, tmp_path, options, capsys):
    """Each option set trains, validates (eval.every: the live model; under ZeRO-3 every weight partitioned) and
    evaluates."""
    run = tmp_path / "run"
    if "deepspeed.stage=3" in options:  # partition every weight (the stock JSON keeps a tiny model's whole)
        ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (tmp_path / "zero3.json").write_text(json.dumps(ds))
        options = [*options, f"deepspeed.config={tmp_path / 'zero3.json'}"]
    common = [f"data.path={data}", *TINY, f"out={run}", "train.steps=3", "eval.every=3"]
    train_ranks("configs/mini.yaml", *common, *options, nproc=2)
    assert_training_plan_matches(run, data, world=2)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows, validation = [r for r in records if "loss/total" in r], [r for r in records if "eval/hr@10" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss/total"] == r["loss/total"] and r["loss/total"] > 0 for r in rows)  # finite, not NaN
    # validation ranked the live model: what `argus eval` gives for the checkpoint it wrote; exactly in fp32, and
    # within bf16's rounding of the weights for a bf16 run (the checkpoint holds the fp32 master weights)
    again = argus_own_process("eval", str(run), "--data", str(data), "--split", "val", "--json")
    assert again[0] == 0, again[2][-2000:]
    tol = 0.1 if "deepspeed.precision=bf16" in options else 1e-9
    assert [r["step"] for r in validation] == [3]
    got = {k: validation[0][f"eval/{k}"] for k in ("hr@10", "ndcg@10", "hr@100")}
    assert got == pytest.approx({k: json.loads(again[1])["model"][k] for k in got}, abs=tol)
    head = "loss/next_item" if "heads.feedback.weight=0" in options else "loss/feedback"
    assert all(r[head] > 0 for r in rows)
    assert all(0 <= r["tokens/padding_share"] < 1 and r["tokens/rank_skew"] >= 0 for r in rows)
    code, out, err = argus_own_process("eval", str(run), "--data", str(data), "--json")
    assert code == 0, err[-2000:]
    assert json.loads(out)["users"] > 0


@pytest.mark.slow
def test_zero3_validation_runs_every_forward_on_every_rank(tmp_path):
    """ZeRO-3 with every weight partitioned gathers each submodule's weights from all ranks at its forward: a rank
    with an empty padding batch (5 validation users on 2 ranks, one a batch: 3 batches and 2 + 1 empty) still runs
    the forward (before: gloo aborted on a collective mismatch at the first validation; NCCL would hang), and
    validation equals `argus eval` of the checkpoint it wrote."""
    from trainer.data.synth import synthesize

    data, run = tmp_path / "data", tmp_path / "run"
    synthesize(data, users=5, items=200, mean_len=30, shards=2, seed=0, holdout="loo", workers=1)
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    train_ranks("configs/mini.yaml", f"data.path={data}", *TINY, f"out={run}", "data.batch_size=2",
                "deepspeed.stage=3", f"deepspeed.config={tmp_path / 'zero3.json'}", "train.steps=2", "eval.every=2",
                "eval.batch_size=1")  # fmt: skip
    validation = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval/hr@10" in x]
    assert [r["step"] for r in validation] == [2]
    code, out, err = argus_own_process("eval", str(run), "--data", str(data), "--split", "val", "--json")
    assert code == 0, err[-2000:]
    rep = json.loads(out)
    assert rep["users"] == 5
    for k in ("hr@10", "ndcg@10", "hr@100"):
        assert validation[0][f"eval/{k}"] == pytest.approx(rep["model"][k], abs=1e-9)


@pytest.mark.slow
def test_plain_and_torchrun_give_the_same_curve(data, tmp_path, torchrun_run):
    """One config, every launcher: identical loss curves. Here 1 rank plain vs 1 rank under torchrun, both real
    processes; the 2-rank torchrun run (shared) is what `argus launch deepspeed` (DeepSpeed's own launcher,
    tests/test_launch_deepspeed.py) and Ray (bitwise, tests/test_ray_fault_tolerance.py) reproduce."""
    common = ["configs/mini.yaml", f"data.path={data}", *TINY, "train.steps=3"]
    plain = subprocess.run(
        [*ARGUS, "train", *common, f"out={tmp_path / 'plain'}"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert plain.returncode == 0, plain.stderr[-2000:]
    torchrun(*common, f"out={tmp_path / 'tr1'}", nproc=1)
    assert losses(tmp_path / "plain") == losses(tmp_path / "tr1")
    assert losses(tmp_path / "tr1") != losses(torchrun_run)  # 2 ranks see twice the data per step


@pytest.mark.slow
def test_eval_on_temporal_split_ranks_every_target(tmp_path, capsys):
    """Temporal holdout: several targets per user; recall@K <= hr@K, users counted once."""
    from trainer.data.manifest import Manifest
    from trainer.data.synth import synthesize

    data = tmp_path / "data"
    synthesize(
        data,
        users=80,
        items=120,
        mean_len=40,
        shards=2,
        seed=4,
        holdout="temporal",
        days=60,
        val_days=5,
        test_days=10,
        workers=1,
    )
    run = tmp_path / "run"
    train_ranks("configs/mini.yaml", f"data.path={data}", f"out={run}", *TINY, "train.steps=2", nproc=1)
    code, out, err = argus_own_process("eval", str(run), "--data", str(data), "--json", "--ks", "5,50")
    assert code == 0, err[-2000:]
    rep = json.loads(out)
    test = Manifest.load(data).splits["test"]
    assert rep["users"] + rep["users_without_history"] == sum(s.users for s in test.shards)
    assert test.shards and sum(s.targets for s in test.shards) > rep["users"]  # really several targets per user
    for who in ("model", "popularity"):
        assert rep[who]["recall@5"] <= rep[who]["hr@5"] <= rep[who]["hr@50"]
