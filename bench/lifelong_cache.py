"""Lifelong histories through a summary cache (issue 19, docs/lifelong.md): downstream step time vs lifetime length.

    python bench/lifelong_cache.py [--lifetimes 1000,10000,100000] [--interactions 1600000] [--steps 60]
                                   [--packed] [--json]

For each lifetime length L (mean interactions per user), `argus data synth --users N/L --mean-len L --max-len 256`
writes about N interactions (the same for every L, so every dataset has as many samples and the loader behaves
alike) as members of one 256-interaction window each (a 10^5 history is ~400 members). A summariser
(`configs/nano.yaml`, context 256 + 64 summary tokens, trained in-line for a few steps on separate data: its
quality does not matter here) writes the train split's summary cache with `argus summarize --split train`: for
every member, the summary of the user's whole history before it, read in pieces through a fixed-size state (cost
linear in L, offline). A downstream run (the same shape, from scratch) then trains with `data.summary_cache`: each
sample is one window read after its cached summary, so its step should not depend on L.

Prints, per L: interactions, summarize seconds and interactions/s, the cache's size, and the downstream run's step
time and its compute part (the last logging window), and padding share. A run without summary tokens on the first
dataset gives the step without the summary prefix.

--packed: per L, two more downstream runs that read the summaries as memory (`model.summary.read=memory`), one
window a row (`data.batch_size`) and packed (`data.batch_tokens` = batch x 256: the same grid, filled first-fit
with as many windows as fit): their step time, real interactions per second and padding share. Short lifetimes
(users with fewer than 256 interactions, one short window each) are where packing pays.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.production import argus  # noqa: E402

COMMON = ["model.max_seq_len=256", "eval.every_epochs=0", "eval.patience=0", "train.epochs=0"]
SHAPE = [*COMMON, "model.summary.tokens=64", "model.summary.dim=64", "model.summary.heads=2", "model.summary.chunk=256"]


def last_window(run: Path) -> dict:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"tps"' in x][-1]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lifetimes", default="1000,10000,100000")
    p.add_argument("--interactions", type=int, default=1_600_000, help="per dataset (users = this / lifetime)")
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32, help="samples (windows) per downstream batch")
    p.add_argument("--packed", action="store_true", help="also memory-read downstream runs, one window a row vs packed")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows: list[dict] = []
    no_summary: dict = {}
    with tempfile.TemporaryDirectory(prefix="argus_lifelong_cache_") as tmp:
        root = Path(tmp)
        # the summariser: in-line summaries over samples of 1,024 (4 windows), a few steps
        argus("data", "synth", "--out", str(root / "pre"), "--users", "64", "--items", str(args.items),
              "--mean-len", "1000", "--shards", "2", "--seed", "1", "--holdout", "loo",
              "--max-len", "1024")  # fmt: skip
        argus("train", "configs/nano.yaml", f"data.path={root / 'pre'}", f"out={root / 'summariser'}", *SHAPE,
              "data.max_seq_len=1024", "train.steps=10", "data.batch_size=8", "train.log_every=5")  # fmt: skip
        for life in [int(x) for x in args.lifetimes.split(",")]:
            data, cache, run = root / f"data-{life}", root / f"cache-{life}", root / f"down-{life}"
            users = max(2, round(args.interactions / life))
            argus("data", "synth", "--out", str(data), "--users", str(users), "--items", str(args.items),
                  "--mean-len", str(life), "--shards", "2", "--seed", "0", "--holdout", "none",
                  "--max-len", "256")  # fmt: skip
            t0 = time.perf_counter()
            m = json.loads(argus("summarize", str(root / "summariser"), "--data", str(data), "--split", "train",
                                 "--out", str(cache), "--dtype", "bf16", "--batch-size", "64", "--json"))  # fmt: skip
            wall = time.perf_counter() - t0
            argus("train", "configs/nano.yaml", f"data.path={data}", f"out={run}", *SHAPE, "data.max_seq_len=256",
                  f"data.summary_cache={cache}", f"train.steps={args.steps}", f"data.batch_size={args.batch}",
                  f"train.log_every={args.steps // 2}")  # fmt: skip
            last = last_window(run)
            rows.append({
                "lifetime": life, "users": users, "interactions": m["interactions_read"], "samples": m["samples"],
                "summarize_s": m["timing"]["seconds"], "summarize_wall_s": round(wall, 1),
                "interactions_per_s": m["timing"]["interactions_per_s"], "cache_mib": dir_bytes(cache) / 2**20,
                "step_s": last["time/step_s"], "compute_s": last["time/step_s"] * last["time/compute_share"],
                "padding_share": last.get("tokens/padding_share"),
            })  # fmt: skip
            if args.packed:  # read as memory: one window a row, and packed into the same grid
                for name, batching in (("memory_rows", [f"data.batch_size={args.batch}"]),
                                       ("memory_packed", [f"data.batch_tokens={args.batch * 256}"])):  # fmt: skip
                    out = root / f"{name}-{life}"
                    argus("train", "configs/nano.yaml", f"data.path={data}", f"out={out}", *SHAPE,
                          "data.max_seq_len=256", f"data.summary_cache={cache}", "model.summary.read=memory",
                          f"train.steps={args.steps}", f"train.log_every={args.steps // 2}", *batching)  # fmt: skip
                    last = last_window(out)
                    rows[-1][name] = {"step_s": last["time/step_s"], "tps": last["tps"],
                                      "padding_share": last.get("tokens/padding_share")}  # fmt: skip
            if len(rows) == 1:  # the same data and batches without summary tokens: what the prefix costs
                plain = root / "plain"
                argus("train", "configs/nano.yaml", f"data.path={data}", f"out={plain}", *COMMON,
                      "data.max_seq_len=256", f"train.steps={args.steps}",
                      f"data.batch_size={args.batch}", f"train.log_every={args.steps // 2}")  # fmt: skip
                last = last_window(plain)
                no_summary = {
                    "step_s": last["time/step_s"],
                    "compute_s": last["time/step_s"] * last["time/compute_share"],
                }
    report = {"machine": f"{platform.node()}: {os.cpu_count()} CPUs", "interactions": args.interactions,
              "steps": args.steps, "batch": args.batch, "rows": rows, "no_summary": no_summary}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{'lifetime':>9} {'interactions':>13} {'summarize s':>12} {'inter/s':>9} {'cache MiB':>10} {'step s':>7} "
          f"{'compute s':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['lifetime']:9,} {r['interactions']:13,} {r['summarize_s']:12.1f} {r['interactions_per_s']:9,.0f} "
              f"{r['cache_mib']:10.1f} {r['step_s']:7.3f} {r['compute_s']:9.3f}")  # fmt: skip
    print(
        f"no summary tokens (first dataset): step {no_summary['step_s']:.3f} s, compute {no_summary['compute_s']:.3f} s"
    )
    for r in rows:
        for name in ("memory_rows", "memory_packed"):
            if name in r:
                m = r[name]
                print(f"{r['lifetime']:9,} {name:14} step {m['step_s']:.3f} s, {m['tps']:,.0f} interactions/s, "
                      f"padding {m['padding_share']:.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
