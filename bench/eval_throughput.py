"""Full-ranking `argus eval` at catalog scale: users/s and peak memory per rank, 1 rank vs 2 (issue #14).

    python bench/eval_throughput.py [--items 1e6,1e7] [--ranks 1,2] [--users 1000] [--work /tmp/argus-eval-bench]

For each catalog size: a synthetic dataset of that many items (``argus data synth``, leave-one-out), a `nano`
run (item_dim 64) trained for one step on ``--train-ranks`` ranks so that a real checkpoint holds the whole table
(row-wise: one chunk per training rank; loading a rank's rows reads each saved chunk they overlap whole), then
``torchrun --nproc_per_node=R argus eval RUN --data D --max-users USERS --json`` for each R: the report's own
``cost`` (seconds, users/s, each rank's peak RSS). 1 rank runs with 2 threads, 2 ranks with 1 thread each, on
this 2-core machine. Datasets and runs are reused when they exist (delete the work directory to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict[str, str] | None = None) -> str:
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode:
        sys.exit(f"bench/eval_throughput.py: {' '.join(cmd[:8])} ... failed:\n{out.stderr[-3000:]}")
    return out.stdout


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(work: Path, items: int, users: int, train_ranks: int) -> tuple[Path, Path]:
    argus = [sys.executable, "-m", "launch.cli"]
    data, run = work / f"data-{items}", work / f"run-{items}-{train_ranks}"
    if not (data / "manifest.json").is_file():
        # about 8% of synthetic users have no history before their held-out item: ask for more
        _run([*argus, "data", "synth", "--out", str(data), "--users", str(int(users * 1.15)), "--items", str(items),
              "--mean-len", "20", "--shards", "2", "--holdout", "loo", "--seed", "0"])  # fmt: skip
    if not (run / "checkpoints" / "latest").is_file():
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={train_ranks}",
                    f"--master_port={_port()}", "-m", "launch.cli"]  # fmt: skip
        _run([*launcher, "train", "configs/nano.yaml", f"data.path={data}", f"out={run}", "train.epochs=0",
              "train.steps=1", "data.batch_size=16", "eval.every_epochs=0", "eval.patience=0",
              "eval.full_ranking_max_items=1000000000", "heads.next_item.full_softmax=false",
              "train.device=cpu", "train.overwrite=true"], {"OMP_NUM_THREADS": "1"})  # fmt: skip
    return data, run


def evaluate(run: Path, data: Path, ranks: int, users: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={_port()}",
           "-m", "launch.cli", "eval", str(run), "--data", str(data), "--max-users", str(users), "--json"]  # fmt: skip
    t0 = time.perf_counter()
    out = _run(cmd, {"OMP_NUM_THREADS": str(max(1, 2 // ranks))})
    rep = json.loads(out[out.index("{") :])
    rep["wall_s"] = time.perf_counter() - t0
    return rep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", default="1e6,1e7", help="comma-separated catalog sizes")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument(
        "--train-ranks", type=int, default=2, help="ranks that write the checkpoint (DCP reads a saved chunk whole)"
    )
    p.add_argument("--work", default="/tmp/argus-eval-bench")
    p.add_argument("--report", help="write the rows as JSON here")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print("| items | ranks | users | eval s | users/s | peak RSS per rank (GiB) | table per rank (GiB) | HR@10 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for items in [int(float(x)) for x in a.items.split(",")]:
        data, run = prepare(work, items, a.users, a.train_ranks)
        for ranks in [int(x) for x in a.ranks.split(",")]:
            rep = evaluate(run, data, ranks, a.users)
            c = rep["cost"]
            row = {"items": items, "ranks": ranks, "users": rep["users"], **c, "wall_s": rep["wall_s"],
                   "hr@10": rep["model"]["hr@10"], "table_gib_per_rank": items * 64 * 4 / ranks / 2**30}  # fmt: skip
            rows.append(row)
            peak = " / ".join(f"{g:.2f}" for g in c["peak_memory_gib"])
            print(f"| {items:,} | {ranks} | {rep['users']:,} | {c['seconds']:.1f} | {c['users_per_s']:,.1f} | {peak} "
                  f"| {row['table_gib_per_rank']:.2f} | {row['hr@10']:.4f} |", flush=True)  # fmt: skip
    if a.report:
        Path(a.report).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
