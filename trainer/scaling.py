"""Scaling-law fits: a metric against scale N (parameters, tokens, FLOPs), read from a sweep's results.

Two laws (docs/experiments.md, "Reading a scaling fit"):

- the offset power law, ``P(N) = P0 - (N/N0)^(-a)`` for a rising metric (MRR, HR: P0 its ceiling) or
  ``P(N) = P0 + (N/N0)^(-a)`` for a falling one (NE, loss: P0 its floor), a > 0: the gap to P0 closes as a power
  of N;
- the log-linear law, ``P(N) = b + c*ln(N)``: every 10x of N buys the same step, with no ceiling in sight.

:func:`compare` fits both and says which one AIC prefers. numpy and scipy are imported here, at the top: only
`argus sweep fit` imports this module (inside its command), so `argus --help` never pays for them.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Sequence

import numpy as np
from scipy import optimize, stats

Form = Literal["rising", "falling"]
FormArg = Literal["auto", "rising", "falling"]

MIN_POINTS = 4
"""Fewest points a fit accepts: the power law has k=3 parameters and its standard errors need n - k >= 1."""

_A_GRID = np.geomspace(1e-5, 5.0, 500)
"""Exponents tried for the starting point of the power-law fit (see :func:`fit_offset_power_law`)."""


@dataclass(frozen=True)
class Estimate:
    """A fitted parameter: value, standard error, and 95% confidence interval (low, high)."""

    value: float
    stderr: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float | None]:
        return {k: _finite(v) for k, v in (("value", self.value), ("stderr", self.stderr), ("low", self.low),
                                           ("high", self.high))}  # fmt: skip


def _finite(v: float) -> float | None:
    # JSON has no inf/nan: an undetermined standard error is null
    return float(v) if math.isfinite(v) else None


def _gaussian_aic(rss: float, n: int, k: int) -> float:
    """n*ln(RSS/n) + 2k: the AIC of a least-squares fit with Gaussian errors of unknown variance (constants
    common to both laws dropped: only differences between fits of the same points mean anything)."""
    rss = max(rss, 1e-300)  # an exact fit: a very negative AIC, not a math error
    return n * math.log(rss / n) + 2 * k


def _t975(dof: int) -> float:
    """The two-sided 95% Student-t quantile: with few points the normal 1.96 gives intervals that are too short."""
    return float(stats.t.ppf(0.975, dof))


@dataclass(frozen=True)
class PowerLawFit:
    """The offset power law fitted to points: ``P(N) = P0 -/+ (N/N0)^(-a)``."""

    law: ClassVar[str] = "offset_power"
    k: ClassVar[int] = 3
    form: Form
    P0: Estimate
    N0: Estimate
    a: Estimate
    rmse: float
    aic: float
    n: int
    log_N0: float  # ln N0, what predict() uses: N0 itself overflows when a is tiny
    note: str = ""  # why the fit is not to be trusted, when it is not ("" when it converged inside its bounds)

    @property
    def sign(self) -> float:
        return -1.0 if self.form == "rising" else 1.0

    def predict(self, n: Any) -> Any:
        """P(N) for a number or an array of N."""
        return self.P0.value + self.sign * self.headroom(n)

    def headroom(self, n: Any) -> Any:
        """|P(N) - P0|: what more scale than N can still buy, at most."""
        return np.exp(-self.a.value * (np.log(np.asarray(n, dtype=float)) - self.log_N0))

    def params(self) -> dict[str, Estimate]:
        return {"P0": self.P0, "N0": self.N0, "a": self.a}

    def to_dict(self) -> dict[str, Any]:
        return {**_fit_dict(self), "note": self.note}


@dataclass(frozen=True)
class LogLinearFit:
    """The log-linear law fitted to points: ``P(N) = b + c*ln(N)`` (natural log)."""

    law: ClassVar[str] = "log_linear"
    k: ClassVar[int] = 2
    b: Estimate
    c: Estimate
    rmse: float
    aic: float
    n: int

    @property
    def form(self) -> Form:
        return "rising" if self.c.value >= 0 else "falling"

    def predict(self, n: Any) -> Any:
        """P(N) for a number or an array of N."""
        return self.b.value + self.c.value * np.log(np.asarray(n, dtype=float))

    def params(self) -> dict[str, Estimate]:
        return {"b": self.b, "c": self.c}

    def to_dict(self) -> dict[str, Any]:
        return _fit_dict(self)


def _fit_dict(fit: PowerLawFit | LogLinearFit) -> dict[str, Any]:
    """What both laws' reports hold (``--json``)."""
    return {
        "law": fit.law,
        "form": fit.form,
        "params": {k: v.to_dict() for k, v in fit.params().items()},
        "rmse": fit.rmse,
        "aic": fit.aic,
        "k": fit.k,
        "n": fit.n,
    }


@dataclass(frozen=True)
class Comparison:
    """Both laws fitted to the same points, and the one with the lower AIC."""

    power: PowerLawFit
    log_linear: LogLinearFit

    @property
    def preferred(self) -> str:
        return self.power.law if self.power.aic < self.log_linear.aic else self.log_linear.law

    @property
    def delta_aic(self) -> float:
        """How much lower the preferred law's AIC is (>= 0); under ~2 the points do not tell the laws apart."""
        return abs(self.power.aic - self.log_linear.aic)

    def to_dict(self) -> dict[str, Any]:
        return {
            "offset_power": self.power.to_dict(),
            "log_linear": self.log_linear.to_dict(),
            "preferred": self.preferred,
            "delta_aic": self.delta_aic,
        }


def _points(n: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, v = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 1 or x.shape != v.shape:
        raise ValueError(f"N and P need the same length, got {x.shape} and {v.shape}")
    if len(x) < MIN_POINTS:
        raise ValueError(f"a scaling fit needs at least {MIN_POINTS} points, got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(v))):
        raise ValueError("N and P must be finite numbers")
    if np.any(x <= 0):
        raise ValueError(f"N must be positive (it is log-scaled), got {x[x <= 0][0]:g}")
    if len(np.unique(x)) < 3:
        raise ValueError(f"a scaling fit needs at least 3 distinct N, got {len(np.unique(x))}")
    return x, v


def fit_log_linear(n: Sequence[float], y: Sequence[float]) -> LogLinearFit:
    """Least squares of ``y = b + c*ln(n)``, with standard errors from the usual OLS covariance."""
    x, v = _points(n, y)
    design = np.column_stack([np.ones_like(x), np.log(x)])
    coef, *_ = np.linalg.lstsq(design, v, rcond=None)
    resid = v - design @ coef
    rss, dof = float(resid @ resid), len(x) - LogLinearFit.k
    cov = rss / dof * np.linalg.inv(design.T @ design)
    se, t = np.sqrt(np.diag(cov)), _t975(dof)
    b, c = (
        Estimate(float(coef[i]), float(se[i]), float(coef[i] - t * se[i]), float(coef[i] + t * se[i])) for i in (0, 1)
    )
    return LogLinearFit(
        b=b, c=c, rmse=math.sqrt(rss / len(x)), aic=_gaussian_aic(rss, len(x), LogLinearFit.k), n=len(x)
    )


def _profile(u: np.ndarray, v: np.ndarray, sign: float) -> tuple[float, float, float] | None:
    """Variable projection: for each exponent on the grid the model ``P0 + sign*C*exp(-a*u)`` is linear in
    (P0, C), so least squares gives them exactly; -> (a, P0, ln C) of the grid point with the lowest RSS among
    those with C > 0 (the form asked for), or None when no exponent gives C > 0."""
    best: tuple[float, float, float, float] | None = None
    for a in _A_GRID:
        design = np.column_stack([np.ones_like(u), sign * np.exp(-a * u)])
        coef, *_ = np.linalg.lstsq(design, v, rcond=None)
        if coef[1] <= 0:
            continue
        r = v - design @ coef
        rss = float(r @ r)
        if best is None or rss < best[0]:
            best = (rss, float(a), float(coef[0]), math.log(coef[1]))
    return None if best is None else best[1:]


def fit_offset_power_law(n: Sequence[float], y: Sequence[float], form: FormArg = "auto") -> PowerLawFit:
    """Least squares of the offset power law (``scipy.optimize.curve_fit``); ``form="auto"`` takes the form
    from the sign of the log-linear slope (a metric that grows with N is rising).

    Parametrization, and why: N spans decades (2e5..1e9) and N0 can sit anywhere below them, so fitting N0
    itself is badly scaled and ``(N/N0)^(-a)`` under- or overflows for a wild guess. The fit runs instead on
    u = ln(N/Ng) (Ng the geometric mean of the N measured) with parameters (P0, ln C, a), C = (N0/Ng)^a: the
    model ``P0 -/+ exp(ln C - a*u)`` is smooth in all three and stays finite as a -> 0 (where ln(N0/Ng) =
    ln C / a does not). Its start comes from variable projection (:func:`_profile`): for a fixed a the model is
    linear in P0 and C, so a 1-D grid over a with exact least squares for the rest lands in the basin of the
    global optimum; curve_fit then only polishes. a is bounded to the grid's range: on points that do not bend
    the optimum is a -> 0 with P0 -> infinity (the log-linear law is that limit); a fit that stops at a bound
    says so in ``note``, with infinite errors.

    Errors: curve_fit's covariance, scaled by the residual variance RSS/(n-3); 95% intervals with Student's t
    at n-3 degrees of freedom (1.96 is too short with ~9 points). N0's comes from ln N0's (delta method over
    ln C and a) and is exp() of it: asymmetric, positive. All are local (linearized) errors: when the points
    barely bend, a and N0 are poorly determined and their intervals say so by being wide.
    """
    x, v = _points(n, y)
    if form == "auto":
        slope = np.polyfit(np.log(x), v, 1)[0]
        form = "rising" if slope >= 0 else "falling"
    if form not in ("rising", "falling"):
        raise ValueError(f"form must be auto, rising or falling, got {form!r}")
    sign = -1.0 if form == "rising" else 1.0
    log_ng = float(np.mean(np.log(x)))
    u = np.log(x) - log_ng
    start = _profile(u, v, sign)
    if start is None:
        raise ValueError(f"the points do not follow a {form} offset power law (they move the other way)")

    def model(uu: np.ndarray, p: float, log_c: float, a: float) -> np.ndarray:
        return p + sign * np.exp(log_c - a * uu)

    a_lo, a_hi = float(_A_GRID[0]), float(_A_GRID[-1])
    note = ""
    try:
        with warnings.catch_warnings():
            # a barely-bending curve leaves the covariance undetermined: reported as infinite errors, not a warning
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            popt, pcov = optimize.curve_fit(
                model,
                u,
                v,
                p0=[start[1], start[2], start[0]],
                # a bounded: on points that do not bend the optimum runs off to a -> 0, P0 -> infinity (the
                # log-linear law is that limit), and an unbounded fit never converges
                bounds=([-np.inf, -np.inf, a_lo], [np.inf, np.inf, a_hi]),
                method="trf",
                max_nfev=20000,
            )
    except RuntimeError:  # no convergence from the grid's start: keep the start, with unknown errors
        popt, pcov = np.array([start[1], start[2], start[0]]), np.full((3, 3), np.inf)
        note = "curve_fit did not converge: the grid's best point, errors unknown"
    p_hat, log_c, a_hat = (float(q) for q in popt)
    if a_hat <= a_lo * 1.01 or a_hat >= a_hi * 0.99:
        note = f"a stopped at its bound ({a_hat:g}): the points do not bend like a power law " + (
            "(near a = 0 it is the log-linear law)" if a_hat < 1 else "(they bend too sharply)"
        )
        pcov = np.full((3, 3), np.inf)  # a bound, not an optimum: the local covariance means nothing
    resid = v - model(u, *popt)
    rss = float(resid @ resid)
    tq = _t975(len(x) - PowerLawFit.k)
    se_p, se_a = _se(pcov[0, 0]), _se(pcov[2, 2])
    # ln N0 = ln Ng + ln C / a; its standard error by the delta method, from the (ln C, a) covariance
    log_n0 = log_ng + log_c / a_hat
    g = np.array([1.0 / a_hat, -log_c / a_hat**2])
    se_log_n0 = _se(float(g @ pcov[1:, 1:] @ g)) if np.all(np.isfinite(pcov[1:, 1:])) else math.inf
    n0 = _exp(log_n0)
    return PowerLawFit(
        form=form,
        P0=Estimate(p_hat, se_p, p_hat - tq * se_p, p_hat + tq * se_p),
        # N0's interval is exp() of ln N0's: asymmetric, and positive
        N0=Estimate(n0, n0 * se_log_n0, _exp(log_n0 - tq * se_log_n0), _exp(log_n0 + tq * se_log_n0)),
        a=Estimate(a_hat, se_a, a_hat - tq * se_a, a_hat + tq * se_a),
        rmse=math.sqrt(rss / len(x)),
        aic=_gaussian_aic(rss, len(x), PowerLawFit.k),
        n=len(x),
        log_N0=log_n0,
        note=note,
    )


def _se(var: float) -> float:
    return math.sqrt(var) if math.isfinite(var) and var >= 0 else math.inf


def _exp(z: float) -> float:
    if math.isnan(z):
        return math.nan
    return math.exp(z) if z < 700 else math.inf


def compare(n: Sequence[float], y: Sequence[float], form: FormArg = "auto") -> Comparison:
    """Both laws fitted to the same points; ``.preferred`` is the one with the lower AIC. Compare by AIC, not
    RMSE: the power law has one parameter more and so (nearly) always the lower error."""
    return Comparison(power=fit_offset_power_law(n, y, form), log_linear=fit_log_linear(n, y))


# ---- results files -------------------------------------------------------------------------------------------
_MISSING = object()


def lookup(row: Any, key: str) -> Any:
    """``row[key]``, where a dotted key also walks nested dicts (``metrics.ne/next_item``); a literal key with dots
    in it wins over the walk. Missing: the module's ``_MISSING`` sentinel."""
    if not isinstance(row, dict):
        return _MISSING
    if key in row:
        return row[key]
    i = key.find(".")
    while i != -1:
        head = key[:i]
        if head in row:
            found = lookup(row[head], key[i + 1 :])
            if found is not _MISSING:
                return found
        i = key.find(".", i + 1)
    return _MISSING


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


@dataclass(frozen=True)
class Points:
    """The (N, P) pairs read from a results file, and how many rows were skipped for want of either."""

    n: list[float]
    y: list[float]
    rows: int
    skipped: int


def jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, JSON value) of each non-blank line of a JSONL file; a line that is not JSON is a ValueError naming
    the file and line (results files of `argus sweep run`, read by it and by `argus sweep fit`)."""
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {lineno}: not JSON ({e.msg})") from None


def read_points(path: str | Path, x_key: str, y_key: str) -> Points:
    """One point per JSON line of ``path`` that has a number at both keys; the rest are counted as skipped.
    Raises ValueError (naming the file, line or key) for a missing file, a line that is not JSON, a
    non-positive N, or fewer than :data:`MIN_POINTS` usable points."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such results file")
    n: list[float] = []
    y: list[float] = []
    rows = skipped = 0
    for lineno, row in jsonl_rows(p):
        rows += 1
        xv, yv = _number(lookup(row, x_key)), _number(lookup(row, y_key))
        if xv is None or yv is None:
            skipped += 1
            continue
        if xv <= 0:
            raise ValueError(f"{p} line {lineno}: {x_key}={xv:g}, but N must be positive (it is log-scaled)")
        n.append(xv)
        y.append(yv)
    if len(n) < MIN_POINTS:
        raise ValueError(
            f"{p}: {len(n)} usable point(s) with numbers at {x_key!r} and {y_key!r} ({skipped} of {rows} rows "
            f"skipped); a scaling fit needs at least {MIN_POINTS}"
        )
    return Points(n=n, y=y, rows=rows, skipped=skipped)
