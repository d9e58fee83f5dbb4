"""`argus sweep run`: the spec (one-line errors), the grid and trial ids, what a rerun skips or resumes, the report
(no Ray); and one real sweep on a throw-away local Ray cluster: finished and failed trials, then a rerun that runs
nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from helpers import TINY_MODEL, argus_inproc, one_line_error, tree_digest

from launch.sweep_report import markdown_table, scaling_fit, table_rows
from launch.sweep_run import RESULTS, _render, expand, load_spec, plan_trials, read_rows
from trainer.config import ConfigError, apply_overrides

REPO = Path(__file__).resolve().parents[1]
TINY = [*TINY_MODEL, "data.num_workers=0", "train.steps=3"]


def write_spec(path: Path, **kw) -> Path:
    spec = {"name": "sw", "base": "configs/mini.yaml", "overrides": list(TINY), "axes": {"model.d_model": [16, 32]}}
    spec.update(kw)
    path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}, sort_keys=False))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"base": None}, "base: required (a run config, e.g. configs/mini.yaml)"),
        ({"axes": {"model.d_model": 16}}, "axes.model.d_model: expected a non-empty list of values, got 16"),
        ({"axes": {"model.d_model": []}}, "axes.model.d_model: expected a non-empty list of values, got []"),
        (
            {"axes": {"size": [{"model.d_model": 16}, 32]}},
            "axes.size: mix of mappings and plain values; use one or the other",
        ),
        ({"ranks": 0}, "ranks: must be >= 1, got 0"),
        ({"overrides": ["train.steps"]}, "overrides[0]: expected key=value, got 'train.steps'"),
        (
            {"evals": {"split": "test"}},
            "unknown config key evals (known keys here: axes, base, eval, finetune, metrics, name, overrides, plan, "
            "ranks)",
        ),  # fmt: skip
        ({"eval": {"max_users": "x"}}, "eval.max_users: expected an integer, got 'x'"),
        ({"plan": {"gpu": "h10"}}, "plan.gpu: unknown GPU 'h10'; known: "),
        ({"finetune": {"overrides": ["out=/x"]}}, "finetune.overrides[0]: out is the sweep's to set"),
    ],
)
def test_a_bad_spec_is_one_line_naming_the_key(tmp_path, monkeypatch, capsys, change, message):
    monkeypatch.chdir(REPO)
    spec = write_spec(tmp_path / "s.yaml", **change)
    code, _, err = argus_inproc(capsys, "sweep", "run", str(spec), "--local", "--storage-path", str(tmp_path / "st"))
    assert code == 2 and one_line_error(err).startswith(f"argus: error: {spec}: {message}")
    assert not (tmp_path / "st").exists()


def test_a_bad_trial_config_is_one_line_naming_the_trial_before_ray(tmp_path, monkeypatch, capsys):
    """Every trial's config is checked (trainer/run.py: load_job, for the spec's ranks) before Ray starts."""
    monkeypatch.chdir(REPO)
    spec = write_spec(tmp_path / "s.yaml", axes={"model.d_model": [16, "wide"]})
    code, _, err = argus_inproc(
        capsys, "sweep", "run", str(spec), "data.path=/nonexistent", "--local", "--storage-path", str(tmp_path / "st")
    )  # fmt: skip
    bad = expand(load_spec(spec), ["data.path=/nonexistent"])[1]
    assert code == 2 and one_line_error(err) == (
        f"argus: error: trial {bad.id} (model.d_model=wide): {REPO / 'configs' / 'mini.yaml'}: model.d_model: "
        "expected an integer, got 'wide'"
    )
    spec = write_spec(tmp_path / "s.yaml", axes={"model.n_heads": [2, 3]}, ranks=1)  # 32 % 3: validate()'s error
    code, _, err = argus_inproc(
        capsys, "sweep", "run", str(spec), "data.path=/nonexistent", "--local", "--storage-path", str(tmp_path / "st")
    )  # fmt: skip
    assert code == 2 and "(model.n_heads=3): model." in one_line_error(err)
    assert not (tmp_path / "st").exists()


def test_the_grid_is_the_product_of_the_axes_and_trial_ids_are_stable(tmp_path):
    spec = load_spec(
        write_spec(
            tmp_path / "s.yaml",
            axes={
                "size": [{"model.d_model": 16, "model.d_ff": 32}, {"model.d_model": 32, "model.d_ff": 64}],
                "optim.lr": [1e-3, "2e-3"],
            },
        )
    )
    trials = expand(spec, ["data.path=/d"])
    assert len(trials) == 4 and len({t.id for t in trials}) == 4
    assert [t.axes["optim.lr"] for t in trials] == [1e-3, "2e-3", 1e-3, "2e-3"]  # the last axis varies fastest
    assert trials[0].overrides == [*TINY, "data.path=/d", "model.d_model=16", "model.d_ff=32", "optim.lr=0.001"]
    assert trials[3].label() == "size={model.d_model=32, model.d_ff=64}, optim.lr=2e-3"
    assert [t.id for t in expand(spec, ["data.path=/d"])] == [t.id for t in trials]  # stable
    assert {t.id for t in expand(spec, ["data.path=/e"])}.isdisjoint(t.id for t in trials)  # another trial
    for v in ("custom", "2e-3", "true", "", 7, 0.5, True, None):  # an axis value reads back as written
        assert apply_overrides({}, [f"k={_render(v)}"])["k"] == v
    with pytest.raises(ConfigError, match="are the same trial"):
        expand(load_spec(write_spec(tmp_path / "d.yaml", axes={"model.d_model": [16, 16]})))


def test_a_rerun_skips_trials_with_a_row_and_resumes_unfinished_ones(data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_spec(write_spec(tmp_path / "s.yaml", axes={"model.d_model": [16, 32, 64]}))
    trials = expand(spec, [f"data.path={data}"])
    root = tmp_path / "st" / "sw"
    base = str(REPO / "configs" / "mini.yaml")

    plan = plan_trials(spec, trials, root, base)
    assert [t["trial"] for t in plan.to_run] == [t.id for t in trials] and not plan.done
    assert all(not any(o.startswith(("resume=", "train.overwrite=")) for o in t["job_overrides"]) for t in plan.to_run)
    assert all(t["job_overrides"][-1] == f"out={root / 'trials' / t['trial'] / 'run'}" for t in plan.to_run)
    params = [t["params"] for t in plan.to_run]
    assert params == sorted(params) and len(set(params)) == 3  # the dense encoder grows with d_model
    assert all(t["flops_per_interaction"] > 0 for t in plan.to_run)

    # trial 0 finished, trial 1 failed, trial 2 was interrupted after a checkpoint
    root.mkdir(parents=True)
    rows = [{"trial": trials[0].id, "status": "ok"}, {"trial": trials[1].id, "status": "failed"}]
    (root / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = root / "trials" / trials[2].id / "run" / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text('{"step": 2}')
    plan = plan_trials(spec, trials, root, base)
    assert plan.done == trials[:2] and [t["trial"] for t in plan.to_run] == [trials[2].id]
    assert plan.to_run[0]["job_overrides"][-1] == "resume=true"
    plan = plan_trials(spec, trials, root, base, retry_failed=True)
    assert [t["trial"] for t in plan.to_run] == [trials[1].id, trials[2].id]
    # a run that died before its first checkpoint starts over
    shutil.rmtree(ckpt.parent)
    (ckpt.parent.parent / "metrics.jsonl").write_text('{"step": 1}\n')
    assert plan_trials(spec, trials, root, base).to_run[0]["job_overrides"][-1] == "train.overwrite=true"
    # a retried trial's newer row wins
    with open(root / RESULTS, "a") as f:
        f.write(json.dumps({"trial": trials[1].id, "status": "ok"}) + "\n")
    assert read_rows(root / RESULTS)[trials[1].id]["status"] == "ok"


def test_the_report_has_a_row_per_trial_and_a_fit_from_four_points(tmp_path):
    spec = load_spec(write_spec(tmp_path / "s.yaml", axes={"model.d_model": [16, 32, 64, 128, 256]}))
    trials = expand(spec)
    rows = {
        t.id: {"trial": t.id, "params": 1000 * 4**i, "status": "ok", "wall_s": 1.0,
               "metrics": {"loss/next_item": 2.0 + (1000 * 4**i / 1e3) ** -0.5}}
        for i, t in enumerate(trials[:4])
    }  # fmt: skip
    rows[trials[4].id] = {"trial": trials[4].id, "status": "failed", "failed_in": "train", "exit_code": 4}
    header, cells = table_rows(trials, rows, ["loss/next_item"])
    assert header == [
        "id", "model.d_model", "params", "FLOPs/interaction", "GPU-hours", "loss/next_item", "wall s", "status"
    ]  # fmt: skip
    assert cells[0][:3] == [trials[0].id, "16", "1,000"] and cells[4][-1] == "failed (train, exit 4)"
    md = markdown_table(header, cells).splitlines()
    assert len(md) == 7 and md[1] == "|---|---|---|---|---|---|---|---|"
    why_not, fit = scaling_fit(trials, rows, "loss/next_item")
    assert why_not is None and any("AIC prefers" in line for line in fit)
    del rows[trials[3].id]
    assert scaling_fit(trials, rows, "loss/next_item")[0].startswith("no scaling fit: 3 finished point(s)")


@pytest.mark.slow
def test_a_sweep_on_local_ray_finishes_reports_a_failed_trial_and_a_rerun_runs_nothing(imp_data, tmp_path):
    """Two trials through Ray Tune (one local session): one pre-trains, evaluates, fine-tunes and evaluates that,
    one (its shards corrupt: the config validates) fails at run time and is reported, without stopping the other.
    Rerunning the sweep makes no Ray trial: every trial has its row (the failed one too, until --retry-failed)."""
    data = imp_data
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    shards = list(bad.rglob("*.tar"))
    assert shards
    for shard in shards:
        shard.write_bytes(b"not a tar file" * 64)
    spec = write_spec(
        tmp_path / "s.yaml",
        axes={"trial": [{"model.d_model": 16}, {"model.d_model": 16, "data.path": str(bad)}]},
        eval={"max_users": 20},
        finetune={"overrides": ["train.steps=2", "finetune.item_mlp=8"]},
        metrics=["loss/next_item", "hr@10", "finetune/pairwise_acc"],
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(ray_tmp)}
    cmd = [sys.executable, "-m", "launch.cli", "sweep", "run", str(spec), f"data.path={data}", "--local",
           "--storage-path", str(tmp_path / "st")]  # fmt: skip
    try:
        t0 = time.monotonic()
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        first = time.monotonic() - t0
        root = tmp_path / "st" / "sw"
        assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]  # a trial failed
        rows = [json.loads(x) for x in (root / RESULTS).read_text().splitlines()]
        trials = expand(load_spec(spec), [f"data.path={data}"])
        assert sorted(r["trial"] for r in rows) == sorted(t.id for t in trials)
        by_id = {r["trial"]: r for r in rows}
        for t in trials[:1]:
            r = by_id[t.id]
            assert r["status"] == "ok", r
            assert set(r["metrics"]) == {"loss/next_item", "hr@10", "finetune/pairwise_acc"} and all(
                isinstance(v, float) for v in r["metrics"].values()
            )
            assert r["train"]["step"] == 3 and r["eval"]["hr@10"] == r["metrics"]["hr@10"]
            assert r["axes"] == t.axes and r["overrides"] == t.overrides and r["params"] > 0
            assert r["flops_per_interaction"] > 0 and r["wall_s"] > 0
            assert r["plan"]["gpu_hours"] > 0 and r["plan"]["gpus"] == 8 and r["plan"]["items"] == 150
            assert (root / "trials" / t.id / "run" / "checkpoints" / "latest").is_file()
            # the fine-tuning stage: its own run from this trial's, evaluated on impressions
            ft = yaml.safe_load((root / "trials" / t.id / "finetune" / "config.yaml").read_text())
            assert ft["finetune"]["init"] == str(root / "trials" / t.id / "run") and ft["train"]["steps"] == 2
            assert r["finetune_train"]["step"] == 2 and "loss/pairwise" in r["finetune_train"]
            ft_eval = json.loads((root / "trials" / t.id / "finetune_eval.json").read_text())
            assert r["metrics"]["finetune/pairwise_acc"] == ft_eval["model"]["pairwise_acc"]
            assert r["eval"]["finetune/pau_vs_pretrained"] == ft_eval["model"]["pau_vs_pretrained"]
        failed = by_id[trials[1].id]
        assert failed["status"] == "failed" and failed["failed_in"] == "train" and failed["exit_code"] not in (0, None)
        assert any("argus: error:" in line for line in failed["log_tail"]), failed["log_tail"]
        assert "1 of 2 trial(s) finished, 1 failed" in out.stdout
        assert f"failed: {trials[1].id}" in out.stdout
        report = (root / "report.md").read_text()
        assert all(t.id in report for t in trials) and "scaling fit" not in report  # params does not vary
        assert "to train on 1e+11 interactions with 8 x h100 and the trial's dataset's items" in report
        attempts = {t.id: len((root / "trials" / t.id / "attempts.jsonl").read_text().splitlines()) for t in trials}
        assert attempts == {t.id: 1 for t in trials}

        before = tree_digest(root / "trials")
        results = (root / RESULTS).read_bytes()
        t0 = time.monotonic()
        again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        second = time.monotonic() - t0
        assert again.returncode == 1, again.stderr[-3000:]
        assert "2 of 2 trial(s) already have a row" in again.stdout and "to run" not in again.stdout
        assert (root / RESULTS).read_bytes() == results and tree_digest(root / "trials") == before
        assert "1 of 2 trial(s) finished, 1 failed" in again.stdout
        assert list(ray_tmp.iterdir()) == []
        print(f"first run {first:.1f} s, rerun {second:.1f} s")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_sweep_whose_trials_all_have_rows_starts_no_ray_and_reports_the_fit(tmp_path, monkeypatch, capsys):
    """Every trial done: no Ray cluster (none is reachable here), the table and report.md again, with the scaling
    fit of the first metric against params (>= 4 finished points, params varies)."""
    import cluster.ray_local

    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(cluster.ray_local, "ray_session", no_ray)
    monkeypatch.chdir(REPO)
    spec = write_spec(tmp_path / "s.yaml", axes={"model.d_model": [16, 32, 64, 128]}, metrics=["loss/next_item"])
    trials = expand(load_spec(spec), ["data.path=/d"])
    root = tmp_path / "st" / "sw"
    root.mkdir(parents=True)
    rows = [
        {"trial": t.id, "params": 1000 * 4**i, "status": "ok", "wall_s": 2.0,
         "metrics": {"loss/next_item": 2.0 + (4**i) ** -0.5 + 0.001 * (-1) ** i}}
        for i, t in enumerate(trials)
    ]  # fmt: skip
    (root / RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = argus_inproc(
        capsys, "sweep", "run", str(spec), "data.path=/d", "--local", "--storage-path", str(tmp_path / "st")
    )
    assert code == 0, err
    assert "4 of 4 trial(s) already have a row" in out and "4 of 4 trial(s) finished, 0 failed" in out
    assert "AIC prefers the" in out
    report = (root / "report.md").read_text()
    assert all(t.id in report for t in trials) and "Scaling fit of loss/next_item against params (4 points" in report
    assert "loss/next_item: falls with size (4 sizes)" in out and "![vs_params](plots/vs_params.png)" in report


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    import struct

    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def test_report_trends_fits_and_plots_against_params_and_a_context_axis(tmp_path):
    """A size sweep: a trend per metric against params, both fitted laws, a plot of every metric against params.
    A size x context grid: plots against params and against the context axis (one line per size), none against
    the size axis (params shows it)."""
    from launch.sweep_report import plot, report, trend

    assert trend([(1, 3.0), (2, 2.0), (4, 1.0)]) == "falls" and trend([(1, 1.0), (2, 2.0)]) == "rises"
    assert trend([(1, 1.0), (2, 3.0), (4, 2.0)]) == "not monotonic" and trend([(1, 1.0), (2, 1.0)]) == "flat"
    spec = load_spec(write_spec(tmp_path / "s.yaml", axes={"model.d_model": [16, 32, 64, 128, 256]},
                                metrics=["ne/event", "hr@10"]))  # fmt: skip
    trials = expand(spec)
    rows = {
        t.id: {"trial": t.id, "params": 1000 * 4**i, "status": "ok", "wall_s": 1.0, "plan": {"gpu_hours": 10.0 * i},
               "metrics": {"ne/event": 0.8 + (4**i) ** -0.4, "hr@10": 0.5 - 0.3 * (4**i) ** -0.3}}
        for i, t in enumerate(trials)
    }  # fmt: skip
    lines, plots = report("Sweep sw", "8 x h100", spec.metrics, tmp_path, trials, rows)
    text = "\n".join(lines)
    assert "- ne/event: falls with size (5 sizes)" in text and "- hr@10: rises with size (5 sizes)" in text
    assert "Scaling fit of ne/event against params (5 points" in text and "(falling)" in text
    assert "Scaling fit of hr@10 against params (5 points" in text and "(rising)" in text
    assert [p.name for p in plots] == ["vs_params.png"] and _png_size(plots[0]) == (int(4.2 * 2 * 110), 396)
    assert "| 40 |" in text  # the planner's GPU-hours column

    # context x size: params changes with size only; context gets its own plot, one line per size
    grid = {"model.d_model": [16, 32], "model.max_seq_len": [8, 16, 32]}
    spec = load_spec(write_spec(tmp_path / "c.yaml", axes=grid, metrics=["hr@10"]))
    trials = expand(spec)
    rows = {
        t.id: {"trial": t.id, "params": 100 * t.axes["model.d_model"], "status": "ok",
               "metrics": {"hr@10": 0.1 * t.axes["model.d_model"] / 16 + 0.01 * t.axes["model.max_seq_len"]}}
        for t in trials
    }  # fmt: skip
    from launch.sweep_report import _series, finished, scaling_fit

    assert scaling_fit(trials, rows, "hr@10")[0].startswith("no scaling fit of hr@10: several finished trials per size")
    lines = _series(finished(trials, rows), "hr@10", None, "")  # against params: one line per context
    assert list(lines) == [f"model.max_seq_len={c}" for c in (8, 16, 32)]
    assert lines["model.max_seq_len=8"] == [(1600.0, pytest.approx(0.18)), (3200.0, pytest.approx(0.28))]
    lines = _series(finished(trials, rows), "hr@10", "model.max_seq_len", "")  # against context: one per size
    assert list(lines) == ["model.d_model=16", "model.d_model=32"] and [x for x, _ in lines["model.d_model=32"]] == [
        8,
        16,
        32,
    ]
    made = plot(trials, rows, spec.metrics, tmp_path / "ctx")
    assert [p.name for p in made] == ["vs_params.png", "vs_model.max_seq_len.png"]  # d_model: a size axis
    assert all(_png_size(p)[0] == int(4.2 * 110) for p in made)
    assert plot(trials, {}, spec.metrics, tmp_path / "none") == []  # nothing finished: nothing drawn


def test_the_planner_cost_of_a_trial_scales_with_interactions_and_gpus(data):
    """The row's `plan`: `argus plan`'s analytic estimate for the trial's config on the spec's GPUs. Twice the
    interactions cost twice the GPU-hours; two nodes are 16 GPUs; a catalog that cannot fit says so."""
    from launch.sweep_run import PlanSpec, plan_cost
    from trainer.run import load_job

    cfg = load_job(str(REPO / "configs" / "mini.yaml"), [f"data.path={data}", *TINY, "out=/tmp/x"])
    one = plan_cost(cfg, PlanSpec(gpus=8, interactions=1e11), 100)
    two = plan_cost(cfg, PlanSpec(gpus=8, interactions=2e11), 100)
    wide = plan_cost(cfg, PlanSpec(gpus=8, nodes=2, interactions=1e11), 100)
    assert one["fits"] and one["items"] == 100 and one["gpus"] == 8 and one["gpu"] == "h100"
    assert two["gpu_hours"] == pytest.approx(2 * one["gpu_hours"], rel=1e-3)
    for r in (one, wide):  # GPU-hours = days x 24 x GPUs
        assert r["gpu_hours"] == pytest.approx(r["days"] * 24 * r["gpus"], rel=1e-9)
    assert wide["gpus"] == 16 and wide["days"] != one["days"]
    huge = plan_cost(cfg, PlanSpec(gpus=1, items=1e12), 100)
    assert huge["items"] == 10**12 and huge["fits"] is False
    assert (
        cfg.train.global_batch_size
        == load_job(  # not changed by planning
            str(REPO / "configs" / "mini.yaml"), [f"data.path={data}", *TINY, "out=/tmp/x"]
        ).train.global_batch_size
    )


@pytest.mark.parametrize("study", ["scaling", "objectives", "context", "gpu/scaling", "gpu/objectives", "gpu/context"])
def test_every_built_in_study_checks_on_a_dataset(study, imp_data, tmp_path, monkeypatch):
    """configs/sweeps/: every trial of each built-in study (and of its GPU-scale variant) passes the checks a run
    makes before Ray starts (its config for the spec's ranks, the fine-tuning stage's keys, the planner's cost)."""
    monkeypatch.chdir(REPO)
    spec = load_spec(f"configs/sweeps/{study}.yaml")
    trials = expand(spec, [f"data.path={imp_data}"])
    plan = plan_trials(spec, trials, tmp_path, str(REPO / spec.base))
    assert len(plan.to_run) == len(trials) >= 3
    assert all(r["plan"]["fits"] and r["plan"]["gpu_hours"] > 0 for r in plan.to_run), [r["plan"] for r in plan.to_run]
    params = [r["params"] for r in plan.to_run]
    if "scaling" in study:
        assert params == sorted(params) and len(set(params)) == len(params)  # sizes grow
    else:
        assert len(set(params)) == 1  # one encoder; the objective or the context changes
    assert (spec.finetune is not None) == ("objectives" in study)


def test_the_fine_tuning_stage_is_checked_before_ray_and_a_rerun_resumes_it(imp_data, data, tmp_path):
    """A spec with `finetune`: the stage's config is checked before any trial runs (the model shapes stay the
    trial's; the data has impression splits), and a rerun of a trial whose runs exist resumes both of them."""
    from trainer.config import ConfigError

    def plan(path: Path, d: Path, retry: bool = False):
        spec = load_spec(path)
        return plan_trials(spec, expand(spec, [f"data.path={d}"]), tmp_path / "st", str(REPO / spec.base), retry)

    ok = write_spec(tmp_path / "ok.yaml", axes={"model.d_model": [16]}, finetune={"overrides": ["train.steps=2"]})
    t = plan(ok, imp_data).to_run[0]
    run, ft = Path(t["run_dir"]), Path(t["finetune_dir"])
    assert t["finetune_overrides"][-2:] == [f"finetune.init={run}", f"out={ft}"]
    with pytest.raises(ConfigError, match="finetune.overrides: model.n_layers: 3 differs from the trial's 2"):
        plan(write_spec(tmp_path / "s.yaml", finetune={"overrides": ["model.n_layers=3"]}), imp_data)
    with pytest.raises(ConfigError, match="eval.every: validation during fine-tuning is not supported"):
        plan(write_spec(tmp_path / "s.yaml", finetune={"overrides": ["eval.every=5"]}), imp_data)
    with pytest.raises(ConfigError, match="no split 'impressions'"):
        plan(ok, data)  # no impressions in this dataset
    # an interrupted trial: both runs hold a checkpoint; its row says it failed in the fine-tuning stage
    for d in (run, ft):
        (d / "checkpoints" / "step_00000002").mkdir(parents=True)
        (d / "checkpoints" / "step_00000002" / "meta.json").write_text('{"step": 2}')
    again = plan(ok, imp_data).to_run[0]
    assert again["job_overrides"][-1] == "resume=true" and again["finetune_overrides"][-1] == "resume=true"
    (tmp_path / "st" / RESULTS).write_text(json.dumps({"trial": t["trial"], "status": "failed"}) + "\n")
    assert plan(ok, imp_data).to_run == [] and len(plan(ok, imp_data, retry=True).to_run) == 1
