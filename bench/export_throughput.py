"""Export throughput of `argus export` on this machine: users/s and items/s, at 1 and 2 ranks.

    python bench/export_throughput.py [--users 1000] [--items 200000] [--mean-len 150] [--preset mini]
                                      [--context 128] [--ranks 1,2] [--batch-size 256] [--json]

Synthesizes a leave-one-out dataset, pre-trains the model for one step (a real checkpoint in the
real layout; throughput does not depend on the weights), then runs the real command line: one plain
process for 1 rank, torchrun (gloo on CPU) for more. Rates are those the export measures itself
(manifest.json `timing`): the user phase and the item phase, each timed between barriers on all
ranks, so process start-up, sharding and checkpoint loading are excluded (reported separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `argus export` once launch/cli.py registers it; until then the command's own entry point (same code).
CLI = "launch.cli"


def _run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return time.perf_counter() - t0


def export(run: Path, data: Path, out: Path, ranks: int, batch: int, dtype: str) -> dict:
    args = [
        "-m",
        CLI,
        "export",
        str(run),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        str(batch),
        "--dtype",
        dtype,
    ]
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=29653", *args]
    wall = _run(cmd)
    m = json.loads((out / "manifest.json").read_text())
    t = m["timing"]
    return {
        "ranks": ranks,
        "dtype": dtype,
        "users": m["users"],
        "items": m["items"],
        "users_per_s": t["users_per_s"],
        "items_per_s": t["items_per_s"],
        "users_s": t["users_s"],
        "items_s": t["items_s"],
        "startup_s": round(wall - t["users_s"] - t["items_s"], 2),
        "wall_s": round(wall, 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--items", type=int, default=200_000)
    p.add_argument("--mean-len", type=float, default=150.0)
    p.add_argument("--preset", default="mini")
    p.add_argument("--context", type=int, default=128, help="model.max_seq_len (the state sees context - 1 rows)")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, run = Path(tmp) / "data", Path(tmp) / "run"
        _run(
            [
                sys.executable,
                "-m",
                "launch.cli",
                "data",
                "synth",
                "--out",
                str(data),
                "--users",
                str(a.users),
                "--items",
                str(a.items),
                "--mean-len",
                str(a.mean_len),
                "--shards",
                "4",
                "--seed",
                "1",
                "--holdout",
                "loo",
                "--workers",
                "1",
            ]
        )
        _run(
            [
                sys.executable,
                "-m",
                "launch.cli",
                "train",
                "configs/mini.yaml",
                f"data.path={data}",
                f"out={run}",
                f"model.preset={a.preset}",
                f"model.max_seq_len={a.context}",
                "data.batch_size=8",
                "train.steps=1",
                "train.checkpoint_every=0",
                "train.device=cpu",
                "data.num_workers=0",
            ]
        )
        rows = [export(run, data, Path(tmp) / f"out{r}", int(r), a.batch_size, a.dtype) for r in a.ranks.split(",")]
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "preset": a.preset,
        "context": a.context,
        "users": a.users,
        "items": a.items,
        "mean_len": a.mean_len,
        "batch_size": a.batch_size,
    }
    if a.json:
        print(json.dumps({"config": meta, "rows": rows}, indent=1))
        return
    print(f"{meta}\n")
    print("| ranks | dtype | users | users/s | items | items/s | user phase s | item phase s | start-up s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['dtype']} | {r['users']:,} | {r['users_per_s']:,.0f} | {r['items']:,} | "
            f"{r['items_per_s']:,.0f} | {r['users_s']:.1f} | {r['items_s']:.2f} | {r['startup_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
