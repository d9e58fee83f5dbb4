"""Hostfiles for the deepspeed launcher (MPI style, ``host slots=N`` per line): write, parse, and build
them from a plain node list or from the alive nodes of a running Ray cluster."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, Callable, Sequence

Hosts = list[tuple[str, int]]

# Hostnames and IPv4 addresses; IPv6 is out because the launcher's --include syntax uses ':' for slots.
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class HostUnreachable(RuntimeError):
    """A hostfile host that passwordless ssh cannot reach; the message names the host and what ssh said."""


LOCAL_HOSTS = ("localhost", "127.0.0.1")


def ssh_check(host: str, run: Callable[..., Any] = subprocess.run, timeout: float = 30) -> str | None:
    """Why passwordless ssh to ``host`` fails (ssh's last line of stderr), or None when it works: the check the
    deepspeed launcher makes (``ssh -o PasswordAuthentication=no HOST hostname``), without a prompt."""
    cmd = ["ssh", "-o", "PasswordAuthentication=no", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", host, "hostname"]
    try:
        done = run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return "no ssh client on this machine"
    except subprocess.TimeoutExpired:
        return f"no answer in {timeout:g} s"
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in (done.stderr or "").splitlines() if line.strip()]
    return lines[-1] if lines else f"ssh exited with {done.returncode}"


def check_reachable(hosts: Sequence[str], hostfile: str | Path, run: Callable[..., Any] = subprocess.run) -> None:
    """Refuse (HostUnreachable) a multi-node launch with a host ssh cannot reach, naming it, before the deepspeed
    launcher fails on it with a chained traceback (it checks only the first host; the others fail later). A lone
    ``localhost`` is not checked: the launcher runs it without ssh."""
    if len(hosts) == 1 and hosts[0] in LOCAL_HOSTS:
        return
    for host in hosts:
        why = ssh_check(host, run)
        if why is not None:
            raise HostUnreachable(
                f"--hostfile {hostfile}: host {host} is not reachable by passwordless ssh ({why}); the deepspeed "
                f"launcher starts each node's ranks over ssh: set up keys, or leave it out with --exclude {host}"
            )


def _check_host(host: str, slots: int, where: str, seen: set[str]) -> None:
    if not _HOST.fullmatch(host):
        raise ValueError(f"{where}: bad host name {host!r}")
    if slots < 1:
        raise ValueError(f"{where}: {host}: slots must be >= 1, got {slots}")
    if host in seen:
        # The deepspeed launcher refuses duplicates too, but only after it has started.
        raise ValueError(f"{where}: host {host} listed twice")
    seen.add(host)


def _slots(text: str, where: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"{where}: slots must be an integer, got {text!r}") from None
    if n < 1:
        raise ValueError(f"{where}: slots must be >= 1, got {n}")
    return n


def _lines(path: str | Path) -> list[tuple[int, str]]:
    """(line number, content without comment) for every non-empty line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: file not found")
    out = []
    for no, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if line:
            out.append((no, line))
    return out


def write_hostfile(hosts: Hosts, path: str | Path) -> Path:
    """Write ``host slots=N`` lines (the deepspeed/MPI hostfile format); returns the path."""
    if not hosts:
        raise ValueError(f"{path}: no hosts to write")
    seen: set[str] = set()
    for host, slots in hosts:
        _check_host(host, int(slots), str(path), seen)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(f"{host} slots={int(slots)}\n" for host, slots in hosts))
    return p


def parse_hostfile(path: str | Path) -> Hosts:
    """Read and validate a deepspeed hostfile; errors name ``file:line``."""
    hosts: Hosts = []
    seen: set[str] = set()
    for no, line in _lines(path):
        where = f"{path}:{no}"
        m = re.fullmatch(r"(\S+)\s+slots=(\S+)", line)
        if not m:
            raise ValueError(f"{where}: expected 'HOST slots=N', got {line!r}")
        slots = _slots(m.group(2), where)
        _check_host(m.group(1), slots, where, seen)
        hosts.append((m.group(1), slots))
    if not hosts:
        raise ValueError(f"{path}: no hosts (every line is blank or a comment)")
    return hosts


def hosts_from_nodes_file(path: str | Path, default_slots: int | None) -> Hosts:
    """A plain node list: one host per line as ``host``, ``host slots=N`` or ``host:N``; ``#`` comments.

    Hosts without a slot count get ``default_slots``; if that is None they are an error.
    """
    hosts: Hosts = []
    seen: set[str] = set()
    for no, line in _lines(path):
        where = f"{path}:{no}"
        parts = line.split()
        if len(parts) == 2 and parts[1].startswith("slots="):
            host, slots = parts[0], _slots(parts[1][len("slots=") :], where)
        elif len(parts) == 1 and ":" in parts[0]:
            host, n = parts[0].split(":", 1)
            slots = _slots(n, where)
        elif len(parts) == 1:
            if default_slots is None:
                raise ValueError(f"{where}: no slot count for {parts[0]}; write '{parts[0]} slots=N' or pass --slots")
            host, slots = parts[0], default_slots
        else:
            raise ValueError(f"{where}: expected 'HOST', 'HOST slots=N' or 'HOST:N', got {line!r}")
        _check_host(host, slots, where, seen)
        hosts.append((host, slots))
    if not hosts:
        raise ValueError(f"{path}: no hosts (every line is blank or a comment)")
    return hosts


def _node_slots(node: dict[str, Any]) -> int:
    res = node.get("Resources", {})
    return int(res.get("GPU") or res.get("CPU") or 0)


def hosts_from_ray(address: str | None, slots: int | None) -> Hosts:
    """The alive nodes of a running Ray cluster, head node first.

    Slots are ``slots`` if given, else each node's GPUs (CPUs on GPU-less nodes). Uses the current Ray
    connection if there is one; otherwise connects to ``address`` (None: ``"auto"``, i.e. RAY_ADDRESS or
    the cluster started on this machine; never a new local instance) and disconnects afterwards.
    """
    import logging

    import ray

    own = not ray.is_initialized()
    if own:
        try:
            ray.init(address=address or "auto", logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as e:
            raise RuntimeError(f"no Ray cluster at {address or 'auto'}: {e}") from None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    finally:
        if own:
            ray.shutdown()
    # Head first: without --master_addr the deepspeed launcher makes the first host rank 0's node.
    nodes.sort(key=lambda n: ("node:__internal_head__" not in n.get("Resources", {}), n["NodeManagerAddress"]))
    merged: dict[str, int] = {}
    for n in nodes:
        addr = n["NodeManagerAddress"]
        # Several Ray nodes on one machine are one launcher host: add up their resources.
        merged[addr] = slots if slots is not None else merged.get(addr, 0) + _node_slots(n)
    hosts = [(h, s) for h, s in merged.items() if s > 0]
    if not hosts:
        raise RuntimeError("the Ray cluster has no alive node with GPUs or CPUs")
    return hosts
