"""One line, one exit code, one rank (docs/reliability.md): errors raised in DataLoader workers, on several ranks,
in Ray workers and by the deepspeed launcher's hosts reach the user as argus's own line, printed once, with their
class's exit code (launch/exit_codes.py); --debug / ARGUS_DEBUG=1 add the traceback. And the Ray fault drill's
spec travels to the workers in their config, not in the environment."""

from __future__ import annotations

import ast
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from helpers import TINY_MODEL, argus_inproc, argus_ranks_failing, one_line_error

from launch import exit_codes

REPO = Path(__file__).resolve().parents[1]


def _corrupt_train_shards(root: Path) -> set[str]:
    """Every sample of every train shard made undecodable (0xc1 is never valid msgpack); -> the sample keys."""
    from trainer.data.manifest import Manifest

    keys = set()
    for sh in Manifest.load(root).splits["train"].shards:
        path = root / sh.path
        data = bytearray(path.read_bytes())
        with tarfile.open(path) as t:
            for mem in t.getmembers():
                data[mem.offset_data : mem.offset_data + 8] = b"\xc1" * 8
                keys.add(mem.name.partition(".")[0])
        path.write_bytes(bytes(data))
    return keys


@pytest.mark.slow
def test_a_corrupt_shard_in_a_dataloader_worker_is_one_line_with_the_data_code(data, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    keys = _corrupt_train_shards(bad)
    argv = ["train", "configs/mini.yaml", f"data.path={bad}", *TINY_MODEL, "data.num_workers=1", "train.steps=2"]
    [(code, _, err)] = argus_ranks_failing(*argv, f"out={tmp_path / 'run'}", nproc=1)
    line = one_line_error(err)
    assert code == exit_codes.DATA == 4, err
    assert re.fullmatch(r"argus: error: shard \S+/train/shard-\d+\.tar: .+", line), line
    assert any(k in line for k in keys), line
    # --debug: the worker's traceback, then the same line
    [(code, _, err)] = argus_ranks_failing("--debug", *argv, f"out={tmp_path / 'run2'}", nproc=1)
    assert code == exit_codes.DATA and "Traceback (most recent call last)" in err and "DataLoader worker" in err
    assert err.strip().splitlines()[-1] == line


@pytest.mark.slow
def test_a_config_error_on_two_ranks_is_printed_once(data, tmp_path):
    ranks = argus_ranks_failing(
        "train", "configs/mini.yaml", f"data.path={data}", f"out={tmp_path / 'run'}", "model.nope=1", nproc=2
    )
    assert [code for code, _, _ in ranks] == [exit_codes.CONFIG] * 2, ranks
    line = one_line_error(ranks[0][2])
    assert "unknown config key model.nope" in line
    assert ranks[1][2] == "", "rank 1 must stay silent: rank 0 prints the error every rank raised"


def test_debug_flag_and_env_show_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("ARGUS_DEBUG", raising=False)
    argv = ["train", "configs/mini.yaml", "model.nope=1"]
    code, _, err = argus_inproc(capsys, *argv)
    assert code == 2 and "unknown config key model.nope" in one_line_error(err)
    for debug_argv, env in ((["--debug", *argv], None), ([*argv, "--debug"], None), (argv, "1")):
        if env:
            monkeypatch.setenv("ARGUS_DEBUG", env)
        code, _, dbg = argus_inproc(capsys, *debug_argv)
        assert code == 2 and dbg.startswith("Traceback (most recent call last)") and "ConfigError" in dbg, dbg
        assert dbg.strip().splitlines()[-1] == err.strip()


def test_the_exit_code_table_matches_exit_codes_py():
    docs = {p.name: p.read_text() for p in (REPO / "docs").glob("*.md")}
    assert [n for n, text in docs.items() if "| code | meaning |" in text] == ["reliability.md"], "listed once"
    text = docs["reliability.md"]
    table = text[text.index("| code | meaning |") :].split("\n\n")[0].splitlines()[2:]
    rows = {int(r.split("|")[1]): r.split("|")[2] for r in table}
    codes = {name: v for name, v in vars(exit_codes).items() if name.isupper() and isinstance(v, int)}
    assert sorted(rows) == sorted(set(codes.values())), (rows, codes)
    for name, code in codes.items():
        assert f"`{name}`" in rows[code], f"the row for {code} should name `{name}`"
    assert len(set(codes.values())) == len(codes), "one code per class"


def _project_exceptions() -> set[str]:
    """Classes the project defines that derive from an exception class (by the names of their bases)."""
    out = set()
    for path in REPO.glob("*/**/*.py"):
        if any(p in path.parts for p in ("tests", ".venv", "bench")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                if any(b.endswith(("Error", "Exception")) for b in bases):
                    out.add(node.name)
    return out


def test_every_typed_error_of_the_project_has_a_class():
    defined = _project_exceptions()
    assert {"ConfigError", "ShardReadError", "ManifestError", "InsufficientResources", "HostUnreachable"} <= defined
    mapped = set(exit_codes.CLASSES) - exit_codes.NOT_DEFINED_HERE - exit_codes.RESERVED
    assert mapped <= defined, f"mapped but defined nowhere: {mapped - defined}"
    assert defined <= set(exit_codes.CLASSES), f"typed errors without an exit code: {defined - set(exit_codes.CLASSES)}"


def test_classify_unwraps_dataloader_ray_and_checkpoint_errors(tmp_path):
    from torch._utils import ExceptionWrapper

    from cluster.ray_local import InsufficientResources
    from trainer.checkpoint import resolve_checkpoint
    from trainer.data.reader import ShardReadError

    try:
        raise ShardReadError("shard /d/train/shard-000001.tar: key 'u7_0': corrupt sample")
    except ShardReadError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapped.reraise()
    except ShardReadError as e:
        assert "\n" in str(e)  # torch's message: the worker's whole traceback
        f = exit_codes.classify(e)
    assert (f.code, f.message) == (exit_codes.DATA, "shard /d/train/shard-000001.tar: key 'u7_0': corrupt sample")

    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    ray_err = WorkerGroupError(
        "Worker 1 failed: ...\nTraceback ...",
        {1: UserExceptionWithTraceback(ShardReadError("shard s.tar: bad"), "Traceback ...\nShardReadError: ...")},
    )
    f = exit_codes.classify(ray_err)
    assert (f.code, f.message) == (exit_codes.DATA, "shard s.tar: bad")

    with pytest.raises(FileNotFoundError) as info:
        resolve_checkpoint(tmp_path)
    f = exit_codes.classify(info.value)
    assert f.code == exit_codes.CHECKPOINT and f.message.startswith(f"{tmp_path}: no checkpoint")
    assert exit_codes.classify(FileNotFoundError("elsewhere")).code == exit_codes.CONFIG

    f = exit_codes.classify(RuntimeError("outer").with_traceback(None))
    assert f.code == exit_codes.CONFIG
    try:
        try:
            raise InsufficientResources("--num-workers 4 x --cpus-per-worker 1 needs 4 CPU, the cluster has 2")
        except InsufficientResources as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as e:
        assert exit_codes.classify(e).code == exit_codes.CLUSTER
    assert exit_codes.classify(TypeError("a bug")) is None


def test_eval_of_a_directory_without_a_checkpoint_exits_with_the_checkpoint_code(data, tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    code, _, err = argus_inproc(capsys, "eval", str(tmp_path / "run"), "--data", str(data))
    assert code == exit_codes.CHECKPOINT, err
    assert one_line_error(err) == (
        f"argus: error: {tmp_path / 'run'}: no checkpoint (expected a run directory with checkpoints/latest, "
        "or a checkpoint directory with meta.json)"
    )


def test_ray_eval_refuses_bad_input_before_starting_ray(data, tmp_path, capsys):
    """`argus launch ray-eval`: a missing checkpoint, or --address without --storage-path, is one line before any
    cluster work (a real Ray eval: tests/test_launch_ray.py)."""
    ray_eval = ["launch", "ray-eval", "--data", str(data), "--num-workers", "2"]
    code, _, err = argus_inproc(capsys, *ray_eval, str(tmp_path / "none"), "--local")
    assert code == exit_codes.CHECKPOINT
    assert one_line_error(err).startswith(f"argus: error: {tmp_path / 'none'}: no checkpoint")
    code, _, err = argus_inproc(capsys, *ray_eval, str(tmp_path / "none"), "--address", "auto")
    assert code == 2 and one_line_error(err) == (
        "argus: error: --storage-path: required with --address (storage the driver and every worker see)"
    )


def test_an_unreachable_host_is_one_line_with_the_cluster_code(data, tmp_path, capsys, monkeypatch):
    import launch.deepspeed_launch as dl

    def no_spawn(*a, **k):
        raise AssertionError("spawned")

    monkeypatch.setattr(dl, "_run", no_spawn)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("argus-no-such-host.invalid slots=1\n")  # ssh fails on the name (or: no ssh client)
    code, _, err = argus_inproc(
        capsys,
        "launch",
        "deepspeed",
        "configs/mini.yaml",
        f"data.path={data}",
        f"out={tmp_path / 'r'}",
        "--hostfile",
        str(hostfile),
        "--env-dir",
        str(tmp_path),
    )
    assert code == exit_codes.CLUSTER, err
    line = one_line_error(err)
    assert line.startswith(
        f"argus: error: --hostfile {hostfile}: host argus-no-such-host.invalid is not reachable by passwordless ssh ("
    )
    assert line.endswith("set up keys, or leave it out with --exclude argus-no-such-host.invalid")
    assert not (tmp_path / ".deepspeed_env").exists()


# ---- the fault drill on an existing Ray cluster ------------------------------------------------------------------
def test_the_fault_drill_reaches_the_workers_config(data, tmp_path):
    from launch.ray_launch import worker_config
    from trainer.faults import FaultSpecError, install
    from trainer.run import load_job

    cfg = load_job("configs/mini.yaml", [f"data.path={data}", f"out={tmp_path / 'run'}"], world_size=2)
    spec = f"rank=1,step=3,once={tmp_path / 'a'};rank=0,step=4,phase=checkpoint,once={tmp_path / 'b'}"
    conf = worker_config(cfg, 2, 1.0, environ={"ARGUS_FAULT_INJECT": spec})
    assert conf["fault_inject"] == spec
    assert worker_config(cfg, 2, 1.0, environ={})["fault_inject"] == ""

    # the worker arms the drill from its config, whatever its own environment says (none, on an existing cluster)
    class FakeTrainer:
        after_step = mid_checkpoint = mid_prune = None
        info = type("Info", (), {"rank": 1})()

    armed, unarmed = FakeTrainer(), FakeTrainer()
    install(armed, conf["fault_inject"])
    install(unarmed, "")
    assert armed.after_step is not None and unarmed.after_step is None

    for bad, message in (
        ("rank=1,step=3", "missing once"),
        ("rank=2,step=3,once=/x", "rank 2 does not exist with --num-workers 2"),
        ("rank=1,step=x,once=/x", "step must be a number >= 0, got 'x'"),
        ("rank=1,step=3,once=/x,phase=eval", "phase must be one of step, checkpoint, prune"),
        ("rank=1,step,once=/x", "expected key=value pairs"),
    ):
        with pytest.raises(FaultSpecError, match=message):
            worker_config(cfg, 2, 1.0, environ={"ARGUS_FAULT_INJECT": bad})
        assert exit_codes.classify(FaultSpecError(message)).code == exit_codes.CONFIG


def test_a_bad_fault_drill_is_refused_before_ray_starts(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ARGUS_FAULT_INJECT", "rank=0,step=1")
    code, _, err = argus_inproc(
        capsys,
        "launch",
        "ray",
        "configs/mini.yaml",
        f"data.path={data}",
        "--address",
        "127.0.0.1:1",  # nothing there: reaching Ray would fail differently
        "--num-workers",
        "1",
        "--storage-path",
        str(tmp_path),
    )
    assert code == exit_codes.CONFIG
    assert one_line_error(err) == "argus: error: ARGUS_FAULT_INJECT: 'rank=0,step=1': missing once"


def test_the_executable_ends_without_teardown_after_a_destroyed_group(monkeypatch):
    """`argus` (launch.cli:entry): after a command that destroyed a process group it made (eval, export), the
    process ends with os._exit and the command's exit code, output flushed; otherwise with sys.exit."""
    import launch.cli as cli
    import trainer.dist

    ended = []

    class Ended(Exception):
        pass

    def fake_exit(code):
        ended.append(("os._exit", code))
        raise Ended

    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr(trainer.dist, "left_a_group", False)
    with pytest.raises(SystemExit) as e:
        cli.entry()
    assert e.value.code == 3 and ended == []
    monkeypatch.setattr(trainer.dist, "left_a_group", True)
    with pytest.raises(Ended):
        cli.entry()
    assert ended == [("os._exit", 3)]
