"""The strict config system: YAML + overrides -> dataclasses; errors name the key; round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from trainer.config import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    n: int = 1
    x: float = 0.5
    name: str = "a"
    flag: bool = False
    ks: list[int] = field(default_factory=lambda: [1, 2])
    maybe: int | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    out: str = ""


def test_types_are_checked_and_keys_named():
    assert from_dict(Outer, {"inner": {"n": 3, "x": 2, "ks": [5]}}).inner == Inner(n=3, x=2.0, ks=[5])
    for bad, msg in [
        ({"inner": {"n": "3"}}, "inner.n: expected an integer"),
        ({"inner": {"n": True}}, "inner.n: expected an integer"),
        ({"inner": {"flag": "yes"}}, "inner.flag: expected true/false"),
        ({"inner": {"ks": [1, "b"]}}, r"inner.ks\[1\]: expected an integer"),
        ({"inner": {"typo": 1}}, "unknown config key inner.typo"),
        ({"inner": 5}, "inner: expected a mapping"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            from_dict(Outer, bad)
    assert from_dict(Outer, {"inner": {"maybe": None}}).inner.maybe is None


def test_overrides_parse_yaml_scalars_and_nest():
    d = apply_overrides({}, ["inner.n=7", "inner.x=1e-3", "inner.flag=true", "inner.ks=[3,4]", "out=run dir"])
    cfg = from_dict(Outer, d)
    assert (cfg.inner.n, cfg.inner.x, cfg.inner.flag, cfg.inner.ks, cfg.out) == (7, 1e-3, True, [3, 4], "run dir")
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"out": "x"}, ["out.deeper=1"])


@pytest.mark.parametrize("name", ["mini", "small", "medium", "large"])
def test_shipped_configs_load_validate_and_round_trip(name, tmp_path):
    from trainer.job import JobConfig

    cfg = load_config(JobConfig, REPO / "configs" / f"{name}.yaml", ["data.path=/data", "out=/run"])
    cfg.validate(world_size=8, device="cuda" if name in ("medium", "large") else "cpu")
    assert cfg.model.preset == name
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(JobConfig, tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)
    ds = cfg.deepspeed_config(8)
    assert ds["train_batch_size"] == cfg.data.batch_size * 8 and "gradient_clipping" in ds


def test_deepspeed_json_contradiction_is_refused(tmp_path):
    import json

    from trainer.job import JobConfig

    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 7, "zero_optimization": {"stage": 2}}))
    args = ["data.path=/d", "out=/r", f"deepspeed.config={bad}"]
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=7 contradicts"):
        load_config(JobConfig, REPO / "configs" / "mini.yaml", args)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="zero_optimization.stage=3 but deepspeed.stage=2"):
        load_config(JobConfig, REPO / "configs" / "mini.yaml", args)


def test_validation_changes_nothing(tmp_path):
    """validate() only checks: derived values (sample length, the fine-tuning split) are computed, not stored."""
    from trainer.job import JobConfig

    init = tmp_path / "pre"
    cfg = load_config(
        JobConfig,
        REPO / "configs" / "mini.yaml",
        ["data.path=/d", "out=/r", "data.max_seq_len=0", "model.token_layout=interleaved"],
        validate=False,
    )
    ft = load_config(
        JobConfig, REPO / "configs" / "mini.yaml", ["data.path=/d", "out=/r", f"finetune.init={init}"], validate=False
    )
    for c in (cfg, ft):
        before = to_dict(c)
        c.validate(world_size=2, device="cpu")
        assert to_dict(c) == before
    assert cfg.data.max_seq_len == 0 and cfg.interactions_per_sample() == 256 // 2
    assert cfg.loader_config().max_seq_len == 128 and cfg.loader_config() is not cfg.data
    assert (ft.data.split, ft.train_split(), ft.loader_config().split) == ("train", "impressions", "impressions")


def test_moved_keys_still_load_with_one_note(tmp_path, capsys):
    """Old configs and old runs' saved config.yaml name embeddings.token_layout/side_dim/num_contexts/side_sharding."""
    import yaml

    import trainer.config as config
    from trainer.job import JobConfig

    old = {
        "embeddings": {
            "item_dim": 32,
            "token_layout": "interleaved",
            "side_dim": 8,
            "num_contexts": 7,
            "side_sharding": "row_wise",
        },
        "data": {"path": "/d"},
        "out": "/r",
    }
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    config._noted.clear()
    cfg = load_config(JobConfig, tmp_path / "old.yaml")
    assert (cfg.model.token_layout, cfg.model.side_dim, cfg.model.num_contexts) == ("interleaved", 8, 7)
    assert cfg.embeddings.item_dim == 32 and "side_sharding" not in to_dict(cfg.embeddings)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "argus: note: config key embeddings.token_layout is deprecated: use model.token_layout",
        "argus: note: config key embeddings.side_dim is deprecated: use model.side_dim",
        "argus: note: config key embeddings.num_contexts is deprecated: use model.num_contexts",
        "argus: note: config key embeddings.side_sharding is deprecated: it is no longer used and is ignored",
    ]
    assert old["embeddings"]["side_dim"] == 8  # the caller's mapping is not changed
    load_config(JobConfig, tmp_path / "old.yaml")
    assert capsys.readouterr().err == ""  # once per process
    with pytest.raises(ConfigError, match="embeddings.side_dim: deprecated, and model.side_dim is set"):
        load_config(JobConfig, tmp_path / "old.yaml", ["model.side_dim=16"])
