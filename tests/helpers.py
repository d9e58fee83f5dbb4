"""Shared test helpers: a tiny model that trains in seconds on 2 CPU cores, and reading a run's losses."""

import json
from pathlib import Path

TINY_MODEL = ["model.preset=custom", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
              "model.max_seq_len=32", "embeddings.item_dim=16", "embeddings.side_dim=8", "data.batch_size=4",
              "heads.next_item.uniform_negatives=16", "heads.next_item.in_batch_negatives=16",
              "train.log_every=1", "train.device=cpu", "train.timeout_s=120"]


def losses(run: Path) -> dict[int, float]:
    """step -> loss/total from a run's metrics.jsonl."""
    return {r["step"]: r["loss/total"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
