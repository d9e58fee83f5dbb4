"""Capacity planner vs measured: per-rank memory and compute time per step of real CPU training runs.

    OMP_NUM_THREADS=1 python bench/plan_vs_measured.py [--presets mini,small] [--ranks 1,2] [--json]

For each preset and world size the planner's per-rank memory (``trainer.memory``: dense states for
ZeRO-2 fp32, activations, DeepSpeed buckets; TorchRec's own storage estimate for the embedding
shards, which sit in host memory on CPU) is compared with what training adds to a process's RSS,
and its compute time per step (``trainer.flops.flops_per_interaction`` at this machine's measured
one-thread fp32 matmul rate) with the trainer's own compute time per step.

Each run is a worker process (this file with ``--worker``, under torchrun for 2+ ranks) that:
imports everything the trainer uses, joins the process group, runs a tiny forward/backward/AdamW
warm-up (so the CPU kernels' code pages are resident before the baseline), records VmRSS (the
baseline), then builds ``Trainer(cfg)`` (loader, TorchRec DMP, DeepSpeed engine) and trains. Its
peak RSS (``ru_maxrss``) minus the baseline is what training added; the max over ranks is reported.
The worker also sums the bytes autograd saves in each step (weights and tables left out): the
activation term checked apart from what the allocator keeps.
Compute time per step is measured twice, first logging window (start-up) discarded: the trainer's
wall-clock ``time/step_s x time/compute_share`` from RUN/metrics.jsonl, and the rank's CPU time
around ``engine.train_step`` (on a shared machine other tenants inflate the first, not the second).
The prediction divides the planner's FLOPs for the interactions those steps really had by the
best-of-10 CPU-time rate of a one-thread fp32 ``torch.mm`` of the encoder's FF1 shape, timed by
every rank right after training (the mean over ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def job_overrides(
    data: Path, out: Path, preset: str, batch: int, ctx: int, steps: int, log_every: int, extra: Sequence[str] = ()
) -> list[str]:
    """The run: fp32, ZeRO-2 and sampled softmax are the presets' defaults and are left as they are."""
    return [
        f"data.path={data}",
        f"out={out}",
        f"model.preset={preset}",
        f"model.max_seq_len={ctx}",
        f"data.batch_size={batch}",
        f"train.steps={steps}",
        f"train.log_every={log_every}",
        "train.checkpoint_every=0",
        "train.device=cpu",
        *extra,
    ]


def load(preset: str, overrides: list[str]) -> Any:
    from trainer.config import load_config
    from trainer.job import JobConfig

    return load_config(JobConfig, REPO / "configs" / f"{preset}.yaml", overrides, validate=False)


# ---- prediction ------------------------------------------------------------------------------------------------
def predict(preset: str, overrides: list[str], world: int, items: int) -> dict[str, Any]:
    """The planner's per-rank memory terms (bytes) and training FLOPs per interaction."""
    from cluster.hardware import Hardware
    from cluster.planner import analytic_embedding_bytes, plan_config, torchrec_plan
    from trainer.flops import flops_per_interaction
    from trainer.memory import activations, dense_params, dense_states, ds_buffers

    cfg = plan_config(load(preset, overrides), world)
    ds = cfg.deepspeed
    p = dense_params(cfg)
    states = dense_states(p.total, p.largest_layer, ds.stage, ds.precision, ds.offload, world, world)
    act = activations(cfg)
    buffers = ds_buffers(cfg.deepspeed_config(world), ds.precision)
    emb = torchrec_plan(cfg, items, Hardware("h100", nodes=1, gpus_per_node=world), None, compute_device="cpu")
    if "error" in emb:
        raise RuntimeError(emb["error"])
    # On CPU TorchRec keeps the tables in "ddr"; nothing should be planned into HBM.
    embeddings = emb["host_per_rank"] + emb["hbm_per_rank"]
    total = states.gpu + act.total + buffers + embeddings
    return {
        "dense_params": p.total,
        "states": states.gpu,
        "activations": act.total,
        "activations_layers": act.layers,
        "activations_other": act.other,
        "activations_working": act.working,
        "ds_buffers": buffers,
        "embeddings": embeddings,
        "embeddings_analytic": analytic_embedding_bytes(cfg, items, world),
        "total": total,
        "flops_per_interaction": flops_per_interaction(cfg, items),
    }


def matmul_flops(m: int, k: int, n: int, repeats: int = 10) -> float:
    """This machine's fp32 FLOP/s for an (m, k) x (k, n) ``torch.mm`` on one thread: best of ``repeats``,
    timed in this thread's CPU time (other tenants of a shared machine delay it, but do not bill it)."""
    import torch

    torch.set_num_threads(1)  # every rank trains on one thread (OMP_NUM_THREADS=1)
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)  # first call: allocation, kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        torch.mm(a, b)
        times.append(time.thread_time() - t0)
    return 2.0 * m * k * n / min(times)


# ---- the worker (one rank of one run) --------------------------------------------------------------------------
def vm_rss() -> int:
    """Resident set size now, bytes (/proc/self/status VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def warm_up() -> None:
    """One tiny LayerNorm + attention + MLP forward/backward and AdamW step: loads the CPU kernels'
    code and their one-time workspaces before the baseline, so they are not billed to training."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(2, 8, 32, requires_grad=True)
    lin = torch.nn.Linear(32, 32)
    h = lin(F.layer_norm(x, (32,)))
    y = F.gelu(F.scaled_dot_product_attention(h, h, h, is_causal=True))
    F.cross_entropy(y.reshape(-1, 32), torch.zeros(16, dtype=torch.long)).backward()
    torch.optim.AdamW(lin.parameters()).step()


def worker(preset: str, overrides: list[str], report_dir: Path) -> None:
    """Train one rank; write its baseline and peak RSS, and per step its interactions, CPU time and
    autograd-saved bytes, to ``report_dir``."""
    import deepspeed  # noqa: F401  (imported before the baseline: libraries are not training's memory)
    import torch
    import torchrec  # noqa: F401

    from trainer.dist import init_distributed
    from trainer.logger import quiet_library_logs
    from trainer.train import Trainer

    quiet_library_logs()
    cfg = load(preset, overrides)
    info = init_distributed(cfg.train.device, cfg.train.timeout_s)
    warm_up()
    baseline, peak_before = vm_rss(), peak_rss()
    trainer = Trainer(cfg, info)
    after_build = vm_rss()
    interactions: list[int] = []
    cpu_s: list[float] = []
    saved: list[int] = []
    eng = trainer.engine
    step = eng.train_step
    # weights autograd saves for backward (dense parameters, embedding tables) are states, not activations
    weights = {
        t.untyped_storage().data_ptr()
        for t in (*eng.ds.module.parameters(), *eng.tables.parameters(), *eng.tables.buffers())
    }

    def counted(batch: Any, i: int) -> Any:
        """Records the interactions each step really had (histories vary), the bytes autograd saved
        (the activations, free of allocator effects) and its CPU time: the trainer's wall-clock timer
        also bills whatever else the shared machine runs meanwhile."""
        interactions.append(batch.num_interactions)
        held: dict[int, int] = {}  # by storage: views of one buffer count once

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights:
                held[ptr] = t.untyped_storage().nbytes()
            return t

        t0 = time.process_time()  # all threads of this rank (gloo's included); the loader is its own process
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = step(batch, i)
        cpu_s.append(time.process_time() - t0)
        saved.append(sum(held.values()))
        return out

    eng.train_step = counted  # type: ignore[method-assign]
    trainer.run()
    peak, end = peak_rss(), vm_rss()
    # The matmul rate is taken here, not in the parent: same process and, with 2+ ranks, the same
    # contention as training (the ranks leave the last collective together); after the peak is read,
    # so its buffers are not billed to training.
    enc = cfg.model.resolved()  # FF1 at this micro-batch: a step's biggest matmul shape
    flops_s = matmul_flops(cfg.data.batch_size * cfg.interactions_per_sample(), enc.d_model, enc.d_ff)
    report = {
        "rank": info.rank,
        "baseline": baseline,
        "peak_before": peak_before,
        "after_build": after_build,
        "peak": peak,
        "end": end,
        "interactions": interactions,
        "cpu_s": cpu_s,
        "saved": saved,
        "matmul_flops_s": flops_s,
    }
    (report_dir / f"rank{info.rank}.json").write_text(json.dumps(report))


# ---- one measured run ------------------------------------------------------------------------------------------
def measure(
    preset: str, overrides: list[str], ranks: int, out: Path, port: int, mmap_threshold: int = 0
) -> dict[str, Any]:
    """Launch the worker(s); peak minus baseline RSS (max over ranks) and rank 0's compute time per step.

    ``mmap_threshold`` > 0 fixes glibc's M_MMAP_THRESHOLD (a diagnostic, off by default): large blocks
    are then always mmapped and go back to the OS when freed, instead of staying in the heap."""
    reports = out / "bench"
    reports.mkdir(parents=True)
    args = [
        str(Path(__file__).resolve()),
        "--worker",
        "--preset",
        preset,
        "--report-dir",
        str(reports),
        "--overrides",
        json.dumps(overrides),
    ]
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={ranks}",
            f"--master_port={port}",
            *args,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    load = os.getloadavg()[0]  # other tenants of the machine show here (and in the wall-clock times)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{preset} x{ranks} failed:\n{proc.stderr[-3000:]}")
    per_rank = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(ranks)]
    windows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = windows[1:]  # the first window holds start-up (first-touch allocations, DeepSpeed's lazy buffers)
    steps = [w["step"] - prev["step"] for prev, w in zip(windows, timed)]
    window_s = [w["time/step_s"] * w["time/compute_share"] for w in timed]
    compute_s = sum(t * n for t, n in zip(window_s, steps)) / sum(steps)
    first_timed = windows[0]["step"]
    inter = per_rank[0]["interactions"][first_timed:]  # the steps whose time is measured, rank 0
    cpu = per_rank[0]["cpu_s"][first_timed:]
    added = [r["peak"] - r["baseline"] for r in per_rank]
    return {
        "added": max(added),
        "added_per_rank": added,
        "baseline": max(r["baseline"] for r in per_rank),
        "peak": max(r["peak"] for r in per_rank),
        "peak_before": max(r["peak_before"] for r in per_rank),
        "after_build": max(r["after_build"] - r["baseline"] for r in per_rank),
        "compute_s": compute_s,
        "compute_s_per_window": window_s,
        "timed_steps": sum(steps),
        "cpu_s": statistics.mean(cpu),
        "cpu_s_range": [min(cpu), max(cpu)],
        "matmul_flops_s": statistics.mean(r["matmul_flops_s"] for r in per_rank),
        "interactions_per_step": statistics.mean(inter),
        "max_interactions_per_step": max(max(r["interactions"]) for r in per_rank),
        "wall_s": wall,
        "autograd_saved": max(max(r["saved"]) for r in per_rank),
        "loadavg_1min_at_start": load,
    }


def run_one(
    preset: str,
    ranks: int,
    data: Path,
    out: Path,
    items: int,
    batch: int,
    ctx: int,
    steps: int,
    log_every: int,
    port: int,
    mmap_threshold: int = 0,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    ov = job_overrides(data, out, preset, batch, ctx, steps, log_every, extra)
    pred = predict(preset, ov, ranks, items)
    meas = measure(preset, ov, ranks, out, port, mmap_threshold)
    flops_s = meas["matmul_flops_s"]
    pred_s = pred["flops_per_interaction"] * meas["interactions_per_step"] / flops_s
    return {
        "preset": preset,
        "ranks": ranks,
        "batch_size": batch,
        "context": ctx,
        "predicted": pred,
        "measured": meas,
        "memory_ratio": meas["added"] / pred["total"],
        "matmul_flops_s": flops_s,
        "predicted_compute_s": pred_s,
        "compute_ratio": meas["compute_s"] / pred_s,
        "cpu_ratio": meas["cpu_s"] / pred_s,
    }


# ---- report ----------------------------------------------------------------------------------------------------
def print_tables(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    mem = Table(
        "preset",
        "ranks",
        "states",
        "activations",
        "DS buffers",
        "embeddings",
        "predicted",
        "measured",
        "measured / predicted",
        "measured / (predicted - DS buffers)",
        "autograd-saved (layers + other)",
        title="Memory per rank, MiB (measured = peak RSS - baseline, max over ranks; autograd-saved: "
        "the largest step's saved activations, max over ranks)",
    )
    for r in rows:
        p, m = r["predicted"], r["measured"]
        saved_pred = p["activations_layers"] + p["activations_other"]  # what autograd holds; not the working set
        mem.add_row(
            r["preset"],
            str(r["ranks"]),
            *(f"{p[k] / MiB:,.0f}" for k in ("states", "activations", "ds_buffers", "embeddings", "total")),
            f"{m['added'] / MiB:,.0f}",
            f"{r['memory_ratio']:.2f}",
            f"{m['added'] / (p['total'] - p['ds_buffers']):.2f}",
            f"{m['autograd_saved'] / MiB:,.0f} ({saved_pred / MiB:,.0f})",
        )
    step = Table(
        "preset",
        "ranks",
        "interactions / rank / step",
        "FLOPs / step",
        "matmul GFLOP/s",
        "predicted s",
        "CPU s (min-max)",
        "CPU / predicted",
        "wall s (windows)",
        "wall / predicted",
        "load",
        title="Compute time per step, rank 0, first logging window discarded (CPU: process time; "
        "wall: the trainer's time/step_s x time/compute_share; load: 1-min load average at launch)",
    )
    for r in rows:
        m = r["measured"]
        n, w, c = m["interactions_per_step"], m["compute_s_per_window"], m["cpu_s_range"]
        step.add_row(
            r["preset"],
            str(r["ranks"]),
            f"{n:,.0f}",
            f"{r['predicted']['flops_per_interaction'] * n:.3g}",
            f"{r['matmul_flops_s'] / 1e9:.1f}",
            f"{r['predicted_compute_s']:.2f}",
            f"{m['cpu_s']:.2f} ({c[0]:.2f}-{c[1]:.2f})",
            f"{r['cpu_ratio']:.2f}",
            f"{m['compute_s']:.2f} ({min(w):.2f}-{max(w):.2f})",
            f"{r['compute_ratio']:.2f}",
            f"{m['loadavg_1min_at_start']:.1f}",
        )
    console = Console(width=max(Console().width, 150))  # log files: don't squeeze the columns
    console.print(mem)
    console.print(step)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="mini,small")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--batch-sizes", default="16,8", help="per rank, one per preset (small is 4x mini's FLOPs)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--users", type=int, default=600)
    p.add_argument(
        "--mean-len",
        type=float,
        default=1500.0,
        help="lognormal (sigma 1.1) history lengths: at 1500 about 85%% fill a 256 context",
    )
    p.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=0,
        metavar="BYTES",
        help="diagnostic: set glibc's MALLOC_MMAP_THRESHOLD_ in the workers (0 = glibc's dynamic default)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one more config override for every run (repeatable), e.g. deepspeed.config=PATH",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--report-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.preset, json.loads(a.overrides), a.report_dir)
        return 0

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    presets = a.presets.split(",")
    batches = [int(b) for b in a.batch_sizes.split(",")]
    if len(batches) != len(presets):
        p.error("--batch-sizes: give one per preset")
    from trainer.data.synth import synthesize

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synthesize(data, users=a.users, items=a.items, mean_len=a.mean_len, shards=4, seed=0, holdout="none")
        for preset, batch in zip(presets, batches):
            for ranks in map(int, a.ranks.split(",")):
                out = Path(tmp) / f"{preset}-{ranks}"
                rows.append(
                    run_one(
                        preset,
                        ranks,
                        data,
                        out,
                        a.items,
                        batch,
                        a.context,
                        a.steps,
                        a.log_every,
                        29652,
                        a.malloc_mmap_threshold,
                        a.set,
                    )
                )
                if not a.json:
                    r = rows[-1]
                    print(
                        f"{preset} x{ranks}: memory {r['measured']['added'] / MiB:,.0f} MiB measured vs "
                        f"{r['predicted']['total'] / MiB:,.0f} predicted; compute {r['measured']['cpu_s']:.2f} "
                        f"CPU s vs {r['predicted_compute_s']:.2f} s ({r['measured']['wall_s']:.0f} s run)",
                        flush=True,
                    )
    rep = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "items": a.items,
        "context": a.context,
        "steps": a.steps,
        "log_every": a.log_every,
        "users": a.users,
        "mean_len": a.mean_len,
        "malloc_mmap_threshold": a.malloc_mmap_threshold,
        "overrides": a.set,
        "results": rows,
    }
    if a.json:
        json.dump(rep, sys.stdout, indent=1)
        print()
    else:
        print_tables(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
