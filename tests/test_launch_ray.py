"""`argus launch ray`: resource check, manifests that parse, restore choice, a real --local run, quiet output.
(`argus launch ray-eval` against `argus eval`: tests/test_finetune.py, 3 Ray workers.)"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import TINY_MODEL, argus_inproc, one_line_error

from cluster.ray_local import RAY_CHATTER, check_resources, filter_forwarded_output
from launch.cli import build_parser
from launch.ray_launch import pick_restore, reported_checkpoint, write_pointer

REPO = Path(__file__).resolve().parents[1]
TINY = [*TINY_MODEL, "data.num_workers=0", "train.steps=3"]


def test_resource_check_refuses_what_cannot_fit():
    check_resources({"CPU": 4.0}, workers=2, cpus=2, gpus=0)
    with pytest.raises(RuntimeError, match="needs 6 CPU, the cluster has 4"):
        check_resources({"CPU": 4.0}, workers=3, cpus=2, gpus=0)
    with pytest.raises(RuntimeError, match="needs 2 GPU, the cluster has 0"):
        check_resources({"CPU": 64.0}, workers=2, cpus=1, gpus=1)


def test_restart_continues_from_the_newer_of_rays_and_the_runs_checkpoint(tmp_path):
    def ckpt(name: str, step: int) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(f'{{"step": {step}}}')
        return tmp_path / name

    ray2, own2, own4 = ckpt("ray2", 2), ckpt("own2", 2), ckpt("own4", 4)
    assert pick_restore(None, None) == (None, None)
    assert pick_restore(ray2, None) == (ray2, "ray")
    assert pick_restore(None, own4) == (own4, "run_dir")
    assert pick_restore(ray2, own4) == (own4, "run_dir")  # Ray lost the step-4 report with the dead worker
    assert pick_restore(ray2, own2) == (ray2, "ray")
    # a run that is not resumed (new, or started over) takes only this launch's checkpoints from Ray: Ray keeps
    # an earlier launch's under the same --name
    (ray2 / "meta.json").write_text('{"step": 2, "launch": "a"}')
    assert pick_restore(ray2, None, launch="a") == (ray2, "ray")
    assert pick_restore(ray2, None, launch="b") == (None, None)
    assert pick_restore(ray2, own2, launch="b") == (own2, "run_dir")


def test_ray_keeps_a_pointer_that_resolves_to_the_runs_checkpoint(tmp_path):
    """What Ray Train is handed (and copies into its storage path) is one small JSON file naming the checkpoint in the
    run directory; once retention deletes that checkpoint the pointer resolves to None (the run's `latest` is newer
    then). A Ray checkpoint of an older argus (a full copy, with meta.json) is used as it is."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text('{"step": 4, "launch": "a"}')
    reported = tmp_path / "ray" / "checkpoint_0"
    reported.mkdir(parents=True)
    write_pointer(reported, ckpt)
    assert [p.name for p in reported.iterdir()] == ["argus_pointer.json"] and (
        reported / "argus_pointer.json"
    ).stat().st_size < 512
    assert reported_checkpoint(reported) == ckpt
    assert pick_restore(reported_checkpoint(reported), None, launch="a") == (ckpt, "ray")
    (ckpt / "meta.json").unlink()  # deleted by retention
    assert reported_checkpoint(reported) is None
    old_copy = tmp_path / "ray" / "checkpoint_old"
    old_copy.mkdir()
    (old_copy / "meta.json").write_text('{"step": 2}')
    assert reported_checkpoint(old_copy) == old_copy


@pytest.mark.slow
def test_ray_launch_refuses_a_run_in_out_before_starting_ray(data, tmp_path, monkeypatch, capsys):
    """The driver checks `out` as every launcher does (trainer/run.py: load_job): one line, nothing changed."""
    from helpers import tree_digest

    monkeypatch.chdir(REPO)
    run = tmp_path / "storage" / "argus" / "run"  # the default out=STORAGE/NAME/run
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / "meta.json").write_text('{"step": 4}')
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    (run / "metrics.jsonl").write_text('{"step": 4}\n')
    before = tree_digest(tmp_path)
    launch = ["launch", "ray", "configs/mini.yaml", f"data.path={data}", *TINY, "--local", "--num-workers", "1"]
    code, _, err = argus_inproc(capsys, *launch, "--storage-path", str(tmp_path / "storage"))
    assert code == 2 and one_line_error(err) == (
        f"argus: error: out {run}: holds a run (checkpoints up to step 4); "
        "pass resume=true to continue it or train.overwrite=true to start over"
    )
    assert tree_digest(tmp_path) == before, "nothing written: no Ray session either"


def test_local_ray_warns_on_oversubscription_uses_ray_tmpdir_and_cleans_up_on_failure(
    data, tmp_path, monkeypatch, capsys
):
    """`--local` on a machine with fewer CPUs than asked for: one warning line; the throw-away cluster's files go
    under $RAY_TMPDIR and are removed even when the cluster fails to start (a stub here: the real cluster is
    test_local_ray_run_keeps_its_files_bounded_and_its_output_quiet's); the variable is left as it was."""
    import ray.cluster_utils

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    ray_tmp = tmp_path / "rt"
    ray_tmp.mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    seen = []

    class FailingCluster:  # what Ray's Cluster does first: write its session files under RAY_TMPDIR, then fail
        def __init__(self, **kw):
            tmp = Path(os.environ["RAY_TMPDIR"])
            seen.append((tmp, kw["head_node_args"]["num_cpus"]))
            (tmp / "ray" / "session_x" / "logs").mkdir(parents=True)
            (tmp / "ray" / "session_x" / "logs" / "raylet.out").write_text("...")
            raise RuntimeError("the head node did not start")

    monkeypatch.setattr(ray.cluster_utils, "Cluster", FailingCluster)
    launch = ["launch", "ray", "configs/mini.yaml", f"data.path={data}", *TINY, "--local", "--num-workers", "2"]
    code, _, err = argus_inproc(capsys, *launch, "--storage-path", str(tmp_path / "s"))
    assert code == 2
    assert err.splitlines() == [
        "argus: warning: --num-workers 2 x --cpus-per-worker 1 = 2 CPUs, this machine has 1: the workers share "
        "cores (slower, not wrong)",
        "argus: error: the head node did not start",
    ]
    assert len(seen) == 1 and seen[0][0].parent == ray_tmp and seen[0][0].name.startswith("argus-ray-")
    assert seen[0][1] == 2  # the local cluster is as large as the request
    assert list(ray_tmp.iterdir()) == [], "what argus made under RAY_TMPDIR is gone"
    assert os.environ["RAY_TMPDIR"] == str(ray_tmp)

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "missing"))
    code, _, err = argus_inproc(capsys, *launch, "--num-workers", "1", "--storage-path", str(tmp_path / "s"))
    assert (
        code == 2
        and one_line_error(err) == f"argus: error: RAY_TMPDIR={tmp_path / 'missing'}: not an existing directory"
    )


def test_forwarded_chatter_is_dropped_and_the_rest_printed():
    """The driver-side filter wraps Ray's forwarding handler (the real one exists only once ray.init has run: the
    --local run below checks the whole path); fbgemm's INFO lines are dropped in the worker itself."""
    import logging

    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from trainer.logger import _FbgemmInfo

    got = []
    dispatcher.add_handler("ray_print_logs", lambda data: got.append(data["lines"]))
    try:
        assert filter_forwarded_output() and filter_forwarded_output()  # idempotent: wrapped once
        lines = ["step 1/3  loss 7.3", *(f"x {c} y" for c in RAY_CHATTER), "Traceback (most recent call last):"]
        dispatcher.emit({"lines": lines, "pid": 1, "ip": "127.0.0.1", "is_err": False})
        dispatcher.emit({"lines": [f"{RAY_CHATTER[0]} again"], "pid": 1, "ip": "127.0.0.1", "is_err": True})
    finally:
        dispatcher.remove_handler("ray_print_logs")
    assert got == [["step 1/3  loss 7.3", "Traceback (most recent call last):"]]

    def record(path: str, level: int) -> logging.LogRecord:
        return logging.LogRecord("root", level, path, 1, "Successfully loaded: 'x.so'", None, None)

    quiet = _FbgemmInfo()
    assert not quiet.filter(record("/venv/site-packages/fbgemm_gpu/__init__.py", logging.INFO))
    assert quiet.filter(record("/venv/site-packages/fbgemm_gpu/__init__.py", logging.WARNING))
    assert quiet.filter(record("/work/argus/trainer/train.py", logging.INFO))


def test_verbose_anywhere_on_the_line_reaches_the_workers(monkeypatch):
    from launch.cli import parse_args
    from launch.ray_launch import worker_config
    from trainer.config import load_config
    from trainer.job import JobConfig

    args = parse_args(["launch", "ray", "configs/mini.yaml", "--local", "--verbose", "--num-workers", "2",
                       "--storage-path", "/tmp/s", "data.path=/d"])  # fmt: skip
    assert args.verbose and not args.debug and args.overrides == ["data.path=/d"]
    assert not parse_args(["plan", "configs/mini.yaml"]).verbose
    cfg = load_config(JobConfig, REPO / "configs" / "mini.yaml", ["data.path=/d"], validate=False)
    assert worker_config(cfg, 2, 1.0, environ={"ARGUS_VERBOSE": "1"})["verbose"] is True
    assert worker_config(cfg, 2, 1.0, environ={"ARGUS_VERBOSE": "0"})["verbose"] is False


def test_kuberay_entrypoint_is_a_valid_argus_command():
    job = yaml.safe_load((REPO / "cluster" / "k8s" / "rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "argus"
    args = build_parser().parse_args(argv[1:])
    assert args.launch_command == "ray" and args.num_workers == 16 and args.gpus_per_worker == 1
    assert (REPO / args.config).is_file()


@pytest.mark.slow
def test_local_ray_run_keeps_its_files_bounded_and_its_output_quiet(tmp_path):
    """`argus launch ray --local` (a real process). The throw-away cluster keeps its files under $RAY_TMPDIR while
    it runs, and nothing of it is left after. (That a Ray run trains exactly as torchrun does, bit for bit, is the
    node-loss drill's reference check: tests/test_ray_fault_tolerance.py.)

    A checkpoint every step, train.keep_last=2: the run keeps steps 2 and 3, each with its manifest; Ray's storage
    path holds one pointer file per reported checkpoint and no second copy (before: every checkpoint twice).
    Quiet by default: the workers' progress lines come through, Ray's INFO lines, its placement-group cleaner's
    polling and fbgemm's library list do not (before: 14 lines per rank, ~20 polling lines, 10 per kernel)."""
    import shutil
    import tempfile
    import time

    from trainer import checkpoint_store as store
    from trainer.data.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, users=40, items=90, mean_len=20, shards=2, seed=6, holdout="loo", workers=1)
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(ray_tmp)}
    common = ["configs/mini.yaml", f"data.path={data}", *TINY, "train.checkpoint_every=1", "train.keep_last=2"]
    cmd = [sys.executable, "-m", "launch.cli", "launch", "ray", *common, "--local", "--num-workers", "2",
           "--storage-path", str(tmp_path / "store"), "--name", "loc"]  # fmt: skip
    used = set()
    try:
        with open(tmp_path / "ray.out", "w") as out, open(tmp_path / "ray.err", "w") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)
            deadline = time.monotonic() + 600
            while proc.poll() is None and time.monotonic() < deadline:
                used.update(p.name for p in ray_tmp.iterdir())
                time.sleep(0.5)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        assert proc.returncode == 0, (tmp_path / "ray.err").read_text()[-3000:]
        assert len(used) == 1 and next(iter(used)).startswith("argus-ray-"), used  # the cluster's files were here
        assert list(ray_tmp.iterdir()) == [], "and are gone"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    run = tmp_path / "store" / "loc" / "run"
    assert sorted(store.checkpoints(run)) == [2, 3]
    assert all(store.verify(p).status == "verified" for p in store.checkpoints(run).values())
    ray_files = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and run not in p.parents]
    pointers = sorted(p.parent.name for p in ray_files if p.name == "argus_pointer.json")
    assert len(pointers) == 3, "one pointer per reported checkpoint; Ray deleted none"
    ray_bytes = sum(p.stat().st_size for p in ray_files)
    run_bytes = sum(store.checkpoint_bytes(p) for p in store.checkpoints(run).values())
    assert ray_bytes < 64 * 1024 < run_bytes, f"Ray keeps {ray_bytes} bytes beside the run's {run_bytes}: {ray_files}"
    assert not [p for p in ray_files if p.suffix in (".pt", ".distcp")], "no checkpoint file outside the run"
    printed = (tmp_path / "ray.out").read_text() + (tmp_path / "ray.err").read_text()
    assert "step 3/3" in printed and "done: loc:" in printed
    chatter = [x for x in printed.splitlines() if any(c in x for c in (*RAY_CHATTER, "INFO worker.py"))]
    assert not chatter, chatter[:5]


@pytest.mark.slow
def test_cluster_check_probes_allreduce_and_checks_memory(tmp_path):
    """One real `argus cluster check --local`: a throw-away Ray cluster, the all-reduce probe over 2 workers, and the
    planner's memory per rank for a catalog that cannot fit vs each worker's share of RAM."""
    from trainer.data.synth import synthesize

    data = tmp_path / "data"
    synthesize(data, users=20, items=30, mean_len=10, shards=1, seed=1, holdout="none", workers=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    check = [sys.executable, "-m", "launch.cli", "cluster", "check", "configs/mini.yaml", f"data.path={data}"]
    opts = ["--local", "--num-workers", "2", "--probe-mb", "4", "--min-free-gb", "0.01"]
    # 10^11 items x (64 fp32 + 1 Adagrad state) = 26 TB over 2 workers
    out = subprocess.run(
        [*check, *opts, "--items", "1e11", "--storage-path", str(tmp_path / "pf")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert "gloo over 2 workers" in out.stdout
    assert "127.0.0.2" in out.stdout  # the throw-away cluster lives on loopback
    assert "argus cluster check: memory: the planner predicts 13001.2 GB per rank" in out.stdout
    assert "memory / rank" in out.stdout
    assert "argus cluster check: config" not in out.stdout  # the config itself is fine


def test_cluster_check_reports_a_bad_config_and_still_probes(tmp_path, capsys, monkeypatch):
    """A config problem is one line among the others and the cluster is still checked (run_checks gets no job).
    Ray is stubbed: the real cluster path is the test above."""
    import contextlib

    import cluster.preflight as preflight
    import cluster.ray_local as ray_local

    calls = []

    def fake_run_checks(job, **kw):
        calls.append((job, kw))
        probe = {"backend": "gloo", "world_size": kw["num_workers"], "busbw_gbps": 1.0, "correct": True}
        return preflight.PreflightResult(fits=True, storage=tmp_path, free_bytes=2**40, probe=probe)

    monkeypatch.setattr(ray_local, "ray_session", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(preflight, "nodes", lambda: [])
    monkeypatch.setattr(preflight, "run_checks", fake_run_checks)
    code, out, _ = argus_inproc(
        capsys, "cluster", "check", "configs/mini.yaml", "data.path=/nonexistent", "train.global_batch_size=999",
        "--local", "--num-workers", "2", "--storage-path", str(tmp_path / "pf"),
    )  # fmt: skip
    assert code == 1
    assert "argus cluster check: config: train.global_batch_size: 999 != data.batch_size" in out
    assert "gloo over 2 workers" in out and "FAILED" in out
    assert len(calls) == 1 and calls[0][0] is None and calls[0][1]["num_workers"] == 2
