"""One GPU, a few minutes: packed-batch training throughput of the big presets next to `argus plan`'s prediction.

    bash bench/gpu_check.sh            # on the GPU machine (installs the wheels from .whl/, then runs this)
    python bench/gpu_check.py --smoke  # anywhere: the same flow on CPU with a tiny model, to check the script

For each configuration (``CONFIGS``: ``medium`` and ``large`` at context 2,048 in bf16, ``large`` at 8,192 with
activation checkpointing; packed token-budget batches, sampled softmax with logQ, the item table looked up
every step) it runs ``argus train`` for a few steps on heavy-tailed synthetic histories and prints the last
logging window's tokens/s, TFLOP/s, MFU, padding share and peak memory, beside the planner's predicted memory
and step time for the same config on this GPU. Then one short in-process run counts the host-device syncs of
a training step under ``torch.cuda.set_sync_debug_mode("warn")`` and prints where they come from.

The item table uses ``embeddings.backend=torch`` by default: the lent GPU machines cannot hold TorchRec's CUDA
kernels (docs/benchmarks.md, GPU section); ``--backend torchrec`` for a machine that has them.
Everything is written to ``--out`` (JSON) too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# (name, overrides): batch_tokens per GPU; the table is 1M items of dim 256 (the big presets' item_dim).
CONFIGS: list[tuple[str, list[str]]] = [
    ("medium-2048", ["model.preset=medium", "model.max_seq_len=2048", "data.batch_tokens=32768"]),
    ("large-2048", ["model.preset=large", "model.max_seq_len=2048", "data.batch_tokens=16384"]),
    (
        "large-8192-ckpt",
        [
            "model.preset=large",
            "model.max_seq_len=8192",
            "data.batch_tokens=16384",
            "model.activation_checkpointing=true",
        ],
    ),
]
SMOKE: list[tuple[str, list[str]]] = [
    (
        "smoke-nano-64",
        ["model.preset=nano", "model.max_seq_len=64", "data.batch_tokens=256", "embeddings.item_dim=32"],
    ),
]


def overrides(data: Path, out: Path, steps: int, device: str, precision: str, backend: str) -> list[str]:
    return [
        f"data.path={data}",
        f"out={out}",
        f"train.steps={steps}",
        f"train.log_every={max(steps // 2, 1)}",
        "train.checkpoint_every=0",
        f"train.device={device}",
        f"deepspeed.precision={precision}",
        "deepspeed.stage=2",
        "heads.next_item.full_softmax=false",
        f"embeddings.backend={backend}",
        "data.num_workers=4" if device == "cuda" else "data.num_workers=1",
    ]


def predicted(config: list[str], items: int, gpu: str) -> dict[str, Any]:
    """`argus plan` for the same config on one GPU of this type (analytic; TorchRec's planner not run)."""
    from cluster.hardware import Hardware
    from cluster.planner import PlanRequest, plan
    from trainer.run import load_job

    cfg = load_job(REPO / "configs" / "mini.yaml", config, world_size=1)
    p = plan(cfg, PlanRequest(items=items, hardware=Hardware(gpu, nodes=1, gpus_per_node=1), torchrec=False))
    return {"memory_gb": p["memory"]["total"] / 2**30, "step_s": p["step"]["seconds"], "mfu": p["inputs"]["mfu"]}


def train(name: str, config: list[str], timeout: float) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "4", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "launch.cli", "train", "configs/mini.yaml", *config]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = next(Path(c.split("=", 1)[1]) for c in config if c.startswith("out="))
    if proc.returncode != 0:
        return {"config": name, "error": proc.stderr[-3000:], "wall_s": time.time() - t0}
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    keys = ("tps", "interactions_per_s", "tflops", "mfu(%)", "memory/peak_gb", "tokens/padding_share")
    return {"config": name, "wall_s": time.time() - t0, "step_s": last.get("time/step_s")} | {
        k: last.get(k) for k in keys
    }


def count_syncs(data: Path, out: Path, config: list[str], steps: int = 3) -> dict[str, Any]:
    """Syncs of a few training steps (after one warm-up step) under torch's sync debug mode, by origin."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29777", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from trainer.data.manifest import Manifest
    from trainer.dist import init_distributed
    from trainer.engine import Engine
    from trainer.run import load_job

    cfg = load_job(REPO / "configs" / "mini.yaml", config, world_size=1)
    info = init_distributed("cuda", timeout_s=120)
    manifest = Manifest.load(cfg.data.path)
    loader = cfg.loader_config().build(0, 1, manifest)
    engine = Engine(cfg, info, manifest)
    batches = iter(loader)
    engine.train_step(next(batches), 0)
    origins: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        for step in range(1, steps + 1):
            engine.train_step(next(batches), step)
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        where = f"{Path(w.filename).name}:{w.lineno}"
        origins[where] = origins.get(where, 0) + 1
    return {
        "steps": steps,
        "syncs": sum(origins.values()),
        "by_origin": dict(sorted(origins.items(), key=lambda kv: -kv[1])),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the same flow")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--backend", default="torch", choices=["torch", "torchrec"])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--only", default="", help="comma-separated config names")
    p.add_argument("--out", default="", help="write the results here as JSON")
    p.add_argument("--timeout", type=float, default=150, help="seconds per training run")
    a = p.parse_args()
    import torch

    from trainer.data.synth import synthesize
    from trainer.flops import match_gpu_name

    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    gpu_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    spec = match_gpu_name(gpu_name) if device == "cuda" else None
    gpu = spec.name if spec else "h100"
    configs = SMOKE if a.smoke else CONFIGS
    if a.only:
        configs = [c for c in configs if c[0] in a.only.split(",")]
    items = 2000 if a.smoke else a.items
    print(f"torch {torch.__version__}, device {gpu_name}, planner GPU {gpu}, backend {a.backend}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        t0 = time.time()
        users, mean = (200, 40) if a.smoke else (2000, 1000)
        synthesize(data, users=users, items=items, mean_len=mean, shards=8, seed=0, holdout="none", workers=8)
        print(f"data: {users} users, mean history {mean}, {items:,} items ({time.time() - t0:.0f} s)", flush=True)
        for name, extra in configs:
            precision = "fp32" if device == "cpu" else "bf16"
            config = [*overrides(data, Path(tmp) / name, a.steps, device, precision, a.backend), *extra]
            if not a.smoke:
                config.append("embeddings.item_dim=256")
            row = train(name, config, a.timeout)
            try:
                row["plan"] = predicted(config, items, gpu)
            except Exception as e:  # the measurement stands without the prediction
                row["plan"] = {"error": f"{type(e).__name__}: {e}"}
            rows.append(row)
            if "error" in row:
                print(f"{name}: FAILED after {row['wall_s']:.0f} s\n{row['error']}", flush=True)
                continue
            plan = row["plan"]
            print(
                f"{name:<16} {row['tps'] or 0:>10,.0f} tok/s  {row['tflops'] or 0:7.1f} TFLOP/s  "
                f"MFU {row['mfu(%)'] if row['mfu(%)'] is not None else float('nan'):5.1f}%  "
                f"padding {row['tokens/padding_share'] or 0:.1%}  peak {row['memory/peak_gb'] or 0:.1f} GB "
                f"(plan {plan.get('memory_gb', float('nan')):.1f} GB)  step {row['step_s'] or 0:.3f} s "
                f"(plan {plan.get('step_s', float('nan')):.3f} s)  [{row['wall_s']:.0f} s]",
                flush=True,
            )
        name, extra = configs[0]
        sync_cfg = [*overrides(data, Path(tmp) / "syncs", 4, device, "fp32" if device == "cpu" else "bf16", a.backend)]
        syncs = count_syncs(data, Path(tmp) / "syncs", [*sync_cfg, *extra])
        print(f"syncs per {syncs.get('steps', 0)} steps: {json.dumps(syncs)}", flush=True)
    report = {"device": gpu_name, "torch": torch.__version__, "backend": a.backend, "results": rows, "syncs": syncs}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
