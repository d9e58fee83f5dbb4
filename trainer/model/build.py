"""The one place a dense model is built from a run config (training, fine-tuning, eval, export, tests)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from trainer.model.argus import ArgusModel
from trainer.model.two_tower import TwoTower

if TYPE_CHECKING:
    from trainer.job import JobConfig


def build_dense(cfg: JobConfig) -> nn.Module:
    """The module DeepSpeed trains for ``cfg``: ``ArgusModel``, or ``TwoTower`` for a fine-tuning run.

    Weights are freshly initialised from torch's global RNG (seed it first for identical ranks);
    :func:`trainer.checkpoint.load_weights` fills them from a checkpoint."""
    model: nn.Module
    if cfg.finetune.enabled:
        model = TwoTower(cfg.model, cfg.embeddings, cfg.heads, cfg.finetune)
        argus = model.argus
    else:
        model = argus = ArgusModel(cfg.model, cfg.embeddings, cfg.heads)
    if cfg.model.summary.tokens:  # model.summary: the windows of the longest sample, on every rank alike
        argus.min_windows = cfg.windows_per_sample()
    return model


def compile_dense(dense: nn.Module) -> None:
    """``train.compile``: torch.compile the encoder blocks of ``dense`` (``Encoder.compile_blocks``; lazy, the
    first forward compiles)."""
    encoder = dense.argus.encoder if isinstance(dense, TwoTower) else dense.encoder
    encoder.compile_blocks()
