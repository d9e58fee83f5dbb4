"""`argus launch ray`: the same training function on a Ray cluster (Ray Train V2 `TorchTrainer`).

Each Ray worker runs `trainer.train.Trainer` in a process group Ray sets up (gloo on CPU, NCCL on
GPUs). Checkpoints are the trainer's own (DeepSpeed + DCP + loader + RNG), written to the run directory and
deleted there by argus alone (retention: `train.keep_last`, `train.keep_every`). Ray is handed a pointer, not
the checkpoint: `ray.train.report(..., checkpoint=...)` uploads a directory holding one small JSON file
(`argus_pointer.json`: run directory, checkpoint name, step, launch), so Ray keeps no second copy, and with
`CheckpointConfig(num_to_keep=None)` it deletes nothing. After a worker failure Ray restarts the group and every
worker restores from the checkpoint `ray.train.get_checkpoint()` points at (or the run's own newer `latest`).

`out=` (the run directory) must be on storage every node sees (NFS, FSx, ...): all ranks write
their shards of a checkpoint there. It defaults to `STORAGE_PATH/NAME/run`. The driver checks it as every
launcher does (`trainer/run.py: load_job`): a run already there needs `resume=true` (continue) or
`train.overwrite=true` (start over: the driver removes the old run before any worker starts). Submitting the
same `--name` and `--storage-path` again with `resume=true` resumes the run; without it, a worker restores only
checkpoints of this launch (after a worker failure), never Ray's copy of an earlier launch's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

from cluster.ray_local import check_resources, oversubscription, ray_session
from launch.console import console
from trainer.config import to_dict
from trainer.data.storage import absolute
from trainer.faults import ENV as FAULT_ENV


def _join(config: dict[str, Any]) -> Any:
    """What every Ray worker of argus does first: the driver's --verbose (not this node's), library logs quieted
    before TorchRec (fbgemm logs at import) and DeepSpeed are imported, and the rank variables the trainer's code
    reads (trainer/dist.py). Returns Ray Train's context."""
    import ray.train

    from trainer.logger import VERBOSE_ENV, quiet_library_logs

    os.environ[VERBOSE_ENV] = "1" if config.get("verbose") else ""
    quiet_library_logs()
    ctx = ray.train.get_context()
    os.environ.update(
        RANK=str(ctx.get_world_rank()), WORLD_SIZE=str(ctx.get_world_size()), LOCAL_RANK=str(ctx.get_local_rank())
    )
    os.environ.setdefault("OMP_NUM_THREADS", str(config["omp_threads"]))
    return ctx


def train_worker(config: dict[str, Any]) -> None:
    """Runs inside each Ray Train worker."""
    import ray.train
    from ray.train import Checkpoint

    _join(config)
    from trainer.checkpoint import pointer_target
    from trainer.config import from_dict
    from trainer.job import JobConfig
    from trainer.run import build_trainer
    from trainer.train import Trainer

    os.environ[FAULT_ENV] = config.get("fault_inject", "")  # the driver's drill wins over this node's environment
    trainer = build_trainer(from_dict(JobConfig, config["job"]))

    def report(tr: Trainer, path: Path) -> None:
        # Collective in Ray Train V2: every worker reports; rank 0 hands over a pointer to the (shared) checkpoint,
        # which Ray copies (one small file) into its storage path.
        metrics = {"step": tr.step, "epoch": tr.loader.epoch}
        if tr.info.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="argus_pointer") as tmp:
            write_pointer(Path(tmp), path)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    trainer.on_checkpoint = report
    trainer.checkpoint_meta["launch"] = config["launch"]
    from_ray = ray.train.get_checkpoint()
    with from_ray.as_directory() if from_ray is not None else nullcontext(None) as ray_dir:
        own = pointer_target(trainer.run_dir, "latest")
        path, source = pick_restore(
            reported_checkpoint(Path(ray_dir)) if ray_dir else None,
            own if own is not None and (own / "meta.json").is_file() else None,
            launch=None if trainer.cfg.resume else config["launch"],
        )
        if trainer.info.rank == 0:  # one line per attempt: what an operator asks after a restart
            with open(trainer.run_dir / "ray_attempts.jsonl", "a") as f:
                f.write(
                    json.dumps(
                        {"time": time.time(), "restored_from": source, "step": checkpoint_step(path) if path else 0}
                    )
                    + "\n"
                )
        trainer.resume_from(path)  # verified first: a bad checkpoint falls back to the newest good one before it
    trainer.run()


POINTER = "argus_pointer.json"


def write_pointer(directory: Path, checkpoint: Path) -> None:
    """What Ray Train keeps of a checkpoint: where it is (the run directory on shared storage), and its meta."""
    meta = checkpoint_meta(checkpoint)
    (directory / POINTER).write_text(
        json.dumps({"run_dir": str(checkpoint.parent.parent), "checkpoint": checkpoint.name, **meta}, indent=1)
    )


def reported_checkpoint(ray_dir: Path) -> Path | None:
    """The checkpoint a Ray checkpoint stands for: its pointer's target, or None once retention deleted it (the
    run's own ``latest`` is newer then); a Ray checkpoint of an older argus is a full copy, used as it is."""
    pointer = ray_dir / POINTER
    if not pointer.is_file():
        return ray_dir if (ray_dir / "meta.json").is_file() else None
    p = json.loads(pointer.read_text())
    path = Path(p["run_dir"]) / "checkpoints" / p["checkpoint"]
    return path if (path / "meta.json").is_file() else None


def pick_restore(ray_dir: Path | None, own: Path | None, launch: str | None = None) -> tuple[Path | None, str | None]:
    """Which checkpoint a (re)started worker group continues from: the newer of Ray's and the run's own.

    ``launch`` (a run that is not resumed): Ray's checkpoint counts only if this launch wrote it (its
    ``meta.json`` names the launch); Ray keeps an earlier launch's under the same ``--name``, and a new run (or
    one started over with ``train.overwrite=true``) must not continue from it. The run's own ``latest`` is
    this launch's anyway: ``out`` held no run, or the driver removed it.

    Ray registers a reported checkpoint only when its controller next polls the workers (every
    ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s by default); a worker that dies sooner takes the report
    with it and ``get_checkpoint()`` returns an older one, or None. The run directory's ``latest``
    pointer (on shared storage, flipped only once every rank has written) is never older, so the
    newer of the two wins and no finished checkpoint is wasted; a tie goes to Ray's copy. Both are
    complete checkpoints, so exactly-once holds either way.
    """
    if ray_dir is not None and launch is not None and checkpoint_meta(ray_dir).get("launch") != launch:
        ray_dir = None
    candidates = [
        (checkpoint_step(p), src == "ray", p, src) for p, src in ((ray_dir, "ray"), (own, "run_dir")) if p is not None
    ]
    if not candidates:
        return None, None
    _, _, path, source = max(candidates, key=lambda c: (c[0], c[1]))
    return path, source


def checkpoint_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "meta.json").read_text())


def checkpoint_step(path: Path) -> int:
    return int(checkpoint_meta(path)["step"])


def worker_config(cfg: Any, num_workers: int, cpus_per_worker: float, environ: Any = None) -> dict[str, Any]:
    """What every Ray worker gets (``train_loop_config``): the job, its thread count, this launch's id and the
    fault drill. ``ARGUS_FAULT_INJECT`` is taken from the driver's environment and passed explicitly: workers on an
    existing cluster (``--address``) run in the environment their raylet started with, not the driver's; so does
    ``--verbose``."""
    from trainer.faults import ENV, parse_faults
    from trainer.logger import verbose

    environ = os.environ if environ is None else environ
    spec = environ.get(ENV, "")
    parse_faults(spec, num_workers)  # a malformed drill: one line now, not a crash in every worker later
    return {
        "job": to_dict(cfg),
        "omp_threads": max(1, int(cpus_per_worker)),
        "launch": uuid.uuid4().hex,  # in this launch's checkpoints (pick_restore)
        "fault_inject": spec,
        "verbose": verbose(environ),
    }


@contextlib.contextmanager
def _cluster(a: argparse.Namespace) -> Iterator[None]:
    """The Ray cluster a launch runs on (--address, or a throw-away --local one sized to the request, with a warning
    when that oversubscribes this machine), checked to hold the requested workers."""
    if a.local and (too_many := oversubscription(a.num_workers, a.cpus_per_worker)):
        print(f"argus: warning: {too_many}", file=sys.stderr, flush=True)
    with ray_session(a.address, int(a.num_workers * a.cpus_per_worker) if a.local else None):
        import ray

        check_resources(ray.cluster_resources(), a.num_workers, a.cpus_per_worker, a.gpus_per_worker)
        yield


def _worker_group(a: argparse.Namespace, timeout_s: float | None = None) -> dict[str, Any]:
    """TorchTrainer's process-group and scaling settings for --num-workers, --cpus/--gpus-per-worker: NCCL on
    GPUs, gloo on CPUs; ``timeout_s``: the collective timeout (None: Ray's default)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    resources = {"CPU": a.cpus_per_worker, **({"GPU": a.gpus_per_worker} if a.gpus_per_worker else {})}
    return {
        "torch_config": TorchConfig(
            backend="nccl" if a.gpus_per_worker else "gloo", **({"timeout_s": int(timeout_s)} if timeout_s else {})
        ),
        "scaling_config": ScalingConfig(
            num_workers=a.num_workers, use_gpu=a.gpus_per_worker > 0, resources_per_worker=resources
        ),
    }


def launch(a: argparse.Namespace) -> int:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from trainer.run import load_job, start_over

    overrides = list(a.overrides)
    storage = str(Path(a.storage_path).resolve())
    if not any(o.startswith("out=") for o in overrides):
        overrides.append(f"out={Path(storage) / a.name / 'run'}")
    cfg = load_job(a.config, overrides, world_size=a.num_workers)  # one line, before any cluster work
    # Workers run in their own working directory: hand them absolute paths.
    cfg.data.path, cfg.out = absolute(cfg.data.path), str(Path(cfg.out).resolve())
    if cfg.finetune.init:
        cfg.finetune.init = str(Path(cfg.finetune.init).resolve())
    if cfg.data.summary_cache:
        cfg.data.summary_cache = str(Path(cfg.data.summary_cache).resolve())
    if cfg.eval.val_summary_cache:
        cfg.eval.val_summary_cache = str(Path(cfg.eval.val_summary_cache).resolve())
    loop_config = worker_config(cfg, a.num_workers, a.cpus_per_worker)  # before Ray: a bad drill is one line
    with _cluster(a):
        # train.overwrite: the old run goes now, once, in the driver (a worker group that Ray restarts after a
        # failure must not remove what this launch wrote)
        cfg = start_over(cfg)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=loop_config,
            **_worker_group(a, cfg.train.timeout_s),
            run_config=RunConfig(
                name=a.name,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=a.max_failures),
                # Ray holds pointers (train_worker: report) and deletes none: only argus deletes checkpoints
                checkpoint_config=CheckpointConfig(num_to_keep=None),
            ),
        )
        result = trainer.fit()
        ckpt = result.checkpoint and (reported_checkpoint(Path(result.checkpoint.path)) or result.checkpoint.path)
        console.print(f"done: {a.name}: {result.metrics}; checkpoint {ckpt or '-'}")
        return 0


# ---- argus launch ray-eval -----------------------------------------------------------------------------------
EVAL_REPORT = "eval_report.json"


def eval_worker(config: dict[str, Any]) -> None:
    """Runs inside each Ray Train worker: `argus eval`'s collective (trainer.evaluate.evaluate) in the process
    group Ray set up; rank 0 reports the report (every worker reports: a collective in Ray Train V2)."""
    import ray.train

    ctx = _join(config)
    from trainer.evaluate import evaluate
    from trainer.finetune import evaluate_finetune

    if config["finetune"]:
        rep = evaluate_finetune(config["run"], config["data"], split=config["split"])
    else:
        rep = evaluate(
            config["run"],
            config["data"],
            config["split"],
            config["ks"],
            config["max_users"],
            delay_s=config["delay"],
            items=config["items"],
            summary_cache=config["summary_cache"],
        )
    if ctx.get_world_rank() != 0:
        ray.train.report({}, checkpoint=None)
        return
    # Ray Train V2 keeps only metrics attached to a checkpoint: the report travels as one (a small JSON file)
    with tempfile.TemporaryDirectory(prefix="argus_eval") as tmp:
        (Path(tmp) / EVAL_REPORT).write_text(json.dumps(rep))
        ray.train.report({"split": rep["split"]}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def launch_eval(a: argparse.Namespace) -> int:
    """`argus launch ray-eval RUN --data DIR`: `argus eval` over Ray workers (users and the item table split over
    them, as under torchrun; a fine-tuning run's impression eval likewise); the driver prints rank 0's report."""
    import shutil

    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from launch.train_cli import is_finetune_run, print_eval, print_finetune_eval
    from trainer import checkpoint
    from trainer.data.manifest import Manifest
    from trainer.logger import verbose

    if a.num_workers < 1:
        raise ValueError(f"--num-workers: must be >= 1, got {a.num_workers}")
    if a.address and not a.storage_path:
        raise ValueError("--storage-path: required with --address (storage the driver and every worker see)")
    # One line before any cluster work: the checkpoint, the dataset and the split must exist.
    path = checkpoint.resolve_checkpoint(a.run, prefer_best=True)
    saved = checkpoint.saved_job(path)
    manifest = Manifest.load(a.data)
    split = a.split or (saved.finetune.eval_split if saved.finetune.enabled else saved.eval.split)
    manifest.split(split)
    if a.delay:
        if saved.finetune.enabled:
            raise ValueError("--delay: a fine-tuning run is evaluated on impressions, scored at their request time")
        from trainer.evaluate import delayed_state_time

        delayed_state_time(manifest, split, a.delay, a.data)
    if a.items != "all" and saved.finetune.enabled:
        raise ValueError("--items: a fine-tuning run is evaluated on its impressions' shown items")
    if a.summary_cache and saved.finetune.enabled:
        raise ValueError("--summary-cache: a fine-tuning run is scored with its own data.summary_cache, if any")
    if a.max_users is not None and a.max_users < 0:
        raise ValueError(f"--max-users: must be >= 0, got {a.max_users}")
    loop_config = {
        # workers run in their own working directory: absolute paths
        "run": str(Path(a.run).resolve()),
        "data": absolute(a.data),
        "split": a.split,
        "ks": [int(k) for k in a.ks.split(",")] if a.ks else None,
        "max_users": a.max_users,
        "delay": a.delay,
        "items": a.items,
        "summary_cache": str(Path(a.summary_cache).resolve()) if a.summary_cache else None,
        "finetune": is_finetune_run(a.run),  # its impression eval (pairwise accuracy, NDCG within impressions)
        "omp_threads": max(1, int(a.cpus_per_worker)),
        "verbose": verbose(os.environ),
    }
    storage = Path(a.storage_path).resolve() if a.storage_path else Path(tempfile.mkdtemp(prefix="argus-ray-eval-"))
    try:
        with _cluster(a):
            result = TorchTrainer(
                eval_worker,
                train_loop_config=loop_config,
                **_worker_group(a),
                run_config=RunConfig(name=a.name, storage_path=str(storage)),
            ).fit()
        # read before the finally below removes a temporary storage path
        with result.checkpoint.as_directory() as d:
            rep = json.loads((Path(d) / EVAL_REPORT).read_text())
    finally:
        if not a.storage_path:
            shutil.rmtree(storage, ignore_errors=True)
    (print_finetune_eval if loop_config["finetune"] else print_eval)(rep, a.run, a.json)
    return 0


# ---- parsers -------------------------------------------------------------------------------------------------
def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="Ray cluster address (e.g. auto, or HEAD:6379)")
    where.add_argument("--local", action="store_true", help="start a throw-away local cluster on loopback")
    p.add_argument("--num-workers", type=int, required=True)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)


def add_launch_ray(launch_sub: Any) -> None:
    from launch.train_cli import add_eval_args

    r = launch_sub.add_parser("ray", help="train on a Ray cluster (TorchTrainer); --local for a throw-away cluster")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="key=value, as for `argus train`")
    _add_cluster_args(r)
    r.add_argument("--storage-path", required=True, help="where Ray keeps run state and checkpoints")
    r.add_argument("--max-failures", type=int, default=0, help="worker-group restarts allowed")
    r.add_argument("--name", default="argus", help="run name; the same name resumes")
    r.set_defaults(func=launch)

    e = launch_sub.add_parser(
        "ray-eval",
        help="`argus eval` on a Ray cluster: users and the item table split over the workers (full-ranking "
        "metrics identical to one process)",
    )
    add_eval_args(e)
    _add_cluster_args(e)
    e.add_argument(
        "--storage-path",
        help="where Ray keeps its run state (shared storage; with --local: default a temporary directory, removed)",
    )
    e.add_argument("--name", default="argus-eval", help="Ray run name")
    e.set_defaults(func=launch_eval)
