"""Scaling-law fits (trainer/scaling.py) and `argus sweep fit`: known laws recovered from noisy points, AIC picking
the law the points came from, and the command end to end on a small results file."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import argus_inproc, one_line_error

from trainer.scaling import compare, fit_log_linear, fit_offset_power_law, lookup

N = np.geomspace(2e5, 1e9, 9)  # 9 points, log-uniform over the range a small sweep measures

# Both curves bend visibly inside the range. With 1% multiplicative noise, P0 and a come back within 5% for
# 197/200 (rising) and 199/200 (falling) seeds; the first example values (a falling a=0.25, N0=3e3) bend
# too little for a within 5% (1 seed in 3), so steeper ones are used.
RISING = {"P0": 0.5, "N0": 5e4, "a": 0.5}  # MRR-like: 0.00 at 2e5 -> 0.49 at 1e9, ceiling 0.5
FALLING = {"P0": 0.6, "N0": 1e6, "a": 0.5}  # NE-like: 2.84 at 2e5 -> 0.63 at 1e9, floor 0.6


def power_law(p0: float, n0: float, a: float, sign: float, seed: int) -> np.ndarray:
    y = p0 + sign * (N / n0) ** (-a)
    return y * (1 + 0.01 * np.random.default_rng(seed).standard_normal(len(N)))


def log_linear(b: float, c: float, seed: int) -> np.ndarray:
    y = b + c * np.log(N)
    return y * (1 + 0.01 * np.random.default_rng(seed).standard_normal(len(N)))


@pytest.mark.parametrize(("truth", "sign", "form"), [(RISING, -1.0, "rising"), (FALLING, 1.0, "falling")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_offset_power_law_recovers_p0_and_a(truth, sign, form, seed):
    y = power_law(truth["P0"], truth["N0"], truth["a"], sign, seed)
    fit = fit_offset_power_law(N, y)  # form="auto": from the trend's sign
    assert fit.form == form
    assert fit.P0.value == pytest.approx(truth["P0"], rel=0.05)
    assert fit.a.value == pytest.approx(truth["a"], rel=0.05)
    assert fit.N0.value == pytest.approx(truth["N0"], rel=0.5)  # poorly determined by nature: a loose check
    assert fit.note == ""
    # the intervals bracket the estimate, and predict() is the law with the fitted parameters
    for e in (fit.P0, fit.N0, fit.a):
        assert e.low < e.value < e.high and 0 < e.stderr < math.inf
    want = fit.P0.value + sign * (N / fit.N0.value) ** (-fit.a.value)
    np.testing.assert_allclose(fit.predict(N), want, rtol=1e-9)
    # RMSE and AIC are the residuals' (Gaussian AIC, k=3)
    rss = float(np.sum((y - fit.predict(N)) ** 2))
    assert fit.rmse == pytest.approx(math.sqrt(rss / len(N)))
    assert fit.aic == pytest.approx(len(N) * math.log(rss / len(N)) + 2 * 3)


def test_confidence_intervals_cover_the_truth_about_95_percent():
    # 40 noisy draws of the falling law: over 100 draws the 95% intervals covered P0 96 and a 79 times (linearized
    # intervals on a curved problem run a little short for a); intervals from the unscaled covariance or without
    # Student's t would cover far fewer
    hits = {"P0": 0, "a": 0}
    for seed in range(40):
        fit = fit_offset_power_law(N, power_law(FALLING["P0"], FALLING["N0"], FALLING["a"], 1.0, 100 + seed))
        hits["P0"] += fit.P0.low <= FALLING["P0"] <= fit.P0.high
        hits["a"] += fit.a.low <= FALLING["a"] <= fit.a.high
    assert hits["P0"] >= 32 and hits["a"] >= 30, hits


def test_a_forced_form_against_the_trend_is_refused():
    y = power_law(FALLING["P0"], FALLING["N0"], FALLING["a"], 1.0, 0)
    with pytest.raises(ValueError, match="rising"):
        fit_offset_power_law(N, y, form="rising")
    with pytest.raises(ValueError, match="at least 4 points"):
        fit_offset_power_law(N[:3], y[:3])
    with pytest.raises(ValueError, match="positive"):
        fit_offset_power_law([0.0, *N[1:]], y)


def test_log_linear_fit_recovers_its_law():
    fit = fit_log_linear(N, log_linear(0.05, 0.02, 0))
    assert fit.c.value == pytest.approx(0.02, rel=0.1)
    assert fit.c.low < 0.02 < fit.c.high
    assert fit.form == "rising" and fit.k == 2
    rss = float(np.sum((log_linear(0.05, 0.02, 0) - fit.predict(N)) ** 2))
    assert fit.aic == pytest.approx(len(N) * math.log(rss / len(N)) + 2 * 2)


def test_aic_prefers_the_law_the_points_came_from():
    # On log-linear points the power law (one parameter more, and the log-linear law as its a -> 0 limit) is never
    # worse by RMSE, yet AIC's penalty picks the log-linear law: 19 of these 20 seeds (in general ~85%: the rest
    # is noise an extra parameter fits by chance); on power-law points it picks the power law on every seed.
    log_wins = 0
    for seed in range(20):
        c = compare(N, log_linear(0.05, 0.02, seed))
        log_wins += c.preferred == "log_linear"
        assert c.power.rmse <= c.log_linear.rmse * 1.001, seed  # why RMSE is the wrong judge
    assert log_wins >= 15, log_wins
    for seed in range(5):
        c = compare(N, power_law(RISING["P0"], RISING["N0"], RISING["a"], -1.0, seed))
        assert c.preferred == "offset_power" and c.delta_aic > 10, (seed, c.delta_aic)


def test_lookup_walks_nested_keys_and_prefers_a_literal_one():
    row = {"params": 5, "metrics": {"ne/next_item": 0.8, "a": {"b": 1}}, "x.y": 2, "x": {"y": 3}}
    assert lookup(row, "params") == 5
    assert lookup(row, "metrics.ne/next_item") == 0.8
    assert lookup(row, "metrics.a.b") == 1
    assert lookup(row, "x.y") == 2
    assert lookup(row, "metrics.nope") is not None and lookup(row, "metrics.nope") is lookup(row, "nope")


def _results(tmp_path, y: np.ndarray):
    path = tmp_path / "results.jsonl"
    rows = [
        {"trial": i, "params": float(n), "metrics": {"ne/next_item": float(v)}} for i, (n, v) in enumerate(zip(N, y))
    ]
    rows.append({"trial": 9, "params": 4e9, "status": "failed"})  # no metric: skipped, and counted
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    return path


def test_cli_fits_a_results_file(tmp_path, capsys, monkeypatch):
    import launch.console

    monkeypatch.delenv("COLUMNS", raising=False)  # the human output below is read whole: no wrapping at 80
    monkeypatch.setattr(launch.console.console, "_width", None)
    path = _results(tmp_path, power_law(FALLING["P0"], FALLING["N0"], FALLING["a"], 1.0, 0))
    argv = ["sweep", "fit", str(path), "--x", "params", "--y", "metrics.ne/next_item", "--at", "1e11"]
    code, out, err = argus_inproc(capsys, *argv, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert (rep["points"], rep["rows"], rep["skipped"]) == (9, 10, 1)
    power = rep["offset_power"]
    assert power["form"] == "falling" and power["k"] == 3 and rep["log_linear"]["k"] == 2
    assert power["params"]["P0"]["value"] == pytest.approx(FALLING["P0"], rel=0.05)
    assert power["params"]["a"]["value"] == pytest.approx(FALLING["a"], rel=0.05)
    assert power["params"]["a"]["low"] < power["params"]["a"]["value"] < power["params"]["a"]["high"]
    assert rep["preferred"] == "offset_power" and rep["delta_aic"] > 10
    at = rep["at"]
    assert at["guess"] is True and at["times_largest_measured"] == pytest.approx(100)
    p0, n0, a = (power["params"][k]["value"] for k in ("P0", "N0", "a"))
    assert at["offset_power"] == pytest.approx(p0 + (1e11 / n0) ** -a, rel=1e-6)

    code, out, err = argus_inproc(capsys, *argv)
    assert code == 0, err
    assert "1 of 10 rows skipped" in out
    assert "AIC prefers the offset power law" in out
    assert "P(N) = P0 + (N/N0)^(-a)" in out and "P(N) = b + c*ln(N)" in out
    assert "100x the largest N measured" in out and "is a guess" in out


def test_cli_bad_input_is_one_line_with_the_config_code(tmp_path, capsys):
    path = _results(tmp_path, power_law(RISING["P0"], RISING["N0"], RISING["a"], -1.0, 0))
    code, out, err = argus_inproc(capsys, "sweep", "fit", str(tmp_path / "missing.jsonl"), "--x", "params", "--y", "m")
    assert code == 2 and out == ""
    assert one_line_error(err) == f"argus: error: {tmp_path / 'missing.jsonl'}: no such results file"

    code, _, err = argus_inproc(capsys, "sweep", "fit", str(path), "--x", "params", "--y", "metrics.mrr")
    assert code == 2
    line = one_line_error(err)
    assert str(path) in line and "'metrics.mrr'" in line and "0 usable point(s)" in line

    code, _, err = argus_inproc(capsys, "sweep", "fit", str(path), "--x", "trial", "--y", "metrics.ne/next_item")
    assert code == 2 and "line 1: trial=0, but N must be positive" in one_line_error(err)
