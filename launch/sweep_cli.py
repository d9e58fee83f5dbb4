"""`argus sweep fit`: parser and command (wired into launch/cli.py).

The fitting is trainer/scaling.py's (numpy and scipy, imported inside the command so `argus --help` stays fast);
this module reads flags and prints what comes back. `argus sweep run` (the runner: Ray Tune trials, results.jsonl,
report.md) is launch/sweep_run.py's, imported inside its command likewise.
"""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING, Any

from rich.table import Table

from launch.console import console, print_json

if TYPE_CHECKING:
    from trainer.scaling import Comparison, Estimate

GUESS_BEYOND = 10.0
"""An extrapolation past this multiple of the largest N measured is a guess (the caveat `--at` prints)."""

LAW_NAMES = {"offset_power": "offset power law", "log_linear": "log-linear law"}


def _g(v: float) -> str:
    """A number in 4 significant digits ("inf" and "nan" as such)."""
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def _ci(e: Estimate) -> str:
    return f"[{_g(e.low)}, {_g(e.high)}]"


def _formula(law: str, form: str) -> str:
    if law == "log_linear":
        return "P(N) = b + c*ln(N)"
    return f"P(N) = P0 {'-' if form == 'rising' else '+'} (N/N0)^(-a)"


def _extrapolation(cmp: Comparison, at: float, n_max: float) -> dict[str, Any]:
    power, loglin = cmp.power, cmp.log_linear
    return {
        "N": at,
        "times_largest_measured": at / n_max,
        "guess": at > GUESS_BEYOND * n_max,
        "offset_power": float(power.predict(at)),
        "log_linear": float(loglin.predict(at)),
        "headroom": float(power.headroom(at)),
    }


# ---- argus sweep fit ------------------------------------------------------------------------------------------
def cmd_sweep_fit(a: argparse.Namespace) -> int:
    from trainer.scaling import compare, read_points

    if a.at is not None and not a.at > 0:
        raise ValueError(f"--at {a.at:g}: N must be positive")
    pts = read_points(a.results, a.x, a.y)
    try:
        cmp = compare(pts.n, pts.y, a.form)
    except ValueError as e:  # the fit's own message, with the file and keys it is about
        raise ValueError(f"{a.results}: {a.y} against {a.x}: {e}") from e
    n_max = max(pts.n)
    rep: dict[str, Any] = {
        "results": a.results,
        "x": a.x,
        "y": a.y,
        "points": len(pts.n),
        "rows": pts.rows,
        "skipped": pts.skipped,
        "largest_measured_N": n_max,
        "headroom_at_largest": float(cmp.power.headroom(n_max)),
        **cmp.to_dict(),
    }
    if a.at is not None:
        rep["at"] = _extrapolation(cmp, a.at, n_max)
    if a.json:
        print_json(rep)
        return 0

    console.print(
        f"[bold]{a.results}[/]: {a.y} against {a.x}, {len(pts.n)} points"
        + (f" ({pts.skipped} of {pts.rows} rows skipped: no number at {a.x!r} or {a.y!r})" if pts.skipped else "")
    )
    t = Table("law", "form", "parameter", "value", "95% CI", "std err", title="fits")
    for fit in (cmp.power, cmp.log_linear):
        for i, (name, e) in enumerate(fit.params().items()):
            first = i == 0
            t.add_row(
                _formula(fit.law, fit.form) if first else "",
                fit.form if first else "",
                name,
                _g(e.value),
                _ci(e),
                _g(e.stderr),
            )
    console.print(t)
    s = Table("law", "k", "RMSE", "AIC", "ΔAIC", title="goodness of fit (compare by AIC: lower is better)")
    best = min(cmp.power.aic, cmp.log_linear.aic)
    for fit in (cmp.power, cmp.log_linear):
        s.add_row(LAW_NAMES[fit.law], str(fit.k), _g(fit.rmse), f"{fit.aic:.2f}", f"{fit.aic - best:.2f}")
    console.print(s)
    if cmp.power.note:
        console.print(f"offset power law: {cmp.power.note}")
    console.print(
        f"AIC prefers the {LAW_NAMES[cmp.preferred]} (ΔAIC = {cmp.delta_aic:.2f}"
        + ("; under 2: the points hardly tell the laws apart)" if cmp.delta_aic < 2 else ")")
    )
    side = "ceiling" if cmp.power.form == "rising" else "floor"
    console.print(
        f"power law: {side} P0 = {_g(cmp.power.P0.value)}; headroom |P(N) - P0| at the largest N measured "
        f"({_g(n_max)}): {_g(rep['headroom_at_largest'])}"
    )
    if a.at is not None:
        x = rep["at"]
        e = Table("N", "offset power law", "log-linear law", "power-law headroom", title="extrapolation")
        e.add_row(_g(a.at), _g(x["offset_power"]), _g(x["log_linear"]), _g(x["headroom"]))
        console.print(e)
        ratio = x["times_largest_measured"]
        if x["guess"]:
            console.print(
                f"[yellow]caveat[/]: N = {_g(a.at)} is {ratio:,.0f}x the largest N measured ({_g(n_max)}); "
                f"beyond {GUESS_BEYOND:g}x an extrapolation is a guess, and the two laws' answers above differ by "
                f"{_g(abs(x['offset_power'] - x['log_linear']))}"
            )
        else:
            console.print(
                f"caveat: an extrapolation (N = {_g(a.at)} is {ratio:.3g}x the largest N measured, "
                f"{_g(n_max)}); past {GUESS_BEYOND:g}x it would be a guess"
            )
    return 0


# ---- argus sweep run ------------------------------------------------------------------------------------------
def cmd_sweep_run(a: argparse.Namespace) -> int:
    from launch.sweep_run import run_sweep

    return run_sweep(
        a.spec,
        a.overrides,
        a.storage_path,
        name=a.name,
        address=a.address,
        local=a.local,
        retry_failed=a.retry_failed,
        cpus_per_rank=a.cpus_per_rank,
        gpus_per_rank=a.gpus_per_rank,
    )


# ---- parser --------------------------------------------------------------------------------------------------
def add_sweep(sub: Any) -> None:
    """Add `sweep` and its commands to the sub-parsers of `argus`."""
    sweep = sub.add_parser("sweep", help="scaling sweeps: run a sweep's trials, fit scaling laws to its results")
    ssub = sweep.add_subparsers(dest="sweep_command", metavar="SWEEP_COMMAND", required=True)

    f = ssub.add_parser(
        "fit",
        help="fit an offset power law and a log-linear law to a metric against scale; AIC picks one",
        description="Fit P(N) = P0 -/+ (N/N0)^(-a) (rising/falling metric) and P(N) = b + c*ln(N) to the "
        "trials in RESULTS.jsonl; print both fits with 95%% intervals, RMSE and AIC (docs/experiments.md).",
    )
    f.add_argument("results", metavar="RESULTS.jsonl", help="one JSON object (a trial) per line")
    f.add_argument(
        "--x", required=True, help="key of the scale N (e.g. params); dots address nested keys: a.b is row['a']['b']"
    )
    f.add_argument("--y", required=True, help="key of the metric (e.g. ne/next_item or metrics.ne/next_item)")
    f.add_argument(
        "--form",
        choices=["auto", "rising", "falling"],
        default="auto",
        help="rising: P0 is a ceiling (MRR, HR); falling: a floor (NE, loss); auto: from the sign of the trend",
    )
    f.add_argument("--at", type=float, default=None, metavar="N", help="also extrapolate both laws to N (e.g. 1e9)")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_sweep_fit)

    r = ssub.add_parser(
        "run",
        help="train (and evaluate) every trial of a sweep spec through Ray Tune; one JSONL row per trial",
        description='Run the grid of trials SPEC.yaml describes (docs/experiments.md, "Running a sweep"): each '
        "trial's `argus train` (and `argus eval`) in STORAGE/NAME/trials/ID/, one row per trial in "
        "STORAGE/NAME/results.jsonl, a table and STORAGE/NAME/report.md at the end. Trials that already have a row "
        "are skipped; unfinished ones resume.",
    )
    r.add_argument(
        "spec", metavar="SPEC.yaml", help="the sweep spec: base config, overrides, axes, ranks, eval, metrics"
    )
    r.add_argument("overrides", nargs="*", help="key=value overrides for every trial (after the spec's own)")
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="Ray cluster address (e.g. auto, or HEAD:6379)")
    where.add_argument("--local", action="store_true", help="start a throw-away local Ray cluster on loopback")
    r.add_argument(
        "--storage-path", required=True, help="where the sweep lives (STORAGE/NAME): shared storage with --address"
    )
    r.add_argument("--name", default=None, help="the sweep's directory under --storage-path (default: the spec's name)")
    r.add_argument("--cpus-per-rank", type=float, default=1.0, help="CPUs a trial asks Ray for, per rank")
    r.add_argument("--gpus-per-rank", type=float, default=0.0, help="GPUs a trial asks Ray for, per rank")
    r.add_argument(
        "--retry-failed", action="store_true", help="run the trials whose row says failed again (default: skipped)"
    )
    r.set_defaults(func=cmd_sweep_run)
