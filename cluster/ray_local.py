"""Ray cluster plumbing shared by `argus launch ray` and `argus cluster check`: connect (or start a throw-away
local cluster), and refuse a worker request the cluster cannot fit before Ray waits on it forever."""

from __future__ import annotations

import contextlib
import logging
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


# Lines Ray forwards from its processes that are not actionable: Ray Train's placement-group cleaner polls the
# State API, which needs the dashboard (off on `--local` clusters), once a second; Ray's core worker warns about
# its own PreemptionWatcher actor; Ray Train logs every rank's report and the pointer directory it stores for
# each checkpoint (`argus checkpoint list RUN` lists the checkpoints themselves); fbgemm_gpu (in workers started
# before argus's filter: trainer/logger.py) lists every library it loads and dumps each embedding kernel's
# arguments.
RAY_CHATTER: tuple[str, ...] = (
    "Failed to query Ray Train Controller actor state",
    "Actor with class name: 'PreemptionWatcher'",
    "Reporting training result ",
    "Checkpoint successfully created at: ",
    "Successfully loaded: '",
    "[TBE=",
)


def filter_forwarded_output(chatter: tuple[str, ...] = RAY_CHATTER) -> bool:
    """Drop the ``chatter`` lines from what Ray forwards to this driver (workers' stdout and stderr); the rest
    (progress, errors, Ray Train's failure and restart lines) is printed as before. Returns whether the filter is
    in place: it wraps Ray's own forwarding handler (private API, pinned Ray version; tests/test_launch_ray.py
    checks it), and without that handler it leaves the output alone."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False

    def quiet(handle: Any) -> Any:
        def emit(data: dict[str, Any]) -> None:
            lines = [line for line in data.get("lines", []) if not any(c in line for c in chatter)]
            if lines:
                handle({**data, "lines": lines})

        emit.argus_filtered = True  # type: ignore[attr-defined]
        return emit

    with dispatcher._lock:
        pairs = dispatcher.handlers
        if not any(name == "ray_print_logs" for name, _ in pairs):
            return False
        dispatcher.handlers = [
            (name, h if name != "ray_print_logs" or getattr(h, "argus_filtered", False) else quiet(h))
            for name, h in pairs
        ]
    return True


def driver_log_level() -> int:
    """The level of Ray's own logger in this driver: WARNING (no "Connecting to existing Ray cluster" and the
    like) unless ``--verbose``."""
    from trainer.logger import verbose

    return logging.INFO if verbose() else logging.WARNING


def connect(address: str) -> None:
    """``ray.init(address)``, quiet unless ``--verbose``: Ray's INFO lines and the forwarded :data:`RAY_CHATTER`
    are not printed."""
    import ray

    level = driver_log_level()
    ray.init(address=address, logging_level=level)
    if level > logging.INFO:
        filter_forwarded_output()


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
        connect=False,  # ray_session connects (quietly)
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
        connect(address)
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
        connect(local.address)
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
