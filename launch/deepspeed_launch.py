"""`argus launch deepspeed`: run `argus train` under the stock deepspeed launcher (`argus cluster hostfile`,
in launch/cluster_cli.py, writes its hostfile).

The launcher is used as is; argus adds what it leaves to the user: the config is validated (for the world size
the launch will have) before anything starts, OMP_NUM_THREADS is set, and a `.deepspeed_env` carries it, the
package path and the NCCL/gloo network settings to every node.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

ENV_FILE = ".deepspeed_env"  # the name deepspeed.launcher.runner looks for (in $HOME and the working directory)
# First line of every env file argus writes: an existing file without it is the user's and is never overwritten.
# (The launcher parses every line as KEY=VALUE, so a comment line would crash it.)
MARKER = "ARGUS_DEEPSPEED_ENV"
PASS_THROUGH_PREFIXES = ("NCCL_",)
PASS_THROUGH_NAMES = ("GLOO_SOCKET_IFNAME",)
SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|AUTH|CREDENTIAL", re.IGNORECASE)
# The launcher exports values as `export K=V` / `K="V"` through a shell: keep to what survives that unchanged.
_SAFE_VALUE = re.compile(r'[^"$`\\\n\r]*')
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def package_root() -> Path:
    """The directory holding the `launch` package (the repository root for a source checkout)."""
    return Path(__file__).resolve().parents[1]


# ---- resources -------------------------------------------------------------------------------------------------
def _parse_filter(spec: str, hosts: Mapping[str, list[int]], flag: str) -> dict[str, list[int]]:
    """`NAME[:SLOT[,SLOT...]][@NAME...]` (the launcher's --include/--exclude syntax) -> host -> slots ([] = all)."""
    out: dict[str, list[int]] = {}
    for part in spec.split("@"):
        name, _, slots = part.partition(":")
        if name not in hosts:
            raise ValueError(f"{flag} {spec}: host {name!r} is not in the hostfile ({', '.join(hosts)})")
        try:
            picked = sorted({int(s) for s in slots.split(",")}) if slots else []
        except ValueError:
            raise ValueError(f"{flag} {spec}: slots must be integers, got {slots!r}") from None
        bad = [s for s in picked if s not in hosts[name]]
        if bad:
            raise ValueError(f"{flag} {spec}: {name} has slots 0..{len(hosts[name]) - 1}, not {bad}")
        # Like the launcher: the union of the slots named for a host; [] (all) only if none ever are.
        out[name] = sorted(set(out.get(name, [])) | set(picked))
    return out


def resolve_resources(
    hosts: Sequence[tuple[str, int]],
    include: str | None,
    exclude: str | None,
    num_nodes: int | None,
    num_gpus: int | None,
) -> dict[str, list[int]]:
    """host -> the slots the launcher will use, by its rules (checked here so errors come before any spawn)."""
    if include and exclude:
        raise ValueError("--include and --exclude are mutually exclusive")
    if (include or exclude) and (num_nodes is not None or num_gpus is not None):
        raise ValueError("--num-nodes/--num-gpus cannot be combined with --include/--exclude")
    for flag, n in (("--num-nodes", num_nodes), ("--num-gpus", num_gpus)):
        if n is not None and n < 1:
            raise ValueError(f"{flag} must be >= 1, got {n}")
    pool = {h: list(range(n)) for h, n in hosts}
    if include:
        picked = _parse_filter(include, pool, "--include")
        # Hostfile order, not --include order: it decides which node gets the first ranks.
        pool = {h: (picked[h] or s) for h, s in pool.items() if h in picked}
    elif exclude:
        for h, s in _parse_filter(exclude, pool, "--exclude").items():
            pool[h] = [x for x in pool[h] if s and x not in s]
        pool = {h: s for h, s in pool.items() if s}
    if num_nodes is not None:
        if num_nodes > len(pool):
            raise ValueError(f"--num-nodes {num_nodes}: only {len(pool)} host(s) available")
        pool = dict(list(pool.items())[:num_nodes])
    if num_gpus is not None:
        pool = {h: list(range(num_gpus)) for h in pool}
    if not pool or not any(pool.values()):
        raise ValueError("no hosts/slots left to launch on")
    return pool


def _local_devices() -> tuple[int, bool]:
    """(slots the launcher sees on this machine, whether they are GPUs)."""
    import torch

    n = torch.cuda.device_count()
    # On CPU the launcher counts LOCAL_SIZE or NUMA nodes; 1 unless told otherwise is the common case.
    return (n, True) if n else (int(os.environ.get("LOCAL_SIZE", 0)) or 1, False)


# ---- the environment every rank gets -----------------------------------------------------------------------
def deepspeed_env(
    slots_per_node: int, gpu: bool, environ: Mapping[str, str] | None = None, cores: int | None = None
) -> dict[str, str]:
    """What `.deepspeed_env` should export: OMP_NUM_THREADS, PYTHONPATH, NCCL_*/GLOO_SOCKET_IFNAME.

    OMP_NUM_THREADS is taken from ``environ`` if set, else 1 per rank on CPU hosts (the ranks already use
    every core) and cores per node / slots on GPU hosts. Secret-looking names are never included.
    """
    environ = os.environ if environ is None else environ
    cores = cores or len(os.sched_getaffinity(0))
    env = {MARKER: "1"}
    env["OMP_NUM_THREADS"] = environ.get("OMP_NUM_THREADS") or str(
        max(1, cores // max(1, slots_per_node)) if gpu else 1
    )
    root = str(package_root())
    # Remote nodes start `python -m launch.cli` in the same directory, which need not be the repository.
    paths = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    for k in sorted(environ):
        if _passes_through(k) and not SECRET.search(k):
            env[k] = environ[k]
    return env


def _passes_through(name: str) -> bool:
    return name.startswith(PASS_THROUGH_PREFIXES) or name in PASS_THROUGH_NAMES


def format_deepspeed_env(env: Mapping[str, str]) -> str:
    """KEY=VALUE lines, checked: the launcher splits each line at the first '=' and has no comments/quoting."""
    lines = []
    for k, v in env.items():
        if not _NAME.fullmatch(k):
            raise ValueError(f"{ENV_FILE}: bad variable name {k!r}")
        if SECRET.search(k):
            raise ValueError(f"{ENV_FILE}: refusing to write {k}: the name looks like a secret")
        if not _SAFE_VALUE.fullmatch(v):
            raise ValueError(f"{ENV_FILE}: {k}: value has a newline, quote, '$', '`' or backslash")
        lines.append(f"{k}={v}\n")
    return "".join(lines)


def write_deepspeed_env(path: Path, env: Mapping[str, str]) -> Path:
    """Write ``env`` as a deepspeed env file at ``path`` (a directory means ``path/.deepspeed_env``)."""
    path = Path(path)
    if path.is_dir():
        path = path / ENV_FILE
    text = format_deepspeed_env(env)
    if path.is_file() and not path.read_text().startswith(f"{MARKER}="):
        raise ValueError(f"{path}: exists and was not written by argus; remove it or pass --env-dir DIR")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


# ---- the command ---------------------------------------------------------------------------------------------
def deepspeed_command(
    config: str,
    overrides: list[str],
    hostfile: str | None,
    include: str | None,
    exclude: str | None,
    num_gpus: int | None,
    num_nodes: int | None,
    master_addr: str | None,
    master_port: int,
    python: str,
) -> list[str]:
    """The stock launcher line: `deepspeed [...] --master_port P --module launch.cli train CONFIG overrides...`.

    ``deepspeed`` is the console script next to ``python`` (else ``python -m deepspeed.launcher.runner``,
    the same program): the launcher starts every rank with the interpreter it runs under.
    """
    script = Path(python).parent / "deepspeed"
    cmd = [str(script)] if script.is_file() else [python, "-m", "deepspeed.launcher.runner"]
    for flag, value in (
        ("--hostfile", hostfile),
        ("--include", include),
        ("--exclude", exclude),
        ("--num_nodes", num_nodes),
        ("--num_gpus", num_gpus),
        ("--master_addr", master_addr),
    ):
        if value not in (None, ""):
            cmd += [flag, str(value)]
    # The launcher appends --local_rank=N after our arguments; `argus train` accepts and drops it.
    return cmd + ["--master_port", str(master_port), "--module", "launch.cli", "train", config, *overrides]


def _run(cmd: list[str], env: dict[str, str]) -> int:
    """Run the launcher in its own process group and pass SIGINT/SIGTERM to the whole group.

    Signalling only the launcher is not enough: on one node it dies without stopping its helper, and the ranks
    would keep running (and holding their GPUs) as orphans.
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum: int, _frame: Any = None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    old = None
    with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread
        old = signal.signal(signal.SIGTERM, forward)
    try:
        try:
            rc = proc.wait()
            return 128 - rc if rc < 0 else rc  # killed by signal N: the shell's 128 + N
        except KeyboardInterrupt:
            forward(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                forward(signal.SIGKILL)
            raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def launch(
    config: str,
    overrides: Sequence[str] = (),
    *,
    hostfile: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    num_gpus: int | None = None,
    num_nodes: int | None = None,
    master_addr: str | None = None,
    master_port: int = 29500,
    python: str = sys.executable,
    env_dir: str | Path | None = None,
    dry_run: bool = False,
) -> int:
    """Validate the config, write the env file, run the deepspeed launcher; returns its exit code.

    ``env_dir`` (default: the working directory, where the launcher looks) receives `.deepspeed_env`;
    elsewhere, DS_ENV_FILE points the launcher at it. Ranks run in the current working directory.
    """
    from cluster.hostfile import check_reachable, parse_hostfile
    from trainer.run import load_job

    overrides = list(overrides)
    if hostfile is not None:
        # The launcher silently runs on this machine alone when the hostfile is missing: refuse instead.
        hosts = parse_hostfile(hostfile)
        gpu = _local_devices()[1]
    else:
        if num_nodes is not None and num_nodes > 1:
            raise ValueError(f"--num-nodes {num_nodes} needs a --hostfile listing the nodes")
        n, gpu = _local_devices()
        if gpu and num_gpus is not None and num_gpus > n:
            raise ValueError(f"--num-gpus {num_gpus}: this machine has {n} GPU(s)")
        hosts = [("localhost", n)]
    pool = resolve_resources(hosts, include, exclude, num_nodes, num_gpus)
    world = sum(len(s) for s in pool.values())
    load_job(config, overrides, world_size=world)  # a one-line ConfigError naming the key, before any spawn
    if hostfile is not None and not dry_run:
        check_reachable(list(pool), hostfile)  # one line naming the host, not the launcher's chained traceback

    cmd = deepspeed_command(
        config, overrides, hostfile, include, exclude, num_gpus, num_nodes, master_addr, master_port, python
    )
    env = deepspeed_env(max(len(s) for s in pool.values()), gpu)
    env_file = (Path(env_dir) if env_dir is not None else Path.cwd()) / ENV_FILE
    held = sorted(k for k in os.environ if _passes_through(k) and SECRET.search(k))
    if held:
        print(f"not exported to other nodes (names look like secrets): {', '.join(held)}", file=sys.stderr)
    print(shlex.join(cmd), flush=True)
    if dry_run:
        print(f"# {env_file} ({world} ranks on {len(pool)} node(s))\n{format_deepspeed_env(env)}", end="", flush=True)
        return 0
    write_deepspeed_env(env_file, env)
    proc_env = {**os.environ, **env}  # the file only reaches other nodes; ranks on this one inherit this env
    if env_file.resolve().parent != Path.cwd().resolve():
        # An absolute DS_ENV_FILE wins over both of the launcher's search directories.
        proc_env["DS_ENV_FILE"] = str(env_file.resolve())
    return _run(cmd, proc_env)


# ---- CLI -----------------------------------------------------------------------------------------------------
def cmd_launch_deepspeed(a: argparse.Namespace) -> int:
    return launch(
        a.config,
        a.overrides,
        hostfile=a.hostfile,
        include=a.include,
        exclude=a.exclude,
        num_gpus=a.num_gpus,
        num_nodes=a.num_nodes,
        master_addr=a.master_addr,
        master_port=a.master_port,
        env_dir=a.env_dir,
        dry_run=a.dry_run,
    )


def add_launch_deepspeed(launch_sub: Any) -> None:
    """Add `deepspeed` to the sub-parsers of `argus launch`."""
    p = launch_sub.add_parser("deepspeed", help="run `argus train` under the deepspeed launcher (one or more nodes)")
    p.add_argument("config", help="YAML run config, e.g. configs/mini.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for `argus train`")
    p.add_argument("--hostfile", help="'host slots=N' lines (`argus cluster hostfile`); default: this machine")
    p.add_argument("--include", help="launcher syntax: host1@host2:0,2 (not with --num-*)")
    p.add_argument("--exclude", help="launcher syntax: host1:0 (not with --num-*)")
    p.add_argument("--num-gpus", type=int, help="ranks per node (on CPU too)")
    p.add_argument("--num-nodes", type=int, help="use the first N hosts of the hostfile")
    p.add_argument("--master-addr", help="rank 0's address (default: the launcher's choice)")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--env-dir", help=f"where to write {ENV_FILE} (default: the working directory)")
    p.add_argument("--dry-run", action="store_true", help=f"print the command and {ENV_FILE}; run nothing")
    p.set_defaults(func=cmd_launch_deepspeed)
