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
    for bad, msg in [({"inner": {"n": "3"}}, "inner.n: expected an integer"),
                     ({"inner": {"n": True}}, "inner.n: expected an integer"),
                     ({"inner": {"flag": "yes"}}, "inner.flag: expected true/false"),
                     ({"inner": {"ks": [1, "b"]}}, r"inner.ks\[1\]: expected an integer"),
                     ({"inner": {"typo": 1}}, "unknown config key inner.typo"),
                     ({"inner": 5}, "inner: expected a mapping")]:
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
