"""Options and key=value overrides mix in any order, in every subcommand that takes overrides; a token that is
neither a known option nor key=value is still refused, by name. Each case fails in the config (an unknown key
given after an option) before any work: the override reached the config, it was not refused by argparse."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import argus_inproc, one_line_error

REPO = Path(__file__).resolve().parents[1]
BAD = "model.nope=1"  # an override the config refuses, naming it: proof that it got there


def _cases(tmp: Path) -> dict[str, list[str]]:
    config = "configs/mini.yaml"
    return {
        "train": ["train", config, "data.path=D", "--local_rank=0", BAD],  # the deepspeed launcher's option
        "finetune": ["finetune", config, "data.path=D", "--init", str(tmp / "pre"), BAD],
        "launch ray": [
            "launch",
            "ray",
            config,
            "data.path=D",
            "--local",
            "--num-workers",
            "1",
            BAD,
            "--storage-path",
            str(tmp / "s"),
        ],  # fmt: skip
        "launch deepspeed": ["launch", "deepspeed", config, "data.path=D", "--dry-run", BAD, "--master-port", "1"],
        "plan": ["plan", config, "--items", "1e6", BAD, "--gpu", "h100"],
    }


@pytest.mark.parametrize("command", ["train", "finetune", "launch ray", "launch deepspeed", "plan"])
def test_overrides_after_options_reach_the_config(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LOCAL_RANK", "0")  # what --local_rank=N sets (main() only sets it when unset)
    code, _, err = argus_inproc(capsys, *_cases(tmp_path)[command])
    assert code == 2
    assert one_line_error(err).startswith("argus: error: configs/mini.yaml: unknown config key model.nope ")


def test_cluster_check_takes_overrides_after_options(tmp_path, monkeypatch, capsys):
    """`cluster check` reports a config problem among its checks (exit 1); Ray is stubbed (see test_launch_ray)."""
    import contextlib

    import cluster.preflight as preflight
    import cluster.ray_local as ray_local

    def fake_run_checks(job, **kw):
        return preflight.PreflightResult(fits=True, storage=tmp_path, free_bytes=2**40, probe={})

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(ray_local, "ray_session", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(preflight, "nodes", lambda: [])
    monkeypatch.setattr(preflight, "run_checks", fake_run_checks)
    code, out, err = argus_inproc(
        capsys, "cluster", "check", "configs/mini.yaml", "--local", BAD, "--num-workers", "1",
        "--storage-path", str(tmp_path / "pf"),
    )  # fmt: skip
    assert code == 1, err
    assert "argus cluster check: config: configs/mini.yaml: unknown config key model.nope " in out


@pytest.mark.parametrize(
    "argv, stray",
    [
        (["launch", "ray", "configs/mini.yaml", "--local", "--num-workers", "1", "stray", "--storage-path", "S"],
         "stray"),
        (["train", "configs/mini.yaml", "--bogus", "a=1"], "--bogus"),
        (["plan", "--preset", "mini", "--items", "1e6", "--bogus=1"], "--bogus=1"),
        (["eval", "RUN", "--data", "D", BAD], BAD),  # eval and export take no overrides
        (["export", "RUN", "--data", "D", "--out", "O", "x=1"], "x=1"),
    ],
)  # fmt: skip
def test_a_token_neither_option_nor_override_is_refused_by_name(argv, stray, capsys):
    code, _, err = argus_inproc(capsys, *argv)
    assert code == 2
    assert err.splitlines()[-1] == f"argus: error: unrecognized arguments: {stray}"


def test_eval_and_export_options_in_any_order():
    from launch.cli import build_parser

    p = build_parser()
    for a, b in (
        (["eval", "RUN", "--data", "D", "--json"], ["eval", "--json", "--data", "D", "RUN"]),
        (["export", "RUN", "--data", "D", "--out", "O"], ["export", "--out", "O", "RUN", "--data", "D"]),
    ):
        assert vars(p.parse_args(a)) == vars(p.parse_args(b))
