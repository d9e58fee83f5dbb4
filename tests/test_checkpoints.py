"""Checkpoint retention and integrity (issue #13): which checkpoints a run keeps (train.keep_last, train.keep_every,
best, latest) across kills while saving and while deleting; manifests, a corrupted `latest` on resume (one line,
fallback, the same result as resuming from the previous checkpoint), no good checkpoint (one line, exit 2), and
`argus checkpoint list|verify`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY_MODEL,
    argus_inproc,
    argus_ranks,
    free_port,
    losses,
    one_line_error,
    rank_env,
    start_ranks,
    tree_digest,
)

from trainer import checkpoint_store as store

REPO = Path(__file__).resolve().parents[1]
TINY = [*TINY_MODEL, "data.num_workers=0", "optim.warmup_steps=2"]


def _steps(run: Path) -> list[int]:
    return sorted(store.checkpoints(run))


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.endswith((".tmp", ".trash")))


# ---- the policy and the file operations, on fake checkpoints (no training) ------------------------------------------
def _fake_run(root: Path, steps: list[int], latest: int, best: int | None = None) -> Path:
    for s in steps:
        d = root / "checkpoints" / store.checkpoint_name(s)
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"step": s}))
        (d / "weights.bin").write_bytes(bytes(range(256)) * (s + 1))
        store.write_manifest(d, store.describe_files(d, store.checkpoint_files(d)), s, 1)
    store.set_pointer(root, store.LATEST, root / "checkpoints" / store.checkpoint_name(latest))
    if best is not None:
        store.set_pointer(root, store.BEST, root / "checkpoints" / store.checkpoint_name(best))
    return root


def test_retention_policy_and_prune_on_fake_checkpoints(tmp_path):
    policy = store.Retention(keep_last=3, keep_every=4)
    assert policy.keep(range(1, 11), latest=10, best=2) == {2, 4, 8, 9, 10}
    assert policy.keep(range(1, 11), latest=10) == {4, 8, 9, 10}
    # newer than latest: abandoned (resume fell back past it), milestones included
    assert policy.keep(range(1, 11), latest=6, best=2) == {2, 4, 5, 6}
    assert store.Retention(keep_last=1).keep([1, 2, 3], latest=3) == {3}

    run = _fake_run(tmp_path / "run", list(range(1, 11)), latest=10, best=2)
    root = run / "checkpoints"
    (root / "step_00000011.tmp").mkdir()  # a save killed mid-write
    (root / "step_00000003.trash").mkdir()  # a deletion killed between rename and removal
    (root / "step_00000003.trash" / "x").write_text("partial")
    (root / "notes.txt").write_text("yours")  # not argus's: never touched
    killed = []

    def kill_once(trash: Path) -> None:
        if not killed:
            killed.append(trash.name)
            raise KeyboardInterrupt  # the process dies here: renamed, not yet removed

    with pytest.raises(KeyboardInterrupt):
        store.prune(run, policy, mid_delete=kill_once)  # leftovers first, then step 1: killed
    assert killed == ["step_00000001.trash"] and _leftovers(run) == ["step_00000001.trash"]
    assert store.latest_checkpoint(run).name == "step_00000010" and store.best_checkpoint(run).name == "step_00000002"
    removed = store.prune(run, policy)
    assert removed == ["step_00000001.trash", *(f"step_0000000{s}" for s in (3, 5, 6, 7))]
    assert _steps(run) == [2, 4, 8, 9, 10] and _leftovers(run) == []
    assert (root / "notes.txt").read_text() == "yours"
    # nothing published: nothing deleted
    (root / "latest").unlink()
    assert store.prune(run, store.Retention(keep_last=1)) == [] and _steps(run) == [2, 4, 8, 9, 10]


def test_verify_names_each_bad_file(tmp_path):
    run = _fake_run(tmp_path / "run", [1, 2], latest=2)
    ckpt = run / "checkpoints" / "step_00000002"
    assert store.verify(ckpt).status == "verified" and store.verify(ckpt).files == 2
    data = (ckpt / "weights.bin").read_bytes()
    (ckpt / "weights.bin").write_bytes(data[:100])
    v = store.verify(ckpt)
    assert (v.status, v.problems) == ("bad", [f"weights.bin: 100 bytes, the manifest says {len(data):,}"])
    assert v.line() == f"checkpoint {ckpt} (step 2) is bad: weights.bin: 100 bytes, the manifest says {len(data):,}"
    (ckpt / "weights.bin").write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    assert store.verify(ckpt).problems == [f"weights.bin: sha256 differs from the manifest ({len(data):,} bytes)"]
    assert store.verify(ckpt, quick=True).status == "verified", "--quick compares sizes only"
    (ckpt / "weights.bin").unlink()
    assert store.verify(ckpt).problems == ["weights.bin: missing"]
    (ckpt / "meta.json").unlink()
    assert store.verify(ckpt).problems == ["meta.json: missing (an incomplete checkpoint)"]
    old = run / "checkpoints" / "step_00000001"
    (old / store.MANIFEST).unlink()
    assert store.verify(old).status == "unverified"
    # ranks split the files: every file is checked by exactly one of them
    names = store.checkpoint_files(old)
    parts = store.shares(store.file_sizes(old, names), 2)
    assert sorted(n for p in parts for n in p) == names and all(parts)


def test_select_resume_on_fake_checkpoints(tmp_path, caplog):
    """Resume's choice (one process, no process group): a bad latest -> one line, fall back (and `latest` names the
    checkpoint resumed from); a latest without a manifest -> one note, used; a pointer to a missing checkpoint -> bad;
    nothing good -> CheckpointError, one line, nothing changed."""
    from trainer.checkpoint import CheckpointError, select_resume

    caplog.set_level("WARNING", logger="trainer.checkpoint")
    run = _fake_run(tmp_path / "run", [1, 2, 3], latest=3)
    root = run / "checkpoints"
    (root / "step_00000003" / "weights.bin").write_bytes(b"x")
    assert select_resume(run, root / "step_00000003", rank=0) == root / "step_00000002"
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {root / 'step_00000003'} (step 3) is bad: weights.bin: 1 bytes, the manifest says 1,024",
        f"resume: falling back to {root / 'step_00000002'} (step 2), the newest good checkpoint (latest now names it); "
        "step 3 runs again",
    ]
    assert store.latest_checkpoint(run).name == "step_00000002"
    caplog.clear()
    (root / "step_00000002" / store.MANIFEST).unlink()
    assert select_resume(run, root / "step_00000002", rank=1) == root / "step_00000002"
    assert caplog.records == [], "only rank 0 says anything"
    assert select_resume(run, root / "step_00000002", rank=0) == root / "step_00000002"
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {root / 'step_00000002'} (step 2) has no manifest.json (written by an older argus): "
        "resuming from it unverified"
    ]
    caplog.clear()
    assert select_resume(run, root / "step_00000009", rank=0) == root / "step_00000002"  # `latest` names nothing
    assert caplog.records[0].getMessage().endswith("(step 9) is bad: meta.json: missing (an incomplete checkpoint)")
    (root / "step_00000001" / "weights.bin").unlink()
    (root / "step_00000002" / "meta.json").unlink()
    before = tree_digest(root)
    with pytest.raises(CheckpointError) as e:
        select_resume(run, root / "step_00000003", rank=0)
    assert str(e.value) == (
        f"{root}: no good checkpoint to resume from (steps 3, 1 are bad; step 3: weights.bin: 1 bytes, the manifest "
        "says 1,024); pass train.overwrite=true to start over"
    )
    assert tree_digest(root) == before


def test_resume_before_best_points_best_back(tmp_path):
    """Resume fell back past the checkpoint `best` names (its step is trained again, and its directory replaced):
    `best` goes back to the best validation up to the resumed step, or away when that checkpoint is gone."""
    from trainer.job import JobConfig
    from trainer.train import Validation

    run = _fake_run(tmp_path / "run", [2, 4, 6], latest=4, best=6)
    (run / "validation.jsonl").write_text(
        "".join(json.dumps({"step": s, "ndcg@10": v}) + "\n" for s, v in ((2, 0.3), (4, 0.1), (6, 0.5)))
    )
    val = Validation(JobConfig(out=str(run)), run)
    val.restore(4, rank=1)
    assert store.best_checkpoint(run).name == "step_00000006", "rank 0 alone moves it"
    val = Validation(JobConfig(out=str(run)), run)
    val.restore(4, rank=0)
    assert (val.best, val.best_step) == (0.3, 2) and store.best_checkpoint(run).name == "step_00000002"
    store.set_pointer(run, store.BEST, run / "checkpoints" / "step_00000006")
    store.discard(run / "checkpoints" / "step_00000002")
    Validation(JobConfig(out=str(run)), run).restore(4, rank=0)
    assert store.pointer_target(run, store.BEST) is None


# ---- a real run: retention across a kill while saving and a kill while deleting -----------------------------------
SCRIPT = {3: 0.10, 6: 0.50, 9: 0.20, 10: 0.30}  # validation peaks at step 6


def _scripted_worker(rank: int, world: int, overrides: list[str], port: int, fault: str) -> None:
    rank_env(rank, world, port)
    os.environ["ARGUS_FAULT_INJECT"] = fault
    import trainer.evaluate as ev
    from trainer import checkpoint_store as store
    from trainer.run import load_job, train

    real = ev.rank_model
    run = next(o.split("=", 1)[1] for o in overrides if o.startswith("out="))

    def scripted(*args, **kw):
        rep = real(*args, **kw)  # the real validation (of the live model) runs; only the selected value is scripted
        step = json.loads((store.latest_checkpoint(run) / "meta.json").read_text())["step"]  # just saved
        rep["model"]["ndcg@10"] = SCRIPT[step]
        return rep

    ev.rank_model = scripted
    train(load_job("configs/mini.yaml", overrides, world))


@pytest.mark.slow
def test_retention_keeps_last_milestones_and_best_across_kills(data, tmp_path, capsys):
    """10 checkpoints (one per step), keep_last=3, keep_every=4, validation every 3 steps (best: step 6). Attempt 1 is
    killed while writing the step-7 checkpoint, attempt 2 while deleting after the step-8 one (step 5 renamed to
    .trash, not removed); attempt 3 finishes. At every point `latest` and `best` name complete, verified
    checkpoints, and the run ends with exactly steps 4, 8 (milestones), 6 (best), 8, 9, 10 (the last 3)."""
    run = tmp_path / "run"
    args = [f"data.path={data}", f"out={run}", *TINY, "train.steps=10", "train.checkpoint_every=1", "eval.every=3"]
    args += ["train.keep_last=3", "train.keep_every=4", "eval.val_max_users=8"]

    def attempt(fault: str, resume: bool) -> None:
        start_ranks(_scripted_worker, (1, args + (["resume=true"] if resume else []), free_port(), fault), 1)

    def pointers_sound() -> None:
        for name in (store.LATEST, store.BEST):
            assert store.verify(store.pointer_target(run, name)).status == "verified", name

    with pytest.raises(Exception, match="signal SIGKILL"):
        attempt(f"rank=0,step=7,phase=checkpoint,once={tmp_path / 'k1'}", resume=False)
    assert (tmp_path / "k1").read_text().strip() == (
        "rank 0 killed at checkpoint 7; latest=step_00000006; writing=step_00000007.tmp"
    )
    assert _steps(run) == [4, 5, 6] and _leftovers(run) == ["step_00000007.tmp"]
    assert store.latest_checkpoint(run).name == store.best_checkpoint(run).name == "step_00000006"
    pointers_sound()

    with pytest.raises(Exception, match="signal SIGKILL"):
        attempt(f"rank=0,step=8,phase=prune,once={tmp_path / 'k2'}", resume=True)
    assert (tmp_path / "k2").read_text().strip() == (
        "rank 0 killed at prune 8; latest=step_00000008; deleting=step_00000005.trash"
    )
    assert _steps(run) == [4, 6, 7, 8] and _leftovers(run) == ["step_00000005.trash"]
    assert store.latest_checkpoint(run).name == "step_00000008" and store.best_checkpoint(run).name == "step_00000006"
    pointers_sound()

    attempt("", resume=True)
    assert _steps(run) == [4, 6, 8, 9, 10] and _leftovers(run) == []
    assert store.latest_checkpoint(run).name == "step_00000010" and store.best_checkpoint(run).name == "step_00000006"
    assert sorted(losses(run)) == list(range(1, 11))
    code, out, err = argus_inproc(capsys, "checkpoint", "list", str(run), "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [(c["step"], c["status"], c["roles"]) for c in listed["checkpoints"]] == [
        (4, "verified", ["milestone"]),
        (6, "verified", ["best"]),
        (8, "verified", ["milestone"]),
        (9, "verified", []),
        (10, "verified", ["latest"]),
    ]
    assert (listed["keep_last"], listed["keep_every"], listed["leftovers"]) == (3, 4, [])
    assert listed["bytes"] == sum(store.checkpoint_bytes(p) for p in store.checkpoints(run).values())
    code, out, _ = argus_inproc(capsys, "checkpoint", "list", str(run))
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(f"{run}: 5 checkpoints, ") and "train.keep_every=4" in lines[0]
    assert lines[2].split()[:2] == ["4", "step_00000004"] and lines[2].endswith("verified    milestone")
    assert lines[6].endswith("verified    latest")


# ---- integrity: a corrupted latest on resume ----------------------------------------------------------------------
@pytest.mark.slow
def test_corrupted_latest_falls_back_to_the_previous_checkpoint(data, tmp_path, capsys):
    """Two files of the step-4 checkpoint are damaged (one truncated, one byte flipped; on 2 ranks each is checked
    by a different rank). `argus checkpoint verify` names both and exits 1; resume says so in one line (rank 0
    only), falls back to step 2 in one more, and finishes equal to a run resumed from step 2. With no good
    checkpoint left, resume stops with one line and exit 2."""
    common = ["configs/mini.yaml", f"data.path={data}", *TINY, "train.checkpoint_every=2"]
    base = tmp_path / "base"
    argus_ranks("train", *common, f"out={base}", "train.steps=4", nproc=2)
    bad, ref = tmp_path / "bad", tmp_path / "ref"
    shutil.copytree(base, bad)
    shutil.copytree(base, ref)
    ckpt = bad / "checkpoints" / "step_00000004"
    share0, share1 = store.shares(store.file_sizes(ckpt, store.checkpoint_files(ckpt)), 2)
    cut, flip = share1[0], next(n for n in share0 if n.endswith(".pt"))
    size = (ckpt / cut).stat().st_size
    with open(ckpt / cut, "r+b") as f:
        f.truncate(size // 2)
    raw = bytearray((ckpt / flip).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (ckpt / flip).write_bytes(bytes(raw))

    # argus checkpoint verify / list
    code, out, err = argus_inproc(capsys, "checkpoint", "verify", str(bad))
    assert code == 1
    assert out.splitlines() == [f"OK {bad}/checkpoints/step_00000002: step 2, {_nfiles(bad, 2)} files, "
                                f"{store.checkpoint_bytes(bad / 'checkpoints' / 'step_00000002') / 1e6:,.1f} MB "
                                "match the manifest"]  # fmt: skip
    assert sorted(err.splitlines()) == sorted(
        [
            f"BAD {ckpt / cut}: step 4: {size // 2:,} bytes, the manifest says {size:,}",
            f"BAD {ckpt / flip}: step 4: sha256 differs from the manifest ({len(raw):,} bytes)",
        ]
    )
    assert argus_inproc(capsys, "checkpoint", "verify", str(bad), "--step", "2")[0] == 0
    assert argus_inproc(capsys, "checkpoint", "verify", str(ckpt.parent / "step_00000002"))[0] == 0
    assert argus_inproc(capsys, "checkpoint", "verify", str(bad), "--step", "4", "--quick")[0] == 1
    code, _, err = argus_inproc(capsys, "checkpoint", "verify", str(bad), "--step", "3")
    assert code == 2 and one_line_error(err) == f"argus: error: {bad}: no checkpoint at step 3 (steps: 2, 4)"
    code, out, _ = argus_inproc(capsys, "checkpoint", "list", str(bad))
    assert code == 0 and out.splitlines()[3].split()[-2:] == ["bad", "latest"]

    # resume: one line naming the step and a file, one line for the fallback, rank 0 only
    outs = argus_ranks("train", *common, f"out={bad}", "train.steps=6", "resume=true", nproc=2)
    said = [line for line in outs[0].splitlines() if "step_00000004" in line and "checkpoint" in line]
    first = sorted([cut, flip])[0]
    assert len(said) == 1 and said[0].endswith(
        f"checkpoint {ckpt} (step 4) is bad: {first}: "
        + (f"{size // 2:,} bytes, the manifest says {size:,}" if first == cut else "sha256 differs from the manifest")
        + (f" ({len(raw):,} bytes) (and 1 more)" if first == flip else " (and 1 more)")
    ), outs[0][-3000:]
    fallback = [line for line in outs[0].splitlines() if "falling back" in line]
    assert len(fallback) == 1 and fallback[0].endswith(
        f"resume: falling back to {bad}/checkpoints/step_00000002 (step 2), the newest good checkpoint "
        "(latest now names it); steps 3-4 run again"
    )
    assert "is bad" not in outs[1] and "falling back" not in outs[1]
    # the reference: the same run resumed from step 2 (step 4 removed)
    store.discard(ref / "checkpoints" / "step_00000004")
    store.set_pointer(ref, store.LATEST, ref / "checkpoints" / "step_00000002")
    argus_ranks("train", *common, f"out={ref}", "train.steps=6", "resume=true", nproc=2)
    assert [losses(bad)[s] for s in range(3, 7)] == [losses(ref)[s] for s in range(3, 7)]
    assert _steps(bad) == _steps(ref) == [2, 4, 6] and store.verify(ckpt).status == "verified", "step 4 re-written"
    _assert_same_weights(bad / "checkpoints" / "step_00000006", ref / "checkpoints" / "step_00000006", data)

    # no good checkpoint: one line, exit 2, every checkpoint byte-identical
    for step in (2, 4, 6):
        (bad / "checkpoints" / store.checkpoint_name(step) / "loader.json").write_text("{}")
    before = tree_digest(bad / "checkpoints")
    with pytest.raises(AssertionError) as failed:
        argus_ranks("train", *common, f"out={bad}", "train.steps=8", "resume=true", nproc=1)
    assert tree_digest(bad / "checkpoints") == before
    message = str(failed.value)
    assert "exit code 5" in message, message[-3000:]  # launch/exit_codes.py: CHECKPOINT
    errors = [line for line in message.splitlines() if line.startswith("argus: error:")]
    assert errors == [
        f"argus: error: {bad}/checkpoints: no good checkpoint to resume from (steps 6, 4, 2 are bad; step 6: "
        f"loader.json: 2 bytes, the manifest says {_manifest_size(bad, 6, 'loader.json'):,}); "
        "pass train.overwrite=true to start over"
    ]


def _nfiles(run: Path, step: int) -> int:
    return len(store.read_manifest(run / "checkpoints" / store.checkpoint_name(step))["files"])


def _manifest_size(run: Path, step: int, name: str) -> int:
    return store.read_manifest(run / "checkpoints" / store.checkpoint_name(step))["files"][name]["size"]


def _assert_same_weights(a: Path, b: Path, data: Path) -> None:
    from trainer.checkpoint import load_model

    num_items = json.loads((data / "manifest.json").read_text())["num_items"]
    (_, sa, da), (_, sb, db) = load_model(a, num_items), load_model(b, num_items)
    for (name, x), (_, y) in zip(
        sorted({**sa.state_dict(), **da.state_dict()}.items()), sorted({**sb.state_dict(), **db.state_dict()}.items())
    ):
        assert torch.equal(x, y), name
