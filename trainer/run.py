"""Run a training job in this process: pre-training, or fine-tuning when ``finetune.init`` names a run.

Its own module so that ``trainer/train.py`` (the loop) and ``trainer/finetune.py`` (which extends it) do
not import each other: launchers call :func:`train` / :func:`build_trainer` from here.
"""

from __future__ import annotations

from typing import Any

from trainer.dist import DistInfo
from trainer.finetune import FinetuneTrainer
from trainer.job import JobConfig
from trainer.train import Trainer


def build_trainer(cfg: JobConfig, info: DistInfo | None = None) -> Trainer:
    """The Trainer for ``cfg``: FinetuneTrainer when ``finetune.init`` is set."""
    return FinetuneTrainer(cfg, info) if cfg.finetune.enabled else Trainer(cfg, info)


def train(cfg: JobConfig) -> dict[str, Any]:
    """Run a whole training (or fine-tuning) job in this process (one rank of it)."""
    return build_trainer(cfg).run()
