"""Elastic resume: a checkpoint written on N ranks continues on M ranks (``checkpoint.load`` calls this).

The item tables (DCP) and the data loader's position re-lay out on any world size by themselves; the dense side
does not: a ZeRO-1/2/3 checkpoint holds the fp32 weights and the AdamW state as flat per-rank partitions, and
DeepSpeed refuses it on another data-parallel size. On a world-size change the dense checkpoint is converted,
once, by rank 0, into DeepSpeed's *universal* checkpoint (``deepspeed.checkpoint.ds_to_universal``: one
fp32 / exp_avg / exp_avg_sq / step file per parameter, world-size free) in a scratch directory beside the
checkpoint, every rank loads its new partitions from it (``load_universal``), and the scratch directory is
removed. The published checkpoint is only read. A change of ``parallel.tp`` on the same world size takes the same
path (the conversion merges AutoTP's shards, the load splits them for the new layout). Same world size and layout
(and ZeRO-0, whose optimizer state is not partitioned): DeepSpeed's own load, unchanged, bitwise.

Why the universal checkpoint (measured on CPU, docs/training.md "Elastic resume"): its conversion is a few
tenths of a second for the test model and about a second for ``configs/mini.yaml`` (3.2 M parameters), it
runs only when the world size changed, needs nothing new in ``save()``, and restores exactly the saved fp32
weights, exp_avg, exp_avg_sq and step on every stage. Two fixes on top, both for DeepSpeed 0.19.8's
ZeRO-3 universal load (``stage3.py: load_hp_checkpoint_state_from_checkpoint_dir_stage3``), both caught by
tests/test_elastic_resume.py: it gives every parameter group the hyperparameters of group 0 (weight decay on
the no-decay group), and one shared ``step`` tensor to every group, which AdamW then advances once per group
per step (wrong bias correction from the second step on). :func:`load_dense` puts each group's saved
hyperparameters back and gives each group its own step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from trainer.engine import Engine

log = logging.getLogger(__name__)

UNIVERSAL_TAG = "universal"


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def scratch_dir(path: Path) -> Path:
    """Where checkpoint ``path``'s universal conversion is written while it loads: beside the checkpoint (every
    rank reads the checkpoint's filesystem already), not named ``step_*`` (retention and ``latest`` ignore it),
    removed once loaded."""
    return path.parent / f".universal-{path.name}"


def to_universal(dense_dir: Path, out: Path) -> float:
    """Convert DeepSpeed checkpoint ``dense_dir/<tag>`` into a universal checkpoint at ``out`` (in this process,
    no worker pool); returns the seconds it took."""
    from deepspeed.checkpoint import ds_to_universal

    t0 = time.perf_counter()
    args = argparse.Namespace(
        input_folder=str(dense_dir),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # ZeRO-1/2 checkpoints of a plain data-parallel model carry no UC info
    )
    shutil.rmtree(out, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        ds_to_universal.main(args)
    return time.perf_counter() - t0


def _group_hyperparameters(path: Path) -> list[dict[str, Any]] | None:
    """Each saved parameter group's hyperparameters of a ZeRO-3 universal checkpoint (None if not there)."""
    sd = torch.load(path / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    groups = sd.get("optimizer_state_dict", {}).get("param_groups")
    return None if groups is None else [{k: v for k, v in g.items() if k != "params"} for g in groups]


def load_dense(engine: Engine, dense_dir: Path, tag: str, saved_world: int | None, rank: int) -> float | None:
    """Collective: the dense model, its AdamW state and the lr scheduler from ``dense_dir/tag``, written on
    ``saved_world`` ranks (None: on another layout, another parallel.tp). Returns the seconds the universal
    conversion took, or None when DeepSpeed's own load served (same world size and layout, or ZeRO-0)."""
    ds = engine.ds
    world = world_size()
    if saved_world == world or ds.zero_optimization_stage() == 0:
        ds.load_checkpoint(str(dense_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        return None
    scratch = scratch_dir(dense_dir.parent)
    uc = scratch / UNIVERSAL_TAG
    seconds = torch.zeros(1, dtype=torch.float64)
    if rank == 0:
        failed = None
        try:
            seconds[0] = to_universal(dense_dir / tag, uc)
        except Exception as e:  # tell the other ranks instead of leaving them in the broadcast
            failed, seconds[0] = e, -1.0
        _broadcast(seconds, ds.device)
        if failed is not None:
            shutil.rmtree(scratch, ignore_errors=True)
            raise failed
    else:
        _broadcast(seconds, ds.device)
        if seconds[0] < 0:
            raise RuntimeError(f"rank 0 failed to convert {dense_dir} for a resume on {world} ranks (see its log)")
    try:
        groups = _group_hyperparameters(uc) if ds.zero_optimization_stage() == 3 else None
        config = ds._config
        config.load_universal_checkpoint = True
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                ds.load_checkpoint(
                    str(scratch), tag=UNIVERSAL_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
                )
        finally:
            config.load_universal_checkpoint = False
        if groups is not None and len(groups) == len(ds.optimizer.param_groups):
            for group, saved in zip(ds.optimizer.param_groups, groups):
                group.update(saved)
        for state in ds.optimizer.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):  # ZeRO-3 hands every group the same step tensor
                state["step"] = state["step"].clone()
    finally:
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    return float(seconds[0])


def _broadcast(t: torch.Tensor, device: Any) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        d = t.to(device)
        dist.broadcast(d, 0)
        t.copy_(d.cpu())


def _ranks(n: int) -> str:
    return f"{n} rank" + ("" if n == 1 else "s")


def resume_line(
    name: str,
    saved_world: int,
    world: int,
    batch_size: int,
    convert_s: float | None,
    saved_dp: int | None = None,
    dp: int | None = None,
) -> str:
    """The one line rank 0 logs when a checkpoint resumes on another world size (or another data-parallel size:
    ``saved_dp``/``dp``, which differ from the world sizes under parallel.sp; default: the world sizes)."""
    saved_dp, dp = saved_dp or saved_world, dp or world
    line = (
        f"resuming {name} written on {_ranks(saved_world)} on {_ranks(world)}: global batch "
        f"{batch_size * saved_dp} -> {batch_size * dp} samples per step (data.batch_size {batch_size} per "
        + ("rank)" if (saved_dp, dp) == (saved_world, world) else "data-parallel rank)")
    )
    if convert_s is not None:
        line += f"; dense state re-partitioned through a universal checkpoint ({convert_s:.1f} s)"
    return line
