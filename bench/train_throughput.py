"""Training throughput (interactions/s over all ranks) of `argus train` on this machine.

    python bench/train_throughput.py [--presets mini,small] [--ranks 1,2] [--steps 40] [--json]
    # packed (token-budget) vs padded batches on heavy-tailed histories (mean 1,000, max 8,192)
    python bench/train_throughput.py --presets mini,small --ranks 1 --contexts 2048,8192 --batching both \
        --mean-len 1000 --max-len 8192 --softmax sampled --steps 12
    # on a GPU machine (one GPU): medium and large at context 2048, bf16, sampled softmax only
    python bench/train_throughput.py --presets medium,large --ranks 1 --context 2048 --batch-size 8 \
        --device cuda --precision bf16 --softmax sampled

Each configuration runs the real CLI (torchrun for 2+ ranks: TorchRec row-wise item table + DeepSpeed
ZeRO-2, fp32) on a synthetic dataset, with the sampled softmax (256 uniform + 256 in-batch negatives)
and with the full softmax over the catalog. The rate is the last logging window's (the first window
holds start-up and is discarded).

``--batching``: ``padded`` is ``--batch-size`` users per step, each row padded to the longest;
``packed`` is the same grid (``data.batch_tokens = batch size x context``) filled first-fit with several
users' histories. Both report real interactions/s, the padding share of the grid and the data-loading share.
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


def run(
    data: Path,
    out: Path,
    preset: str,
    ranks: int,
    full: bool,
    steps: int,
    batch: int,
    ctx: int,
    device: str,
    precision: str,
    packed: bool = False,
) -> dict:
    args = [
        "configs/mini.yaml",
        f"data.path={data}",
        f"out={out}",
        f"model.preset={preset}",
        f"model.max_seq_len={ctx}",
        f"data.batch_size={batch}",
        f"train.steps={steps}",
        f"train.log_every={steps // 2}",
        "train.checkpoint_every=0",
        f"train.device={device}",
        f"deepspeed.precision={precision}",
        f"deepspeed.stage={3 if preset == 'large' else 2}",
        f"heads.next_item.full_softmax={'true' if full else 'false'}",
        f"data.batch_tokens={batch * ctx if packed else 0}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        cmd = [sys.executable, "-m", "launch.cli", "train", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={ranks}",
            "--master_port=29651",
            "-m",
            "launch.cli",
            "train",
            *args,
        ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "preset": preset,
        "ranks": ranks,
        "softmax": "full" if full else "sampled",
        "context": ctx,
        "batching": "packed" if packed else "padded",
        "padding_share": last.get("tokens/padding_share"),
        "interactions_per_s": last["interactions_per_s"],
        "tflops": last["tflops"],
        "data_share": last.get("time/data_share"),
        "peak_gb": last.get("memory/peak_gb"),
        "tps": last.get("tps"),
        "mfu": last.get("mfu(%)"),
    }


def record_mfu(rows: list[dict], a: argparse.Namespace) -> None:
    """On a known GPU, keep the best sampled-softmax MFU in bench/results/mfu.json: `argus plan` uses
    our own measurement instead of its assumed 40% from then on."""
    import torch

    from trainer.flops import match_gpu_name

    measured = [r for r in rows if r.get("mfu") is not None and r["softmax"] == "sampled"]
    if not measured or not torch.cuda.is_available():
        return
    spec = match_gpu_name(torch.cuda.get_device_name(0))
    if spec is None:
        return
    best = max(measured, key=lambda r: r["mfu"])
    path = REPO / "bench" / "results" / "mfu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(path.read_text()) if path.is_file() else {}
    table[spec.name] = {
        "mfu": best["mfu"] / 100,
        "source": f"bench/train_throughput.py: {best['preset']}, "
        f"context {best['context']}, {a.precision}, {best['ranks']} rank(s)",
    }
    path.write_text(json.dumps(table, indent=1) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="mini,small")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--contexts", "--context", default="128", help="comma-separated context lengths")
    p.add_argument("--batching", default="padded", choices=["padded", "packed", "both"])
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--mean-len", type=int, default=0, help="mean history length (default: max(200, context))")
    p.add_argument("--max-len", type=int, default=0, help="longest history kept by the synthesizer (default: its own)")
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--softmax", default="both", choices=["both", "sampled", "full"])
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    modes = {"both": (False, True), "sampled": (False,), "full": (True,)}[a.softmax]
    batchings = {"both": (False, True), "padded": (False,), "packed": (True,)}[a.batching]
    contexts = [int(c) for c in a.contexts.split(",")]
    from trainer.data.synth import synthesize

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        kw = {"max_len": a.max_len} if a.max_len else {}
        mean = a.mean_len or max(200, max(contexts))
        synthesize(data, users=a.users, items=a.items, mean_len=mean, shards=4, seed=0, holdout="none", **kw)
        for preset in a.presets.split(","):
            for ctx in contexts:
                for ranks in map(int, a.ranks.split(",")):
                    for full in modes:
                        for packed in batchings:
                            out = Path(tmp) / f"{preset}-{ctx}-{ranks}-{full}-{packed}"
                            rows.append(
                                run(
                                    data,
                                    out,
                                    preset,
                                    ranks,
                                    full,
                                    a.steps,
                                    a.batch_size,
                                    ctx,
                                    a.device,
                                    a.precision,
                                    packed,
                                )
                            )
                            if not a.json:
                                r = rows[-1]
                                print(
                                    f"{r['preset']:<6} ctx={ctx:<5} ranks={r['ranks']} {r['softmax']:<7} "
                                    f"{r['batching']:<6} {r['interactions_per_s']:>9,.0f} interactions/s  "
                                    f"{r['tflops'] * 1e3:7.1f} GFLOP/s padding {r['padding_share'] or 0:.0%} "
                                    f"data {r['data_share'] or 0:.0%}"
                                    + (f"  MFU {r['mfu']:.1f}%" if r.get("mfu") is not None else ""),
                                    flush=True,
                                )
    rep = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "items": a.items,
        "contexts": contexts,
        "mean_len": mean,
        "batch_size_per_rank": a.batch_size,
        "steps": a.steps,
        "results": rows,
    }
    record_mfu(rows, a)
    if a.json:
        json.dump(rep, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
