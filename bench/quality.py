"""argus (the recommended config for the data size) vs the reference SASRec, on the same split (issue #11).

    python bench/quality.py [--shape small|medium] [--seeds 0,1,2] [--csv FILE --csv-args "..."]
        [--work DIR] [--report FILE] [--argus-args "key=value ..."] [--ref-args "--epochs 200 ..."]

For each dataset (synthetic shapes like small and medium public datasets, or an interaction CSV converted
with ``--holdout loo``): argus trains with ``torchrun --nproc_per_node=2`` (1 thread per rank) from the config
``argus data inspect`` recommends, validation picking the checkpoint; the reference SASRec
(``bench/reference_sasrec.py``) trains in 1 process with 2 threads, validation picking its epoch. Both are
scored on ``test`` by the same code (``trainer.evaluate.rank_split``); for synthetic data the oracle (each
user's true next-item distribution, ``trainer.data.oracle``) is ranked the same way.

Wall time to the selected checkpoint runs from launching the training command to the selected checkpoint on
disk (argus: ``checkpoints/best``'s meta.json; the reference: ``best.pt``), start-up included for both.
Run it on an otherwise idle machine: the two runs are timed one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # like two small public movie-ratings logs (users x items x mean history)
    "small": dict(users=1000, items=1700, mean_len=100),
    "medium": dict(users=6000, items=3400, mean_len=165),
}
# Reference settings: the standard SASRec of the issue (hidden 64, 2 blocks, 2 heads, dropout 0.2, Adam 1e-3,
# batch 256), given every chance: validation every epoch and enough patience (time to the selected checkpoint
# does not count the epochs after it).
# A time cap bounds the benchmark (--max-seconds, the same for both sides); a run it stops says so.
REF_DEFAULT = ["--epochs", "300", "--patience", "10", "--min-epochs", "20"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run ``cmd`` (output to ``log``); returns the launch time (time.time()) once it finished successfully."""
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if rc.returncode:
        sys.exit(f"bench/quality.py: {' '.join(cmd[:6])} ... failed (exit {rc.returncode}); see {log}")
    return t0


def make_data(work: Path, shape: str | None, seed: int, csv: str | None, csv_args: str) -> Path:
    argus = [sys.executable, "-m", "launch.cli", "data"]
    if csv:
        out = work / "data"
        if not (out / "manifest.json").is_file():
            _run(
                [*argus, "convert", csv, "--out", str(out), "--holdout", "loo", *shlex.split(csv_args)],
                work / "convert.log",
            )
        return out
    s = SHAPES[shape]
    out = work / f"{shape}-seed{seed}" / "data"
    if not (out / "manifest.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        _run(
            [
                *argus,
                "synth",
                "--out",
                str(out),
                "--users",
                str(s["users"]),
                "--items",
                str(s["items"]),
                "--mean-len",
                str(s["mean_len"]),
                "--holdout",
                "loo",
                "--seed",
                str(seed),
                "--shards",
                "4",
            ],
            out.parent / "synth.log",
        )
    return out


def run_argus(data: Path, run: Path, seed: int, extra: list[str], max_seconds: float) -> dict[str, Any]:
    from trainer.checkpoint import best_checkpoint
    from trainer.data.manifest import Manifest
    from trainer.recommend import recommend

    rec = recommend(int(Manifest.load(data).split("train").interactions))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "launch.cli",
        "train",
        rec.config,
        f"data.path={data}",
        f"out={run}",
        f"train.seed={seed}",
        f"train.max_seconds={max_seconds}",
        *extra,
    ]
    t0 = _run(cmd, run.with_suffix(".log"), {"OMP_NUM_THREADS": "1"})
    t_end = time.time()
    best = best_checkpoint(run)
    meta = json.loads((best / "meta.json").read_text())
    out = subprocess.run(
        [sys.executable, "-m", "launch.cli", "eval", str(run), "--data", str(data), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    rep = json.loads(out.stdout)
    return {
        "config": rec.config,
        "overrides": extra,
        "checkpoint": best.name,
        "test": rep["model"],
        "popularity": rep["popularity"],
        "seconds_to_best": meta["time"] - t0,
        "seconds_total": t_end - t0,
    }


def run_reference(data: Path, out: Path, seed: int, extra: list[str], max_seconds: float) -> dict[str, Any]:
    report = out / "report.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "reference_sasrec.py"),
        str(data),
        "--threads",
        "2",
        "--seed",
        str(seed),
        "--max-seconds",
        str(max_seconds),
        "--out",
        str(out),
        "--report",
        str(report),
        *REF_DEFAULT,
        *extra,
    ]
    out.mkdir(parents=True, exist_ok=True)
    t0 = _run(cmd, out / "log.txt")
    t_end = time.time()
    rep = json.loads(report.read_text())
    return {
        "args": [*REF_DEFAULT, *extra],
        "best_epoch": rep["best_epoch"],
        "test": rep["test"]["model"],
        "popularity": rep["test"]["popularity"],
        "seconds_to_best": rep["best_time"] - t0,
        "seconds_total": t_end - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--seeds", default="0", help="comma-separated; each seed makes its own data and runs")
    p.add_argument("--csv", help="an interaction log to convert (--holdout loo) instead of synthetic data")
    p.add_argument("--csv-args", default="", help="extra `argus data convert` arguments, e.g. column names")
    p.add_argument("--work", default="bench-quality", help="data and runs go here (reused data is not rewritten)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--argus-args", default="", help="extra key=value overrides for argus")
    p.add_argument("--ref-args", default="", help="extra reference_sasrec.py arguments")
    p.add_argument("--max-seconds", type=float, default=900, help="training time cap for each side (0 = none)")
    p.add_argument("--only", choices=["argus", "reference"], help="run one side only")
    a = p.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from trainer.evaluate import oracle_report

    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        data = make_data(work, None if a.csv else a.shape, seed, a.csv, a.csv_args)
        base = data.parent
        stamp = time.strftime("%H%M%S")
        r: dict[str, Any] = {"data": str(data), "seed": seed, "shape": "csv" if a.csv else a.shape}
        if a.only != "reference":
            r["argus"] = run_argus(data, base / f"argus-{stamp}", seed, shlex.split(a.argus_args), a.max_seconds)
        if a.only != "argus":
            r["reference"] = run_reference(
                data, base / f"reference-{stamp}", seed, shlex.split(a.ref_args), a.max_seconds
            )
        if not a.csv:
            r["oracle"] = oracle_report(data, "test", [10, 100])["oracle"]
        results.append(r)
        print(json.dumps(r), flush=True)
    table = Table(
        "seed", "model", "HR@10", "NDCG@10", "of oracle", "s to selected", "s total", title="test, full ranking"
    )
    for r in results:
        oracle = r.get("oracle", {}).get("ndcg@10")
        for name in ("argus", "reference"):
            if name in r:
                m = r[name]
                share = f"{m['test']['ndcg@10'] / oracle:.0%}" if oracle else "-"
                table.add_row(
                    str(r["seed"]),
                    name,
                    f"{m['test']['hr@10']:.4f}",
                    f"{m['test']['ndcg@10']:.4f}",
                    share,
                    f"{m['seconds_to_best']:.0f}",
                    f"{m['seconds_total']:.0f}",
                )
        if oracle:
            table.add_row(str(r["seed"]), "oracle", f"{r['oracle']['hr@10']:.4f}", f"{oracle:.4f}", "100%", "-", "-")
        pop = next(r[n]["popularity"] for n in ("argus", "reference") if n in r)
        table.add_row(str(r["seed"]), "popularity", f"{pop['hr@10']:.4f}", f"{pop['ndcg@10']:.4f}", "", "-", "-")
    Console().print(table)
    if a.report:
        Path(a.report).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
