"""`argus data synth|convert|inspect|verify|stream`: parsers and commands (wired into launch/cli.py)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rich.table import Table

from launch.console import console, print_json
from trainer.data.storage import redact


# ---- argus data synth ----------------------------------------------------------------------------------------
def cmd_data_synth(a: argparse.Namespace) -> int:
    from trainer.data.outdir import dataset_output
    from trainer.data.synth import synthesize

    t0 = time.perf_counter()
    with dataset_output(a.out, a.overwrite) as out:
        m = _synth(synthesize, out, a)
    dt = time.perf_counter() - t0
    n = sum(s.interactions for s in m.splits.values())
    console.print(
        f"wrote {redact(a.out)}: {', '.join(f'{k} {v.samples} samples' for k, v in m.splits.items())}; "
        f"{n:,} interactions in {dt:.1f}s ({n / max(dt, 1e-9):,.0f}/s)"
    )
    return 0


def _synth(synthesize: Any, out: str, a: argparse.Namespace) -> Any:
    return synthesize(
        out,
        users=a.users,
        items=a.items,
        mean_len=a.mean_len,
        shards=a.shards,
        seed=a.seed,
        clusters=a.clusters,
        holdout=a.holdout,
        max_len=a.max_len,
        workers=a.workers,
        days=a.days,
        val_days=a.val_days,
        test_days=a.test_days,
        gap_seconds=a.gap_seconds,
        impressions=a.impressions,
        slate=a.slate,
        imp_days=a.imp_days,
        imp_test_days=a.imp_test_days,
        item_features=a.item_features,
        new_items=a.new_items,
        favourites=a.favourites,
        **({} if a.favourite_items is None else {"favourite_items": a.favourite_items}),  # None: synth's default
        favourite_skew=a.favourite_skew,
        favourite_clusters=a.favourite_clusters,
        overwrite=a.overwrite,
    )


# ---- argus data convert --------------------------------------------------------------------------------------
# convert()'s parameters as this command's flags: its messages name what to pass here (trainer.data.convert.Hints)
CONVERT_FLAGS = {
    "fmt": "--format",
    "shards": "--shards",
    "max_len": "--max-len",
    "workers": "--workers",
    "val_seconds": "--val-seconds",
    "test_seconds": "--test-seconds",
    "gap_seconds": "--gap-seconds",
    "impressions_test_seconds": "--impressions-test-seconds",
    "like_threshold": "--like-threshold",
    "dislike_threshold": "--dislike-threshold",
    "item_features": "--item-features",
}


def cmd_data_convert(a: argparse.Namespace) -> int:
    from trainer.data.convert import ColumnMap, Hints, convert

    cols = ColumnMap(
        user=a.user_col,
        item=a.item_col,
        timestamp=a.timestamp_col,
        rating=None if a.rating_col in ("", "none") else a.rating_col,
    )
    from trainer.data.outdir import dataset_output

    with dataset_output(a.out, a.overwrite) as out:
        m = _convert(convert, out, cols, Hints, a)
    skipped = m.source.get("skipped_rows", {})
    feats = m.item_features
    console.print(
        f"wrote {redact(a.out)}: {m.num_items:,} items; "
        + ", ".join(f"{k} {v.samples} samples / {v.interactions:,} interactions" for k, v in m.splits.items())
        + (f"; skipped rows: {skipped}" if skipped else "")
        + (
            f"; item features: {feats['rows']:,} items (dim {feats['dim']}), {feats['missing']:,} without (zero "
            f"rows), {feats['unknown_items']:,} unknown ids dropped"
            if feats
            else ""
        )
    )
    return 0


def _convert(convert: Any, out: str, cols: Any, Hints: Any, a: argparse.Namespace) -> Any:  # noqa: N803
    return convert(
        a.input,
        out,
        fmt=a.format,
        columns=cols,
        holdout=a.holdout,
        val_seconds=a.val_seconds,
        test_seconds=a.test_seconds,
        gap_seconds=a.gap_seconds,
        shards=a.shards,
        max_len=a.max_len,
        like_threshold=a.like_threshold,
        dislike_threshold=a.dislike_threshold,
        timestamp_unit=a.timestamp_unit,
        on_error=a.on_error,
        workers=a.workers,
        impressions=a.impressions,
        impressions_test_seconds=a.impressions_test_seconds,
        item_features=a.item_features,
        overwrite=a.overwrite,
        hints=Hints(
            skip="--on-error skip",
            column="--{role}-col NAME",
            no_rating="--rating-col none",
            columns="--user-col/--item-col/--timestamp-col",
            names=CONVERT_FLAGS,
        ),
    )


# ---- argus data inspect / verify -----------------------------------------------------------------------------
def cmd_data_inspect(a: argparse.Namespace) -> int:
    from trainer.data.inspect import inspect
    from trainer.recommend import recommend

    rep = inspect(a.dir, max_shards=a.max_shards, workers=a.workers)
    train = rep["splits"].get("train")
    if train is not None:
        r = recommend(int(train["interactions"]))
        rep["recommended"] = {"preset": r.preset, "config": r.config, "note": r.note, "command": r.command(a.dir)}
    if a.json:
        print_json(rep)
        return 0
    console.print(
        f"[bold]{rep['root']}[/]  source={rep['source']}  items={rep['num_items']:,}  max_len={rep['max_len']}"
    )
    feats = rep.get("item_features")
    if feats:  # what model.item_features must be set to for a semantic item tower
        console.print(
            f"item features: dim {feats['dim']} ({feats['path']}; {feats['rows']:,} items with a vector, "
            f"{feats['missing']:,} without)"
        )
    t = Table("split", "shards", "users", "samples", "interactions", "targets", "items seen", title="counts")
    h = Table(
        "split",
        "p50",
        "p90",
        "p99",
        "max",
        "mean",
        "shard interactions min..max (cv)",
        title="interactions per user, and shard balance",
    )
    for name, s in rep["splits"].items():
        hl, b = s["history_length"], s["shard_balance"]
        t.add_row(
            name,
            str(s["shards"]),
            f"{s['users']:,}",
            f"{s['samples']:,}",
            f"{s['interactions']:,}",
            f"{s['targets']:,}",
            f"{s['items_seen']:,}",
        )
        h.add_row(
            name,
            *(f"{hl[k]:.0f}" for k in ("p50", "p90", "p99", "p100")),
            f"{hl.get('mean', 0):.1f}",
            f"{b['interactions_min']:,}..{b['interactions_max']:,} ({b['interactions_cv']:.2f})",
        )
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
    if "recommended" in rep:
        r = rep["recommended"]
        console.print(
            f"recommended for {train['interactions']:,} training interactions: preset {r['preset']} "
            f"({r['note']})\n  {r['command']}"
        )
    return 0


def cmd_data_verify(a: argparse.Namespace) -> int:
    from trainer.data.inspect import verify

    rep = verify(a.dir, workers=a.workers)
    if a.json:
        print_json(rep)
    elif rep["ok"]:
        console.print(
            f"OK {rep['root']}: {rep['shards']} shards, {rep['samples']:,} samples, "
            f"{rep['interactions']:,} interactions match the manifest"
        )
    else:
        for e in rep["errors"]:
            print(f"BAD {e}", file=sys.stderr)
        print(f"argus data verify: {len(rep['errors'])} problem(s) in {rep['root']}", file=sys.stderr)
    return 0 if rep["ok"] else 1


# ---- argus data stream ---------------------------------------------------------------------------------------
def cmd_data_stream(a: argparse.Namespace) -> int:
    """Dry-run the exactly-once layout: every rank's loader, one after another, in this process."""
    from trainer.data.loader import ShardLoader

    cfg = ShardLoader.Config(
        path=a.dir,
        split=a.split,
        batch_size=a.batch_size,
        num_workers=a.num_workers,
        max_seq_len=a.max_seq_len,
        seed=a.seed,
        batch_format=a.batch_format,
    )
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
    rep = {
        "samples_expected": total,
        "samples_seen": len(seen),
        "duplicates": dup,
        "exactly_once": len(seen) == total and dup == 0,
        "ranks": ranks,
        "seconds": dt,
        "interactions_per_s": inter / max(dt, 1e-9),
    }
    if a.json:
        print_json(rep)
    else:
        t = Table(
            "rank",
            "batches",
            "samples",
            "interactions",
            "skipped",
            "truncated",
            title=f"{a.split}: world_size={a.world_size} x num_workers={a.num_workers}, batch_size={a.batch_size}",
        )
        for r in ranks:
            t.add_row(*(str(r[k]) for k in ("rank", "batches", "samples", "interactions", "skipped", "truncated")))
        console.print(t)
        console.print(
            f"{len(seen):,} of {total:,} samples, {dup} duplicates -> "
            f"{'exactly once' if rep['exactly_once'] else '[red]NOT exactly once[/]'}; "
            f"{rep['interactions_per_s']:,.0f} interactions/s in this process"
        )
    return 0 if rep["exactly_once"] else 1


# ---- parser --------------------------------------------------------------------------------------------------
OVERWRITE_HELP = (
    "replace the dataset already in --out (its files are removed first); a directory holding anything else "
    "is refused even so"
)


def add_data(sub: Any) -> None:
    """Add `data` and its commands to the sub-parsers of `argus`."""
    data = sub.add_parser("data", help="make, convert, inspect, verify and stream WebDataset shards")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    s = dsub.add_parser("synth", help="generate a synthetic dataset with planted structure")
    s.add_argument("--out", required=True, help="output directory: missing or empty (see --overwrite)")
    s.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    s.add_argument("--users", type=int, required=True)
    s.add_argument("--items", type=int, required=True)
    s.add_argument("--mean-len", type=float, default=200.0, help="mean interactions per user")
    s.add_argument("--shards", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--holdout", choices=["none", "loo", "temporal"], default="loo")
    s.add_argument("--max-len", type=int, default=8192, help="longest sample; longer histories are chunked")
    s.add_argument("--workers", type=int, default=0, help="processes (0 = one per core)")
    s.add_argument(
        "--clusters",
        type=int,
        default=0,
        help='item clusters ("genres"; 0 = max(4, round(sqrt(items) / 4)), at most 2048)',
    )
    s.add_argument("--days", type=int, default=120, help="length of the simulated time window")
    s.add_argument("--val-days", type=float, default=7.0)
    s.add_argument("--test-days", type=float, default=7.0)
    s.add_argument("--gap-seconds", type=int, default=0)
    s.add_argument(
        "--impressions",
        type=int,
        default=0,
        help="impressions per active user in the last --imp-days: writes the fine-tuning splits",
    )
    s.add_argument("--slate", type=int, default=10, help="items shown per impression")
    s.add_argument("--imp-days", type=float, default=7.0)
    s.add_argument("--imp-test-days", type=float, default=1.0, help="the last days of impressions: impressions_test")
    s.add_argument(
        "--item-features", type=int, default=0, metavar="DIM", help="write item metadata vectors of this width"
    )
    s.add_argument(
        "--new-items",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="hold this fraction of items back until the test window (cold-start items; --holdout temporal)",
    )
    s.add_argument(
        "--favourites",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of fresh draws that replay one of the user's lifelong favourite items (long-range signal)",
    )
    s.add_argument(
        "--favourite-items",
        type=int,
        default=None,
        metavar="N",
        help="favourite items per user (--favourites; default 32)",
    )
    s.add_argument(
        "--favourite-skew",
        type=float,
        default=0.0,
        metavar="S",
        help="replay a user's j-th favourite with weight j^-S (--favourites; 0 = all alike)",
    )
    s.add_argument(
        "--favourite-clusters",
        type=int,
        default=0,
        metavar="N",
        help="favourites are N distinct clusters per user instead of items: a replay visits one (--favourites; at"
        " most half of --clusters)",
    )
    s.set_defaults(func=cmd_data_synth)

    c = dsub.add_parser("convert", help="convert Yambda-style parquet or CSV/TSV logs into shards")
    c.add_argument("input", help="a file or a directory of .parquet / .csv / .tsv files")
    c.add_argument("--out", required=True, help="output directory: missing or empty (see --overwrite)")
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
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
    c.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="raise",
        help="bad rows: stop with the file, row (from 1; in CSV/TSV, after the header) and column, or skip and "
        "count them in the manifest",
    )
    c.add_argument("--workers", type=int, default=1, help="processes writing shards")
    c.add_argument(
        "--impressions",
        default=None,
        help="impression log (parquet/CSV/TSV: uid, item_id, timestamp, event_type [, played_ratio_pct, "
        "score, impression_id]): adds the fine-tuning splits",
    )
    c.add_argument(
        "--impressions-test-seconds",
        type=int,
        default=86400,
        help="impressions in the last N seconds form impressions_test",
    )
    c.add_argument(
        "--item-features",
        default=None,
        metavar="FILE",
        help="item metadata vectors (parquet file or directory: the item id column, named like the logs' item "
        "column or item_id, and vector or embedding, a list of floats; text embedded beforehand): written as "
        "item_features.npy, zero rows for items without one; unknown ids are dropped and counted",
    )
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
