"""`argus export` and `argus retrieve`: parsers and commands (wired into launch/cli.py's build_parser)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
from typing import Any

from launch.console import console, print_json


def parse_time(value: str) -> int:
    """Unix seconds, or an ISO-8601 date/time (UTC unless it names a zone) -> unix seconds."""
    try:
        return int(value)
    except ValueError:
        pass
    try:
        t = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"--at: expected unix seconds or an ISO-8601 time (2024-02-01T00:00:00), got {value!r}"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return int(t.timestamp())


def cmd_export(a: argparse.Namespace) -> int:
    from trainer.logger import quiet_library_logs

    quiet_library_logs()  # before anything imports DeepSpeed: it warns at import unless told the accelerator
    from trainer.export import export

    at = None if a.at is None else parse_time(a.at)
    with contextlib.redirect_stdout(sys.stderr):  # library banners must not corrupt --json
        m = export(
            a.checkpoint,
            a.data,
            a.out,
            split=a.split,
            at=at,
            dtype=a.dtype,
            batch_size=a.batch_size,
            context=a.context,
            num_workers=a.num_workers,
            device=a.device,
            overwrite=a.overwrite,
            summary_cache=a.summary_cache,
        )
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    if a.json:
        print_json(m)
        return 0
    if m.get("summary_cache"):
        c = m["summary_cache"]
        console.print(
            f"summary cache {c['path']} (cutoff {c['at']}): {c['stale_users']:,} users' summaries leave out "
            f"{c['interactions_left_out']:,} older interactions (rebuild it to include them)"
        )
    t = m["timing"]
    console.print(
        f"exported {a.out}: {m['users']:,} users ({m['users_skipped']:,} without history before the "
        f"cutoff: skipped), {m['items']:,} items, dim {m['dim']} {m['dtype']}, {m['world_size']} "
        f"rank(s); {t['users_per_s']:,.0f} users/s, {t['items_per_s']:,.0f} items/s"
    )
    return 0


def cmd_summarize(a: argparse.Namespace) -> int:
    from trainer.logger import quiet_library_logs

    quiet_library_logs()
    from trainer.export import summarize

    at = None if a.at is None else parse_time(a.at)
    with contextlib.redirect_stdout(sys.stderr):
        m = summarize(
            a.run,
            a.data,
            a.out,
            split=a.split,
            at=at,
            dtype=a.dtype,
            batch_size=a.batch_size,
            device=a.device,
            overwrite=a.overwrite,
        )
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    if a.json:
        print_json(m)
        return 0
    t = m["timing"]
    console.print(
        f"summarized {a.out}: {m['samples']:,} samples of {m['split']!r} ({m['interactions_read']:,} history "
        f"interactions read), {m['tokens']} tokens x {m['dim']} {m['dtype']} each, {m['world_size']} rank(s); "
        f"{t['samples_per_s']:,.0f} samples/s, {t['interactions_per_s']:,.0f} interactions/s"
    )
    return 0


def cmd_retrieve(a: argparse.Namespace) -> int:
    from trainer.retrieve import AnnSpec, retrieve

    faiss_flags = {
        "nlist": a.nlist,
        "nprobe": a.nprobe,
        "train_size": a.train_size,
        "hnsw_m": a.hnsw_m,
        "ef_search": a.ef_search,
        "ef_construction": a.ef_construction,
    }
    ann = None
    if a.index == "faiss":
        ann = AnnSpec(kind=a.faiss_type or "ivf", seed=a.seed, **faiss_flags)
    elif a.faiss_type is not None or any(v is not None for v in faiss_flags.values()):
        raise ValueError("--faiss-type and its parameters need --index faiss")
    rep = retrieve(
        a.export_dir, k=a.k, users=a.users, batch=a.batch_size, index=a.index, ann=ann, num_threads=a.threads
    )
    if a.json:
        print_json(rep)
        return 0
    from rich.table import Table

    ann_cols = ["ANN Recall@K", "ANN recall vs exact"] if a.index == "faiss" else []
    t = Table(
        "K",
        "Recall@K (= HR@K)",
        *ann_cols,
        title=f"{a.export_dir}: brute-force top-{rep['k']} over {rep['items']:,} "
        f"items, {rep['users']:,} users with a next item",
    )
    for key, value in rep.items():
        if key.startswith("recall@"):
            c = key.split("@")[1]
            ann_vals = [f"{rep[f'ann_next_recall@{c}']:.4f}", f"{rep[f'ann_recall@{c}']:.4f}"] if ann_cols else []
            t.add_row(c, f"{value:.4f}", *ann_vals)
    console.print(t)
    console.print(
        f"{rep['users_without_next']:,} users without a next item (not scored); {rep['seconds']:.2f} s, "
        f"{rep['users_per_s']:,.0f} users/s"
    )
    if a.index == "faiss":
        f = rep["faiss"]
        params = ", ".join(f"{k}={v}" for k, v in f.items() if k not in ("type", "version"))
        console.print(
            f"faiss {f['type']} ({params}): built in {rep['ann_build_s']:.2f} s; search "
            f"{rep['ann_queries_per_s']:,.0f} queries/s vs exact {rep['exact_queries_per_s']:,.0f} queries/s"
        )
    return 0


def add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="user-state and item vectors of a checkpoint to sharded parquet "
        "(score = dot product); plain, torchrun or deepspeed",
    )
    p.add_argument("checkpoint", help="run directory (its latest checkpoint) or one checkpoint directory")
    p.add_argument("--data", required=True, help="dataset directory (the split's histories, the catalog size)")
    p.add_argument("--out", required=True, help="output directory (users/, items/, manifest.json): missing or empty")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the export already in --out (its files are removed first); a directory holding anything "
        "else is refused even so",
    )
    p.add_argument(
        "--split",
        default="test",
        help="whose histories: an eval split holds each user's whole "
        "history before the held-out target (default: test)",
    )
    p.add_argument(
        "--at",
        default=None,
        metavar="TIMESTAMP",
        help="cutoff: only interactions strictly before it are history (unix seconds or ISO-8601, UTC)",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="stored vector type")
    p.add_argument("--batch-size", type=int, default=256, help="users per rank per forward pass")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="most recent history interactions a state is computed from (default: data.max_seq_len - 1)",
    )
    p.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes per rank")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--summary-cache",
        default=None,
        metavar="CACHE",
        help="model.summary runs: read each user's summary tokens from an `argus summarize` cache and compute the "
        "state from the most recent window alone",
    )
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(func=cmd_export)


def add_summarize(sub: Any) -> None:
    p = sub.add_parser(
        "summarize",
        help="cache the history-summary tokens (model.summary) before each sample of a split, of the user's whole "
        "history, to sharded parquet (for train, eval and export to read); plain, torchrun or deepspeed",
    )
    p.add_argument("run", help="run directory (its best or latest checkpoint) or one checkpoint directory")
    p.add_argument("--data", required=True, help="dataset directory (the split's histories)")
    p.add_argument("--out", required=True, help="output directory (users/, manifest.json): missing or empty")
    p.add_argument("--overwrite", action="store_true", help="replace the summary cache already in --out")
    p.add_argument("--split", default="test", help="whose samples: train or an eval split (default: test)")
    p.add_argument(
        "--at",
        default=None,
        metavar="TIMESTAMP",
        help="cutoff: only interactions strictly before it are summarised (unix seconds or ISO-8601, UTC)",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="stored token type")
    p.add_argument(
        "--batch-size", type=int, default=64, help="history pieces (model.summary.chunk tokens) per rank per pass"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(func=cmd_summarize)


def add_retrieve(sub: Any) -> None:
    p = sub.add_parser(
        "retrieve",
        help="brute-force top-K over an export's item vectors; Recall@K against each user's next item; "
        "--index faiss: an approximate index too, compared with it",
    )
    p.add_argument("export_dir")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--users", type=int, default=None, help="only the first N users (by id) with a next item")
    p.add_argument("--batch-size", type=int, default=1024, help="users per matmul")
    p.add_argument(
        "--index",
        choices=["exact", "faiss"],
        default="exact",
        help="exact: brute force only; faiss: also a faiss index (needs faiss-cpu), reported against exact",
    )
    p.add_argument("--faiss-type", choices=["ivf", "hnsw"], default=None, help="faiss index (default: ivf)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: 4*sqrt(items), >= 39 items per list)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists scanned per query (default: 32, <= nlist)")
    p.add_argument(
        "--train-size", type=int, default=None, help="IVF k-means sample, seeded (default: 64*nlist, <= items)"
    )
    p.add_argument("--hnsw-m", type=int, default=None, help="HNSW links per node (default: 32)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search candidates (default: max(2*K, 64))")
    p.add_argument("--ef-construction", type=int, default=None, help="HNSW build candidates (default: 80)")
    p.add_argument("--seed", type=int, default=0, help="seed of the IVF training sample and k-means")
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: as they are)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_retrieve)
