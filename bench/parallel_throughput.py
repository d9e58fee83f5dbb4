"""Data vs tensor vs sequence parallelism on this machine: step time and peak memory per rank of `argus train` with
the same global batch, dp=2 (one row per rank) vs tp=2 (two rows on both ranks, each holding half of every block's
weights) vs sp=2 (two rows on both ranks, each encoding half of every row), beside the planner's dense states and
activations per rank and the bytes of the tp / sp collectives.

    python bench/parallel_throughput.py [--preset small] [--context 2048] [--steps 6] [--json]

Each layout runs the real CLI under torchrun (2 ranks, gloo, TorchRec row-wise item table + DeepSpeed ZeRO-2, fp32)
on a synthetic dataset of histories at least as long as the context. The step time is the last logging window's
(the first holds start-up); peak memory is each rank's peak RSS on CPU (the process, not only the activations:
compare the layouts' differences with the planner's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# layout -> (rows per rank, overrides); the global batch is 2 rows in each
LAYOUTS = {"dp": (1, []), "tp": (2, ["parallel.tp=2"]), "sp": (2, ["parallel.sp=2"])}


def train(data: Path, out: Path, args: argparse.Namespace, layout: str) -> dict:
    batch, extra = LAYOUTS[layout]
    overrides = [
        "configs/mini.yaml", f"data.path={data}", f"out={out}", f"model.preset={args.preset}",
        f"model.max_seq_len={args.context}", f"data.batch_size={batch}", f"train.steps={args.steps}",
        f"train.log_every={args.steps // 2}", "train.checkpoint_every=0", "train.device=cpu", "data.num_workers=0",
        "model.attention=segments", *extra,
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "launch.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([*cmd, "train", *overrides], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{layout}: argus train failed:\n{done.stderr[-3000:]}")
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    rows = 2  # the global batch: rows per step
    step_s = rows * args.context / last["interactions_per_s"] if last["interactions_per_s"] else float("nan")
    return {"step_s": step_s, "peak_gb": last["memory/peak_gb"], "interactions_per_s": last["interactions_per_s"]}


def planned(data: Path, args: argparse.Namespace, layout: str) -> dict:
    from cluster.hardware import Hardware
    from cluster.planner import PlanRequest, plan
    from trainer.config import load_config
    from trainer.data.manifest import Manifest
    from trainer.job import JobConfig

    batch, extra = LAYOUTS[layout]
    cfg = load_config(
        JobConfig,
        REPO / "configs" / "mini.yaml",
        [f"model.preset={args.preset}", f"model.max_seq_len={args.context}", f"data.batch_size={batch}", *extra,
         "deepspeed.precision=fp32", "out=/x", f"data.path={data}"],
        validate=False,
    )  # fmt: skip
    items = Manifest.load(data).num_items
    r = plan(cfg, PlanRequest(items=items, hardware=Hardware(gpu="h100", gpus_per_node=2), torchrec=False))
    m = r["memory"]
    return {
        "activations_gb": m["activations"] / 1e9,
        "dense_gb": (m["dense_params"] + m["dense_grads"] + m["dense_optimizer"]) / 1e9,
        "comm_mb": (r["step"]["sp_comm_bytes"] + r["step"]["tp_comm_bytes"]) / 1e6,
        "h100_step_s": r["step"]["seconds"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from trainer.data.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="argus_par_") as tmp:
        data = Path(tmp) / "data"
        synthesize(data, users=48, items=2000, mean_len=2 * args.context, shards=2, seed=0, holdout="none",
                   max_len=args.context, workers=1)  # fmt: skip
        rows = {}
        for layout in LAYOUTS:
            rows[layout] = {**train(data, Path(tmp) / layout, args, layout), **planned(data, args, layout)}
    report = {
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "preset": args.preset,
        "context": args.context,
        "global_batch_rows": 2,
        "layouts": rows,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{args.preset}, context {args.context}, 2 rows per step, 2 CPU ranks (gloo), {report['machine']}")
    print(f"{'layout':8} {'step s':>8} {'peak GB/rank':>13} | planner: {'dense GB/rank':>13} {'act GB/rank':>11} "
          f"{'comm MB/step':>12}")  # fmt: skip
    for name, r in rows.items():
        print(f"{name + '=2':8} {r['step_s']:8.2f} {r['peak_gb']:13.2f} |          {r['dense_gb']:13.3f} "
              f"{r['activations_gb']:11.2f} {r['comm_mb']:12.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
