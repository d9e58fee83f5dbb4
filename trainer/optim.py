"""The dense optimizer's parameter groups and learning-rate schedule (what AdamW under DeepSpeed gets).

Weight decay pulls a weight toward zero. That is a prior for the matrices of linear layers; for a
LayerNorm gain (whose neutral value is 1), a bias, a position or a side-table row it only adds noise
that small datasets feel (issue #11), so those go in a group without decay, as in GPT-2/nanoGPT.
The item table is not here: TorchRec's fused optimizer trains it (``embeddings.optimizer``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class OptimConfig:
    """Dense optimizer (AdamW, a plain torch optimizer: DeepSpeed compiles nothing for it) and its schedule."""

    lr: float = 1e-3
    weight_decay: float = 0.01  # on the weight matrices of linear layers only (see decay_groups)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps to lr
    schedule: str = "cosine"  # after warmup: cosine | linear decay to min_lr at the last step, or constant
    min_lr: float = 1e-5  # the decay's floor (an lr below it is not raised: the floor is min(min_lr, lr))

    def validate(self, where: str = "optim") -> None:
        if self.lr <= 0:
            raise ValueError(f"{where}.lr: must be > 0, got {self.lr}")
        if self.min_lr < 0:
            raise ValueError(f"{where}.min_lr: must be >= 0, got {self.min_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"{where}.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"{where}.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{where}.schedule: must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if len(self.betas) != 2:
            raise ValueError(f"{where}.betas: expected two numbers")


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: the weight matrices of ``nn.Linear`` layers decay; everything else (norms,
    biases, position and side tables) does not. Each parameter lands in exactly one group."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if id(p) in decay_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The schedule as a multiple of ``cfg.lr`` for ``LambdaLR``: ``f(s)`` is the lr of optimizer step ``s + 1``
    (0-based ``s``). Warmup ramps linearly to 1 over ``warmup_steps``; the decay reaches ``min_lr`` at the
    last step (``total_steps``) and stays there if a run goes on."""
    floor = min(cfg.min_lr / cfg.lr, 1.0)
    warmup = cfg.warmup_steps

    def f(s: int) -> float:
        step = s + 1
        if warmup and step <= warmup:
            return step / warmup
        if cfg.schedule == "constant":
            return 1.0
        span = max(total_steps - warmup, 1)
        t = min(max(step - warmup, 0) / span, 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
        return floor + (1 - floor) * shape

    return f
