"""The report of `argus sweep run`: a table per trial, scaling fits, trends and PNG plots, from the rows of
``results.jsonl``.

``report.md`` beside the results holds: the table (axes, encoder params, FLOPs per interaction, the planner's
GPU-hours for the spec's ``plan``, the metrics, wall time, status), for every metric the trend against params
(does it fall or rise monotonically with size) and, from 4 finished sizes, `argus sweep fit`'s two laws; and the
plots in ``plots/``: every metric against params (log axis, both fits drawn) and against each numeric axis (for a
context sweep: metric vs context).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence


class Trial(Protocol):
    """A point of the sweep's grid, as the report reads it (launch/sweep_run.py: Trial)."""

    id: str
    axes: dict[str, Any]

    def label(self) -> str: ...


PLOTS = "plots"
MAX_PLOTTED_METRICS = 6
PLOT_COLUMNS = 3
"""A spec without a metrics list plots the first this many numeric metrics of its rows."""


def _g(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def axis_label(v: Any) -> str:
    """An axis value as the table and a trial's label print it: a mapping as ``{key=value, ...}``."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={x}" for k, x in v.items()) + "}"
    return str(v)


def _params(t: Trial, r: dict[str, Any]) -> Any:
    """A trial's x on a scaling plot or fit: its encoder's parameters."""
    return r.get("params")


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def metric_names(trials: list[Trial], rows: dict[str, dict[str, Any]], metrics: Sequence[str]) -> list[str]:
    """The spec's metrics, or (none listed) every metric any row has, in first-seen order."""
    if metrics:
        return list(metrics)
    seen: dict[str, None] = {}
    for t in trials:
        seen.update(dict.fromkeys((rows.get(t.id) or {}).get("metrics") or {}))
    return list(seen)


def table_rows(
    trials: list[Trial], rows: dict[str, dict[str, Any]], metrics: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the sweep's table: one line per trial of the spec, in grid order."""
    axis_names = list(trials[0].axes) if trials else []
    metrics = metric_names(trials, rows, metrics)
    header = ["id", *axis_names, "params", "FLOPs/interaction", "GPU-hours", *metrics, "wall s", "status"]
    cells = []
    for t in trials:
        row = rows.get(t.id) or {}
        m = row.get("metrics") or {}
        status = row.get("status", "not run")
        if status == "failed":
            status = f"failed ({row.get('failed_in', '?')}, exit {row.get('exit_code', '?')})"
        cells.append(
            [
                t.id,
                *(axis_label(t.axes[a]) for a in axis_names),
                _g(row.get("params")),
                _g(row.get("flops_per_interaction")),
                _g((row.get("plan") or {}).get("gpu_hours")),
                *(_g(m.get(k)) for k in metrics),
                f"{row['wall_s']:.1f}" if "wall_s" in row else "-",
                status,
            ]
        )
    return header, cells


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(esc, c)) + " |" for c in cells]
    return "\n".join(lines)


def finished(trials: list[Trial], rows: dict[str, dict[str, Any]]) -> list[tuple[Trial, dict[str, Any]]]:
    return [(t, r) for t in trials if (r := rows.get(t.id)) and r.get("status") == "ok"]


def points(
    done: list[tuple[Trial, dict[str, Any]]], metric: str, x: Callable[[Trial, dict[str, Any]], Any]
) -> list[tuple[float, float]]:
    """(x, metric) of the finished trials that have both, sorted by x."""
    out = []
    for t, r in done:
        xv, yv = _number(x(t, r)), _number((r.get("metrics") or {}).get(metric))
        if xv is not None and yv is not None:
            out.append((xv, yv))
    return sorted(out)


def trend(pts: list[tuple[float, float]]) -> str:
    """``falls``, ``rises`` (strictly, with x), ``flat`` or ``not monotonic``; points sorted by x, one per x."""
    dy = [b[1] - a[1] for a, b in zip(pts, pts[1:])]
    if all(d < 0 for d in dy):
        return "falls"
    if all(d > 0 for d in dy):
        return "rises"
    if all(d == 0 for d in dy):
        return "flat"
    return "not monotonic"


@functools.lru_cache(maxsize=64)
def _compare(pts: tuple[tuple[float, float], ...]) -> Any:
    """`argus sweep fit`'s two laws fitted to ``pts`` (cached: the report's lines and its plot use one fit)."""
    from trainer.scaling import compare

    return compare([n for n, _ in pts], [y for _, y in pts])


def params_fit(done: list[tuple[Trial, dict[str, Any]]], metric: str) -> tuple[str | None, Any]:
    """(None, the two laws fitted to ``metric`` against params) from at least 4 finished sizes, one trial each;
    else (why not, None)."""
    from trainer.scaling import MIN_POINTS

    pts = points(done, metric, _params)
    if len(pts) < MIN_POINTS:
        return f"no scaling fit: {len(pts)} finished point(s) with {metric}, a fit needs {MIN_POINTS}", None
    if len({n for n, _ in pts}) < 2:
        return "no scaling fit: params does not vary over the finished trials", None
    if len({n for n, _ in pts}) < len(pts):
        return (
            f"no scaling fit of {metric}: several finished trials per size (another axis varies too); fit one "
            "value of it at a time with `argus sweep fit`",
            None,
        )
    try:
        return None, _compare(tuple(pts))
    except ValueError as e:
        return f"no scaling fit of {metric} against params: {e}", None


def scaling_fit(trials: list[Trial], rows: dict[str, dict[str, Any]], metric: str) -> tuple[str | None, list[str]]:
    """`argus sweep fit`'s comparison of ``metric`` against params, as Markdown lines, when the sweep has at least
    4 finished points and params varies; else (why not, [])."""
    done = finished(trials, rows)
    why_not, cmp = params_fit(done, metric)
    if cmp is None:
        return why_not, []
    p = cmp.power
    lines = [
        f"Scaling fit of {metric} against params ({len(points(done, metric, _params))} points; `argus sweep fit "
        f"RESULTS --x params --y metrics.{metric}` prints the intervals):",
        "",
        f"- offset power law ({p.form}): P0 = {p.P0.value:.4g}, N0 = {p.N0.value:.4g}, a = {p.a.value:.4g}; "
        f"RMSE {p.rmse:.4g}, AIC {p.aic:.2f}" + (f" ({p.note})" if p.note else ""),
        f"- log-linear law: b = {cmp.log_linear.b.value:.4g}, c = {cmp.log_linear.c.value:.4g}; "
        f"RMSE {cmp.log_linear.rmse:.4g}, AIC {cmp.log_linear.aic:.2f}",
        f"- AIC prefers the {'offset power' if cmp.preferred == 'offset_power' else 'log-linear'} law "
        f"(ΔAIC = {cmp.delta_aic:.2f}"
        + ("; under 2: the points hardly tell the laws apart)" if cmp.delta_aic < 2 else ")"),
    ]
    return None, lines


def _axis_x(trials: list[Trial], name: str) -> str | None:
    """The number a trial is plotted at along axis ``name``: its value (a scalar axis), or the one key of its
    mappings whose values are numbers, distinct from mapping to mapping (``model.max_seq_len`` of a context axis
    whose mappings also set the batch size); None when there is none."""
    values = [t.axes[name] for t in trials]
    if all(not isinstance(v, dict) for v in values):
        return "" if all(_number(v) is not None for v in values) else None
    distinct = list(dict.fromkeys(map(axis_label, values)))
    firsts = {axis_label(v): v for v in values}
    for key in values[0]:
        xs = [firsts[d].get(key) for d in distinct]
        if all(_number(x) is not None for x in xs) and len(set(xs)) == len(xs):
            return key
    return None


def _x_axes(trials: list[Trial], rows: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(x label, axis, key: "" for a scalar axis) of the axes a metric is plotted against besides params: numeric
    (:func:`_axis_x`), with at least two values, and not a size axis (one whose value alone sets params: the params
    plot shows it). A context sweep's ``model.max_seq_len``."""
    out, sizes = [], _size_axes(trials, rows)
    for name in trials[0].axes if trials else []:
        key = _axis_x(trials, name)
        if key is None or len({axis_label(t.axes[name]) for t in trials}) < 2 or name in sizes:
            continue
        out.append((key or name, name, key))
    return out


def _size_axes(trials: list[Trial], rows: dict[str, dict[str, Any]]) -> list[str]:
    """Axes whose value alone sets params (each value one params number, a different one per value)."""
    out = []
    for name in trials[0].axes if trials else []:
        params: dict[str, set[Any]] = {}
        for t in trials:
            params.setdefault(axis_label(t.axes[name]), set()).add((rows.get(t.id) or {}).get("params"))
        sizes = [next(iter(p)) for p in params.values() if len(p) == 1]
        if len(sizes) == len(params) > 1 and len(set(sizes)) == len(sizes):
            out.append(name)
    return out


def _x(t: Trial, axis: str, key: str) -> Any:
    v = t.axes[axis]
    return v.get(key) if key else v


def _series(
    done: list[tuple[Trial, dict[str, Any]]],
    metric: str,
    axis: str | None,
    key: str,
    sizes: list[str] | None = None,
) -> dict[str, list[tuple[float, float]]]:
    """The lines of one plot. Against params (axis None): one line per value of the axes that do not set the size
    (a size x context grid: one per context), a single line when every axis does. Against an axis: one line per
    value of the other axes (a size x context grid: one per size). ``sizes``: the size axes (:func:`_size_axes`),
    when the caller has them."""
    axes = list(done[0][0].axes) if done else []
    if axis is None:
        if sizes is None:
            sizes = _size_axes([t for t, _ in done], {t.id: r for t, r in done})
        others = [a for a in axes if a not in sizes]
        if not others:
            return {"": points(done, metric, _params)}
    else:
        others = [a for a in axes if a != axis]

    def rest(t: Trial) -> str:
        return ", ".join(f"{a}={axis_label(t.axes[a])}" for a in others)

    def x(t: Trial, r: dict[str, Any]) -> Any:
        return r.get("params") if axis is None else _x(t, axis, key)

    return {
        label: points([(t, r) for t, r in done if rest(t) == label], metric, x)
        for label in dict.fromkeys(rest(t) for t, _ in done)
    }


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot(trials: list[Trial], rows: dict[str, dict[str, Any]], metrics: Sequence[str], out_dir: Path) -> list[Path]:
    """PNGs under ``out_dir``: every metric against params (log axis; with 4+ sizes the offset power law and the
    log-linear law drawn through the points), and against each numeric axis (one line per value of the other
    axes). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = finished(trials, rows)
    names = [m for m in metric_names(trials, rows, metrics) if points(done, m, lambda t, r: 0)]
    names = names[: len(metrics) or MAX_PLOTTED_METRICS]
    if not done or not names:
        return []
    written = []
    xs: list[tuple[str, str | None, str]] = []
    if len({r.get("params") for _, r in done}) > 1:
        xs.append(("params", None, ""))
    xs += _x_axes(trials, rows)
    sizes = _size_axes([t for t, _ in done], {t.id: r for t, r in done})
    for xname, axis, key in xs:
        cols = min(PLOT_COLUMNS, len(names))
        rows_n = -(-len(names) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.6 * rows_n), squeeze=False)
        for ax in axes.flat[len(names) :]:
            ax.set_visible(False)
        for ax, m in zip(axes.flat, names):
            series = _series(done, m, axis, key, sizes)
            for label, pts in series.items():
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label or "trials")
            pts = series.get("", [])
            cmp = params_fit(done, m)[1] if axis is None and pts else None  # one line of every size: its fit
            if cmp is not None:
                grid = np.geomspace(pts[0][0], pts[-1][0], 100)
                ax.plot(grid, cmp.power.predict(grid), "--", label=f"offset power (AIC {cmp.power.aic:.1f})")
                ax.plot(grid, cmp.log_linear.predict(grid), ":", label=f"log-linear (AIC {cmp.log_linear.aic:.1f})")
            lo, hi = min(p[0] for s in series.values() for p in s), max(p[0] for s in series.values() for p in s)
            if lo > 0 and hi / lo >= 4:
                ax.set_xscale("log", base=10 if axis is None else 2)
            ax.set(xlabel="encoder parameters" if axis is None else xname, ylabel=m, title=f"{m} vs {xname}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"vs_{_safe(xname)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def report(
    title: str,
    intro: str,
    metrics: Sequence[str],
    root: Path,
    trials: Sequence[Trial],
    rows: dict[str, dict[str, Any]],
) -> tuple[list[str], list[Path]]:
    """The Markdown lines of ``report.md`` (``# title``, ``intro``, the table, trends, fits, plots, failures) and
    the plots it shows (written under ``root/plots``)."""
    trials = list(trials)
    header, cells = table_rows(trials, rows, metrics)
    lines = [f"# {title}", "", intro, "", markdown_table(header, cells)]
    done = finished(trials, rows)
    wanted, metrics = metrics, metric_names(trials, rows, metrics)
    if len({r.get("params") for _, r in done}) > 1:
        lines += ["", "Trend against encoder parameters (finished trials):", ""]
        for m in metrics:
            pts = points(done, m, _params)
            if len(pts) >= 2 and len({n for n, _ in pts}) == len(pts):
                lines.append(f"- {m}: {trend(pts)} with size ({len(pts)} sizes)")
        for m in metrics:
            why_not, fit = scaling_fit(trials, rows, m)
            lines += ["", *(fit or [why_not or ""])]
    try:
        plots = plot(trials, rows, wanted, root / PLOTS)
    except Exception as e:  # noqa: BLE001 - a plot is not worth the report: say why there is none
        plots = []
        lines += ["", f"no plots: {type(e).__name__}: {e}"]
    for path in plots:
        lines += ["", f"![{path.stem}]({PLOTS}/{path.name})"]
    failed = [t for t in trials if rows.get(t.id, {}).get("status") == "failed"]
    for t in failed:
        r = rows[t.id]
        lines += ["", f"Trial {t.id} ({t.label()}) failed in {r.get('failed_in')}: see `{r.get('log', '-')}`"]
    return lines, plots
