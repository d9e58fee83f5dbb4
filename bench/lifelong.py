"""Lifelong-history summaries (issue 19, docs/lifelong.md): context 256 + 64 summary tokens vs 256 vs 2,048.

    python bench/lifelong.py [--seeds 0,1,2] [--steps 200] [--users 400] [--items 5000] [--mean-len 1500]
                             [--favourites 0.15] [--favourite-items 32 | --favourite-clusters N --clusters C]
                             [--favourite-skew 0] [--arms ...] [--validate-every N] [--set KEY=VALUE ...]
                             [--timing] [--json]

Data: `argus data synth --favourites P --holdout loo`: every user has 32 (--favourite-items) favourite items
drawn from the whole catalog, and a share P of the fresh draws replays one of them, so part of the planted signal
lies in the older history (a 256-interaction window shows only some of a user's favourites, 2,048 show most); with
--favourite-clusters N the favourites are N clusters a replay visits (--clusters C: more, smaller clusters). The
same histories are written twice: cut into samples of 256 (`--max-len 256`, for the 256-context arm: every
interaction is a target once, as for the others) and of 2,048.

Arms (`configs/nano.yaml`, the same steps and about the same interactions per batch; without --arms the first
three):
  context 256               model.max_seq_len=256 on the 256-sample data
  context 256 + 64 summary  model.max_seq_len=256, data.max_seq_len=2048, model.summary.tokens=64: each sample is
                            encoded as 256-interaction windows, each after the summary of the sample's older ones
  context 2048              model.max_seq_len=2048
  context 256 windows       the summary arm's control: its samples and windows, each window encoded on its own
                            (model.windows=true, no summary): what the summary adds, on the same training samples

  context 256 + 64 cached summary
                            the downstream model VISTA serves: trained from scratch on the 256-sample data, each
                            sample one window read after its cached summary (`data.summary_cache`: argus summarize
                            --split train with the "256 + 64 summary" run of the same seed, whose summariser it is;
                            the summary covers the user's whole history before the window), ranked with
                            `argus eval --summary-cache` (a test-split cache); its step has no summariser in it
  cached summary (warm start)
                            the same, started from the in-line run's weights (`train.init_from`): VISTA's second
                            stage after the first, 2 x --steps in all
  context 256 + 64 summary (2x steps), context 256 (2x steps), context 2048 (2x steps),
  context 256 windows (2x steps)
                            its controls: the in-line arm and the plain contexts trained as long as both stages
                            together
  context 256 + 64 summary (memory); cached summary (memory; warm start)
                            the same two stages with the summary tokens read as each block's keys and values only
                            (model.summary.read=memory: no queries or feed-forward for them)

Beside them the reference SASRec (bench/reference_sasrec.py) on the 256-cut data, trained to its best val NDCG@10
(at most --reference-seconds of training).

Each run is ranked on the test split (the last interaction of every user; full ranking); a run on the 2,048-cut data
(in-line summary, windows, context 2,048) is ranked a second time from the 256-cut test split (the same users and
targets, the last 255 interactions before each: no older window to summarise or attend to), and the difference
(`beyond256/ndcg@10`, paired per run) is what the model gets from beyond them (for a summary arm, also from the
shift to an empty history's summary, which its last window seldom reads in training; for the windows arm, only the
time gap its last window's first interaction has from the one before: about 0, a check). The arms on the 2,048-cut
data differ from context 256 in their training samples too (a batch holds a few users' whole histories, not pieces of
--batch users'; the windows are the 256-cut data's samples, both cut from the history's end), so their gap to
context 256 alone does not say what the longer memory is worth: "context 256 windows" trains on the summary arm's
samples without one. Then on its long-range slice: the users whose test target is a favourite the last 256
interactions do not show (what only a longer memory can get; HR@10 / HR@100 from the run's `argus export`, items
ahead = a higher score); and every test user's favourites ranked by the served state, those the last 256
interactions show and those only older ones show (the share in the top 100 and the median rank: does the state know
them at all?; with --json also over each user's first 8 favourites, `fav8_`: the most replayed ones with
--favourite-skew S, which replays the j-th with weight j^-S).
Prints the mean and standard error over training seeds, with step time (the last logging window's mean).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.production import argus, mean_se, pick_arms  # noqa: E402

if TYPE_CHECKING:
    import numpy as np

    from trainer.data.schema import Sample

CACHED = "context 256 + 64 cached summary"
WARM = "cached summary (warm start)"
MEMORY = "context 256 + 64 summary (memory)"
WARM_MEMORY = "cached summary (memory; warm start)"
SUMMARY = ["model.summary.tokens=64", "model.summary.dim=64", "model.summary.heads=2", "model.summary.chunk=256"]
ARMS = {
    "context 256": (256, ["model.max_seq_len=256"]),
    "context 256 + 64 summary": (2048, ["model.max_seq_len=256", "data.max_seq_len=2048", *SUMMARY]),
    "context 2048": (2048, ["model.max_seq_len=2048"]),
    # the summary arm's control on its own samples: the same windows of 256, each on its own (model.windows)
    "context 256 windows": (2048, ["model.max_seq_len=256", "data.max_seq_len=2048", "model.windows=true"]),
    # trains from scratch on the 256-sample data, each sample after its cached summary (data.summary_cache) from
    # the "context 256 + 64 summary" run of the same seed (its summariser; argus summarize --split train / test)
    CACHED: (256, ["model.max_seq_len=256", *SUMMARY]),
    # the same, started from that run's weights (train.init_from: VISTA's second stage on top of the first), and
    # the in-line arm trained as long as the two stages together (its control)
    WARM: (256, ["model.max_seq_len=256", *SUMMARY]),
    "context 256 + 64 summary (2x steps)": (2048, ["model.max_seq_len=256", "data.max_seq_len=2048", *SUMMARY]),
    # the plain contexts trained as long as the two stages together (equal steps)
    "context 256 (2x steps)": (256, ["model.max_seq_len=256"]),
    "context 2048 (2x steps)": (2048, ["model.max_seq_len=2048"]),
    "context 256 windows (2x steps)": (2048, ["model.max_seq_len=256", "data.max_seq_len=2048", "model.windows=true"]),
    # the summary tokens read as each block's keys and values only (model.summary.read=memory): in-line, and cached
    # with a warm start from that run
    MEMORY: (2048, ["model.max_seq_len=256", "data.max_seq_len=2048", *SUMMARY, "model.summary.read=memory"]),
    WARM_MEMORY: (256, ["model.max_seq_len=256", *SUMMARY, "model.summary.read=memory"]),
}
DEFAULT_ARMS = ("context 256", "context 256 + 64 summary", "context 2048")  # without --arms
SUMMARISER = {CACHED: "context 256 + 64 summary", WARM: "context 256 + 64 summary", WARM_MEMORY: MEMORY}
REFERENCE = "reference SASRec (context 256)"  # bench/reference_sasrec.py, trained to its best val NDCG@10


def mean_sample(data: Path) -> float:
    from trainer.data.manifest import Manifest

    s = Manifest.load(data).split("train")
    return s.interactions / max(1, s.samples)


def favourites(data: Path) -> tuple[dict[int, list[int]], np.ndarray, list[np.ndarray]]:
    """Each user's favourites as units (items, or clusters with --favourite-clusters), every item's unit, and each
    unit's items."""
    import numpy as np

    from trainer.data import synth

    items, truth = synth.load_truth(data)
    if "favourite_clusters" in truth:
        unit, fav = items["item_cluster"].astype(np.int64), truth["favourite_clusters"]
    else:
        unit, fav = np.arange(items["item_cluster"].shape[0]), truth["favourites"]
    members = np.split(np.argsort(unit, kind="stable"), np.cumsum(np.bincount(unit))[:-1])
    return dict(zip(truth["user"].tolist(), fav.tolist())), unit, members


def held_out_samples(data: Path) -> Iterator[Sample]:
    """The test split's samples, shard by shard."""
    import tarfile

    from trainer.data.manifest import Manifest
    from trainer.data.schema import decode_sample

    for shard in Manifest.load(data).split("test").shards:
        with tarfile.open(data / shard.path) as tf:
            yield from [decode_sample(m.name.split(".")[0], tf.extractfile(m).read()) for m in tf]


def long_range_users(data: Path, window: int) -> set[int]:
    """Users whose test target is one of their favourites (an item, or an item of a favourite cluster) that the
    ``window`` interactions before it do not show (what only a longer memory can get)."""
    fav, unit, _ = favourites(data)
    users = set()
    for s in held_out_samples(data):
        units = unit[s.cols["item"]]
        target = int(units[-1])
        if target in fav[s.user] and target not in set(units[-1 - window : -1].tolist()):
            users.add(int(s.user))
    return users


def favourite_stats(data: Path, window: int) -> dict[str, float]:
    """How the planted favourites show in the data: the share of test targets that are a favourite (an item, or in
    a favourite cluster), the favourites per test user that the last ``window`` interactions before the target show
    and those only older ones show, and, over the train split, how many interactions pass per start of a replay of
    one given favourite (a replayed item, or the first interaction of a visit to a favourite cluster)."""
    import tarfile

    import numpy as np

    from trainer.data.manifest import Manifest
    from trainer.data.schema import decode_sample

    fav, unit, _ = favourites(data)
    targets, shown = [], []
    for s in held_out_samples(data):
        units = unit[s.cols["item"]]
        recent, older = set(units[-1 - window : -1].tolist()), set(units[: -1 - window].tolist())
        targets.append(int(units[-1]) in fav[s.user])
        own = set(fav[s.user])
        shown.append((len(own & recent), len(own & (older - recent))))
    starts = total = 0
    for shard in Manifest.load(data).split("train").shards:
        with tarfile.open(data / shard.path) as tf:
            for m in tf:
                s = decode_sample(m.name.split(".")[0], tf.extractfile(m).read())
                units = unit[s.cols["item"]]
                on = np.isin(units, fav[s.user])
                starts += int(on[0]) + int((on[1:] & (units[1:] != units[:-1])).sum())
                total += len(units)
    per_user = statistics.mean(len(f) for f in fav.values())
    a = np.array(shown)
    return {"target_share": float(np.mean(targets)), "shown_in_window": float(a[:, 0].mean()),
            "shown_only_beyond": float(a[:, 1].mean()),
            "interactions_per_replay_start_of_one": total * per_user / max(starts, 1)}  # fmt: skip


def favourite_ranks(data: Path, export: Path, window: int) -> dict[str, float]:
    """Does the served state know a user's favourites? The items of each test user's favourites (the item, or
    every item of a favourite cluster) ranked by the export's user vector (items ahead: a higher score) over the
    whole catalog, apart for favourites the last ``window`` interactions before the target show ("in") and those
    only older ones in the sample show ("beyond"): the share in the top 100 and the median rank as a share of the
    catalog (0.5: no better than chance); ``fav8_``: the same over each user's first 8 favourites (the most replayed
    ones with --favourite-skew). Unlike the long-range slice this measures every user, whatever the target is."""
    import numpy as np

    from trainer.export import load_export

    fav, unit, members = favourites(data)
    uid, uvec, _, iid, ivec = load_export(export)
    ivec = ivec[np.argsort(iid)]
    vec = dict(zip(uid.tolist(), uvec))
    ranks: dict[str, list[np.ndarray]] = {"in": [], "beyond": [], "8_in": [], "8_beyond": []}
    for s in held_out_samples(data):
        if s.user not in vec:
            continue
        history = unit[s.cols["item"][:-1]]
        recent, older = set(history[-window:].tolist()), set(history[:-window].tolist())
        scores = ivec @ vec[s.user]
        order = np.sort(scores)
        seen = set()
        for j, f in enumerate(fav[s.user]):
            part = "in" if f in recent else "beyond" if f in older else None
            if part and f not in seen:
                seen.add(f)
                own = scores[members[f]]
                rank = len(scores) - np.searchsorted(order, own, side="right")  # items scored above each
                ranks[part].append(rank)
                if j < 8:
                    ranks[f"8_{part}"].append(rank)
    out = {}
    for part, r in ranks.items():  # NaN: no favourite of that kind (e.g. short histories)
        a = np.concatenate(r) if r else np.zeros(0)
        part = part if part.startswith("8") else f"_{part}"
        out[f"fav{part}/top100"] = float((a < 100).mean()) if r else float("nan")
        out[f"fav{part}/median_rank"] = float(np.median(a) / len(iid)) if r else float("nan")
    return out


def slice_hits(export: Path, users: set[int]) -> dict[str, float]:
    """HR@10 / HR@100 of the exported vectors' full ranking of each user's next item (items ahead: a higher
    score), on the long-range users and on the rest."""
    import numpy as np

    from trainer.export import load_export

    uid, uvec, nxt, iid, ivec = load_export(export)
    order = np.argsort(iid)
    ivec = ivec[order]
    out: dict[str, list[float]] = {}
    for lo in range(0, len(uid), 256):
        sl = slice(lo, lo + 256)
        scores = uvec[sl] @ ivec.T
        own = scores[np.arange(scores.shape[0]), nxt[sl]]
        rank = (scores > own[:, None]).sum(1)
        for u, r in zip(uid[sl].tolist(), rank.tolist()):
            part = "long" if u in users else "rest"
            out.setdefault(f"{part}/hr@10", []).append(float(r < 10))
            out.setdefault(f"{part}/hr@100", []).append(float(r < 100))
    return {k: sum(v) / len(v) for k, v in out.items()}


def reference(data: Path, seed: int, out: Path, max_seconds: float) -> dict:
    """The reference SASRec on the 256-cut data (its context 256), selected on val (at most ``max_seconds`` of
    training; 0: until early stopping): its test HR@10 / NDCG@10."""
    from bench.reference_sasrec import run_reference

    rep = run_reference(data, seed=seed, max_len=256, min_epochs=5, max_seconds=max_seconds, out=str(out))
    test = rep["test"]["model"]
    return {"hr@10": test["hr@10"], "ndcg@10": test["ndcg@10"], "hr@100": test["hr@100"],
            "seconds": rep["seconds_to_best"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--users", type=int, default=400)
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--mean-len", type=float, default=1500)
    p.add_argument("--favourites", type=float, default=0.15)
    p.add_argument("--favourite-items", type=int, default=32, help="favourite items per user")
    p.add_argument("--favourite-skew", type=float, default=0.0, help="the j-th favourite replayed with weight j^-S")
    p.add_argument("--favourite-clusters", type=int, default=0, help="favourites are N clusters per user (not items)")
    p.add_argument("--clusters", type=int, default=0, help="item clusters (0: synth's default, 18 for 5,000 items)")
    p.add_argument("--batch", type=int, default=32, help="samples per batch of the 256-sample data")
    p.add_argument("--arms", default="", help="comma-separated arms (default: the three contexts)")
    p.add_argument("--reference-seconds", type=float, default=240, help="the reference's training cap (0: none)")
    p.add_argument(
        "--validate-every",
        type=int,
        default=0,
        help="validate every N steps; eval and export then read each run's best checkpoint (0: the last); a run's"
        " seconds then include its validations",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for every run (repeatable), e.g. model.d_model=1024 (bench/gpu_lifelong.sh); it wins over the"
        " arms' own keys, so leave max_seq_len, summary and train.steps to them",
    )
    p.add_argument("--timing", action="store_true", help="step times only (no eval): e.g. --steps 120 --seeds 0")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = pick_arms({**ARMS, REFERENCE: (256, [])}, args.arms or ",".join(DEFAULT_ARMS))
    results: dict[str, list[dict]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory(prefix="argus_lifelong_") as tmp:
        data = {}
        for max_len in (256, 2048):
            data[max_len] = Path(tmp) / f"data-{max_len}"
            argus("data", "synth", "--out", str(data[max_len]), "--users", str(args.users), "--items",
                  str(args.items), "--mean-len", str(args.mean_len), "--shards", "2", "--seed", "0", "--holdout",
                  "loo", "--favourites", str(args.favourites),
                  "--favourite-skew", str(args.favourite_skew), "--max-len", str(max_len), "--clusters",
                  str(args.clusters),
                  *(["--favourite-clusters", str(args.favourite_clusters)] if args.favourite_clusters else []),
                  *([] if args.favourite_clusters else ["--favourite-items", str(args.favourite_items)]))  # fmt: skip
        per_sample = {m: mean_sample(d) for m, d in data.items()}
        batch = {256: args.batch, 2048: max(1, round(args.batch * per_sample[256] / per_sample[2048]))}
        long_users = long_range_users(data[2048], 256)
        unseen = len(long_users) / args.users
        fav_stats = favourite_stats(data[2048], 256)
        validate = [f"eval.every={args.validate_every}"] if args.validate_every else []
        for arm, (max_len, extra) in arms.items():
            for seed in seeds:
                if arm == REFERENCE:
                    ref = reference(data[256], seed, Path(tmp) / f"sasrec-{seed}", args.reference_seconds)
                    results[arm].append(ref)
                    continue

                def train(arm: str, max_len: int, extra: list[str], seed: int = seed) -> tuple[Path, float]:
                    run = Path(tmp) / f"{arm}-{seed}".replace(" ", "").replace("+", "")
                    if not run.exists():
                        t0 = time.perf_counter()
                        argus("train", "configs/nano.yaml", f"data.path={data[max_len]}", f"out={run}",
                              "train.epochs=0", f"train.steps={args.steps}", "eval.every_epochs=0", "eval.patience=0",
                              f"data.batch_size={batch[max_len]}", f"train.seed={seed}",
                              f"train.log_every={args.steps // 4}", *validate, *extra, *args.set)  # fmt: skip
                        (run / "seconds").write_text(str(time.perf_counter() - t0))
                    return run, float((run / "seconds").read_text())

                read = []
                if arm.endswith("(2x steps)"):
                    extra = [*extra, f"train.steps={2 * args.steps}"]
                if arm in SUMMARISER:  # the summariser: its in-line arm's run of this seed (trained now if not yet)
                    summariser, _ = train(SUMMARISER[arm], *ARMS[SUMMARISER[arm]])
                    caches = {}
                    splits = ["train", *(["val"] if validate else []), *([] if args.timing else ["test"])]
                    for split in splits:
                        caches[split] = summariser / f"cache-{split}"
                        if not caches[split].exists():
                            argus("summarize", str(summariser), "--data", str(data[256]), "--split", split,
                                  "--out", str(caches[split]), "--dtype", "bf16")  # fmt: skip
                    extra = [*extra, f"data.summary_cache={caches['train']}", "data.max_seq_len=256"]
                    if validate:
                        extra.append(f"eval.val_summary_cache={caches['val']}")
                    if arm in (WARM, WARM_MEMORY):
                        extra.append(f"train.init_from={summariser}")
                    read = [] if args.timing else ["--summary-cache", str(caches["test"])]
                run, seconds = train(arm, max_len, extra)
                windows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"tps"' in x]
                last = windows[-1]
                # the step's compute, the median over the logging windows after the first (warm-up): the data time
                # around an epoch's end (the loader starting over) would otherwise dominate a short run's last window
                compute = statistics.median(w["time/step_s"] * w["time/compute_share"] for w in windows[1:])
                if args.timing:
                    results[arm].append({"step_s": last["time/step_s"], "compute_s": compute})
                    continue
                r = json.loads(argus("eval", str(run), "--data", str(data[max_len]), *read, "--json"))
                # the same model ranking from the last 255 interactions only (the 256-cut test split: no older window
                # to summarise, nothing older to attend to), the same users and targets: what it gets from beyond
                recent = {}
                if max_len == 2048 and not read:
                    rr = json.loads(argus("eval", str(run), "--data", str(data[256]), "--json"))["model"]
                    recent = {"recent256/hr@10": rr["hr@10"], "recent256/ndcg@10": rr["ndcg@10"],
                              "beyond256/ndcg@10": r["model"]["ndcg@10"] - rr["ndcg@10"]}  # fmt: skip
                argus("export", str(run), "--data", str(data[max_len]), "--out", str(run / "export"), *read)
                results[arm].append({"hr@10": r["model"]["hr@10"], "ndcg@10": r["model"]["ndcg@10"],
                                     "hr@100": r["model"]["hr@100"], "pop_hr@10": r["popularity"]["hr@10"],
                                     **recent,
                                     "step_s": last["time/step_s"], "compute_s": compute, "tps": last["tps"],
                                     "seconds": seconds,
                                     **slice_hits(run / "export", long_users),
                                     **favourite_ranks(data[2048], run / "export", 256)})  # fmt: skip
    summary = {arm: {k: mean_se([x[k] for x in rs]) for k in rs[0]} for arm, rs in results.items() if rs}
    for out in summary.values():  # the reference has no step time, long-range slice or popularity of its own
        fav = [f"fav{p}/{m}" for p in ("_in", "_beyond", "8_in", "8_beyond") for m in ("top100", "median_rank")]
        recent = ("recent256/hr@10", "recent256/ndcg@10", "beyond256/ndcg@10")
        for key in ("hr@10", "ndcg@10", *recent, "long/hr@10", "long/hr@100", *fav, "step_s", "compute_s"):
            out.setdefault(key, (float("nan"), 0.0))
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report = {"machine": f"{platform.node()}: {os.cpu_count()} CPUs, {device}", "overrides": args.set,
              "seeds": seeds, "steps": args.steps,
              "batch": batch, "mean_sample": per_sample, "unseen_favourite_share": unseen,
              "favourites": fav_stats,
              "summary": summary}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"test targets that are a favourite the last 256 interactions do not show: {unseen:.1%} (the long slice)")
    print("favourites ranked by the served state (top 100 share / median rank share), those the last 256 show (in)"
          " and those only older interactions show (beyond)")  # fmt: skip
    print(
        "NDCG@10 256 only: the same model ranking from the last 255 interactions only (no cached arm); beyond:"
        " what it gains from older ones (paired)"
    )
    print(f"{'arm':36} {'HR@10':>16} {'NDCG@10':>16} {'NDCG@10 256 only':>16} {'beyond':>17} {'long HR@10':>11} "
          f"{'long HR@100':>12} {'fav in':>13} {'fav beyond':>13} {'step s':>7} {'compute s':>9}")  # fmt: skip
    for arm, out in summary.items():
        hr, nd = out["hr@10"], out["ndcg@10"]
        fav = {p: f"{out[f'fav{p}/top100'][0]:.3f}/{out[f'fav{p}/median_rank'][0]:.2f}" for p in ("_in", "_beyond")}
        print(f"{arm:36} {hr[0]:9.4f} ± {hr[1]:.4f} {nd[0]:9.4f} ± {nd[1]:.4f} {out['recent256/ndcg@10'][0]:16.4f} "
              f"{out['beyond256/ndcg@10'][0]:8.4f} ± {out['beyond256/ndcg@10'][1]:.4f} {out['long/hr@10'][0]:11.4f} "
              f"{out['long/hr@100'][0]:12.4f} {fav['_in']:>13} {fav['_beyond']:>13} {out['step_s'][0]:7.3f} "
              f"{out['compute_s'][0]:9.3f}")  # fmt: skip
    pops = [x["pop_hr@10"] for rs in results.values() for x in rs if "pop_hr@10" in x]
    if pops:
        print(f"popularity HR@10 {statistics.mean(pops):.4f}")


if __name__ == "__main__":
    main()
