"""Ray cluster plumbing shared by `argus launch ray` and `argus cluster check`: connect (or start a throw-away
local cluster), and refuse a worker request the cluster cannot fit before Ray waits on it forever."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from typing import Any, Iterator, Mapping


class InsufficientResources(RuntimeError):
    """The requested Ray workers do not fit the cluster's CPUs/GPUs; the message says what is missing."""


def check_resources(available: dict[str, float], workers: int, cpus: float, gpus: float) -> None:
    """Ray retries "worker group startup timed out" forever when a request can't fit: refuse up front
    (InsufficientResources)."""
    need = {"CPU": workers * cpus, "GPU": workers * gpus}
    for res, amount in need.items():
        if amount > available.get(res, 0.0) + 1e-9:
            raise InsufficientResources(
                f"--num-workers {workers} x --{res.lower()}s-per-worker "
                f"{cpus if res == 'CPU' else gpus:g} needs {amount:g} {res}, the cluster "
                f"has {available.get(res, 0.0):g}"
            )


def oversubscription(workers: int, cpus_per_worker: float, cpu_count: int | None = None) -> str | None:
    """What to warn about when a local cluster gives its workers more CPUs than this machine has (Ray counts
    logical CPUs: the local cluster is made as large as the request, and the workers then share cores), or None."""
    have = os.cpu_count() if cpu_count is None else cpu_count
    need = workers * cpus_per_worker
    if not have or need <= have:
        return None
    return (
        f"--num-workers {workers} x --cpus-per-worker {cpus_per_worker:g} = {need:g} CPUs, this machine has "
        f"{have}: the workers share cores (slower, not wrong)"
    )


def local_tmp_root(environ: Mapping[str, str] = os.environ) -> str:
    """Where a throw-away local cluster keeps its files: ``$RAY_TMPDIR`` when set (an existing directory), else
    /tmp (not ``$TMPDIR``: Ray's socket paths must stay under 107 bytes)."""
    root = environ.get("RAY_TMPDIR") or "/tmp"
    if not os.path.isdir(root):
        raise ValueError(f"RAY_TMPDIR={root}: not an existing directory")
    return root


def start_local_cluster(num_cpus: int, tmp: str) -> Any:
    """A throw-away single-machine cluster on loopback, no dashboard (no token: nothing else can reach it), its
    files (sockets, logs, spilled objects) under ``tmp``.

    ``ray.init()`` ignores a node address for a fresh local instance and advertises the machine's IP,
    so the head is started the way Ray's own ``cluster_utils.Cluster`` does it, at 127.0.0.2 (still
    the loopback network; Ray maps 127.0.0.1 back to the machine's IP).
    """
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_TMPDIR"] = tmp  # Ray's processes, started now, keep their files under it
    os.makedirs(os.path.join(tmp, "ray"), exist_ok=True)
    return Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={"num_cpus": num_cpus, "node_ip_address": "127.0.0.2", "include_dashboard": False},
    )


def remove_tree(path: str, attempts: int = 20) -> None:
    """Remove ``path`` whole; Ray's last processes may still be writing logs there for a moment after shutdown.
    Raises OSError if it is still there after ``attempts`` tries a quarter second apart."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return
        time.sleep(0.25)
    shutil.rmtree(path)


@contextlib.contextmanager
def ray_session(address: str | None, local_cpus: int | None = None) -> Iterator[None]:
    """Connected to the cluster at ``address`` or, with ``local_cpus``, to a throw-away local one of that many
    CPUs; disconnects on exit. A local cluster is stopped on exit, and the directory it was given (a new
    ``argus-ray-*`` under ``$RAY_TMPDIR``, else /tmp) removed, whether the session ended well or not."""
    import ray

    if local_cpus is None:
        ray.init(address=address)
        try:
            yield
        finally:
            ray.shutdown()
        return
    previous = os.environ.get("RAY_TMPDIR")
    tmp = tempfile.mkdtemp(prefix="argus-ray-", dir=local_tmp_root())
    local, finished = None, False
    try:
        local = start_local_cluster(local_cpus, tmp)
        yield
        finished = True
    finally:
        try:
            ray.shutdown()
            if local is not None:
                local.shutdown()
        finally:
            if previous is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = previous
            # after a failure, its own error is the one to report, not a leftover log file
            with contextlib.nullcontext() if finished else contextlib.suppress(OSError):
                remove_tree(tmp)
