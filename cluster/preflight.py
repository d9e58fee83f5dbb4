"""Preflight logic behind `argus cluster check` (launch/cluster_cli.py): can this Ray cluster run this config?

Runs before a long job is queued: lists the nodes with their CPUs/GPUs/memory, checks that the
requested workers fit, measures all-reduce bus bandwidth across exactly those workers (the backend
training will use: gloo on CPU, NCCL on GPUs), compares the planner's memory per rank with the
smallest worker's, and checks free disk at the storage path. Returns data; the CLI prints it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.ray_local import InsufficientResources, check_resources

if TYPE_CHECKING:
    from trainer.job import JobConfig


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
    result = {
        "busbw_gbps": busbw,
        "seconds": seconds,
        "correct": ok,
        "world_size": n,
        "backend": dist.get_backend(),
        "memory_bytes": int(smallest.item()),
        "device_name": name,
    }
    if dist.get_rank() == 0:  # Ray V2 keeps no metrics without a checkpoint: hand the result over in a file
        Path(config["result"]).write_text(json.dumps(result))
    ray.train.report(result)


def nodes() -> list[dict[str, Any]]:
    """The connected Ray cluster's nodes: address, alive, CPUs, GPUs, memory (bytes)."""
    import ray

    out = []
    for node in ray.nodes():
        res = node.get("Resources", {})
        out.append(
            {
                "address": node.get("NodeManagerAddress", "?"),
                "alive": bool(node.get("Alive")),
                "cpus": res.get("CPU", 0),
                "gpus": res.get("GPU", 0),
                "memory": res.get("memory", 0),
            }
        )
    return out


@dataclass
class PreflightResult:
    """What `run_checks` found; ``problems`` is empty when every check passed."""

    fits: bool  # the requested workers fit the cluster's resources
    storage: Path
    free_bytes: int  # free disk at ``storage``
    probe: dict[str, Any] = field(default_factory=dict)  # the all-reduce probe's report ({} if it did not run)
    memory: dict[str, Any] | None = None  # memory_check's report (None without a config or a catalog size)
    problems: list[str] = field(default_factory=list)


def run_checks(
    job: JobConfig | None,
    *,
    num_workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    storage_path: str | Path,
    probe_mb: float = 64.0,
    probe_iters: int = 5,
    min_busbw_gbps: float = 0.0,
    min_free_gb: float = 10.0,
    items: float = 0,
) -> PreflightResult:
    """Resources, all-reduce (correctness and bus bandwidth), memory per rank and disk, on the connected Ray
    cluster (see ``cluster.ray_local.ray_session``). ``job`` (validated for ``num_workers``) enables the
    memory check."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    problems: list[str] = []
    try:
        check_resources(ray.cluster_resources(), num_workers, cpus_per_worker, gpus_per_worker)
        fits = True
    except InsufficientResources as e:
        problems.append(f"resources: {e}")
        fits = False
    probe: dict[str, Any] = {}
    storage = Path(storage_path).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    result_file = storage / f"allreduce-{int(time.time() * 1000)}.json"
    if fits:
        trainer = TorchTrainer(
            allreduce_probe,
            train_loop_config={
                "mb": probe_mb,
                "iters": probe_iters,
                "result": str(result_file),
                "per_node": max(1, num_workers // max(len(ray.nodes()), 1)),
            },
            torch_config=TorchConfig(backend="nccl" if gpus_per_worker else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=num_workers,
                use_gpu=gpus_per_worker > 0,
                resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})},
            ),
            run_config=RunConfig(name=f"preflight-{int(time.time())}", storage_path=str(storage)),
        )
        trainer.fit()
        probe = json.loads(result_file.read_text()) if result_file.is_file() else {}
        if not probe.get("correct", False):
            problems.append(
                "all-reduce: wrong result (check the network interface: GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)"
            )
        elif probe["busbw_gbps"] < min_busbw_gbps:
            problems.append(
                f"all-reduce: {probe['busbw_gbps']:.2f} GB/s bus bandwidth < --min-busbw-gbps {min_busbw_gbps}"
            )
    memory = (
        memory_check(job, probe, num_workers=num_workers, gpus_per_worker=gpus_per_worker, items=items)
        if job is not None and probe
        else None
    )
    if memory and not memory["fits"]:
        problems.append(
            f"memory: the planner predicts {memory['need'] / 1e9:.1f} GB per rank (+ "
            f"{memory['headroom'] / 1e9:.1f} GB headroom) but the smallest worker has "
            f"{memory['capacity'] / 1e9:.1f} GB ({memory['device']}); see `argus plan`"
        )
    free = shutil.disk_usage(storage).free
    if free < min_free_gb * 2**30:
        problems.append(f"disk: {free / 2**30:.1f} GiB free at {storage} < --min-free-gb {min_free_gb}")
    return PreflightResult(fits=fits, storage=storage, free_bytes=free, probe=probe, memory=memory, problems=problems)


def memory_check(
    job: JobConfig, probe: dict[str, Any], *, num_workers: int, gpus_per_worker: float, items: float = 0
) -> dict[str, Any] | None:
    """The capacity planner's per-rank memory for this config and world size vs the smallest worker's."""
    from cluster.hardware import Hardware
    from cluster.planner import PlanRequest, plan
    from trainer.data.manifest import Manifest
    from trainer.flops import match_gpu_name

    if not items and job.data.path and (Path(job.data.path) / "manifest.json").is_file():
        items = job.embeddings.item_rows or Manifest.load(job.data.path).num_items
    if not items:
        return None
    spec = match_gpu_name(probe["device_name"])
    hw = Hardware(
        gpu=spec.name if spec else "h100", nodes=1, gpus_per_node=num_workers, memory_gb=probe["memory_bytes"] / 1e9
    )
    r = plan(job, PlanRequest(items=int(items), hardware=hw, torchrec=bool(gpus_per_worker)))
    m = r["memory"]
    return {
        "need": m["total"],
        "headroom": m["headroom"],
        "capacity": m["capacity"],
        "items": int(items),
        "fits": m["total"] + m["headroom"] <= m["capacity"],
        "device": probe["device_name"],
    }
