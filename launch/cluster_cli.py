"""`argus cluster check` (preflight) and `argus cluster hostfile`: parsers and commands (wired into launch/cli.py).

The checks themselves are in cluster/preflight.py, the hostfile readers and writers in cluster/hostfile.py.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from launch.console import console


# ---- argus cluster check -------------------------------------------------------------------------------------
def cmd_cluster_check(a: argparse.Namespace) -> int:
    """Exit 1 with one line per failed check (config, resources, all-reduce, memory, disk)."""
    from rich.table import Table

    from cluster.preflight import nodes, run_checks
    from cluster.ray_local import oversubscription, ray_session
    from trainer.run import load_job

    problems: list[str] = []
    job = None
    if a.config:
        try:
            job = load_job(
                a.config,
                list(a.overrides) + ([] if any(o.startswith("out=") for o in a.overrides) else ["out=/preflight"]),
                world_size=a.num_workers,
            )
        except ValueError as e:
            problems.append(f"config: {e}")
    if a.local and (too_many := oversubscription(a.num_workers, a.cpus_per_worker)):
        print(f"argus: warning: {too_many}", file=sys.stderr, flush=True)
    with ray_session(a.address, int(a.num_workers * a.cpus_per_worker) if a.local else None):
        t = Table("node", "alive", "CPUs", "GPUs", "memory GiB", title="Ray nodes")
        for n in nodes():
            t.add_row(
                n["address"],
                "yes" if n["alive"] else "NO",
                f"{n['cpus']:g}",
                f"{n['gpus']:g}",
                f"{n['memory'] / 2**30:.1f}",
            )
        console.print(t)
        r = run_checks(
            job,
            num_workers=a.num_workers,
            cpus_per_worker=a.cpus_per_worker,
            gpus_per_worker=a.gpus_per_worker,
            storage_path=a.storage_path,
            probe_mb=a.probe_mb,
            probe_iters=a.probe_iters,
            min_busbw_gbps=a.min_busbw_gbps,
            min_free_gb=a.min_free_gb,
            items=a.items,
        )
        problems += r.problems
        probe, memory = r.probe, r.memory
        t = Table("check", "result", title="preflight")
        t.add_row(
            "workers",
            f"{a.num_workers} x ({a.cpus_per_worker:g} CPU, {a.gpus_per_worker:g} GPU): "
            f"{'fit' if r.fits else 'DO NOT FIT'}",
        )
        if probe:
            t.add_row(
                "all-reduce",
                f"{probe.get('backend')} over {probe.get('world_size')} workers, "
                f"{a.probe_mb} MiB: {probe.get('busbw_gbps', 0):.2f} GB/s bus bandwidth",
            )
        t.add_row("disk", f"{r.free_bytes / 2**30:.1f} GiB free at {r.storage}")
        if memory:
            t.add_row(
                "memory / rank",
                f"planned {memory['need'] / 1e9:.2f} GB + {memory['headroom'] / 1e9:.2f} GB "
                f"headroom vs {memory['capacity'] / 1e9:.2f} GB: "
                f"{'fits' if memory['fits'] else 'DOES NOT FIT'} ({memory['items']:,} items)",
            )
        t.add_row(
            "config",
            "ok"
            if a.config and not any(p.startswith("config") for p in problems)
            else ("not given" if not a.config else "FAILED"),
        )
        console.print(t)
    for p in problems:
        print(f"argus cluster check: {p}")
    return 1 if problems else 0


# ---- argus cluster hostfile ----------------------------------------------------------------------------------
def cmd_cluster_hostfile(a: argparse.Namespace) -> int:
    from cluster.hostfile import hosts_from_nodes_file, hosts_from_ray, write_hostfile

    if a.slots is not None and a.slots < 1:
        raise ValueError(f"--slots must be >= 1, got {a.slots}")
    hosts = hosts_from_nodes_file(a.nodes_file, a.slots) if a.nodes_file else hosts_from_ray(a.address, a.slots)
    path = write_hostfile(hosts, a.out)
    print(
        f"wrote {path}: {len(hosts)} host(s), {sum(s for _, s in hosts)} slots: "
        + ", ".join(f"{h} slots={s}" for h, s in hosts)
    )
    return 0


# ---- parser --------------------------------------------------------------------------------------------------
def add_cluster(sub: Any) -> None:
    """Add `cluster` (check, hostfile) to the sub-parsers of `argus`."""
    cl = sub.add_parser("cluster", help="cluster tools: preflight check, hostfiles")
    csub = cl.add_subparsers(dest="cluster_command", metavar="TOOL", required=True)

    c = csub.add_parser("check", help="preflight: nodes, resources, all-reduce bandwidth, disk, config fit")
    c.add_argument("config", nargs="?", help="run config to validate for this world size (optional)")
    c.add_argument("overrides", nargs="*")
    where = c.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="Ray cluster address (auto, HEAD:6379)")
    where.add_argument("--local", action="store_true", help="a throw-away local cluster (laptop rehearsal)")
    c.add_argument("--num-workers", type=int, default=2)
    c.add_argument("--cpus-per-worker", type=float, default=1.0)
    c.add_argument("--gpus-per-worker", type=float, default=0.0)
    c.add_argument("--storage-path", default="/tmp/argus-preflight")
    c.add_argument("--probe-mb", type=float, default=64.0)
    c.add_argument("--probe-iters", type=int, default=5)
    c.add_argument("--min-busbw-gbps", type=float, default=0.0)
    c.add_argument("--min-free-gb", type=float, default=10.0)
    c.add_argument(
        "--items", type=float, default=0, help="catalog size for the memory check (default: the data manifest's)"
    )
    c.set_defaults(func=cmd_cluster_check)

    h = csub.add_parser("hostfile", help="write a deepspeed hostfile from a running Ray cluster or a node list")
    src = h.add_mutually_exclusive_group()
    src.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or this machine's cluster)")
    src.add_argument("--nodes-file", help="one host per line: 'host', 'host slots=N' or 'host:N'; '#' comments")
    h.add_argument("--slots", type=int, help="slots per host (default: each Ray node's GPUs, else CPUs)")
    h.add_argument("--out", default="hostfile", help="output path (default: ./hostfile)")
    h.set_defaults(func=cmd_cluster_hostfile)
