"""`argus launch deepspeed` / `argus cluster hostfile`: hostfiles, the launcher line, .deepspeed_env, config checks
before any spawn, a real 2-rank run under the deepspeed launcher, Ray node discovery, the shell wrappers."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import TINY_MODEL, argus_inproc, losses

from cluster.hostfile import hosts_from_nodes_file, hosts_from_ray, parse_hostfile, write_hostfile
from launch import deepspeed_launch as dl
from launch.cli import build_parser
from launch.cli import main as argus_main
from launch.cluster_cli import cmd_cluster_hostfile

REPO = Path(__file__).resolve().parents[1]
DS = str(Path(sys.executable).parent / "deepspeed")
TINY = [*TINY_MODEL, "data.num_workers=1", "optim.warmup_steps=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runner():
    """The deepspeed launcher's own parsing code: what ours must agree with."""
    from deepspeed.launcher import runner

    return runner


# ---- hostfiles -----------------------------------------------------------------------------------------------
def test_hostfile_round_trip_and_the_launcher_reads_it(tmp_path, runner):
    hosts = [("node-1", 8), ("10.0.0.2", 4), ("gpu.example.org", 1)]
    path = write_hostfile(hosts, tmp_path / "sub" / "hostfile")
    assert path.read_text() == "node-1 slots=8\n10.0.0.2 slots=4\ngpu.example.org slots=1\n"
    assert parse_hostfile(path) == hosts
    assert list(runner.fetch_hostfile(str(path)).items()) == hosts
    # comments and blank lines are fine in a hand-written hostfile
    path.write_text("# rack 1\nnode-1 slots=8   # the head\n\n  node-2 slots=2\n")
    assert parse_hostfile(path) == [("node-1", 8), ("node-2", 2)]
    with pytest.raises(ValueError, match="listed twice"):
        write_hostfile([("a", 1), ("a", 2)], tmp_path / "dup")


def test_nodes_file_with_comments_slots_and_default(tmp_path):
    nodes = tmp_path / "nodes.txt"
    nodes.write_text("# the allocation\n\nnode-a\nnode-b slots=4   # fat node\nnode-c:2\n   node-d  \n")
    assert hosts_from_nodes_file(nodes, 8) == [("node-a", 8), ("node-b", 4), ("node-c", 2), ("node-d", 8)]
    with pytest.raises(ValueError, match=rf"^{nodes}:3: no slot count for node-a; .*--slots"):
        hosts_from_nodes_file(nodes, None)


@pytest.mark.parametrize(
    "kind,text,message",
    [
        ("hostfile", "a slots=2\nb slots=x\n", ":2: slots must be an integer, got 'x'"),
        ("hostfile", "a slots=2\n\nb\n", ":3: expected 'HOST slots=N', got 'b'"),
        ("hostfile", "a slots=2\nb slots=0\n", ":2: slots must be >= 1, got 0"),
        ("hostfile", "# only\n\n", ": no hosts"),
        ("hostfile", "a slots=1\nb slots=1\na slots=2\n", ":3: host a listed twice"),
        ("hostfile", "a/b slots=1\n", ":1: bad host name 'a/b'"),
        ("nodes", "a\nb c d\n", ":2: expected 'HOST', 'HOST slots=N' or 'HOST:N', got 'b c d'"),
        ("nodes", "a\n# x\nb:zero\n", ":3: slots must be an integer, got 'zero'"),
        ("nodes", "a slots=-1\n", ":1: slots must be >= 1, got -1"),
        ("nodes", "a\nb\na:4\n", ":3: host a listed twice"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, kind, text, message):
    path = tmp_path / kind
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        parse_hostfile(path) if kind == "hostfile" else hosts_from_nodes_file(path, 1)
    assert str(e.value).startswith(f"{path}{message}"), e.value


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: file not found"):
        parse_hostfile(tmp_path / "nope")


# ---- the launcher line and its resources ---------------------------------------------------------------------
TRAIN = ["--module", "launch.cli", "train", "configs/mini.yaml", "out=r", "train.steps=3"]


@pytest.mark.parametrize(
    "kw,expected",
    [
        (dict(num_gpus=2), [DS, "--num_gpus", "2", "--master_port", "29500", *TRAIN]),
        (
            dict(hostfile="hf", num_nodes=2, num_gpus=8, master_addr="10.0.0.1", master_port=29600),
            [
                DS,
                "--hostfile",
                "hf",
                "--num_nodes",
                "2",
                "--num_gpus",
                "8",
                "--master_addr",
                "10.0.0.1",
                "--master_port",
                "29600",
                *TRAIN,
            ],
        ),
        (
            dict(hostfile="hf", include="a@b:0,2"),
            [DS, "--hostfile", "hf", "--include", "a@b:0,2", "--master_port", "29500", *TRAIN],
        ),
        (
            dict(hostfile="hf", exclude="b:1"),
            [DS, "--hostfile", "hf", "--exclude", "b:1", "--master_port", "29500", *TRAIN],
        ),
        (dict(), [DS, "--master_port", "29500", *TRAIN]),
    ],
    ids=["num_gpus", "hostfile-nodes-gpus-addr", "include", "exclude", "bare"],
)
def test_deepspeed_command(kw, expected, runner):
    args = (
        dict(
            hostfile=None,
            include=None,
            exclude=None,
            num_gpus=None,
            num_nodes=None,
            master_addr=None,
            master_port=29500,
            python=sys.executable,
        )
        | kw
    )
    cmd = dl.deepspeed_command("configs/mini.yaml", ["out=r", "train.steps=3"], **args)
    assert cmd == expected
    # the launcher itself reads it as intended (catches misspelt flags)
    a = runner.parse_args(cmd[1:])
    assert (
        a.module
        and a.user_script == "launch.cli"
        and a.user_args == ["train", "configs/mini.yaml", "out=r", "train.steps=3"]
    )
    assert (a.hostfile, a.num_gpus, a.include) == (
        kw.get("hostfile", "/job/hostfile"),
        kw.get("num_gpus", -1),
        kw.get("include", ""),
    )


def test_deepspeed_command_without_console_script(tmp_path):
    py = str(tmp_path / "bin" / "python")
    assert dl.deepspeed_command("c.yaml", [], None, None, None, 2, None, None, 29501, py) == [
        py,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        "29501",
        "--module",
        "launch.cli",
        "train",
        "c.yaml",
    ]


@pytest.mark.parametrize(
    "include,exclude,num_nodes,num_gpus",
    [
        ("b@a:1", None, None, None),
        ("a:0,1@c", None, None, None),
        ("a:1@a:0", None, None, None),
        (None, "b", None, None),
        (None, "a:0@c:1,2", None, None),
        (None, None, 2, None),
        (None, None, None, 1),
        (None, None, 1, 3),
        (None, None, None, None),
    ],
)
def test_resources_match_the_launcher(runner, include, exclude, num_nodes, num_gpus):
    hosts = [("a", 2), ("b", 4), ("c", 3)]
    ours = dl.resolve_resources(hosts, include, exclude, num_nodes, num_gpus)
    theirs = runner.apply_num_nodes_and_gpus(
        runner.parse_inclusion_exclusion(dict(hosts), include or "", exclude or ""), num_nodes or -1, num_gpus or -1
    )
    assert list(ours.items()) == list(theirs.items())


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(include="a", exclude="b"), "mutually exclusive"),
        (dict(include="a", num_gpus=1), "cannot be combined"),
        (dict(include="z"), "host 'z' is not in the hostfile"),
        (dict(include="a:5"), "a has slots 0..1, not [5]"),
        (dict(num_nodes=4), "--num-nodes 4: only 2 host(s)"),
        (dict(exclude="a@b"), "no hosts/slots left"),
    ],
)
def test_bad_resource_requests(kw, message):
    args = dict(include=None, exclude=None, num_nodes=None, num_gpus=None) | kw
    with pytest.raises(ValueError) as e:
        dl.resolve_resources([("a", 2), ("b", 2)], **args)
    assert message in str(e.value)


# ---- .deepspeed_env ------------------------------------------------------------------------------------------
def read_env(path: Path) -> dict[str, str]:
    # exactly how deepspeed.launcher.runner reads it: every line is KEY=VALUE
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def test_deepspeed_env_content_and_no_secrets(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")
    monkeypatch.setenv("PYTHONPATH", "/opt/extra")
    secrets = {
        "NCCL_AUTH_TOKEN": "s3cr3t-1",
        "NCCL_IB_PKEY_SECRET": "s3cr3t-2",
        "RAY_AUTH_TOKEN": "s3cr3t-3",
        "MY_PASSWORD": "s3cr3t-4",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-5",
        "NCCL_API_KEY": "s3cr3t-6",
    }
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    path = dl.write_deepspeed_env(tmp_path, dl.deepspeed_env(2, gpu=False))
    assert path == tmp_path / ".deepspeed_env"
    env = read_env(path)
    assert env["OMP_NUM_THREADS"] == "1"  # CPU host: one thread per rank
    assert env["PYTHONPATH"] == f"{REPO}:/opt/extra"
    assert (env["NCCL_SOCKET_IFNAME"], env["NCCL_DEBUG"], env["GLOO_SOCKET_IFNAME"]) == ("eth0", "WARN", "eth1")
    assert not any(dl.SECRET.search(k) for k in env)
    assert not any(v in path.read_text() for v in secrets.values())
    # GPU hosts: cores / slots; an explicit OMP_NUM_THREADS wins
    assert dl.deepspeed_env(8, gpu=True, environ={}, cores=64)["OMP_NUM_THREADS"] == "8"
    assert dl.deepspeed_env(8, gpu=True, environ={}, cores=4)["OMP_NUM_THREADS"] == "1"
    assert dl.deepspeed_env(2, gpu=False, environ={"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"
    # the writer refuses secrets and values the launcher's shell export would mangle
    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN: the name looks like a secret"):
        dl.write_deepspeed_env(tmp_path, {"RAY_AUTH_TOKEN": "x"})
    with pytest.raises(ValueError, match="NCCL_X: value has"):
        dl.write_deepspeed_env(tmp_path, {"NCCL_X": "a$HOME"})
    assert read_env(path)["OMP_NUM_THREADS"] == "1", "failed writes leave the file alone"


def test_env_file_never_overwrites_a_users_file(tmp_path):
    mine = tmp_path / ".deepspeed_env"
    mine.write_text("FOO=bar\n")
    with pytest.raises(ValueError, match="not written by argus"):
        dl.write_deepspeed_env(tmp_path, {"OMP_NUM_THREADS": "1"})
    assert mine.read_text() == "FOO=bar\n"
    mine.unlink()
    dl.write_deepspeed_env(mine, dl.deepspeed_env(1, gpu=False, environ={}))
    dl.write_deepspeed_env(mine, dl.deepspeed_env(1, gpu=False, environ={"OMP_NUM_THREADS": "2"}))
    assert read_env(mine)["OMP_NUM_THREADS"] == "2"


# ---- CLI: dry run, checks before any spawn -------------------------------------------------------------------
@pytest.fixture
def run_cli(monkeypatch, capsys):
    """`argus launch deepspeed ARGS` in this process (the entry point `argus` will call); -> (rc, out, err)."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def run(*args: str) -> argparse.Namespace:
        rc = argus_main(["launch", "deepspeed", *args])
        out = capsys.readouterr()
        return argparse.Namespace(returncode=rc, stdout=out.out, stderr=out.err)

    return run


def test_dry_run_prints_command_and_env(data, tmp_path, run_cli):
    run = tmp_path / "run"
    over = [f"data.path={data}", *TINY, f"out={run}"]
    out = run_cli(
        "configs/mini.yaml", *over, "--num-gpus", "2", "--master-port", "29611", "--dry-run", "--env-dir", str(tmp_path)
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == shlex.join(
        [DS, "--num_gpus", "2", "--master_port", "29611", "--module", "launch.cli", "train", "configs/mini.yaml", *over]
    )
    assert lines[1] == f"# {tmp_path / '.deepspeed_env'} (2 ranks on 1 node(s))"
    assert "ARGUS_DEEPSPEED_ENV=1" in lines and "OMP_NUM_THREADS=1" in lines
    assert not (tmp_path / ".deepspeed_env").exists() and not run.exists(), "a dry run writes nothing"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["model.n_laers=3"], "unknown config key model.n_laers"),
        # validated for the launch's world size (2 ranks): 4 x 2 = 8, not 4
        (["train.global_batch_size=4"], "train.global_batch_size: 4 != data.batch_size"),
    ],
)
def test_bad_config_fails_before_spawning(data, tmp_path, run_cli, extra, message):
    out = run_cli(
        "configs/mini.yaml",
        f"data.path={data}",
        *TINY,
        f"out={tmp_path / 'r'}",
        *extra,
        "--num-gpus",
        "2",
        "--env-dir",
        str(tmp_path),
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("argus: error: ") and message in lines[0], out.stderr
    assert out.stdout == "" and not (tmp_path / ".deepspeed_env").exists() and not (tmp_path / "r").exists()


def test_nothing_is_spawned_for_bad_configs_or_hostfiles(data, tmp_path, monkeypatch):
    def no_spawn(*a, **k):
        raise AssertionError("spawned")

    monkeypatch.setattr(dl.subprocess, "Popen", no_spawn)
    over = [f"data.path={data}", *TINY, f"out={tmp_path / 'r'}"]
    with pytest.raises(ValueError, match="model.n_laers"):
        dl.launch("configs/mini.yaml", [*over, "model.n_laers=3"], num_gpus=2, env_dir=tmp_path)
    with pytest.raises(ValueError, match="train.global_batch_size"):  # 3 ranks x 4 != 8
        dl.launch("configs/mini.yaml", [*over, "train.global_batch_size=8"], num_gpus=3, env_dir=tmp_path)
    # the launcher itself would silently fall back to this machine alone
    with pytest.raises(FileNotFoundError, match="nope: file not found"):
        dl.launch("configs/mini.yaml", over, hostfile=str(tmp_path / "nope"), env_dir=tmp_path)
    with pytest.raises(ValueError, match="--num-nodes 2 needs a --hostfile"):
        dl.launch("configs/mini.yaml", over, num_nodes=2, env_dir=tmp_path)
    assert not (tmp_path / ".deepspeed_env").exists()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_reaches_the_launchers_children(tmp_path):
    """SIGTERM to argus stops the launcher's whole process group, grandchildren (the ranks) included."""
    pidfile = tmp_path / "pid"
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    rc = dl._run(["bash", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], dict(os.environ))
    timer.join()
    assert rc == 128 + signal.SIGTERM
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = alive(grandchild)
    if left:
        os.kill(grandchild, signal.SIGKILL)
    assert not left, "the launcher's child outlived it"
    assert signal.getsignal(signal.SIGTERM) == before, "handler restored"


# ---- a real run ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_run_on_two_cpu_ranks_matches_torchrun(data, tmp_path, monkeypatch, capfd, torchrun_run):
    """`argus launch deepspeed` on 2 CPU ranks == the real torchrun (the session's 2-rank run, same config)."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the env argus builds must supply it
    monkeypatch.setenv("PYTHONUNBUFFERED", "1")
    stray = (REPO / ".deepspeed_env").exists()
    common = ["configs/mini.yaml", f"data.path={data}", *TINY, "train.steps=3"]
    rc = dl.launch(
        common[0], [*common[1:], f"out={tmp_path / 'ds'}"], num_gpus=2, master_port=free_port(), env_dir=tmp_path
    )
    log = capfd.readouterr()
    assert rc == 0, (log.out + log.err)[-3000:]
    assert log.out.splitlines()[0].startswith(f"{DS} --num_gpus 2 --master_port ")
    assert read_env(tmp_path / ".deepspeed_env")["OMP_NUM_THREADS"] == "1"
    assert (REPO / ".deepspeed_env").exists() == stray, "nothing left in the repository"
    ds, ref = losses(tmp_path / "ds"), losses(torchrun_run)
    assert sorted(ds) == [1, 2, 3]
    assert ds == ref

    # `argus eval` under the stock deepspeed launcher (2 ranks, it appends --local_rank=N) prints what one plain
    # process prints: the ranking metrics exactly, NE to its fp32 sums
    evaluate = ["eval", str(tmp_path / "ds"), "--data", str(data), "--json"]
    out = subprocess.run(
        [DS, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "launch.cli", *evaluate],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = out.stdout.splitlines()  # the launcher's own log lines around rank 0's JSON
    launched = json.loads("\n".join(lines[lines.index("{") : lines.index("}") + 1]))
    code, plain, err = argus_inproc(capfd, *evaluate)
    assert code == 0, err[-2000:]
    plain = json.loads(plain)
    assert [launched.pop("cost")["ranks"], plain.pop("cost")["ranks"]] == [2, 1]
    assert launched == {**plain, **{k: pytest.approx(v, rel=1e-6) for k, v in plain.items() if k.startswith("ne/")}}


# ---- Ray -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_hosts_from_a_running_ray_cluster(tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    short = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay under 107 characters
    monkeypatch.setenv("RAY_TMPDIR", short)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=short, log_to_driver=False)
    try:
        ip = ray.util.get_node_ip_address()
        assert hosts_from_ray(None, None) == [(ip, 2)]  # CPU-only node: slots = CPUs
        assert hosts_from_ray(None, 4) == [(ip, 4)]
        assert ray.is_initialized(), "an existing connection is left alone"
        a = argparse.Namespace(address=None, nodes_file=None, slots=None, out=str(tmp_path / "hf"))
        assert cmd_cluster_hostfile(a) == 0
        assert parse_hostfile(tmp_path / "hf") == [(ip, 2)]
    finally:
        ray.shutdown()
        shutil.rmtree(short, ignore_errors=True)


def test_hosts_from_ray_connects_filters_and_orders(monkeypatch):
    """Without a connection: init at the address, alive nodes only, head first, GPUs before CPUs, shutdown."""
    import ray

    calls = []
    nodes = [
        {"Alive": True, "NodeManagerAddress": "10.0.0.3", "Resources": {"CPU": 32.0, "GPU": 8.0}},
        {"Alive": False, "NodeManagerAddress": "10.0.0.4", "Resources": {"CPU": 32.0, "GPU": 8.0}},
        {"Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 16.0}},
        {"Alive": True, "NodeManagerAddress": "10.0.0.9", "Resources": {"CPU": 8.0, "node:__internal_head__": 1.0}},
        {"Alive": True, "NodeManagerAddress": "10.0.0.5", "Resources": {"CPU": 0.0}},  # no slots: left out
    ]
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: calls.append(("init", address)))
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append(("shutdown",)))
    assert hosts_from_ray("10.0.0.9:6379", None) == [("10.0.0.9", 8), ("10.0.0.2", 16), ("10.0.0.3", 8)]
    assert calls == [("init", "10.0.0.9:6379"), ("shutdown",)]
    calls.clear()
    assert hosts_from_ray(None, 2) == [("10.0.0.9", 2), ("10.0.0.2", 2), ("10.0.0.3", 2), ("10.0.0.5", 2)]
    assert calls == [("init", "auto"), ("shutdown",)], "never starts a new local instance"


def test_cluster_hostfile_from_nodes_file(tmp_path, capsys):
    p = build_parser()
    (tmp_path / "nodes").write_text("n1\nn2:4\n")
    a = p.parse_args(
        ["cluster", "hostfile", "--nodes-file", str(tmp_path / "nodes"), "--slots", "2", "--out", str(tmp_path / "hf")]
    )
    assert a.func(a) == 0
    assert (tmp_path / "hf").read_text() == "n1 slots=2\nn2 slots=4\n"
    assert "2 host(s), 6 slots" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # one source only
        p.parse_args(["cluster", "hostfile", "--nodes-file", "x", "--address", "auto"])


# ---- shell wrappers ------------------------------------------------------------------------------------------
def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (d / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (d / name).chmod(0o755)
    return d


ECHO = 'echo "OMP=$OMP_NUM_THREADS PYTHONPATH=$PYTHONPATH"; printf "%s\\n" "$@"'


def test_shell_scripts_parse():
    for s in ("launch/deepspeed.sh", "launch/torchrun.sh", "cluster/slurm/argus.sbatch"):
        out = subprocess.run(["bash", "-n", str(REPO / s)], capture_output=True, text=True)
        assert out.returncode == 0, (s, out.stderr)
        assert os.access(REPO / s, os.X_OK), s
    sbatch = (REPO / "cluster/slurm/argus.sbatch").read_text()
    for opt in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--cpus-per-task=", "--time=", "--output="):
        assert f"#SBATCH {opt}" in sbatch, opt
    assert "srun --kill-on-bad-exit=1 launch/torchrun.sh configs/medium.yaml" in sbatch


def test_torchrun_sh_under_slurm_and_outside(tmp_path):
    # a big allocation: scontrol keeps writing after `head -n1` has gone (SIGPIPE under pipefail)
    scontrol = '[ "$*" = "show hostnames gpu[01-02]" ] && printf "gpu%02d\\n" $(seq 1 20000)'
    bin_ = fake_bin(
        tmp_path,
        torchrun=ECHO,
        scontrol=scontrol,
        **{"nvidia-smi": 'printf "GPU 0: H100\\nGPU 1: H100\\nGPU 2: H100\\nGPU 3: H100\\n"'},
    )
    base = {"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path)}
    slurm = {
        **base,
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "77",
        "SLURM_CPUS_PER_TASK": "32",
    }
    out = subprocess.run(
        [str(REPO / "launch/torchrun.sh"), "configs/medium.yaml", "out=r"],
        env=slurm,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    head, *args = out.stdout.splitlines()
    assert head == f"OMP=8 PYTHONPATH={REPO}"
    assert args == [
        "--nnodes",
        "2",
        "--nproc_per_node",
        "4",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "gpu01:29500",
        "--rdzv_id",
        "77",
        "-m",
        "launch.cli",
        "train",
        "configs/medium.yaml",
        "out=r",
    ]
    # no SLURM, no GPUs: one node, one rank, this host; explicit settings win
    (bin_ / "nvidia-smi").unlink()
    (bin_ / "scontrol").unlink()
    out = subprocess.run(
        [str(REPO / "launch/torchrun.sh"), "c.yaml"],
        capture_output=True,
        text=True,
        env={**base, "MASTER_PORT": "29555", "OMP_NUM_THREADS": "3"},
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    head, *args = out.stdout.splitlines()
    assert head.startswith("OMP=3 ")
    assert (
        args[:9]
        == [
            "--nnodes",
            "1",
            "--nproc_per_node",
            "1",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"{socket.gethostname()}:29555",
            "--rdzv_id",
        ]
        and args[9] == "argus"
    )


def test_deepspeed_sh_passes_hostfile_and_sets_omp(tmp_path):
    hf = write_hostfile([("a", 1), ("b", 2)], tmp_path / "hostfile")
    base = {"PATH": f"{fake_bin(tmp_path, argus=ECHO)}:/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [str(REPO / "launch/deepspeed.sh"), str(hf), "configs/mini.yaml", "out=r", "--dry-run"],
        env=base,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    head, *args = out.stdout.splitlines()
    assert head.startswith(f"OMP={max(1, len(os.sched_getaffinity(0)) // 2)} ")
    assert args == ["launch", "deepspeed", "configs/mini.yaml", "out=r", "--dry-run", "--hostfile", str(hf)]
    # no `argus` on PATH: the package through $PYTHON -m launch.cli, found via PYTHONPATH
    (tmp_path / "bin" / "argus").unlink()
    fake_bin(tmp_path, py=ECHO)
    out = subprocess.run(
        [str(REPO / "launch/deepspeed.sh"), str(hf), "c.yaml"],
        capture_output=True,
        text=True,
        env={**base, "PYTHON": str(tmp_path / "bin" / "py"), "OMP_NUM_THREADS": "5"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"OMP=5 PYTHONPATH={REPO}",
        "-m",
        "launch.cli",
        "launch",
        "deepspeed",
        "c.yaml",
        "--hostfile",
        str(hf),
    ]
    assert subprocess.run([str(REPO / "launch/deepspeed.sh"), str(hf)], capture_output=True).returncode == 2
