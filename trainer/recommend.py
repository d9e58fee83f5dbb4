"""Which preset and settings to start from, by dataset size (printed by ``argus data inspect``; docs/training.md).

The rule reads the training split's size only. The small end is measured (bench/quality.py against the
reference SASRec, docs/benchmarks.md); the large end follows the paper's scaling runs, where each interaction
is seen about once and model size pays off with data size.
"""

from __future__ import annotations

from dataclasses import dataclass

# (at most this many training interactions, preset, config file, what to expect)
TIERS: tuple[tuple[float, str, str, str], ...] = (
    (2e6, "nano", "configs/nano.yaml", "small data: many epochs, dropout 0.2, full softmax; validation picks the step"),
    (5e7, "mini", "configs/mini.yaml", "a few epochs; validate every epoch (eval.every_epochs=1)"),
    (2e9, "small", "configs/small.yaml", "about one epoch; sampled softmax with logQ"),
    (3e10, "medium", "configs/medium.yaml", "one epoch or less; plan GPUs first: argus plan"),
    (float("inf"), "large", "configs/large.yaml", "the paper's billion-parameter setting; argus plan first"),
)


@dataclass(frozen=True)
class Recommendation:
    preset: str
    config: str
    note: str
    train_interactions: int

    def command(self, data: str) -> str:
        return f"argus train {self.config} data.path={data} out=RUN"


def recommend(train_interactions: int) -> Recommendation:
    """The starting point for a dataset whose training split holds ``train_interactions`` interactions."""
    for limit, preset, config, note in TIERS:
        if train_interactions <= limit:
            return Recommendation(preset, config, note, train_interactions)
    raise AssertionError("unreachable: the last tier has no limit")
