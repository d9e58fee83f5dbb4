"""Checkpoints: DeepSpeed (dense) + torch.distributed.checkpoint (the item tables, sharded or replicated, and
their optimizer state) + every rank's data-loader state + RNG states + step + the run config, published atomically.

Layout: ``RUN/checkpoints/step_00000100/{dense/, sparse/, loader.json, rng/rank*.pt, meta.json, config.yaml,
manifest.json}`` and ``RUN/checkpoints/latest`` naming the newest complete one. Everything is written into
``step_*.tmp`` first, the manifest (every file's size and sha256) last; the directory is renamed and then
``latest`` flipped, so a crash at any moment leaves the previous checkpoint loadable. Resuming verifies the
checkpoint against its manifest and falls back to the newest good one (:func:`select_resume`). Pointers,
manifests, verification and retention are file operations without torch: ``trainer/checkpoint_store.py``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from trainer.checkpoint_store import (  # noqa: F401  (re-exported: the pointer API callers use)
    BEST,
    LATEST,
    CheckpointError,
    Verdict,
    best_checkpoint,
    checkpoint_files,
    checkpoint_name,
    checkpoint_root,
    checkpoints,
    describe_files,
    discard,
    file_sizes,
    latest_checkpoint,
    pointer_target,
    resolve_checkpoint,
    set_pointer,
    shares,
    step_of,
    verify,
    write_manifest,
)
from trainer.config import from_dict, save_config
from trainer.data.loader import ShardLoader, gather_states
from trainer.data.manifest import Manifest
from trainer.job import JobConfig
from trainer.model.item_tower import load_item_cold, save_item_cold

if TYPE_CHECKING:
    from embeddings.tables import SparseArch
    from trainer.engine import Engine

DENSE_TAG = "state"
log = logging.getLogger(__name__)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small, picklable), in rank order."""
    if _world() == 1:
        return [obj]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """Collective: ``fn()`` run by rank 0 alone, its result on every rank; its exception raised on every rank
    (the others learn of it instead of waiting in the broadcast)."""
    got: Any = None
    if dist.get_rank() == 0:
        try:
            got = fn()
        except Exception as e:
            got = e
    got = _from_rank0(got)
    if isinstance(got, Exception):
        raise got
    return got


def _from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save(
    engine: Engine,
    loader: ShardLoader,
    step: int,
    cfg: JobConfig,
    run_dir: str | Path,
    rank: int,
    extra: dict[str, Any] | None = None,
    mid_write: Callable[[Path], None] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the published checkpoint directory.

    ``mid_write(tmp)`` runs between the dense and the sparse writes (fault drills kill a rank there). Once every
    rank has written, the ranks hash the files together (each about ``1/world`` of the bytes) and rank 0 writes
    ``manifest.json``, then publishes. Deleting older checkpoints (retention) is the caller's next step
    (``trainer/checkpoint_store.py: prune``), never before this returns.
    """
    root = checkpoint_root(run_dir)
    name = checkpoint_name(step)
    final, tmp = root / name, root / f"{name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    _barrier()
    engine.ds.save_checkpoint(str(tmp / "dense"), tag=DENSE_TAG)
    if mid_write is not None:
        mid_write(tmp)
    dcp.save(
        {"tables": engine.tables.state_dict(), "optimizer": engine.sparse_optimizer.state_dict()},
        checkpoint_id=str(tmp / "sparse"),
    )
    states = gather_states(loader)
    world = len(states)
    # parallel.tp / sp: the ranks of a group hold one loader (the data-parallel rank's): its state once
    states = states[:: engine.group]
    torch.save(_rng_state(), tmp / "rng" / f"rank{rank:05d}.pt")
    if rank == 0:
        save_item_cold(engine.ds.module, tmp)  # a semantic item tower's cold flags: part of the trained model
        (tmp / "loader.json").write_text(json.dumps(states))
        save_config(cfg, tmp / "config.yaml")
        meta = {"step": step, "world_size": world, "time": time.time(), **(extra or {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    _barrier()  # every file is written: hash them (rank 0 lists them, so every rank works from one listing)
    plan = _from_rank0(shares(file_sizes(tmp, checkpoint_files(tmp)), _world()) if rank == 0 else None)
    described = _all_gather(describe_files(tmp, plan[rank]))
    if rank == 0:
        write_manifest(tmp, {k: v for part in described for k, v in part.items()}, step, world)  # last
        if final.exists():  # re-saving a step (resumed from an older checkpoint): replace it
            discard(final)
        os.replace(tmp, final)
        set_pointer(run_dir, LATEST, final)  # the flip: last, atomic
    _barrier()
    return final


def select_resume(run_dir: str | Path, candidate: Path | None, rank: int) -> Path | None:
    """Collective: the checkpoint to resume from. ``candidate`` (the run's ``latest``, or the one a Ray restart
    picked) when it verifies against its manifest, else the newest older checkpoint that does. The ranks verify
    together, each reading its share of the files; rank 0 says what it found, once: one line per bad checkpoint
    (its step and first bad file), one line when it falls back (and points ``latest`` at that checkpoint, so the
    bad one is pruned once a newer one is published). A checkpoint without a manifest (an older argus) is
    used unverified, with a note. Raises :class:`CheckpointError` (one line) when none is usable."""
    if candidate is None:
        return None
    world = _world()
    base = step_of(candidate)
    older = [p for s, p in reversed(checkpoints(run_dir).items()) if base is not None and s < base]
    bad: list[Verdict] = []
    for path in [candidate, *older]:
        verdict = verify(path, (rank, world))
        if world > 1:
            verdict = verdict.merge(_all_gather(verdict))
        if not verdict.ok:
            if rank == 0:
                log.warning("%s", verdict.line())
            bad.append(verdict)
            continue
        step = verdict.step
        if rank == 0:
            if verdict.status == "unverified":
                log.warning(
                    "checkpoint %s (step %s) has no manifest.json (written by an older argus): resuming from it "
                    "unverified",
                    path,
                    step,
                )
            if bad:
                set_pointer(run_dir, LATEST, path)
                again = f"step {step + 1} runs" if bad[0].step == step + 1 else f"steps {step + 1}-{bad[0].step} run"
                log.warning(
                    "resume: falling back to %s (step %s), the newest good checkpoint (latest now names it); %s again",
                    path,
                    step,
                    again,
                )
        return path
    steps = ", ".join(str(v.step) for v in bad)
    raise CheckpointError(
        f"{checkpoint_root(run_dir)}: no good checkpoint to resume from (step{'s' if len(bad) > 1 else ''} {steps} "
        f"{'are' if len(bad) > 1 else 'is'} bad; step {bad[0].step}: {bad[0].problems[0]}); "
        "pass train.overwrite=true to start over"
    )


def load(engine: Engine, loader: ShardLoader, path: Path, rank: int) -> dict[str, Any]:
    """Collective: resume training — dense with its optimizer (DeepSpeed), tables with their sparse
    optimizer state (either backend's checkpoint), loader, RNG; returns meta.json (with the step)."""
    from trainer import elastic

    meta = json.loads((path / "meta.json").read_text())
    saved_world, world = meta.get("world_size"), elastic.world_size()
    # Another world size or tensor-parallel size: the dense side goes through a universal checkpoint
    # (trainer/elastic.py); the same layout: DeepSpeed's own load, bitwise.
    saved = saved_job(path)
    same_tp = saved.parallel.tp == engine.cfg.parallel.tp
    if not same_tp and 0 in (saved.deepspeed.stage, engine.cfg.deepspeed.stage):
        raise CheckpointError(
            f"{path}: resuming parallel.tp={saved.parallel.tp} as parallel.tp={engine.cfg.parallel.tp} needs "
            f"deepspeed.stage >= 1 on both sides (was {saved.deepspeed.stage}, now {engine.cfg.deepspeed.stage}): "
            "the universal checkpoint that re-splits the shards has no ZeRO-0 form"
        )
    convert_s = elastic.load_dense(engine, path / "dense", DENSE_TAG, (saved_world or world) if same_tp else None, rank)
    load_tables(path, engine.tables, engine.sparse_optimizer)  # DCP reshards for any world size
    load_item_cold(engine.ds.module, path)
    states = json.loads((path / "loader.json").read_text())
    loader.load_state_dict(states)  # re-laid out over the new (data-parallel) ranks
    saved_dp, dp = len(states), world // engine.group  # parallel.tp / sp: one loader per group
    rng = path / "rng" / f"rank{rank:05d}.pt"
    if rng.is_file() and saved_world == world and saved_dp == dp:  # per-rank RNG streams: the same layout only
        _set_rng_state(torch.load(rng, weights_only=False))
    if (saved_world not in (None, world) or saved_dp != dp) and rank == 0:
        batch = engine.cfg.data.batch_size * engine.cfg.train.gradient_accumulation_steps
        elastic.log.warning(elastic.resume_line(path.name, saved_world or world, world, batch, convert_s, saved_dp, dp))
    return meta


def saved_config(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((path / "config.yaml").read_text())


def saved_job(path: Path) -> JobConfig:
    """The JobConfig saved beside checkpoint ``path`` (old runs' moved keys are migrated)."""
    return from_dict(JobConfig, saved_config(path))


# ---- weights of a checkpoint into a model: resume, fine-tuning init, eval and export share these ------------------
def load_tables(path: Path, tables: Any, optimizer: Any = None) -> None:
    """Checkpoint ``path``'s item tables (and sparse optimizer state) into ``tables``: a DMP, sharded any way
    for any world size (DCP reshards), a plain ``SparseArch``, or a ``ReplicatedItemTables`` (backend torch).
    The state-dict names are the same for all three, so a checkpoint of either backend loads into any of them.
    Collective under DMP; the other two load in this process alone, even inside a process group (validation
    on rank 0; every rank of a torch-backend run reads the whole table)."""
    from embeddings.replicated import ReplicatedItemTables

    if isinstance(tables, ReplicatedItemTables):
        local = True
    else:
        from torchrec.distributed.model_parallel import DistributedModelParallel

        local = not isinstance(tables, DistributedModelParallel)
    state = {"tables": tables.state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # DCP's ShardedTensor notice: TorchRec's tables are ShardedTensors
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process loading: what we want
        dcp.load(state, checkpoint_id=str(path / "sparse"), no_dist=local)
    tables.load_state_dict(state["tables"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])


def dense_weights(path: Path, collective: bool = False) -> dict[str, torch.Tensor]:
    """The full fp32 dense state dict of checkpoint ``path``, whatever its ZeRO stage, world size and layout.

    ``collective``: every rank of the process group calls it (eval, export, fine-tuning init); a tensor-parallel
    checkpoint is then merged once, on rank 0, and its weights broadcast (the merge writes about 6x the dense
    model's fp32 size to rank 0's temporary directory)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = path / "dense" / DENSE_TAG
    job = saved_job(path)
    if job.parallel.tp > 1:
        merge = functools.partial(_merged_tensor_parallel, tag_dir)
        weights = _on_rank0(merge) if collective and _world() > 1 else merge()
    elif job.deepspeed.stage == 0:  # no ZeRO partitions: the full weights are in the model-states file
        weights = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        # DeepSpeed prints its progress (and a tqdm bar on stderr) for every load: eval, export, validation
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            weights = get_fp32_state_dict_from_zero_checkpoint(str(path / "dense"), tag=DENSE_TAG)
    return {k: v.float() for k, v in weights.items()}


def _merged_tensor_parallel(tag_dir: Path) -> dict[str, torch.Tensor]:
    """A parallel.tp checkpoint's weights, its shards (one set of files per tp rank) merged by DeepSpeed's
    universal checkpoint, converted in a temporary directory."""
    from trainer.elastic import to_universal

    with tempfile.TemporaryDirectory(prefix="argus-tp-") as tmp:
        to_universal(tag_dir, Path(tmp) / "universal")
        params = [p for p in (Path(tmp) / "universal" / "zero").iterdir() if p.is_dir()]
        return {p.name: torch.load(p / "fp32.pt", map_location="cpu", weights_only=False)["param"] for p in params}


def load_weights(path: Path, tables: Any, dense: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    """Checkpoint ``path``'s weights into ``tables`` (see :func:`load_tables`) and into ``dense``, a module not
    yet handed to DeepSpeed (the pre-trained ``ArgusModel`` inside a ``TwoTower`` for fine-tuning init). Under a
    process group every rank calls it. ``skip``: prefixes of saved dense weights ``dense`` need not have (a
    ``train.init_from`` run without the reconstruction head its source trained)."""
    load_tables(path, tables)
    weights = dense_weights(path, collective=_world() > 1)  # under a group every rank loads (eval, export, init)
    mine = dense.state_dict()
    weights = {k: v for k, v in weights.items() if k in mine or not k.startswith(skip)} if skip else weights
    missing = set(mine) - set(weights)
    if missing:
        weights.update(_side_tables_of_old_checkpoint(path, missing))
    dense.load_state_dict(weights)
    load_item_cold(dense, path)  # a semantic item tower: the cold flags the run trained with


def _side_tables_of_old_checkpoint(path: Path, missing: set[str]) -> dict[str, torch.Tensor]:
    """Checkpoints written before the small side tables became dense weights (argus 0.1) hold them in the
    TorchRec part (``side.embeddings.<name>.weight``): read the ones ``missing`` from the dense model there,
    so old runs still evaluate, export and initialise fine-tuning."""
    saved = dcp.FileSystemReader(str(path / "sparse")).read_metadata().state_dict_metadata
    want = {}
    for key in missing:
        parts = key.split(".")
        old = f"side.embeddings.{parts[-2]}.weight"
        if parts[-4:-2] == ["interaction", "side"] and f"tables.{old}" in saved:
            want[key] = (old, torch.empty(tuple(saved[f"tables.{old}"].size)))
    if want:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load({"tables": {old: t for old, t in want.values()}}, checkpoint_id=str(path / "sparse"), no_dist=True)
    return {key: t for key, (_old, t) in want.items()}


def load_model(
    checkpoint_or_run: str | Path, num_items: int, manifest: Manifest | None = None
) -> tuple[JobConfig, SparseArch, torch.nn.Module]:
    """(config, unsharded tables, dense model), in eval mode, from a checkpoint or a run directory's latest;
    with dataset ``manifest``, its item data attached (a semantic item tower needs them to run)."""
    from embeddings.tables import SparseArch
    from trainer.model.build import build_dense
    from trainer.model.item_tower import attach_item_data

    path = resolve_checkpoint(checkpoint_or_run)
    cfg = saved_job(path)
    sparse = SparseArch(cfg.embeddings, num_items, device="cpu")
    dense = build_dense(cfg)
    if manifest is not None:
        attach_item_data(dense, manifest, sparse.item_rows, cfg.data.split)
    load_weights(path, sparse, dense)
    return cfg, sparse.eval(), dense.eval()


class ShardedModel(NamedTuple):
    """A checkpoint's model for inference under a process group (eval, export): the item table sharded by TorchRec as
    in training (or replicated: backend torch), the dense model whole on every rank, both in eval mode."""

    cfg: JobConfig
    tables: Any  # a DMP, or ReplicatedItemTables (embeddings.backend torch)
    item_rows: int
    dense: torch.nn.Module


def load_model_sharded(path: Path, manifest: Manifest, device: torch.device, world: int) -> ShardedModel:
    """Collective: checkpoint ``path`` loaded for inference on this process group, any world size (DCP reshards the
    tables; the dense weights are consolidated from any ZeRO stage), with the item data of dataset ``manifest``
    attached (a semantic item tower's metadata). Used by ``argus eval`` and ``argus export``."""
    from embeddings.replicated import ReplicatedItemTables
    from embeddings.tables import SparseArch
    from trainer.memory import embedding_hbm_budget, embedding_lookups
    from trainer.model.build import build_dense
    from trainer.model.item_tower import attach_item_data

    cfg = saved_job(path)
    num_items = manifest.num_items
    tables: Any
    if cfg.embeddings.backend == "torch":  # the run's backend: the whole table on every rank, plain torch
        tables = ReplicatedItemTables(cfg.embeddings, num_items, device=device)
        item_rows = tables.item_rows
    else:
        from embeddings.sharding import shard

        sparse = SparseArch(cfg.embeddings, num_items, device="meta")
        item_rows = sparse.item_rows
        hbm_cap = None
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            gpn = torch.cuda.device_count()
            hbm_cap = embedding_hbm_budget(cfg, world, total, gpus_per_node=gpn, item_rows=item_rows)
            # inside a training job (validation) the training tables already hold their share: plan in what is free
            hbm_cap = min(hbm_cap, int(torch.cuda.mem_get_info(device)[0] * 0.8))
        batch, lookups = cfg.data.batch_size, embedding_lookups(cfg)
        tables, _ = shard(sparse, cfg.embeddings, device, batch_size=batch, hbm_cap=hbm_cap, lookups=lookups)
    dense = build_dense(cfg)
    attach_item_data(dense, manifest, item_rows, cfg.data.split)
    load_weights(path, tables, dense)
    tables.eval()
    return ShardedModel(cfg, tables, item_rows, dense.to(device).eval())
