"""Shared test helpers: a tiny model that trains in seconds on 2 CPU cores, and reading a run's losses."""

import json
from pathlib import Path

TINY_MODEL = ["model.preset=custom", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
              "model.max_seq_len=32", "embeddings.item_dim=16", "model.side_dim=8", "data.batch_size=4",
              "heads.next_item.uniform_negatives=16", "heads.next_item.in_batch_negatives=16",
              "train.log_every=1", "train.device=cpu", "train.timeout_s=120"]


def losses(run: Path) -> dict[int, float]:
    """step -> loss/total from a run's metrics.jsonl."""
    return {r["step"]: r["loss/total"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def read_samples(root: Path, split: str) -> list:
    """Every sample of a split, read with stdlib tarfile + decode_sample (independently of the loader)."""
    import tarfile

    from trainer.data.manifest import Manifest
    from trainer.data.schema import decode_sample

    out = []
    for shard in Manifest.load(root).split(split).shards:
        with tarfile.open(root / shard.path) as tf:
            out += [decode_sample(m.name.split(".")[0], tf.extractfile(m).read()) for m in tf]
    return out


def assert_training_plan_matches(run: Path, data: Path, world: int) -> None:
    """The sharding `argus train` built (RUN/sharding_plan.json) is the one `argus plan` makes offline."""
    import yaml

    from cluster.hardware import Hardware
    from cluster.planner import torchrec_plan
    from trainer.config import from_dict
    from trainer.job import JobConfig

    cfg = from_dict(JobConfig, yaml.safe_load((run / "config.yaml").read_text()))
    built = json.loads((run / "sharding_plan.json").read_text())
    num_items = json.loads((data / "manifest.json").read_text())["num_items"]
    offline = torchrec_plan(cfg, num_items, Hardware("h100", nodes=1, gpus_per_node=world), None, "cpu")
    assert offline["plan"] == built
