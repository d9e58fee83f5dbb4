"""Checkpoints: DeepSpeed (dense) + torch.distributed.checkpoint (the item tables, sharded or replicated, and
their optimizer state) + every rank's data-loader state + RNG states + step + the run config, published atomically.

Layout: ``RUN/checkpoints/step_00000100/{dense/, sparse/, loader.json, rng/rank*.pt, meta.json, config.yaml}``
and ``RUN/checkpoints/latest`` naming the newest complete one. Everything is written into
``step_*.tmp`` first; the directory is renamed and then ``latest`` flipped, so a crash at any moment
leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from trainer.config import from_dict, save_config
from trainer.data.loader import ShardLoader, gather_states
from trainer.job import JobConfig

if TYPE_CHECKING:
    from embeddings.tables import SparseArch
    from trainer.engine import Engine

LATEST = "latest"
BEST = "best"  # the checkpoint validation selected (eval.every / eval.select), when the run validates
DENSE_TAG = "state"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _pointer(run_dir: str | Path, name: str) -> Path | None:
    root = checkpoint_root(run_dir)
    pointer = root / name
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{pointer}: points to {path.name}, which is incomplete or missing")
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    return _pointer(run_dir, LATEST)


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint validation selected, or None when the run kept no ``best``."""
    return _pointer(run_dir, BEST)


def set_pointer(run_dir: str | Path, name: str, checkpoint_dir: Path) -> None:
    """Atomically point ``checkpoints/<name>`` (``latest``, ``best``) at ``checkpoint_dir``."""
    root = checkpoint_root(run_dir)
    tmp = root / f"{name}.tmp"
    tmp.write_text(checkpoint_dir.name + "\n")
    os.replace(tmp, root / name)


def resolve_checkpoint(path: str | Path, prefer_best: bool = False) -> Path:
    """A checkpoint directory (has meta.json), or a run directory's ``best`` (when ``prefer_best`` and the run
    kept one) or ``latest`` checkpoint."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    found = None
    if (p / "checkpoints").is_dir():
        found = (best_checkpoint(p) if prefer_best else None) or latest_checkpoint(p)
    if found is None:
        raise FileNotFoundError(
            f"{path}: no checkpoint (expected a run directory with checkpoints/latest, "
            f"or a checkpoint directory with meta.json)"
        )
    return found


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

    ``mid_write(tmp)`` runs between the dense and the sparse writes (fault drills kill a rank there).
    """
    root = checkpoint_root(run_dir)
    name = f"step_{step:08d}"
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
    torch.save(_rng_state(), tmp / "rng" / f"rank{rank:05d}.pt")
    if rank == 0:
        (tmp / "loader.json").write_text(json.dumps(states))
        save_config(cfg, tmp / "config.yaml")
        meta = {"step": step, "world_size": len(states), "time": time.time(), **(extra or {})}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    _barrier()
    if rank == 0:
        if final.exists():  # re-saving a step (e.g. after a restart): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        set_pointer(run_dir, LATEST, final)  # the flip: last, atomic
    _barrier()
    return final


def load(engine: Engine, loader: ShardLoader, path: Path, rank: int) -> dict[str, Any]:
    """Collective: resume training — dense with its optimizer (DeepSpeed), tables with their sparse
    optimizer state (either backend's checkpoint), loader, RNG; returns meta.json (with the step)."""
    from trainer import elastic

    meta = json.loads((path / "meta.json").read_text())
    saved_world, world = meta.get("world_size"), elastic.world_size()
    # Another world size: the dense side goes through a universal checkpoint (trainer/elastic.py); same size:
    # DeepSpeed's own load, bitwise.
    convert_s = elastic.load_dense(engine, path / "dense", DENSE_TAG, saved_world, rank)
    load_tables(path, engine.tables, engine.sparse_optimizer)  # DCP reshards for any world size
    loader.load_state_dict(json.loads((path / "loader.json").read_text()))  # re-laid out over the new ranks
    rng = path / "rng" / f"rank{rank:05d}.pt"
    if rng.is_file() and saved_world == world:  # per-rank RNG streams mean nothing on another world size
        _set_rng_state(torch.load(rng, weights_only=False))
    if saved_world not in (None, world) and rank == 0:
        batch = engine.cfg.data.batch_size * engine.cfg.train.gradient_accumulation_steps
        elastic.log.warning(elastic.resume_line(path.name, saved_world, world, batch, convert_s))
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


def dense_weights(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 dense state dict of checkpoint ``path``, whatever its ZeRO stage and world size."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = path / "dense" / DENSE_TAG
    if saved_job(path).deepspeed.stage == 0:  # no ZeRO partitions: the full weights are in the model-states file
        weights = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        # DeepSpeed prints its progress (and a tqdm bar on stderr) for every load: eval, export, validation
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            weights = get_fp32_state_dict_from_zero_checkpoint(str(path / "dense"), tag=DENSE_TAG)
    return {k: v.float() for k, v in weights.items()}


def load_weights(path: Path, tables: Any, dense: torch.nn.Module) -> None:
    """Checkpoint ``path``'s weights into ``tables`` (see :func:`load_tables`) and into ``dense``, a module not
    yet handed to DeepSpeed (the pre-trained ``ArgusModel`` inside a ``TwoTower`` for fine-tuning init)."""
    load_tables(path, tables)
    weights = dense_weights(path)
    missing = set(dense.state_dict()) - set(weights)
    if missing:
        weights.update(_side_tables_of_old_checkpoint(path, missing))
    dense.load_state_dict(weights)


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


def load_model(checkpoint_or_run: str | Path, num_items: int) -> tuple[JobConfig, SparseArch, torch.nn.Module]:
    """(config, unsharded tables, dense model), in eval mode, from a checkpoint or a run directory's latest."""
    from embeddings.tables import SparseArch
    from trainer.model.build import build_dense

    path = resolve_checkpoint(checkpoint_or_run)
    cfg = saved_job(path)
    sparse = SparseArch(cfg.embeddings, num_items, device="cpu")
    dense = build_dense(cfg)
    load_weights(path, sparse, dense)
    return cfg, sparse.eval(), dense.eval()
