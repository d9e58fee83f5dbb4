"""`argus plan`: parse, plan, print a rich report (or --json), sweep GPU counts and plot.

The arithmetic is cluster/planner.py's (and cluster/hardware.py's table); this module only turns flags into a
config and a request and prints what comes back."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from launch.console import console
from launch.exit_codes import PLAN_DOES_NOT_FIT
from trainer.config import ConfigError

if TYPE_CHECKING:
    from cluster.planner import PlanRequest
    from trainer.job import JobConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def _num(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:,.2f}{unit}"
    return f"{n:,.0f}"


def load_plan_config(a: argparse.Namespace) -> JobConfig:
    """CONFIG (or configs/PRESET.yaml) + the flags and key=value overrides, not yet validated."""
    from trainer.config import load_config
    from trainer.job import JobConfig

    path, overrides = a.config, list(a.overrides)
    if path is not None and "=" in path and not Path(path).is_file():  # `argus plan --preset large key=value`
        path, overrides = None, [a.config, *overrides]
    if path is None and a.preset and (CONFIG_DIR / f"{a.preset}.yaml").is_file():
        path = str(CONFIG_DIR / f"{a.preset}.yaml")
    if a.preset:
        overrides.append(f"model.preset={a.preset}")
    flag_keys = {
        "zero_stage": "deepspeed.stage",
        "precision": "deepspeed.precision",
        "micro_batch": "data.batch_size",
        "context": "model.max_seq_len",
    }
    for flag, key in flag_keys.items():
        if getattr(a, flag) is not None:
            overrides.append(f"{key}={getattr(a, flag)}")
    if a.context is not None:
        overrides.append("data.max_seq_len=0")  # the whole context
    if a.offload:
        overrides.append("deepspeed.offload=true")
    if a.activation_checkpointing is not None:
        overrides.append(f"model.activation_checkpointing={str(a.activation_checkpointing).lower()}")
    overrides.append("train.global_batch_size=0")  # the world size is the plan's, not the config's
    return load_config(JobConfig, path, overrides, validate=False)


def parse_number(flag: str, value: str, example: str) -> float:
    """A finite number from the command line (``1e9``, ``300000000000``); ConfigError naming ``flag`` otherwise."""
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x):
        raise ConfigError(f"{flag}: expected a number like {example}, got {value!r}")
    return x


def plan_inputs(a: argparse.Namespace) -> tuple[JobConfig, PlanRequest]:
    """The config and the validated request `argus plan` plans for, from its parsed command line."""
    from cluster.hardware import Hardware
    from cluster.planner import PlanRequest

    if a.config is None and a.preset is None:
        raise ConfigError("argus plan: give a CONFIG file or --preset (mini, small, medium, large)")
    cfg = load_plan_config(a)
    hw = Hardware(
        gpu=a.gpu,
        nodes=a.nodes,
        gpus_per_node=a.gpus_per_node,
        intra_node_gbps=a.intra_node_gbps,
        inter_node_gbps=a.inter_node_gbps,
        memory_gb=a.memory_gb,
        price_per_gpu_hour=a.price,
    )
    req = PlanRequest(
        items=int(parse_number("--items", a.items, "1e9")),
        interactions=parse_number("--interactions", a.interactions, "3e11"),
        hardware=hw,
        mfu=a.mfu,
        fill=a.fill,
        headroom_fraction=a.headroom,
    )
    req.validate()
    return cfg, req


def parse_sweep(spec: str) -> tuple[str, list[int]]:
    """``gpus=8,16,32`` (a plan per GPU count), or ``tp=1,2,4`` / ``sp=1,2,4`` (a plan per tensor- or
    sequence-parallel size, same GPUs)."""
    key, _, values = spec.partition("=")
    if key not in ("gpus", "tp", "sp") or not values:
        raise ConfigError(f"--sweep: expected gpus=N,N,..., tp=N,N,... or sp=N,N,..., got {spec!r}")
    what = "GPU counts" if key == "gpus" else f"{key} sizes"
    try:
        out = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--sweep: {what} must be integers, got {values!r}") from None
    if not out or min(out) < 1:
        raise ConfigError(f"--sweep: {what} must be >= 1, got {values!r}")
    return key, sorted(set(out))


def render(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    i, p, m, s, t = result["inputs"], result["params"], result["memory"], result["step"], result["time"]
    context = f"context {i['context']}"
    if i.get("summary_tokens"):
        kib = i["summary_cache_bytes_per_summary"] / 1024
        context = (
            f"windows of {i['window_tokens']} after {i['summary_tokens']} summary tokens read from data.summary_cache "
            f"({kib:,.0f} KiB per sample in bf16)"
            if i["summary_cache"]
            else f"samples of {i['context']} in windows of {i['window_tokens']} + {i['summary_tokens']} summary tokens "
            f"(summary cache: {kib:,.0f} KiB per user in bf16)"
        )
    elif i.get("windows"):
        context = f"samples of {i['context']} in windows of {i['window_tokens']}"
    console.print(
        f"[bold]{i['preset']}[/]: d_model {i['d_model']}, {i['n_layers']} layers, {context}, "
        f"micro-batch {i['micro_batch']}, ZeRO-{i['zero_stage']}{' + offload' if i['offload'] else ''}, "
        f"{i['precision']}, activation checkpointing {'on' if i['activation_checkpointing'] else 'off'}; "
        f"{_num(i['items'])} items, {_num(i['interactions'])} interactions; "
        f"{i['nodes']} x {i['gpus_per_node']} {i['gpu']} ({i['world']} GPUs)"
    )

    params = Table(title="Parameters", title_justify="left")
    params.add_column("part")
    params.add_column("count", justify="right")
    for key in ("encoder", "positions", "side_tables", "interaction", "heads", "dense_total", "embedding"):
        params.add_row(key, f"{p[key]:,}")
    console.print(params)

    mem = Table(title="Memory per rank", title_justify="left")
    mem.add_column("term")
    mem.add_column("bytes", justify="right")
    rows = [
        (
            "item table + gradient + optimizer state (backend torch, every rank)"
            if result["embedding_plan"].get("backend") == "torch"
            else "embedding shards + optimizer state (TorchRec)",
            m["embeddings"],
        ),
        ("dense parameters", m["dense_params"]),
        ("dense gradients", m["dense_grads"]),
        ("dense optimizer states", m["dense_optimizer"]),
        ("activations: saved by the blocks", m["activations_layers"]),
        ("activations: embeddings, heads, logits", m["activations_other"]),
        ("activations: one block's backward", m["activations_working"]),
        ("DeepSpeed communication buckets", m["comm_buffers"]),
        *([("item metadata (model.item_tower)", m["item_data"])] if m.get("item_data") else []),
        ("[bold]total[/]", m["total"]),
        ("headroom (context, NCCL, fragmentation)", m["headroom"]),
        ("GPU memory", m["capacity"]),
    ]
    for name, value in rows:
        mem.add_row(name, _gb(value))
    if m["embeddings_host"]:
        console.print(
            f"[yellow]TorchRec keeps part of the embedding rows in host memory (UVM caching): "
            f"{_gb(m['embeddings_host'])} per rank; lookups that miss the HBM cache cross PCIe.[/]"
        )
    if m["embeddings_host"] or m["dense_host_offload"]:
        mem.add_row("host memory: UVM embedding rows", _gb(m["embeddings_host"]))
        mem.add_row("host memory per node: offloaded dense states", _gb(m["dense_host_offload"]))
    console.print(mem)

    emb = result["embedding_plan"]
    if "tables" in emb:
        title = "Embedding plan (TorchRec planner, offline)"
        if emb.get("backend") == "torch":
            title = "Embedding tables (backend torch: replicated on every rank)"
        tab = Table(title=title, title_justify="left")
        for col in ("table", "sharding", "kernel", "shards", "HBM / shard", "host / shard"):
            tab.add_column(col, justify="right" if col not in ("table", "sharding", "kernel") else "left")
        for row in emb["tables"]:
            tab.add_row(
                row["table"],
                row["sharding_type"],
                row["compute_kernel"],
                str(row["shards"]),
                _gb(row["hbm_per_shard"]),
                _gb(row["host_per_shard"]),
            )
        console.print(tab)
    elif "error" in emb:
        console.print(f"[red]{emb['error']}[/]")

    step = Table(title="Per step and rank", title_justify="left")
    step.add_column("term")
    step.add_column("value", justify="right")
    f = result["flops"]
    step.add_row(
        "FLOPs / interaction (encoder + head)",
        f"{_num(f['per_interaction'])} ({_num(f['encoder_per_interaction'])} + {_num(f['head_per_interaction'])})",
    )
    step.add_row("embedding bytes / interaction (lookups)", f"{f['embedding_bytes_per_interaction']:,.0f}")
    step.add_row("interactions / step (all ranks)", f"{s['interactions']:,.0f}")
    step.add_row(f"compute at MFU {i['mfu']:.0%} ({i['mfu_source']})", f"{s['compute_s']:.3f} s")
    step.add_row("HBM traffic", f"{s['memory_s']:.3f} s ({_gb(s['hbm_bytes'])})")
    step.add_row("ZeRO collectives (overlapped)", f"{s['zero_comm_s']:.3f} s ({_gb(s['zero_comm_bytes'])})")
    if result["embedding_plan"].get("backend") == "torch":
        step.add_row(
            "item table gradient all-reduce (backend torch; in the step)",
            f"{s['embedding_comm_s']:.3f} s ({_gb(s['embedding_comm_bytes'])})",
        )
    else:
        step.add_row(
            "embedding all-to-all (bandwidth)", f"{s['embedding_comm_s']:.3f} s ({_gb(s['embedding_comm_bytes'])})"
        )
        step.add_row("embeddings (TorchRec's cost model; in the step)", f"{s['embedding_s']:.3f} s")
    step.add_row("[bold]step[/]", f"{s['seconds']:.3f} s, {s['bound']}-bound")
    console.print(step)

    verdict = "[green]fits[/]" if m["fits"] else "[red]does NOT fit[/]"
    cost = f", ${t['cost']:,.0f}" if t["cost"] is not None else ""
    console.print(
        f"{verdict}: {_gb(m['total'])} + {_gb(m['headroom'])} headroom of {_gb(m['capacity'])} per GPU. "
        f"[bold]{t['days']:.2f} days[/] ({t['steps']:,} steps), {t['gpu_hours']:,.0f} GPU-hours{cost}. "
        f"Fewest GPUs with every table in HBM: "
        f"{result.get('min_gpus') or 'none (more GPUs do not shrink what is left)'}."
    )
    for sug in result.get("suggestions", []):
        gpus = f" ({sug['gpus']:,} GPUs)" if sug["gpus"] != i["world"] else ""
        console.print(
            f"  would fit with {sug['change']}{gpus}: {_gb(sug['memory_per_rank'])} per rank, {sug['days']:.2f} days",
            highlight=False,
        )
    if not m["fits"] and not result.get("suggestions"):
        console.print(
            "  no single change (activation checkpointing, ZeRO-3, smaller micro-batch, offload, more GPUs) fits"
        )


def render_sweep(rows: list[dict[str, Any]], console: Any) -> None:
    from rich.table import Table

    tab = Table(title="Sweep", title_justify="left")
    for col in (
        "GPUs",
        "nodes",
        "dp x tp x sp",
        "GPU mem / rank",
        "host mem / rank",
        "fits",
        "step",
        "bound",
        "days",
        "GPU-hours",
        "cost",
    ):
        tab.add_column(col, justify="right")
    for r in rows:
        i, m, s, t = r["inputs"], r["memory"], r["step"], r["time"]
        tab.add_row(
            str(i["world"]),
            str(i["nodes"]),
            f"{i['dp']} x {i['tp']} x {i['sp']}",
            _gb(m["total"]),
            _gb(m["embeddings_host"]),
            "yes" if m["fits"] else "[red]no[/]",
            f"{s['seconds']:.3f} s",
            s["bound"],
            f"{t['days']:.2f}",
            f"{t['gpu_hours']:,.0f}",
            f"${t['cost']:,.0f}" if t["cost"] is not None else "-",
        )
    console.print(tab)


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    gpus = [r["inputs"]["world"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    days = [r["time"]["days"] for r in rows]
    ax1.plot(gpus, days, marker="o")
    for g, d in zip(gpus, days):
        ax1.annotate(f"{d:.2f} d", (g, d), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax1.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="days to train", title="Time to train")
    ax2.plot(gpus, [r["memory"]["total"] / 1e9 for r in rows], marker="o", label="GPU memory per rank")
    if any(r["memory"]["embeddings_host"] for r in rows):
        ax2.plot(
            gpus,
            [r["memory"]["embeddings_host"] / 1e9 for r in rows],
            marker="s",
            linestyle=":",
            label="host memory per rank (UVM rows)",
        )
    ax2.axhline(
        (rows[0]["memory"]["capacity"] - rows[0]["memory"]["headroom"]) / 1e9,
        color="red",
        linestyle="--",
        label="usable per GPU",
    )
    ax2.set(xscale="log", xlabel="GPUs", ylabel="GB", title="Memory per rank")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(gpus, [str(g) for g in gpus])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    ax1.yaxis.set_major_formatter(ScalarFormatter())
    ax1.yaxis.set_minor_formatter(NullFormatter())
    i = rows[0]["inputs"]
    fig.suptitle(f"{i['preset']}, {_num(i['items'])} items, {_num(i['interactions'])} interactions on {i['gpu']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_plan(a: argparse.Namespace) -> int:
    """Print the plan (or --json); exit PLAN_DOES_NOT_FIT (launch/exit_codes.py) when it does not fit."""
    import warnings

    from trainer.logger import quiet_library_logs

    quiet_library_logs()  # before the planner imports TorchRec
    warnings.filterwarnings("ignore")  # TorchRec's planner warns about dry runs: this is one
    from cluster.planner import full_plan, sweep, sweep_parallel

    cfg, req = plan_inputs(a)
    hw = req.hardware
    key, values = parse_sweep(a.sweep) if a.sweep else ("gpus", None)
    gpus = values if key == "gpus" else None
    if gpus is None and a.plot and key == "gpus":
        gpus = sorted(
            {
                g
                for g in (hw.world // 4, hw.world // 2, hw.world, hw.world * 2, hw.world * 4)
                if g >= 1 and (g < hw.gpus_per_node or g % hw.gpus_per_node == 0)
            }
        )
    result = full_plan(cfg, req)
    rows = sweep(cfg, req, gpus) if gpus else sweep_parallel(cfg, req, key, values) if values else []
    if a.plot and rows:
        plot_sweep(rows, Path(a.plot))
    if a.json:
        out = dict(result)
        if rows:
            out["sweep"] = [
                {
                    "gpus": r["inputs"]["world"],
                    "nodes": r["inputs"]["nodes"],
                    "tp": r["inputs"]["tp"],
                    "sp": r["inputs"]["sp"],
                    "memory": r["memory"],
                    "step": r["step"],
                    "time": r["time"],
                }
                for r in rows
            ]
        print(json.dumps(out, indent=1, default=float))
    else:
        render(result, console)
        if rows:
            render_sweep(rows, console)
        if a.plot and rows:
            console.print(f"plot: {a.plot}")
    return 0 if result["memory"]["fits"] else PLAN_DOES_NOT_FIT


def add_plan(sub: Any) -> None:
    from trainer.flops import GPU_SPECS

    p = sub.add_parser(
        "plan",
        help="capacity plan: GPUs, memory per rank and days to train, offline",
        epilog=f"exit code {PLAN_DOES_NOT_FIT} when the plan does not fit GPU memory (after printing it)",
    )
    p.add_argument("config", nargs="?", help="the run's YAML (what `argus train` reads); or use --preset")
    p.add_argument("overrides", nargs="*", help="key=value, as for `argus train`")
    p.add_argument("--preset", choices=["mini", "small", "medium", "large"], help="configs/PRESET.yaml")
    p.add_argument("--items", default="1e9", help="catalog size (item table rows), e.g. 1e9")
    p.add_argument("--interactions", default="3e11", help="interactions to train, e.g. 3e11")
    p.add_argument("--gpu", default="h100", choices=sorted(GPU_SPECS))
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    p.add_argument("--offload", action="store_true", help="ZeRO-3 optimizer + parameter offload to CPU")
    p.add_argument("--precision", choices=["bf16", "fp32"])
    p.add_argument("--micro-batch", type=int, help="samples per GPU per step (data.batch_size)")
    p.add_argument("--context", type=int, help="tokens of context (model.max_seq_len)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--mfu", type=float, default=0.0, help="assumed MFU (default: ours measured, else 0.40)")
    p.add_argument("--fill", type=float, default=1.0, help="average fraction of the context a sample fills")
    p.add_argument("--price", type=float, default=0.0, help="price per GPU-hour")
    p.add_argument("--intra-node-gbps", type=float, default=0.0, help="GB/s per GPU within a node (default by GPU)")
    p.add_argument("--inter-node-gbps", type=float, default=0.0, help="GB/s per GPU between nodes (default by GPU)")
    p.add_argument("--memory-gb", type=float, default=0.0, help="usable GPU memory (default: the datasheet's)")
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of GPU memory kept free (min 2 GiB)")
    p.add_argument(
        "--sweep",
        help="gpus=8,16,32,...: a plan per GPU count; tp=1,2,4 or sp=1,2,4: a plan per tensor- or sequence-parallel "
        "size on the same GPUs",
    )
    p.add_argument("--plot", help="PNG: days and memory per rank vs GPU count")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)
