"""`argus`: the one console command. Thin: parse, validate, hand over to library code."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.table import Table

console = Console(stderr=False)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")


# ---- argus data synth ----------------------------------------------------------------------------------------
def cmd_data_synth(a: argparse.Namespace) -> int:
    from trainer.data.synth import synthesize

    t0 = time.perf_counter()
    m = synthesize(a.out, users=a.users, items=a.items, mean_len=a.mean_len, shards=a.shards, seed=a.seed,
                   holdout=a.holdout, max_len=a.max_len, workers=a.workers, days=a.days, val_days=a.val_days,
                   test_days=a.test_days, gap_seconds=a.gap_seconds, impressions=a.impressions, slate=a.slate,
                   imp_days=a.imp_days, imp_test_days=a.imp_test_days)
    dt = time.perf_counter() - t0
    n = sum(s.interactions for s in m.splits.values())
    console.print(f"wrote {a.out}: {', '.join(f'{k} {v.samples} samples' for k, v in m.splits.items())}; "
                  f"{n:,} interactions in {dt:.1f}s ({n / max(dt, 1e-9):,.0f}/s)")
    return 0


# ---- argus data convert --------------------------------------------------------------------------------------
def cmd_data_convert(a: argparse.Namespace) -> int:
    from trainer.data.convert import ColumnMap, convert

    cols = ColumnMap(user=a.user_col, item=a.item_col, timestamp=a.timestamp_col,
                     rating=None if a.rating_col in ("", "none") else a.rating_col)
    m = convert(a.input, a.out, fmt=a.format, columns=cols, holdout=a.holdout, val_seconds=a.val_seconds,
                test_seconds=a.test_seconds, gap_seconds=a.gap_seconds, shards=a.shards, max_len=a.max_len,
                like_threshold=a.like_threshold, dislike_threshold=a.dislike_threshold,
                timestamp_unit=a.timestamp_unit, on_error=a.on_error, workers=a.workers,
                impressions=a.impressions, impressions_test_seconds=a.impressions_test_seconds)
    skipped = m.source.get("skipped_rows", {})
    console.print(f"wrote {a.out}: {m.num_items:,} items; "
                  + ", ".join(f"{k} {v.samples} samples / {v.interactions:,} interactions" for k, v in m.splits.items())
                  + (f"; skipped rows: {skipped}" if skipped else ""))
    return 0


# ---- argus data inspect / verify -----------------------------------------------------------------------------
def cmd_data_inspect(a: argparse.Namespace) -> int:
    from trainer.data.inspect import inspect

    rep = inspect(a.dir, max_shards=a.max_shards, workers=a.workers)
    if a.json:
        _print_json(rep)
        return 0
    console.print(f"[bold]{rep['root']}[/]  source={rep['source']}  items={rep['num_items']:,}  "
                  f"max_len={rep['max_len']}")
    t = Table("split", "shards", "users", "samples", "interactions", "targets", "items seen", title="counts")
    h = Table("split", "p50", "p90", "p99", "max", "mean", "shard interactions min..max (cv)",
              title="interactions per user, and shard balance")
    for name, s in rep["splits"].items():
        hl, b = s["history_length"], s["shard_balance"]
        t.add_row(name, str(s["shards"]), f"{s['users']:,}", f"{s['samples']:,}", f"{s['interactions']:,}",
                  f"{s['targets']:,}", f"{s['items_seen']:,}")
        h.add_row(name, *(f"{hl[k]:.0f}" for k in ("p50", "p90", "p99", "p100")), f"{hl.get('mean', 0):.1f}",
                  f"{b['interactions_min']:,}..{b['interactions_max']:,} ({b['interactions_cv']:.2f})")
    console.print(t)
    console.print(h)
    ev = Table("split", *[k for k in next(iter(rep["splits"].values()))["events"]], title="event mix")
    for name, s in rep["splits"].items():
        ev.add_row(name, *[f"{v:.1%}" for v in s["events"].values()])
    console.print(ev)
    for name, s in rep["splits"].items():
        if s["stats"]:
            console.print(f"{name}: {s['stats']}")
        if s["shards_read"] < s["shards"]:
            console.print(f"{name}: distributions from {s['shards_read']} of {s['shards']} shards (--max-shards)")
    return 0


def cmd_data_verify(a: argparse.Namespace) -> int:
    from trainer.data.inspect import verify

    rep = verify(a.dir, workers=a.workers)
    if a.json:
        _print_json(rep)
    elif rep["ok"]:
        console.print(f"OK {rep['root']}: {rep['shards']} shards, {rep['samples']:,} samples, "
                      f"{rep['interactions']:,} interactions match the manifest")
    else:
        for e in rep["errors"]:
            print(f"BAD {e}", file=sys.stderr)
        print(f"argus data verify: {len(rep['errors'])} problem(s) in {rep['root']}", file=sys.stderr)
    return 0 if rep["ok"] else 1


# ---- argus data stream ---------------------------------------------------------------------------------------
def cmd_data_stream(a: argparse.Namespace) -> int:
    """Dry-run the exactly-once layout: every rank's loader, one after another, in this process."""
    from trainer.data.loader import ShardLoader

    cfg = ShardLoader.Config(path=a.dir, split=a.split, batch_size=a.batch_size, num_workers=a.num_workers,
                             max_seq_len=a.max_seq_len, seed=a.seed, batch_format=a.batch_format)
    cfg.validate()
    seen: dict[str, int] = {}
    ranks = []
    t0 = time.perf_counter()
    for rank in range(a.world_size):
        loader = cfg.build(rank, a.world_size)
        batches = 0
        for batch in loader:
            batches += 1
            for k in batch.keys:
                seen[k] = seen.get(k, 0) + 1
        ranks.append({"rank": rank, "batches": batches, **loader.stats})
    dt = time.perf_counter() - t0
    total = loader.table.num_samples
    dup = sum(1 for v in seen.values() if v > 1)
    inter = sum(r["interactions"] for r in ranks)
    rep = {"samples_expected": total, "samples_seen": len(seen), "duplicates": dup,
           "exactly_once": len(seen) == total and dup == 0, "ranks": ranks, "seconds": dt,
           "interactions_per_s": inter / max(dt, 1e-9)}
    if a.json:
        _print_json(rep)
    else:
        t = Table("rank", "batches", "samples", "interactions", "skipped", "truncated",
                  title=f"{a.split}: world_size={a.world_size} x num_workers={a.num_workers}, batch_size={a.batch_size}")
        for r in ranks:
            t.add_row(*(str(r[k]) for k in ("rank", "batches", "samples", "interactions", "skipped", "truncated")))
        console.print(t)
        console.print(f"{len(seen):,} of {total:,} samples, {dup} duplicates -> "
                      f"{'exactly once' if rep['exactly_once'] else '[red]NOT exactly once[/]'}; "
                      f"{rep['interactions_per_s']:,.0f} interactions/s in this process")
    return 0 if rep["exactly_once"] else 1


# ---- argus train -------------------------------------------------------------------------------------------
def load_job(config: str | None, overrides: Sequence[str], world_size: int | None = None) -> Any:
    """The run config from YAML + key=value overrides, validated for ``world_size`` (default: $WORLD_SIZE)."""
    from trainer.config import load_config
    from trainer.job import JobConfig

    cfg = load_config(JobConfig, config, overrides)
    cfg.validate(world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", 1)))
    if cfg.finetune.enabled:  # the pre-trained model and the impression split, checked before any process group
        from trainer.data.manifest import Manifest
        from trainer.finetune import check_against_init

        check_against_init(cfg)
        Manifest.load(cfg.data.path).split(cfg.data.split)
    return cfg


def cmd_train(a: argparse.Namespace) -> int:
    from trainer.logger import quiet_library_logs
    from trainer.train import train

    quiet_library_logs()
    cfg = load_job(a.config, a.overrides)
    last = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        console.print(f"done: {cfg.out} step {cfg.train.steps}; " +
                      ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k.startswith(("loss/", "ne/")) or
                                k in ("interactions_per_s", "tps")))
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    a.overrides = [*a.overrides, f"finetune.init={a.init}"]
    return cmd_train(a)


def _is_finetune_run(run: str) -> bool:
    import yaml

    cfg = Path(run) / "config.yaml"
    return cfg.is_file() and bool((yaml.safe_load(cfg.read_text()) or {}).get("finetune", {}).get("init"))


def cmd_eval_finetune(a: argparse.Namespace) -> int:
    from trainer.finetune import evaluate_finetune

    with contextlib.redirect_stdout(sys.stderr):
        rep = evaluate_finetune(a.run, a.data, split=a.split)
    if a.json:
        _print_json(rep)
        return 0
    t = Table("scorer", "pairwise accuracy", "NDCG within impressions",
              title=f"{a.run} on {rep['split']}: {rep['impressions']:,} impressions, {rep['pairs']:,} pairs, "
                    f"lag {rep['lag_seconds']} s ({rep['impressions_no_history']} without history: skipped)")
    for name in ("model", "pretrained", "data", "popularity"):
        if name in rep:
            t.add_row(name, f"{rep[name]['pairwise_acc']:.4f}", f"{rep[name]['ndcg']:.4f}")
    console.print(t)
    console.print(", ".join(f"{k} {v:+.4f}" for k, v in rep["model"].items() if k.startswith("pau_")))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate
    from trainer.logger import quiet_library_logs

    quiet_library_logs()
    if _is_finetune_run(a.run):
        return cmd_eval_finetune(a)
    ks = [int(k) for k in a.ks.split(",")] if a.ks else None
    with contextlib.redirect_stdout(sys.stderr):  # library banners (DeepSpeed's) must not corrupt --json
        rep = evaluate(a.run, a.data, split=a.split, ks=ks, max_users=a.max_users)
    if a.json:
        _print_json(rep)
        return 0
    t = Table("metric", "model", "popularity", "lift",
              title=f"{rep['checkpoint']} on {rep['split']} ({rep['users']:,} users, {rep['ranking']} ranking)")
    for k, v in rep["model"].items():
        if "@" in k:
            lift = rep["lift"].get(k)
            t.add_row(k, f"{v:.4f}", f"{rep['popularity'][k]:.4f}", f"{lift:.2f}x" if lift else "-")
    console.print(t)
    for k in ("ne/event", "ne/played"):
        if k in rep:
            console.print(f"{k} = {rep[k]:.4f}")
    metrics = Path(a.run) / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        last = json.loads(metrics.read_text().splitlines()[-1])
        console.print(f"training: step {last['step']}, loss/total {last.get('loss/total', float('nan')):.3f}, "
                      f"{last.get('interactions_per_s', 0):,.0f} interactions/s over all ranks (last window)")
    return 0


# ---- parser --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="argus", description="Train billion-parameter transformer recommenders "
                                "(ARGUS recipe): data, training, launch, capacity planning.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="make, convert, inspect, verify and stream WebDataset shards")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    s = dsub.add_parser("synth", help="generate a synthetic dataset with planted structure")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--users", type=int, required=True)
    s.add_argument("--items", type=int, required=True)
    s.add_argument("--mean-len", type=float, default=200.0, help="mean interactions per user")
    s.add_argument("--shards", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--holdout", choices=["none", "loo", "temporal"], default="loo")
    s.add_argument("--max-len", type=int, default=8192, help="longest sample; longer histories are chunked")
    s.add_argument("--workers", type=int, default=0, help="processes (0 = one per core)")
    s.add_argument("--days", type=int, default=120, help="length of the simulated time window")
    s.add_argument("--val-days", type=float, default=7.0)
    s.add_argument("--test-days", type=float, default=7.0)
    s.add_argument("--gap-seconds", type=int, default=0)
    s.add_argument("--impressions", type=int, default=0,
                   help="impressions per active user in the last --imp-days: writes the fine-tuning splits")
    s.add_argument("--slate", type=int, default=10, help="items shown per impression")
    s.add_argument("--imp-days", type=float, default=7.0)
    s.add_argument("--imp-test-days", type=float, default=1.0, help="the last days of impressions: impressions_test")
    s.set_defaults(func=cmd_data_synth)

    c = dsub.add_parser("convert", help="convert Yambda-style parquet or CSV/TSV logs into shards")
    c.add_argument("input", help="a file or a directory of .parquet / .csv / .tsv files")
    c.add_argument("--out", required=True)
    c.add_argument("--format", choices=["auto", "yambda", "csv", "tsv"], default="auto")
    c.add_argument("--user-col", default="user")
    c.add_argument("--item-col", default="item")
    c.add_argument("--timestamp-col", default="timestamp")
    c.add_argument("--rating-col", default="rating", help="'none' if the logs have no rating")
    c.add_argument("--timestamp-unit", choices=["s", "ms", "us", "ns"], default="s")
    c.add_argument("--like-threshold", type=float, default=4.0, help="rating >= this -> like")
    c.add_argument("--dislike-threshold", type=float, default=2.0, help="rating <= this -> dislike")
    c.add_argument("--holdout", choices=["none", "loo", "temporal"], default="loo")
    c.add_argument("--val-seconds", type=int, default=86400)
    c.add_argument("--test-seconds", type=int, default=86400)
    c.add_argument("--gap-seconds", type=int, default=0)
    c.add_argument("--shards", type=int, default=8)
    c.add_argument("--max-len", type=int, default=8192)
    c.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="bad rows: stop with the file/row/column, or skip and count them in the manifest")
    c.add_argument("--workers", type=int, default=1, help="processes writing shards")
    c.add_argument("--impressions", default=None,
                   help="impression log (parquet/CSV/TSV: uid, item_id, timestamp, event_type [, played_ratio_pct, "
                        "score, impression_id]): adds the fine-tuning splits")
    c.add_argument("--impressions-test-seconds", type=int, default=86400,
                   help="impressions in the last N seconds form impressions_test")
    c.set_defaults(func=cmd_data_convert)

    i = dsub.add_parser("inspect", help="users, interactions, items, length percentiles, event mix, shard balance")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.add_argument("--max-shards", type=int, default=0, help="read at most this many shards per split (0 = all)")
    i.add_argument("--workers", type=int, default=1)
    i.set_defaults(func=cmd_data_inspect)

    v = dsub.add_parser("verify", help="read every sample; check counts and hashes against the manifest")
    v.add_argument("dir")
    v.add_argument("--json", action="store_true")
    v.add_argument("--workers", type=int, default=1)
    v.set_defaults(func=cmd_data_verify)

    st = dsub.add_parser("stream", help="dry-run the exactly-once loader for a world size; report per-rank counts")
    st.add_argument("dir")
    st.add_argument("--split", default="train")
    st.add_argument("--world-size", type=int, default=2)
    st.add_argument("--num-workers", type=int, default=2)
    st.add_argument("--batch-size", type=int, default=64)
    st.add_argument("--max-seq-len", type=int, default=0)
    st.add_argument("--batch-format", choices=["jagged", "padded"], default="jagged")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_data_stream)

    tr = sub.add_parser("train", help="pre-train (next-item + feedback) on shards; plain, torchrun or deepspeed")
    tr.add_argument("config", help="YAML run config, e.g. configs/mini.yaml")
    tr.add_argument("overrides", nargs="*", help="key=value overrides: data.path=DIR out=RUN train.steps=N resume=true")
    tr.set_defaults(func=cmd_train)

    ft = sub.add_parser("finetune", help="fine-tune a pre-trained run as a two-tower ranker on impressions")
    ft.add_argument("config", help="YAML run config (the pre-training one, or one with the same model)")
    ft.add_argument("--init", required=True, help="the pre-training run directory (or one of its checkpoints)")
    ft.add_argument("overrides", nargs="*", help="key=value overrides, as for train (finetune.lag_seconds=86400 ...)")
    ft.set_defaults(func=cmd_finetune, overrides_anywhere=True)

    ev = sub.add_parser("eval", help="HR/NDCG/Recall@K of a run's latest checkpoint vs the popularity baseline "
                                     "(fine-tuning runs: pairwise accuracy, PAU, NDCG within impressions)")
    ev.add_argument("run", help="run directory (or one checkpoint directory)")
    ev.add_argument("--data", required=True, help="dataset directory (its eval split and train item counts)")
    ev.add_argument("--split", default=None, help="default: the run config's eval.split (test)")
    ev.add_argument("--ks", default="", help="comma-separated cutoffs, default: eval.ks")
    ev.add_argument("--max-users", type=int, default=None)
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    from launch.ray_launch import add_launch_ray

    la = sub.add_parser("launch", help="launch training on a cluster: ray, deepspeed")
    lsub = la.add_subparsers(dest="launch_command", metavar="LAUNCHER", required=True)
    add_launch_ray(lsub)
    from launch.deepspeed_launch import add_cluster_hostfile, add_launch_deepspeed

    add_launch_deepspeed(lsub)

    from cluster.preflight import add_cluster_check

    cl = sub.add_parser("cluster", help="cluster tools: preflight check, hostfiles")
    csub = cl.add_subparsers(dest="cluster_command", metavar="TOOL", required=True)
    add_cluster_check(csub)
    add_cluster_hostfile(csub)

    from cluster.plan_cli import add_plan

    add_plan(sub)

    from launch.export_cli import add_export, add_retrieve

    add_export(sub)
    add_retrieve(sub)
    return p


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the environment too)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(_strip_launcher_args(list(sys.argv[1:] if argv is None else argv)))
    if extra:  # `argus finetune CONFIG --init RUN key=value ...`: overrides after an option
        if not getattr(args, "overrides_anywhere", False) or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, OSError, RuntimeError) as e:
        # One clear line; the library's messages name the file, key or setting at fault.
        print(f"argus: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
