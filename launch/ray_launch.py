"""`argus launch ray`: the same training function on a Ray cluster (Ray Train V2 `TorchTrainer`).

Each Ray worker runs `trainer.train.Trainer` in a process group Ray sets up (gloo on CPU, NCCL on
GPUs). Checkpoints are the trainer's own (DeepSpeed + DCP + loader + RNG), reported to Ray with
`ray.train.report(..., checkpoint=Checkpoint.from_directory(...))`; after a worker failure Ray
restarts the group and every worker restores from `ray.train.get_checkpoint()`. Submitting the same
`--name` and `--storage-path` again resumes the run.

`out=` (the run directory) must be on storage every node sees (NFS, FSx, ...): all ranks write
their shards of a checkpoint there. It defaults to `STORAGE_PATH/NAME/run`.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

from trainer.config import to_dict


def train_worker(config: dict[str, Any]) -> None:
    """Runs inside each Ray Train worker."""
    import ray.train
    from ray.train import Checkpoint

    from trainer.config import from_dict
    from trainer.job import JobConfig
    from trainer.logger import quiet_library_logs
    from trainer.train import Trainer

    quiet_library_logs()
    ctx = ray.train.get_context()
    os.environ.update(RANK=str(ctx.get_world_rank()), WORLD_SIZE=str(ctx.get_world_size()),
                      LOCAL_RANK=str(ctx.get_local_rank()))
    os.environ.setdefault("OMP_NUM_THREADS", str(config["omp_threads"]))
    trainer = Trainer(from_dict(JobConfig, config["job"]))

    def report(tr: Trainer, path: Path) -> None:
        # Collective in Ray Train V2: every worker reports; rank 0 hands over the (shared) directory.
        ckpt = Checkpoint.from_directory(str(path)) if tr.info.rank == 0 else None
        ray.train.report({"step": tr.step, "epoch": tr.loader.epoch}, checkpoint=ckpt)

    trainer.on_checkpoint = report
    fault_drill(trainer, ctx.get_world_rank())
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            trainer.restore(Path(directory))
    trainer.run()


def fault_drill(trainer: Any, rank: int) -> None:
    """ARGUS_FAULT_INJECT="rank=R,step=S,once=PATH": rank R SIGKILLs itself after step S, once (PATH marks it).

    For rehearsing node loss (and for the test that proves recovery loses and repeats nothing).
    """
    spec = os.environ.get("ARGUS_FAULT_INJECT", "")
    if not spec:
        return
    opts = dict(kv.split("=", 1) for kv in spec.split(","))
    if int(opts["rank"]) != rank or Path(opts["once"]).exists():
        return

    def kill(tr: Any, step: int) -> None:
        if step == int(opts["step"]):
            Path(opts["once"]).write_text(f"rank {rank} killed after step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.after_step = kill


def check_resources(available: dict[str, float], workers: int, cpus: float, gpus: float) -> None:
    """Ray retries "worker group startup timed out" forever when a request can't fit: refuse up front."""
    need = {"CPU": workers * cpus, "GPU": workers * gpus}
    for res, amount in need.items():
        if amount > available.get(res, 0.0) + 1e-9:
            raise RuntimeError(f"--num-workers {workers} x --{res.lower()}s-per-worker "
                               f"{cpus if res == 'CPU' else gpus:g} needs {amount:g} {res}, the cluster has "
                               f"{available.get(res, 0.0):g}")


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
    return Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": num_cpus, "node_ip_address": "127.0.0.2", "include_dashboard": False})


def launch(a: argparse.Namespace) -> int:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from launch.cli import console, load_job

    overrides = list(a.overrides)
    storage = str(Path(a.storage_path).resolve())
    if not any(o.startswith("out=") for o in overrides):
        overrides.append(f"out={Path(storage) / a.name / 'run'}")
    cfg = load_job(a.config, overrides, world_size=a.num_workers)  # one line, before any cluster work
    # Workers run in their own working directory: hand them absolute paths.
    cfg.data.path, cfg.out = str(Path(cfg.data.path).resolve()), str(Path(cfg.out).resolve())
    local = start_local_cluster(int(a.num_workers * a.cpus_per_worker)) if a.local else None
    if local is None:
        ray.init(address=a.address)
    try:
        check_resources(ray.cluster_resources(), a.num_workers, a.cpus_per_worker, a.gpus_per_worker)
        resources = {"CPU": a.cpus_per_worker, **({"GPU": a.gpus_per_worker} if a.gpus_per_worker else {})}
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"job": to_dict(cfg), "omp_threads": max(1, int(a.cpus_per_worker))},
            torch_config=TorchConfig(backend="nccl" if a.gpus_per_worker else "gloo",
                                     timeout_s=int(cfg.train.timeout_s)),
            scaling_config=ScalingConfig(num_workers=a.num_workers, use_gpu=a.gpus_per_worker > 0,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=a.name, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=a.max_failures)))
        result = trainer.fit()
        console.print(f"done: {a.name}: {result.metrics}; checkpoint {result.checkpoint.path if result.checkpoint else '-'}")
        return 0
    finally:
        ray.shutdown()
        if local is not None:
            local.shutdown()


def add_launch_ray(launch_sub: Any) -> None:
    r = launch_sub.add_parser("ray", help="train on a Ray cluster (TorchTrainer); --local for a throw-away cluster")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="key=value, as for `argus train`")
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="Ray cluster address (e.g. auto, or HEAD:6379)")
    where.add_argument("--local", action="store_true", help="start a throw-away local cluster on loopback")
    r.add_argument("--num-workers", type=int, required=True)
    r.add_argument("--cpus-per-worker", type=float, default=1.0)
    r.add_argument("--gpus-per-worker", type=float, default=0.0)
    r.add_argument("--storage-path", required=True, help="where Ray keeps run state and checkpoints")
    r.add_argument("--max-failures", type=int, default=0, help="worker-group restarts allowed")
    r.add_argument("--name", default="argus", help="run name; the same name resumes")
    r.set_defaults(func=launch)
