"""Runs written before the small side tables became dense weights (their tables in the TorchRec part of the
checkpoint, `embeddings.side_dim` in config.yaml) still load for eval, export and fine-tuning init."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml

from trainer.checkpoint import DENSE_TAG, load_model
from trainer.config import from_dict, to_dict
from trainer.job import JobConfig
from trainer.model.build import build_dense

SIDE = ("context", "hour", "gap", "event", "played")


def old_layout_checkpoint(path: Path, items: int, with_side: bool = True) -> dict[str, torch.Tensor]:
    """A stage-0 checkpoint as the previous layout wrote it; returns the weights it holds, by new dense name."""
    new = from_dict(
        JobConfig,
        {
            "model": {
                "preset": "custom",
                "d_model": 16,
                "n_layers": 1,
                "n_heads": 2,
                "d_ff": 32,
                "max_seq_len": 16,
                "side_dim": 4,
            },
            "embeddings": {"item_dim": 8},
            "deepspeed": {"stage": 0},
            "out": "x",
        },
    )
    torch.manual_seed(0)
    dense = build_dense(new).state_dict()
    side = {k: torch.randn_like(v) for k, v in dense.items() if k.startswith("interaction.side.")}
    module = {k: v for k, v in dense.items() if k not in side}
    (path / "dense" / DENSE_TAG).mkdir(parents=True)
    torch.save({"module": module}, path / "dense" / DENSE_TAG / "mp_rank_00_model_states.pt")
    old_cfg = to_dict(new)
    model = old_cfg["model"]
    old_cfg["embeddings"].update(
        side_dim=model.pop("side_dim"),
        num_contexts=model.pop("num_contexts"),
        token_layout=model.pop("token_layout"),
        side_sharding="table_wise",
    )
    (path / "config.yaml").write_text(yaml.safe_dump(old_cfg))
    (path / "meta.json").write_text(json.dumps({"step": 1, "world_size": 1}))
    item = torch.randn(items, 8)
    tables = {"items.embeddings.item.weight": item}
    if with_side:
        tables.update({f"side.embeddings.{k.split('.')[-2]}.weight": v for k, v in side.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"tables": tables}, checkpoint_id=str(path / "sparse"))
    return {**module, **side, "item": item}


def test_old_layout_checkpoint_loads_its_side_tables_into_the_dense_model(tmp_path):
    want = old_layout_checkpoint(tmp_path, items=30)
    cfg, sparse, dense = load_model(tmp_path, num_items=30)
    assert (cfg.model.side_dim, cfg.model.token_layout) == (4, "merged")  # moved keys migrated
    assert torch.equal(sparse.items.embeddings["item"].weight.detach(), want.pop("item"))
    got = dense.state_dict()
    assert set(got) == set(want) and any(k.startswith("interaction.side.") for k in want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_checkpoint_without_side_tables_anywhere_is_refused(tmp_path):
    old_layout_checkpoint(tmp_path, items=30, with_side=False)
    with pytest.raises(RuntimeError, match="interaction.side.event.weight"):
        load_model(tmp_path, num_items=30)
