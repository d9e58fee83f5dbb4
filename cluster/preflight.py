"""`argus cluster check`: can this Ray cluster run this config? Nodes, resources, collectives, disk.

Runs before a long job is queued: lists alive nodes with their CPUs/GPUs/memory, checks that the
requested workers fit, measures all-reduce bus bandwidth across exactly those workers (the backend
training will use: gloo on CPU, NCCL on GPUs), checks free disk at the storage path, and validates
the run config for that world size (batch sizes, DeepSpeed JSON). Exit 1 with the reasons when any
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any


def allreduce_probe(config: dict[str, Any]) -> None:
    """Ray Train worker: time all-reduces of ``mb`` MiB and report the bus bandwidth (GB/s)."""
    import ray.train
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    n = dist.get_world_size()
    x = torch.ones(int(config["mb"] * 2**20 // 4), dtype=torch.float32, device=device)
    dist.all_reduce(x)  # warm-up: connection setup
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(config["iters"]):
        dist.all_reduce(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / config["iters"]
    ok = bool(torch.allclose(x[:8], torch.full((8,), float(n) ** (config["iters"] + 1), device=device)))
    # bus bandwidth as nccl-tests defines it: algorithm bandwidth x 2(n-1)/n
    busbw = x.numel() * 4 / seconds * (2 * (n - 1) / n) / 1e9 if n > 1 else float("inf")
    # the smallest memory any worker has: a GPU's, or on CPU this worker's share of its node's RAM
    if device.type == "cuda":
        mem, name = torch.cuda.get_device_properties(device).total_memory, torch.cuda.get_device_name(device)
    else:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(int(config["per_node"]), 1)
        name = "cpu"
    smallest = torch.tensor([mem], dtype=torch.int64, device=device)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    result = {"busbw_gbps": busbw, "seconds": seconds, "correct": ok, "world_size": n, "backend": dist.get_backend(),
              "memory_bytes": int(smallest.item()), "device_name": name}
    if dist.get_rank() == 0:  # Ray V2 keeps no metrics without a checkpoint: hand the result over in a file
        Path(config["result"]).write_text(json.dumps(result))
    ray.train.report(result)


def check(a: argparse.Namespace) -> int:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from rich.table import Table

    from launch.cli import console, load_job
    from launch.ray_launch import check_resources, start_local_cluster

    problems: list[str] = []
    job = None
    if a.config:
        try:
            job = load_job(a.config, list(a.overrides) + ([] if any(o.startswith("out=") for o in a.overrides)
                                                         else ["out=/preflight"]), world_size=a.num_workers)
        except ValueError as e:
            problems.append(f"config: {e}")
    local = start_local_cluster(int(a.num_workers * a.cpus_per_worker)) if a.local else None
    if local is None:
        ray.init(address=a.address)
    try:
        nodes = Table("node", "alive", "CPUs", "GPUs", "memory GiB", title="Ray nodes")
        for node in ray.nodes():
            res = node.get("Resources", {})
            nodes.add_row(node.get("NodeManagerAddress", "?"), "yes" if node.get("Alive") else "NO",
                          f"{res.get('CPU', 0):g}", f"{res.get('GPU', 0):g}", f"{res.get('memory', 0) / 2**30:.1f}")
        console.print(nodes)
        try:
            check_resources(ray.cluster_resources(), a.num_workers, a.cpus_per_worker, a.gpus_per_worker)
            fits = True
        except RuntimeError as e:
            problems.append(f"resources: {e}")
            fits = False
        probe: dict[str, Any] = {}
        storage = Path(a.storage_path).resolve()
        storage.mkdir(parents=True, exist_ok=True)
        result_file = storage / f"allreduce-{int(time.time() * 1000)}.json"
        if fits:
            trainer = TorchTrainer(
                allreduce_probe, train_loop_config={"mb": a.probe_mb, "iters": a.probe_iters,
                                                    "result": str(result_file),
                                                    "per_node": max(1, a.num_workers // max(len(ray.nodes()), 1))},
                torch_config=TorchConfig(backend="nccl" if a.gpus_per_worker else "gloo"),
                scaling_config=ScalingConfig(num_workers=a.num_workers, use_gpu=a.gpus_per_worker > 0,
                                             resources_per_worker={"CPU": a.cpus_per_worker,
                                                                   **({"GPU": a.gpus_per_worker}
                                                                      if a.gpus_per_worker else {})}),
                run_config=RunConfig(name=f"preflight-{int(time.time())}", storage_path=str(storage)))
            trainer.fit()
            probe = json.loads(result_file.read_text()) if result_file.is_file() else {}
            if not probe.get("correct", False):
                problems.append("all-reduce: wrong result (check the network interface: GLOO_SOCKET_IFNAME / "
                                "NCCL_SOCKET_IFNAME)")
            elif probe["busbw_gbps"] < a.min_busbw_gbps:
                problems.append(f"all-reduce: {probe['busbw_gbps']:.2f} GB/s bus bandwidth < --min-busbw-gbps "
                                f"{a.min_busbw_gbps}")
        memory = memory_check(job, a, probe) if job is not None and probe else None
        if memory and not memory["fits"]:
            problems.append(f"memory: the planner predicts {memory['need'] / 1e9:.1f} GB per rank (+ "
                            f"{memory['headroom'] / 1e9:.1f} GB headroom) but the smallest worker has "
                            f"{memory['capacity'] / 1e9:.1f} GB ({memory['device']}); see `argus plan`")
        free = shutil.disk_usage(storage).free
        if free < a.min_free_gb * 2**30:
            problems.append(f"disk: {free / 2**30:.1f} GiB free at {storage} < --min-free-gb {a.min_free_gb}")
        t = Table("check", "result", title="preflight")
        t.add_row("workers", f"{a.num_workers} x ({a.cpus_per_worker:g} CPU, {a.gpus_per_worker:g} GPU): "
                             f"{'fit' if fits else 'DO NOT FIT'}")
        if probe:
            t.add_row("all-reduce", f"{probe.get('backend')} over {probe.get('world_size')} workers, "
                                    f"{a.probe_mb} MiB: {probe.get('busbw_gbps', 0):.2f} GB/s bus bandwidth")
        t.add_row("disk", f"{free / 2**30:.1f} GiB free at {storage}")
        if memory:
            t.add_row("memory / rank", f"planned {memory['need'] / 1e9:.2f} GB + {memory['headroom'] / 1e9:.2f} GB "
                                       f"headroom vs {memory['capacity'] / 1e9:.2f} GB: "
                                       f"{'fits' if memory['fits'] else 'DOES NOT FIT'} ({memory['items']:,} items)")
        t.add_row("config", "ok" if a.config and not any(p.startswith("config") for p in problems)
                  else ("not given" if not a.config else "FAILED"))
        console.print(t)
    finally:
        ray.shutdown()
        if local is not None:
            local.shutdown()
    for p in problems:
        print(f"argus cluster check: {p}")
    return 1 if problems else 0


def memory_check(job: Any, a: argparse.Namespace, probe: dict[str, Any]) -> dict[str, Any] | None:
    """The capacity planner's per-rank memory for this config and world size vs the smallest worker's."""
    from cluster.hardware import Hardware
    from cluster.planner import PlanRequest, plan
    from trainer.data.manifest import Manifest
    from trainer.flops import match_gpu_name

    items = a.items
    if not items and job.data.path and (Path(job.data.path) / "manifest.json").is_file():
        items = job.embeddings.item_rows or Manifest.load(job.data.path).num_items
    if not items:
        return None
    spec = match_gpu_name(probe["device_name"])
    hw = Hardware(gpu=spec.name if spec else "h100", nodes=1, gpus_per_node=a.num_workers,
                  memory_gb=probe["memory_bytes"] / 1e9)
    r = plan(job, PlanRequest(items=int(items), hardware=hw, torchrec=bool(a.gpus_per_worker)))
    m = r["memory"]
    return {"need": m["total"], "headroom": m["headroom"], "capacity": m["capacity"], "items": int(items),
            "fits": m["total"] + m["headroom"] <= m["capacity"], "device": probe["device_name"]}


def add_cluster_check(cluster_sub: Any) -> None:
    c = cluster_sub.add_parser("check", help="preflight: nodes, resources, all-reduce bandwidth, disk, config fit")
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
    c.add_argument("--items", type=float, default=0, help="catalog size for the memory check (default: the "
                                                           "data manifest's)")
    c.set_defaults(func=check)
