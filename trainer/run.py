"""A training job from the command line's view: load and check its config, build its trainer, run it.

Its own module so that ``trainer/train.py`` (the loop) and ``trainer/finetune.py`` (which extends it) do
not import each other; every launcher (plain, torchrun, the deepspeed launcher, Ray) comes through here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from trainer.config import load_config
from trainer.data.manifest import Manifest
from trainer.dist import DistInfo
from trainer.finetune import FinetuneTrainer, check_against_init
from trainer.job import JobConfig
from trainer.train import Trainer


def load_job(config: str | Path | None, overrides: Sequence[str], world_size: int | None = None) -> JobConfig:
    """The run config from YAML + key=value overrides, validated for ``world_size`` (default: $WORLD_SIZE).

    A fine-tuning run also checks the pre-trained run and the impression split, before any process group.
    Raises ConfigError (a ValueError) or OSError naming the key or file at fault.
    """
    cfg = load_config(JobConfig, config, list(overrides), validate=False)
    cfg.validate(world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1)))
    if cfg.finetune.enabled:
        check_against_init(cfg)
        Manifest.load(cfg.data.path).split(cfg.train_split())
    return cfg


def build_trainer(cfg: JobConfig, info: DistInfo | None = None) -> Trainer:
    """The Trainer for ``cfg``: FinetuneTrainer when ``finetune.init`` is set."""
    return FinetuneTrainer(cfg, info) if cfg.finetune.enabled else Trainer(cfg, info)


def train(cfg: JobConfig) -> dict[str, Any]:
    """Run a whole training (or fine-tuning) job in this process (one rank of it)."""
    return build_trainer(cfg).run()
