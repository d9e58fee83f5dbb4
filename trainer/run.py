"""A training job from the command line's view: load and check its config, build its trainer, run it.

Its own module so that ``trainer/train.py`` (the loop) and ``trainer/finetune.py`` (which extends it) do
not import each other; every launcher (plain, torchrun, the deepspeed launcher, Ray) comes through here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

from trainer import rundir
from trainer.config import load_config
from trainer.data.manifest import Manifest
from trainer.dist import DistInfo
from trainer.finetune import FinetuneTrainer, check_against_init
from trainer.job import JobConfig
from trainer.train import Trainer


def load_job(config: str | Path | None, overrides: Sequence[str], world_size: int | None = None) -> JobConfig:
    """The run config from YAML + key=value overrides, validated for ``world_size`` (default: $WORLD_SIZE).

    A fine-tuning run also checks the pre-trained run and the impression split, before any process group.
    ``out`` is checked read-only (trainer/rundir.py): a directory that holds a run needs ``resume=true`` or
    ``train.overwrite=true``, one that holds anything else is refused. Every launcher comes through here, on
    every rank, before any rank writes. Raises ConfigError (a ValueError) or OSError naming the key or file at
    fault.
    """
    cfg = load_config(JobConfig, config, list(overrides), validate=False)
    cfg.validate(world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1)))
    if cfg.finetune.enabled:
        check_against_init(cfg)
        Manifest.load(cfg.data.path).split(cfg.train_split())
    if cfg.model.item_tower != "id":  # the dataset's item metadata must fit the tower: one line before any rank
        from trainer.model.item_tower import check_item_data

        manifest = Manifest.load(cfg.data.path)
        rows = cfg.embeddings.item_rows or manifest.num_items
        check_item_data(cfg.model.item_tower, cfg.model.item_features, rows, manifest)
    if cfg.finetune.enabled:
        rundir.check_run_dir(cfg.out, cfg.resume, cfg.train.overwrite, cfg.finetune.init)
        return cfg
    init = cfg.train.init_from or None
    holds = rundir.check_run_dir(cfg.out, cfg.resume, cfg.train.overwrite, init, "train.init_from")
    if cfg.train.init_from and not (cfg.resume and holds):  # a resumed run has weights of its own
        # pinned: every rank (and a restarted worker) loads the one checkpoint checked here, not whatever the other
        # run's best or latest is by then; the saved config names it
        path = check_against_init(cfg, "train.init_from").resolve()
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(path)))
    return cfg


def start_over(cfg: JobConfig, rank: int = 0) -> JobConfig:
    """``train.overwrite=true``: rank 0 (or a launcher's driver, before any worker starts) removes the earlier
    run in ``out``, once, after :func:`load_job` checked it. Every rank gets the config to train with, its
    ``train.overwrite`` false: that config is saved beside every checkpoint, and running a saved config again
    must never remove the run it belongs to."""
    if not cfg.train.overwrite:
        return cfg
    if rank == 0:
        rundir.start_over(cfg.out)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, overwrite=False))


def build_trainer(cfg: JobConfig, info: DistInfo | None = None) -> Trainer:
    """The Trainer for ``cfg``: FinetuneTrainer when ``finetune.init`` is set."""
    return FinetuneTrainer(cfg, info) if cfg.finetune.enabled else Trainer(cfg, info)


def train(cfg: JobConfig) -> dict[str, Any]:
    """Run a whole training (or fine-tuning) job in this process (one rank of it). With ``train.overwrite``,
    rank 0 removes the earlier run first, before it joins the process group: before any rank writes."""
    cfg = start_over(cfg, int(os.environ.get("RANK", 0)))
    return build_trainer(cfg).run()
