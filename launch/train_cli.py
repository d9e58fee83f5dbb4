"""`argus train`, `argus finetune`, `argus eval`: parsers and commands (wired into launch/cli.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from launch.console import console, print_json


# ---- argus train / finetune ----------------------------------------------------------------------------------
def cmd_train(a: argparse.Namespace) -> int:
    from trainer.logger import quiet_library_logs

    quiet_library_logs()  # before anything imports TorchRec or DeepSpeed: they warn at import
    from trainer.run import load_job, train

    cfg = load_job(a.config, a.overrides)
    last = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        from trainer.checkpoint import best_checkpoint, latest_checkpoint

        shown = ", ".join(
            f"{k}={v:.4g}"
            for k, v in last.items()
            if k.startswith(("loss/", "ne/", "eval/")) or k in ("interactions_per_s", "tps")
        )
        latest = latest_checkpoint(cfg.out)
        console.print(f"done: {cfg.out} {latest.name if latest else ''}; {shown}")
        best = best_checkpoint(cfg.out)
        if best is not None:
            console.print(f"selected by validation ({cfg.eval.select}): {best.name}; eval and export use it")
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    a.overrides = [*a.overrides, f"finetune.init={a.init}"]
    return cmd_train(a)


def is_finetune_run(run: str) -> bool:
    import yaml

    cfg = Path(run) / "config.yaml"
    return cfg.is_file() and bool((yaml.safe_load(cfg.read_text()) or {}).get("finetune", {}).get("init"))


def cmd_eval_finetune(a: argparse.Namespace) -> int:
    from trainer.finetune import evaluate_finetune

    if a.delay:
        raise ValueError("--delay: a fine-tuning run is evaluated on impressions, scored at their request time")
    if a.items != "all":
        raise ValueError("--items: a fine-tuning run is evaluated on its impressions' shown items")
    with contextlib.redirect_stdout(sys.stderr):  # library banners (DeepSpeed's) must not corrupt --json
        rep = evaluate_finetune(a.run, a.data, split=a.split)
    if int(os.environ.get("RANK", "0") or 0) != 0:  # under torchrun or a launcher: every rank has it, rank 0 prints
        return 0
    print_finetune_eval(rep, a.run, a.json)
    return 0


def print_finetune_eval(rep: dict[str, Any], run: str, as_json: bool) -> None:
    """What `argus eval` (and `argus launch ray-eval`) print of a fine-tuning run's report."""
    if as_json:
        print_json(rep)
        return
    t = Table(
        "scorer",
        "pairwise accuracy",
        "NDCG within impressions",
        title=f"{run} on {rep['split']}: {rep['impressions']:,} impressions, {rep['pairs']:,} pairs, "
        f"lag {rep['lag_seconds']} s ({rep['impressions_no_history']} without history: skipped)",
    )
    for name in ("model", "pretrained", "data", "popularity"):
        if name in rep:
            t.add_row(name, f"{rep[name]['pairwise_acc']:.4f}", f"{rep[name]['ndcg']:.4f}")
    console.print(t)
    console.print(", ".join(f"{k} {v:+.4f}" for k, v in rep["model"].items() if k.startswith("pau_")))
    c = rep["cost"]
    peak = ", ".join(f"{g:.2f}" for g in c["peak_memory_gib"])
    console.print(
        f"scored in {c['seconds']:.1f} s on {c['ranks']} rank(s): {c['impressions_per_s']:,.0f} impressions/s; "
        f"peak memory per rank {peak} GiB"
    )


def cmd_eval(a: argparse.Namespace) -> int:
    from trainer.logger import quiet_library_logs

    quiet_library_logs()  # before anything imports TorchRec or DeepSpeed: they warn at import
    from trainer.evaluate import evaluate

    if is_finetune_run(a.run):
        if a.summary_cache:
            raise ValueError("--summary-cache: a fine-tuning run is scored with its own data.summary_cache, if any")
        return cmd_eval_finetune(a)
    ks = [int(k) for k in a.ks.split(",")] if a.ks else None
    with contextlib.redirect_stdout(sys.stderr):  # library banners (DeepSpeed's) must not corrupt --json
        rep = evaluate(a.run, a.data, split=a.split, ks=ks, max_users=a.max_users, delay_s=a.delay, items=a.items,
                       summary_cache=a.summary_cache)  # fmt: skip
    if int(os.environ.get("RANK", "0") or 0) != 0:  # under torchrun or a launcher: every rank has it, rank 0 prints
        return 0
    print_eval(rep, a.run, a.json)
    return 0


def print_eval(rep: dict[str, Any], run: str, as_json: bool) -> None:
    """What `argus eval` (and `argus launch ray-eval`) print of a report: JSON, or a table and a cost line."""
    if as_json:
        print_json(rep)
        return
    t = Table(
        "metric",
        "model",
        "popularity",
        "lift",
        title=f"{rep['checkpoint']} on {rep['split']} ({rep['users']:,} users, {rep['ranking']} ranking)",
    )
    for k, v in rep["model"].items():
        if "@" in k:
            lift = rep["lift"].get(k)
            t.add_row(k, f"{v:.4f}", f"{rep['popularity'][k]:.4f}", f"{lift:.2f}x" if lift else "-")
    console.print(t)
    if "cold_share" in rep:
        console.print(f"cold-start items only: {rep['cold_share']:.2%} of the split's targets")
    if "delay_s" in rep:
        console.print(f"states taken {rep['delay_s']:g} s before the split's cut")
    if "summary_cache" in rep:
        c = rep["summary_cache"]
        console.print(f"summary cache {c['path']}: {c['stale_users']:,} users' summaries leave out "
                      f"{c['interactions_left_out']:,} older interactions")  # fmt: skip
    for k in ("ne/event", "ne/played"):
        if k in rep:
            console.print(f"{k} = {rep[k]:.4f}")
    for note in rep.get("notes", []):
        console.print(f"note: {note}")
    c = rep["cost"]
    peak = ", ".join(f"{g:.2f}" for g in c["peak_memory_gib"])
    console.print(
        f"ranked in {c['seconds']:.1f} s on {c['ranks']} rank(s): {c['users_per_s']:,.0f} users/s; "
        f"peak memory per rank {peak} GiB"
    )
    metrics = Path(run) / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        records = [json.loads(x) for x in metrics.read_text().splitlines()]
        last = next((r for r in reversed(records) if "loss/total" in r), records[-1])  # not a validation record
        console.print(
            f"training: step {last['step']}, loss/total {last.get('loss/total', float('nan')):.3f}, "
            f"{last.get('interactions_per_s', 0):,.0f} interactions/s over all ranks (last window)"
        )


# ---- parser --------------------------------------------------------------------------------------------------
def add_train(sub: Any) -> None:
    """Add `train`, `finetune` and `eval` to the sub-parsers of `argus`."""
    tr = sub.add_parser("train", help="pre-train (next-item + feedback) on shards; plain, torchrun or deepspeed")
    tr.add_argument("config", help="YAML run config, e.g. configs/mini.yaml")
    tr.add_argument("overrides", nargs="*", help="key=value overrides: data.path=DIR out=RUN train.steps=N resume=true")
    tr.set_defaults(func=cmd_train)

    ft = sub.add_parser("finetune", help="fine-tune a pre-trained run as a two-tower ranker on impressions")
    ft.add_argument("config", help="YAML run config (the pre-training one, or one with the same model)")
    ft.add_argument("--init", required=True, help="the pre-training run directory (or one of its checkpoints)")
    ft.add_argument("overrides", nargs="*", help="key=value overrides, as for train (finetune.lag_seconds=86400 ...)")
    ft.set_defaults(func=cmd_finetune)

    ev = sub.add_parser(
        "eval",
        help="HR/NDCG/Recall@K of a run's latest checkpoint vs the popularity baseline "
        "(fine-tuning runs: pairwise accuracy, PAU, NDCG within impressions)",
    )
    add_eval_args(ev)
    ev.set_defaults(func=cmd_eval)


def duration(text: str) -> float:
    """``--delay``'s value: seconds, or a number with s, m, h or d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    scale = units.get(t[-1:], 0) if t else 0
    try:
        value = float(t[:-1] if scale else t) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 24h, 2d, 90m or 3600 (seconds), got {text!r}"
        ) from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite duration >= 0, got {text!r}")
    return value


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The options of `argus eval` (shared with `argus launch ray-eval`)."""
    p.add_argument("run", help="run directory (or one checkpoint directory)")
    p.add_argument("--data", required=True, help="dataset directory (its eval split and train item counts)")
    p.add_argument("--split", default=None, help="default: the run config's eval.split (test)")
    p.add_argument("--ks", default="", help="comma-separated cutoffs, default: eval.ks")
    p.add_argument("--max-users", type=int, default=None, help="score exactly N users: the lowest user ids")
    p.add_argument(
        "--delay",
        type=duration,
        default=0.0,
        help="rank from each user's state this long before the split's cut (a stale served cache): 24h, 2d, 3600s; "
        "needs a temporal holdout",
    )
    p.add_argument(
        "--items",
        choices=["all", "cold"],
        default="all",
        help="cold: only targets whose item has no interaction in the train split (cold-start items)",
    )
    p.add_argument(
        "--summary-cache",
        default=None,
        metavar="CACHE",
        help="model.summary runs: read each user's summary tokens from this argus summarize cache of the split",
    )
    p.add_argument("--json", action="store_true")
