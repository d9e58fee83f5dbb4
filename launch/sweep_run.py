"""`argus sweep run SPEC.yaml`: train every trial of a sweep spec through Ray Tune, one JSONL row per trial.

A spec (docs/experiments.md, "Running a sweep") names a base run config, overrides for every trial, and axes
whose grid product is the trial list. Every trial's config is checked here (``trainer/run.py: load_job``) before
Ray starts. Each trial is one Ray Tune trial of a function trainable (:func:`run_trial`) that runs the project's
own `argus train` (under ``torch.distributed.run`` when ``ranks > 1``) and, when the spec asks, `argus eval
--json` as subprocesses, with the trial's run in ``STORAGE/NAME/trials/ID/run``, and appends the trial's row
to ``STORAGE/NAME/results.jsonl``. A trial that already has a row is skipped (no Ray trial is made for it); an
unfinished one (no row) resumes from its run's checkpoint. A trial whose training or eval fails gets a row with
``status: failed`` and its log's last lines; the others run on.

Ray is imported inside the functions that use it: building `argus`'s parser stays light.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from launch.sweep_report import axis_label
from trainer.config import ConfigError, from_dict, load_yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = "results.jsonl"
REPORT = "report.md"
LOG_TAIL_LINES = 20
"""Lines of a failed trial's log kept in its row."""
LOST = "no result: the Ray trial ended without writing its row"
ROW_KEYS = ("trial", "axes", "overrides", "params", "dense_params", "flops_per_interaction", "plan")
"""What a trial's row says of it before it runs, finished, failed or lost."""


# ---- the spec ------------------------------------------------------------------------------------------------
@dataclass
class EvalSpec:
    """`argus eval` after training: ``split`` (default: the run config's eval.split), ``max_users`` (default:
    eval.max_users), ``ks`` (default: eval.ks)."""

    split: str = ""
    max_users: int | None = None
    ks: list[int] = field(default_factory=list)


@dataclass
class FinetuneSpec:
    """`argus finetune` after pre-training (and its eval), from the trial's run: ``overrides`` on top of the
    trial's (the model shapes must stay); then `argus eval` of the fine-tuning run on ``split`` (default: the
    config's finetune.eval_split). Its metrics land in the row as ``finetune/<name>``."""

    overrides: list[str] = field(default_factory=list)
    split: str = ""


@dataclass
class PlanSpec:
    """What the planner costs every trial's config for (``argus plan``): ``gpus`` GPUs of type ``gpu`` on one
    node (more: ``nodes``), ``items`` in the catalog (0: the trial's dataset's), ``interactions`` to train on.
    The row's ``plan`` holds the GPU-hours, days and whether it fits."""

    gpu: str = "h100"
    nodes: int = 1
    gpus: int = 8
    items: float = 0
    interactions: float = 1e11


@dataclass
class SweepSpec:
    name: str = ""  # the sweep's default --name
    base: str = ""  # the run config every trial starts from (relative: to the working directory, else the spec's)
    overrides: list[str] = field(default_factory=list)  # key=value, for every trial
    # config key -> list of values; or a label -> list of mappings {config key: value} (keys that move together)
    axes: dict[str, Any] = field(default_factory=dict)
    ranks: int = 1  # processes per trial (torchrun --nproc_per_node when > 1)
    eval: EvalSpec | None = None
    finetune: FinetuneSpec | None = None
    plan: PlanSpec = field(default_factory=PlanSpec)
    metrics: list[str] = field(default_factory=list)  # the metrics a row's `metrics` holds (default: all)

    def validate(self) -> None:
        if not self.name:
            raise ConfigError("name: required (the sweep's name; --name overrides it)")
        if not self.base:
            raise ConfigError("base: required (a run config, e.g. configs/mini.yaml)")
        if self.ranks < 1:
            raise ConfigError(f"ranks: must be >= 1, got {self.ranks}")
        _check_overrides("overrides", self.overrides)
        if not self.axes:
            raise ConfigError("axes: required (at least one axis: a config key and a list of values)")
        for name, values in self.axes.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"axes.{name}: expected a non-empty list of values, got {values!r}")
            mappings = [isinstance(v, dict) for v in values]
            if any(mappings) and not all(mappings):
                raise ConfigError(f"axes.{name}: mix of mappings and plain values; use one or the other")
            for j, v in enumerate(values):
                if isinstance(v, dict):
                    if not v:
                        raise ConfigError(f"axes.{name}[{j}]: an empty mapping")
                    bad = [k for k in v if not isinstance(k, str) or not k or "=" in k]
                    if bad:
                        raise ConfigError(f"axes.{name}[{j}]: {bad[0]!r} is not a config key")
                elif isinstance(v, list):
                    raise ConfigError(f"axes.{name}[{j}]: a list; an axis value is a scalar or a mapping of keys")
        if self.eval is not None and self.eval.max_users is not None and self.eval.max_users < 0:
            raise ConfigError(f"eval.max_users: must be >= 0, got {self.eval.max_users}")
        if self.finetune is not None:
            _check_overrides("finetune.overrides", self.finetune.overrides, reserved=("out", "finetune.init", "resume"))
        pl = self.plan
        from trainer.flops import GPU_SPECS

        if pl.gpu not in GPU_SPECS:
            raise ConfigError(f"plan.gpu: unknown GPU {pl.gpu!r}; known: {', '.join(sorted(GPU_SPECS))}")
        if pl.nodes < 1 or pl.gpus < 1 or pl.items < 0 or not pl.interactions > 0:
            raise ConfigError(
                f"plan: nodes and gpus must be >= 1, items >= 0, interactions > 0; got nodes={pl.nodes}, "
                f"gpus={pl.gpus}, items={pl.items:g}, interactions={pl.interactions:g}"
            )


def _check_overrides(where: str, overrides: list[str], reserved: Sequence[str] = ()) -> None:
    """Each item is key=value, its key not one of ``reserved`` (keys the sweep sets itself)."""
    for i, o in enumerate(overrides):
        key = o.split("=", 1)[0]
        if "=" not in o or not key:
            raise ConfigError(f"{where}[{i}]: expected key=value, got {o!r}")
        if key in reserved:
            raise ConfigError(f"{where}[{i}]: {key} is the sweep's to set")


def load_spec(path: str | Path) -> SweepSpec:
    """The spec at ``path``, checked; a ConfigError names the file and the key."""
    data = load_yaml(path)
    try:
        spec = from_dict(SweepSpec, data)
        spec.validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return spec


def _render(value: Any) -> str:
    """``value`` as the text of a key=value override that `trainer.config.apply_overrides` reads back as is."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same else json.dumps(value)
    return json.dumps(value)


@dataclass
class Trial:
    id: str
    axes: dict[str, Any]  # axis name -> value (a mapping for a mapping axis)
    overrides: list[str]  # the spec's, the command line's, then the axes'; the runner adds out= and resume

    def label(self) -> str:
        return ", ".join(f"{k}={axis_label(v)}" for k, v in self.axes.items())


def trial_id(base: str, overrides: Sequence[str]) -> str:
    """A short stable hash of the base config and the trial's overrides, in order (later ones win)."""
    blob = json.dumps({"base": base, "overrides": list(overrides)}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def expand(spec: SweepSpec, extra: Sequence[str] = ()) -> list[Trial]:
    """The grid product of the spec's axes (the last axis varies fastest), one Trial per point."""
    names = list(spec.axes)
    trials = []
    for point in itertools.product(*(spec.axes[n] for n in names)):
        axis_overrides = []
        for name, v in zip(names, point):
            pairs = v.items() if isinstance(v, dict) else [(name, v)]
            axis_overrides += [f"{k}={_render(x)}" for k, x in pairs]
        overrides = [*spec.overrides, *extra, *axis_overrides]
        trials.append(Trial(trial_id(spec.base, overrides), dict(zip(names, point)), overrides))
    seen: dict[str, Trial] = {}
    for t in trials:
        if t.id in seen:
            raise ConfigError(f"axes: trials {seen[t.id].label()} and {t.label()} are the same trial (same overrides)")
        seen[t.id] = t
    return trials


# ---- the storage ---------------------------------------------------------------------------------------------
def read_rows(results: Path) -> dict[str, dict[str, Any]]:
    """Trial id -> its row in ``results`` (the last one, when a retried trial has several)."""
    rows: dict[str, dict[str, Any]] = {}
    if not results.is_file():
        return rows
    from trainer.scaling import jsonl_rows

    for _, row in jsonl_rows(results):
        if isinstance(row, dict) and "trial" in row:
            rows[str(row["trial"])] = row
    return rows


def append_row(results: Path, row: dict[str, Any]) -> None:
    """One JSON line, appended under an exclusive lock (trials on several nodes may finish together)."""
    import fcntl

    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.write(json.dumps(row, sort_keys=False) + "\n")
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def restart_flags(run_dir: Path) -> list[str]:
    """How an unfinished trial's run continues: ``resume=true`` from its checkpoint; ``train.overwrite=true``
    when it holds a run without one (it died before its first checkpoint); nothing when there is no run."""
    from trainer.rundir import RUN, last_step

    if last_step(run_dir) is not None:
        return ["resume=true"]
    if any((run_dir / e).exists() for e in RUN.EVIDENCE):
        return ["train.overwrite=true"]
    return []


@dataclass
class Plan:
    """What a sweep run does: the trials to run (with their job settings) and those already done."""

    to_run: list[dict[str, Any]]
    done: list[Trial]
    rows: dict[str, dict[str, Any]]


def plan_trials(spec: SweepSpec, trials: list[Trial], root: Path, base: str, retry_failed: bool = False) -> Plan:
    """Check every trial to run (``load_job`` for its world size: one line naming the trial and key), and what
    the planner's functions say of it (``params``: the dense encoder's parameters; FLOPs per interaction)."""
    from trainer.data.manifest import Manifest
    from trainer.data.storage import absolute
    from trainer.flops import flops_per_interaction
    from trainer.memory import dense_params
    from trainer.run import load_job

    rows = read_rows(root / RESULTS)
    done, checked = [], []
    for t in trials:  # every config first: a bad axis value is one line, whatever the data
        row = rows.get(t.id)
        if row is not None and not (retry_failed and row.get("status") != "ok"):
            done.append(t)
            continue
        trial_dir = root / "trials" / t.id
        run_dir = trial_dir / "run"
        job_overrides = [*t.overrides, f"out={run_dir}", *restart_flags(run_dir)]
        ft = finetune_job(spec, t, run_dir, trial_dir / "finetune") if spec.finetune is not None else {}
        try:
            cfg = load_job(base, job_overrides, world_size=spec.ranks)
            if ft:
                check_finetune(spec, base, cfg, ft["finetune_overrides"], run_dir)
        except (ConfigError, OSError) as e:
            raise ConfigError(f"trial {t.id} ({t.label()}): {e}") from None
        checked.append((t, job_overrides, cfg, trial_dir, ft))
    to_run = []
    for t, job_overrides, cfg, trial_dir, ft in checked:
        dense = dense_params(cfg)
        item_rows = cfg.embeddings.item_rows
        if not item_rows:
            try:
                item_rows = Manifest.load(cfg.data.path).num_items
            except (ValueError, OSError) as e:  # the manifest's own one-line message, with the trial
                raise ConfigError(f"trial {t.id} ({t.label()}): data.path: {e}") from None
        to_run.append(
            {
                "trial": t.id,
                "axes": t.axes,
                "label": t.label(),
                "overrides": t.overrides,
                "job_overrides": job_overrides,
                "base": base,
                "data": absolute(cfg.data.path),
                "trial_dir": str(trial_dir),
                "run_dir": str(trial_dir / "run"),
                "params": dense.encoder,
                "dense_params": dense.total,
                "flops_per_interaction": flops_per_interaction(cfg, item_rows),
                "plan": plan_cost(cfg, spec.plan, item_rows),
                **ft,
            }
        )
    return Plan(to_run=to_run, done=done, rows=rows)


def check_finetune(spec: SweepSpec, base: str, pre: Any, overrides: list[str], run_dir: Path) -> None:
    """What `argus finetune` will check of a trial's fine-tuning stage (``overrides``: :func:`finetune_job`'s),
    before its pre-training (``pre``, into ``run_dir``) has run: the config with ``finetune.init`` set (its own
    checks: eval.every, ...), the model shapes the same as the pre-training config's (fine-tuning may change only
    how the model is trained), and the impression splits in the data. Raises ConfigError naming the key."""
    import copy

    from trainer.data.manifest import Manifest
    from trainer.finetune import model_difference
    from trainer.run import load_job

    assert spec.finetune is not None
    init = f"finetune.init={run_dir}"  # not there yet: load_job would look for its checkpoint
    cfg = load_job(base, [o for o in overrides if o != init], world_size=spec.ranks)
    probe = copy.deepcopy(cfg)
    probe.finetune.init = str(run_dir)
    probe.validate(spec.ranks)
    diff = model_difference(pre, cfg)
    if diff is not None:
        key, got, want = diff
        raise ConfigError(
            f"finetune.overrides: {key}: {got!r} differs from the trial's {want!r} (fine-tuning keeps the "
            "pre-trained model's shapes)"
        )
    try:
        manifest = Manifest.load(cfg.data.path)
        manifest.split(probe.train_split())
        manifest.split(spec.finetune.split or cfg.finetune.eval_split)
    except (ValueError, OSError) as e:  # the manifest's own line: the data has no impressions
        raise ConfigError(f"finetune: data.path: {e}") from None


def finetune_job(spec: SweepSpec, t: Trial, run_dir: Path, ft_dir: Path) -> dict[str, Any]:
    """The fine-tuning stage's run directory and overrides, from the trial's run in ``run_dir`` (``resume=true``
    when an earlier attempt left a checkpoint in ``ft_dir``)."""
    assert spec.finetune is not None
    overrides = [*t.overrides, *spec.finetune.overrides, f"finetune.init={run_dir}", f"out={ft_dir}"]
    return {"finetune_dir": str(ft_dir), "finetune_overrides": [*overrides, *restart_flags(ft_dir)]}


def plan_cost(cfg: Any, p: PlanSpec, item_rows: int) -> dict[str, Any]:
    """The planner's cost of training ``cfg`` on ``p.interactions`` with ``p``'s GPUs (`argus plan`, its analytic
    estimate: no TorchRec planner per trial), or why it could not plan."""
    import copy

    from cluster.hardware import Hardware
    from cluster.planner import PlanRequest, plan

    cfg = copy.deepcopy(cfg)
    cfg.train.global_batch_size = 0  # the plan's world size, not the trial's
    items = int(p.items) or item_rows
    req = PlanRequest(
        items=items,
        interactions=p.interactions,
        hardware=Hardware(gpu=p.gpu, nodes=p.nodes, gpus_per_node=p.gpus),
        torchrec=False,
    )
    head = {"gpu": p.gpu, "gpus": p.nodes * p.gpus, "items": items, "interactions": p.interactions}
    try:
        r = plan(cfg, req)
    except (ConfigError, ValueError) as e:
        return {**head, "error": str(e)}
    mem = r["memory"]
    return {
        **head,
        "gpu_hours": r["time"]["gpu_hours"],
        "days": r["time"]["days"],
        "mfu": r["inputs"]["mfu"],
        "memory_gb_per_rank": mem["total"] / 1e9,
        "fits": bool(mem["fits"]),
    }


# ---- one trial (inside a Ray Tune trial) ---------------------------------------------------------------------
def _tail(path: Path, n: int = LOG_TAIL_LINES, since: int = 0) -> list[str]:
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(since)
        text = f.read().decode("utf-8", "replace")
    return text.splitlines()[-n:]


def last_training_record(run_dir: Path) -> dict[str, Any]:
    """The last training metrics record of a run's metrics.jsonl (one with a ``loss/`` number: not a validation
    record), or {}. Pre-training logs ``loss/total``, fine-tuning ``loss/pairwise``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    last: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            r = json.loads(line)
            if isinstance(r, dict) and any(k.startswith("loss/") for k in r):
                last = r
    return last


def eval_metrics(rep: dict[str, Any]) -> dict[str, float]:
    """The model's metrics of an `argus eval --json` report (hr@K, ndcg@K, ..., and the ne/* numbers)."""
    out = {k: v for k, v in rep.get("model", {}).items() if isinstance(v, (int, float)) and k != "users"}
    out.update({k: v for k, v in rep.items() if k.startswith("ne/") and isinstance(v, (int, float))})
    return out


def select_metrics(train: dict[str, Any], ev: dict[str, Any], wanted: Sequence[str]) -> dict[str, float | None]:
    """The row's ``metrics``: each wanted metric from the eval when it has it, else from training (None when
    neither does); without a list, every number of both (the eval's win)."""
    numbers = {k: v for k, v in train.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numbers.pop("step", None)
    numbers.update(ev)
    if not wanted:
        return numbers
    return {k: numbers.get(k) for k in wanted}


def finetune_metrics(rep: dict[str, Any]) -> dict[str, float]:
    """The fine-tuned model's numbers of an `argus eval --json` report on a fine-tuning run (pairwise_acc, ndcg,
    pau_vs_pretrained, pau_vs_popularity, ...) and the pre-trained model's (pretrained_pairwise_acc)."""
    out = {k: v for k, v in rep.get("model", {}).items() if isinstance(v, (int, float))}
    if isinstance(rep.get("pretrained", {}).get("pairwise_acc"), (int, float)):
        out["pretrained_pairwise_acc"] = rep["pretrained"]["pairwise_acc"]
    return out


def _eval_json(
    run: Path, data: str, flags: list[str], keep: Path, log: Path, cwd: str, env: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    """`argus eval RUN --data DATA --json FLAGS` as a subprocess (stderr to the trial's log): (exit code, report);
    the report is kept at ``keep``."""
    cmd = [sys.executable, "-m", "launch.cli", "eval", str(run), "--data", data, "--json", *flags]
    keep.unlink(missing_ok=True)  # an earlier attempt's report must not pass for this one's
    out = _run_logged(cmd, log, cwd, env, capture=True)
    if out.returncode != 0:
        return out.returncode, {}
    try:
        rep = json.loads(out.stdout)
    except json.JSONDecodeError:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"argus sweep: eval --json printed no JSON: {out.stdout[-2000:]}\n")
        return -1, {}
    keep.write_text(json.dumps(rep, indent=1))
    return 0, rep


def _run_logged(
    cmd: list[str], log: Path, cwd: str, env: dict[str, str], capture: bool = False
) -> subprocess.CompletedProcess:
    """``cmd`` with its line and its output appended to the trial's ``log``; ``capture``: stdout kept (as text)
    instead, stderr to the log."""
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        if capture:
            return subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=f, text=True)
        return subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)


def run_trial(t: dict[str, Any], sweep: dict[str, Any]) -> dict[str, Any]:
    """Train one trial (then evaluate it; then fine-tune and evaluate that, when the spec asks) as subprocesses;
    append its row to the results; return the row."""
    trial_dir, run_dir = Path(t["trial_dir"]), Path(t["run_dir"])
    trial_dir.mkdir(parents=True, exist_ok=True)
    log = trial_dir / "train.log"
    start = log.stat().st_size if log.is_file() else 0
    with open(trial_dir / "attempts.jsonl", "a") as f:  # one line per time this trial was run
        f.write(json.dumps({"time": time.time(), "job_overrides": t["job_overrides"]}) + "\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    ranks = int(sweep["ranks"])
    argus = ["-m", "launch.cli"]
    if ranks > 1:
        argus = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *argus]
    t0 = time.monotonic()
    row: dict[str, Any] = {k: t[k] for k in ROW_KEYS}
    train = [sys.executable, *argus, "train", t["base"]]
    code = _run_logged([*train, *t["job_overrides"]], log, sweep["cwd"], env).returncode
    phase, ev = "train", {}
    if code == 0 and sweep.get("eval") is not None:
        phase = "eval"
        e = sweep["eval"]
        cmd = ["--split", e["split"]] if e.get("split") else []
        cmd += ["--max-users", str(e["max_users"])] if e.get("max_users") is not None else []
        cmd += ["--ks", ",".join(map(str, e["ks"]))] if e.get("ks") else []
        code, rep = _eval_json(run_dir, t["data"], cmd, trial_dir / "eval.json", log, sweep["cwd"], env)
        ev = eval_metrics(rep)
    if code == 0 and t.get("finetune_dir"):
        phase = "finetune"
        ft_dir = Path(t["finetune_dir"])
        code = _run_logged([*train, *t["finetune_overrides"]], log, sweep["cwd"], env).returncode
        if code == 0:
            phase = "finetune eval"
            split = sweep["finetune"].get("split")
            cmd = ["--split", split] if split else []
            code, rep = _eval_json(ft_dir, t["data"], cmd, trial_dir / "finetune_eval.json", log, sweep["cwd"], env)
            ev.update({f"finetune/{k}": v for k, v in finetune_metrics(rep).items()})
    row["wall_s"] = round(time.monotonic() - t0, 3)
    row["train"] = last_training_record(run_dir)  # what the stages that finished measured, failed trial or not
    if ev:
        row["eval"] = ev
    if t.get("finetune_dir"):
        row["finetune_train"] = last_training_record(Path(t["finetune_dir"]))
    if code == 0:
        row["metrics"] = select_metrics(row["train"], ev, sweep["metrics"])
        row["status"] = "ok"
    else:
        row["status"] = "failed"
        row["failed_in"] = phase
        row["exit_code"] = code
        row["log"] = str(log)
        row["log_tail"] = _tail(log, since=start)
    row["time"] = time.time()
    append_row(Path(sweep["results"]), row)
    return row


def trainable(config: dict[str, Any], trials: dict[str, dict[str, Any]], sweep: dict[str, Any]) -> None:
    """The Ray Tune function trainable: runs the trial ``config["trial"]`` names and reports its row's numbers
    (a failed trial is reported, not raised: its row says what went wrong, and the other trials run on)."""
    from ray import tune

    row = run_trial(trials[config["trial"]], sweep)
    numbers = {k: v for k, v in (row.get("metrics") or {}).items() if isinstance(v, (int, float))}
    tune.report({"ok": int(row["status"] == "ok"), "wall_s": row["wall_s"], **numbers})


# ---- the command ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set, and as it was again afterwards."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _session(address: str | None, local_cpus: int | None) -> Iterator[None]:
    from cluster.ray_local import ray_session

    with ray_session(address, local_cpus):
        yield


def run_sweep(
    spec_path: str,
    extra: Sequence[str],
    storage_path: str,
    name: str | None = None,
    address: str | None = None,
    local: bool = False,
    retry_failed: bool = False,
    cpus_per_rank: float = 1.0,
    gpus_per_rank: float = 0.0,
) -> int:
    """The whole `argus sweep run`; returns the exit code (1 when a trial of the sweep failed)."""
    from rich.table import Table

    from launch.console import console

    spec = load_spec(spec_path)
    name = name or spec.name
    base = Path(spec.base)
    if not base.is_absolute() and not base.is_file():
        base = Path(spec_path).resolve().parent / spec.base
    if not base.is_file():
        raise ConfigError(f"{spec_path}: base: {spec.base}: config file not found")
    base_s = str(base.resolve())
    trials = expand(spec, extra)
    root = Path(storage_path).resolve() / name
    plan = plan_trials(spec, trials, root, base_s, retry_failed)  # every trial checked: before Ray
    if plan.done:
        console.print(
            f"{len(plan.done)} of {len(trials)} trial(s) already have a row in {root / RESULTS}: skipped"
            + ("" if retry_failed else " (--retry-failed runs the failed ones again)")
        )
    sweep = {
        "ranks": spec.ranks,
        "eval": dataclasses.asdict(spec.eval) if spec.eval is not None else None,
        "finetune": dataclasses.asdict(spec.finetune) if spec.finetune is not None else None,
        "metrics": list(spec.metrics),
        "results": str(root / RESULTS),
        "cwd": os.getcwd(),
    }
    if cpus_per_rank <= 0 or gpus_per_rank < 0:
        raise ValueError(f"--cpus-per-rank {cpus_per_rank:g} / --gpus-per-rank {gpus_per_rank:g}: must be > 0 / >= 0")
    if plan.to_run:
        console.print(f"{len(plan.to_run)} trial(s) to run: {root}")
        need = {"CPU": spec.ranks * cpus_per_rank, "GPU": spec.ranks * gpus_per_rank}
        local_cpus = max(1, math.ceil(need["CPU"])) if local else None
        _tune(plan.to_run, sweep, root, need, None if local else address, local_cpus)
    rows = read_rows(root / RESULTS)
    for t in plan.to_run:  # a trial Ray lost (its trainable died before writing a row)
        if t["trial"] not in rows:
            row = {k: t[k] for k in ROW_KEYS}
            row.update(status="failed", failed_in="ray", exit_code=None, log_tail=[LOST])
            append_row(root / RESULTS, row)
            rows[t["trial"]] = row

    from launch.sweep_report import report, table_rows

    header, cells = table_rows(trials, rows, spec.metrics)
    table = Table(*header, title=f"sweep {name}: {len(trials)} trial(s)")
    for c in cells:
        table.add_row(*c)
    console.print(table)
    p = spec.plan
    intro = (
        f"Spec: `{spec_path}`; results: `{root / RESULTS}`. GPU-hours: the planner's (`argus plan`) to train on "
        f"{p.interactions:.3g} interactions with {p.nodes * p.gpus} x {p.gpu}"
        + (f" and {p.items:.3g} items." if p.items else " and the trial's dataset's items.")
    )
    lines, plots = report(f"Sweep {name}", intro, spec.metrics, root, trials, rows)
    for line in lines:
        if line.startswith("- "):  # the trends and the fits
            console.print(line.removeprefix("- "))
    (root / REPORT).write_text("\n".join(lines) + "\n")
    failed = [t for t in trials if rows.get(t.id, {}).get("status") == "failed"]
    ok = sum(rows.get(t.id, {}).get("status") == "ok" for t in trials)
    summary = f"{ok} of {len(trials)} trial(s) finished, {len(failed)} failed; report: {root / REPORT}"
    if plots:
        summary += f", plots: {root / 'plots'}"
    console.print(summary)
    for t in failed:
        r = rows[t.id]
        tail = next((x for x in reversed(r.get("log_tail") or []) if x.strip()), "")
        console.print(f"failed: {t.id} ({t.label()}) in {r.get('failed_in')}: {tail}")
    return 1 if failed else 0


def _progress(labels: dict[str, str]) -> Any:
    """A Ray Tune callback (it runs in the driver) that prints a line per trial as it ends. Tune pickles its
    callbacks with the experiment: the class is module level and holds the labels only."""
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self, labels: dict[str, str]) -> None:
            self.labels = labels

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            from launch.console import console

            i = trial.config["trial"]
            how = "ok" if result.get("ok") else "failed"
            console.print(f"trial {i} ({self.labels.get(i, '')}): {how} in {result.get('wall_s', 0):.1f} s")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            from launch.console import console

            i = trial.config["trial"]
            console.print(f"trial {i} ({self.labels.get(i, '')}): the Ray trial failed ({trial})")

    return Progress(labels)


def _tune(
    to_run: list[dict[str, Any]],
    sweep: dict[str, Any],
    root: Path,
    need: dict[str, float],
    address: str | None,
    local_cpus: int | None,
) -> None:
    """The trials to run, one Ray Tune trial each, one at a time; each asks for ``need`` (its ranks' CPUs, GPUs)."""
    with _session(address, local_cpus):
        import ray
        from ray import tune

        from cluster.ray_local import InsufficientResources
        from trainer.logger import verbose

        have = ray.cluster_resources()
        for res, amount in need.items():  # Ray would wait forever for a trial that cannot fit
            if amount > have.get(res, 0.0) + 1e-9:
                raise InsufficientResources(
                    f"a trial needs {amount:g} {res} (ranks x --{res.lower()}s-per-rank), the cluster has "
                    f"{have.get(res, 0.0):g}"
                )
        by_id = {t["trial"]: t for t in to_run}
        resources = {"cpu": need["CPU"], **({"gpu": need["GPU"]} if need["GPU"] else {})}
        fn = tune.with_resources(tune.with_parameters(trainable, trials=by_id, sweep=sweep), resources)
        tuner = tune.Tuner(
            fn,
            param_space={"trial": tune.grid_search(list(by_id))},
            tune_config=tune.TuneConfig(max_concurrent_trials=1),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(root),
                verbose=2 if verbose() else 0,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=[_progress({i: t["label"] for i, t in by_id.items()})],
            ),
        )
        # Tune's new console output prints an experiment banner and paths whatever `verbose` says; the older
        # reporter at verbose=0 prints nothing (the driver prints a line per trial: _progress)
        quiet = {} if verbose() else {"RAY_AIR_NEW_OUTPUT": "0"}
        with _environ(quiet):
            tuner.fit()  # a trial that raised is in the result grid, not raised here; its row is written below
