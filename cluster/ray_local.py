"""Ray cluster plumbing shared by `argus launch ray` and `argus cluster check`: connect (or start a throw-away
local cluster), and refuse a worker request the cluster cannot fit before Ray waits on it forever."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterator


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


def start_local_cluster(num_cpus: int) -> Any:
    """A throw-away single-machine cluster on loopback, no dashboard (no token: nothing else can reach it).

    ``ray.init()`` ignores a node address for a fresh local instance and advertises the machine's IP,
    so the head is started the way Ray's own ``cluster_utils.Cluster`` does it, at 127.0.0.2 (still
    the loopback network; Ray maps 127.0.0.1 back to the machine's IP).
    """
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = tempfile.mkdtemp(prefix="argus-ray-", dir="/tmp")  # Ray's socket paths must stay short
    os.environ["RAY_TMPDIR"] = tmp
    os.makedirs(os.path.join(tmp, "ray"), exist_ok=True)
    return Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={"num_cpus": num_cpus, "node_ip_address": "127.0.0.2", "include_dashboard": False},
    )


@contextlib.contextmanager
def ray_session(address: str | None, local_cpus: int | None = None) -> Iterator[None]:
    """Connected to the cluster at ``address`` or, with ``local_cpus``, to a throw-away local one of that many
    CPUs; disconnects (and stops the local cluster) on exit."""
    import ray

    local = start_local_cluster(local_cpus) if local_cpus is not None else None
    if local is None:
        ray.init(address=address)
    try:
        yield
    finally:
        ray.shutdown()
        if local is not None:
            local.shutdown()
