"""The stock DeepSpeed configs parse, name their stage, and never rely on DeepSpeed's implicit clipping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ds_config_parses(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    from trainer.config import from_dict
    from trainer.job import JobConfig

    raw = json.loads(path.read_text())
    assert "gradient_clipping" in raw, "0.19.8 clips to 1.0 unless set: always explicit"
    assert "train_batch_size" not in raw and "train_micro_batch_size_per_gpu" not in raw, "the trainer fills these"
    stage = int(path.stem[4])
    job = from_dict(JobConfig, {"deepspeed": {"stage": stage, "config": str(path), "offload": "offload" in path.stem}})
    cfg = DeepSpeedConfig(job.deepspeed_config(world_size=1))
    assert cfg.zero_optimization_stage == stage
    assert cfg.train_micro_batch_size_per_gpu == job.data.batch_size
    assert ("offload" in path.stem) == (cfg.zero_config.offload_optimizer is not None)


def test_all_stages_present():
    assert {p.stem for p in CONFIGS} >= {"zero0", "zero1", "zero2", "zero3", "zero3_offload"}
