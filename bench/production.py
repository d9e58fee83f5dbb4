"""The measurements of docs/production.md, on synthetic data with planted structure, over training seeds.

    python bench/production.py multi-token [--seeds 0,1,2] [--steps 200] [--delays 0,24h,48h] [--json]
    python bench/production.py projection [--seeds 0,1,2] [--steps 200] [--items 2000] [--negatives K] [--json]
    python bench/production.py cold-start [--seeds 0,1,2] [--steps 200] [--json]

multi-token: one dataset with a temporal holdout (`argus data synth --holdout temporal`: the last 7 days are the
test window; the planted tastes drift from session to session, so a state grows stale); `configs/nano.yaml`
trained for the same steps with next-item training (`horizon=1`) and with multi-token prediction (`horizon=8,
half_life_s=1 day, utility.skip=0`); every run evaluated on the test window from the state at its cut and 24 h and
48 h before it (`argus eval --delay`). Beside them the reference SASRec (bench/reference_sasrec.py: full softmax,
trained to its best val NDCG@10) on the same split, ranked from the same stale states (its ``--delay``).

projection: one leave-one-out dataset; `configs/nano.yaml` (d_model 64) with the decoding head's width
`embeddings.item_dim` (= `heads.next_item.projection`) at d/8, d/2 and d: step time, the head's training FLOPs per
interaction (the planner's count) and HR@10 / NDCG@10. `--items 20000 --negatives 4096` makes the head dominate
the step (the report's regime: many candidates per interaction).

cold-start: one temporal dataset whose items carry metadata vectors (`--item-features 32`: cluster centroid plus
noise plus a popularity direction) and 10% of whose items are held back until the test window (`--new-items 0.1`);
`configs/nano.yaml` with `model.item_tower` id (the ID-only model), semantic, and both (with
`model.cold_start_mask_rate` at 0 and at the share of the test window's targets that are cold, as the report
advises); each evaluated on every test target and on the cold items' only (`argus eval --items cold`).

Prints the mean and standard error over seeds beside popularity's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MULTI_TOKEN = {
    "next-item": [],
    "multi-token": ["heads.next_item.horizon=8", "heads.next_item.half_life_s=86400", "heads.next_item.utility.skip=0"],
}
PROJECTION = {f"item_dim={d}": [f"embeddings.item_dim={d}"] for d in (8, 32, 64)}  # nano: d_model 64
FEATURES = 32
TOWER = [f"model.item_features={FEATURES}"]
COLD_START = {
    "id": [],
    "semantic": ["model.item_tower=semantic", *TOWER],
    "both mask 0": ["model.item_tower=both", *TOWER],
    "both mask = cold share": ["model.item_tower=both", *TOWER, "model.cold_start_mask_rate={cold_share}"],
}


def argus(*argv: str) -> str:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keeps wheels installed aside
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "launch.cli", *argv]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"argus {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def pick_arms(arms: dict, spec: str, where: str = "", extra: tuple[str, ...] = ()) -> dict:
    """``--arms a,b``: those of ``arms`` (``extra``: names the caller handles itself); "" = all of them."""
    if not spec:
        return arms
    unknown = set(spec.split(",")) - set(arms) - set(extra)
    if unknown:
        raise SystemExit(f"--arms: no arm {', '.join(sorted(unknown))}{where} ({', '.join(arms)})")
    return {a: x for a, x in arms.items() if a in spec.split(",")}


def mean_se(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0)


def train(data: Path, run: Path, steps: int, seed: int, extra: list[str]) -> dict:
    """`argus train configs/nano.yaml` for ``steps`` steps; -> its last logging window and its head FLOPs."""
    argus("train", "configs/nano.yaml", f"data.path={data}", f"out={run}", "train.epochs=0", f"train.steps={steps}",
          "eval.every_epochs=0", "eval.patience=0", "data.batch_size=32", f"train.seed={seed}", "train.log_every=50",
          *extra)  # fmt: skip
    from trainer.checkpoint import saved_job
    from trainer.data.manifest import Manifest
    from trainer.flops import next_item_head_flops

    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"tps"' in x][-1]
    cfg = saved_job(sorted((run / "checkpoints").glob("step_*"))[-1])
    return {"step_s": last["time/step_s"], "head_flops": next_item_head_flops(cfg, Manifest.load(data).num_items)}


def sasrec(data: Path, out: Path, seed: int, delays: list[str]) -> list[dict]:
    """The reference SASRec trained on ``data`` (selected on val), its test reports from each delay's states."""
    import torch

    from bench.reference_sasrec import RefConfig, SASRec, run_reference
    from bench.reference_sasrec import evaluate as ranked
    from launch.train_cli import duration
    from trainer.data.manifest import Manifest
    from trainer.evaluate import delayed_state_time

    rep = run_reference(data, seed=seed, out=str(out), min_epochs=5)
    cfg, manifest = RefConfig(**rep["config"]), Manifest.load(data)
    model = SASRec(manifest.num_items, cfg.max_len, cfg.hidden, cfg.blocks, cfg.heads, cfg.dropout)
    model.load_state_dict(torch.load(out / "best.pt")["model"])
    reports = []
    for d in delays:
        at = delayed_state_time(manifest, "test", duration(d), data)
        r = ranked(model, data, manifest, "test", cfg, state_before=at)
        reports.append({"model": r.model, "popularity": r.popularity, "users": r.users, "steps": rep["steps"],
                        "seconds": rep["best_time"] - rep["train_start_time"]})  # fmt: skip
    return reports


def summarize(reports: list[dict]) -> dict:
    out = {f"{who}/{m}": mean_se([r[who][m] for r in reports]) for who in ("model", "popularity") for m in
           ("hr@10", "ndcg@10")}  # fmt: skip
    out["users"] = reports[0]["users"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=["multi-token", "projection", "cold-start"])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--delays", default="0,24h,48h")
    p.add_argument("--users", type=int, default=1500)
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--negatives", type=int, default=0, help="heads.next_item.uniform_negatives (0: nano's)")
    p.add_argument("--arms", default="", help="comma-separated arms of the study to run (default: all)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    seeds = [int(s) for s in args.seeds.split(",")]
    delays = args.delays.split(",") if args.study == "multi-token" else ["0"]
    arms = {"multi-token": MULTI_TOKEN, "projection": PROJECTION, "cold-start": COLD_START}[args.study]
    arms = pick_arms(arms, args.arms, f" in {args.study}", extra=("sasrec",))
    holdout = ["--holdout", "temporal", "--days", "60", "--val-days", "3", "--test-days", "7"]
    if args.study == "projection":
        holdout = ["--holdout", "loo"]
    if args.study == "cold-start":
        holdout += ["--item-features", str(FEATURES), "--new-items", "0.1"]
        delays = ["all", "cold"]  # the item slices, in the delay's place
    reports: dict[str, dict[str, list[dict]]] = {a: {d: [] for d in delays} for a in arms}
    costs: dict[str, list[dict]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory(prefix="argus_production_") as tmp:
        data = Path(tmp) / "data"
        argus("data", "synth", "--out", str(data), "--users", str(args.users), "--items", str(args.items),
              "--mean-len", "120", "--shards", "2", "--seed", "0", *holdout)  # fmt: skip
        cold_share = 0.0
        for arm, extra in arms.items():
            for seed in seeds:
                run = Path(tmp) / f"{arm}-{seed}".replace(" ", "").replace(",", "")
                t0 = time.perf_counter()
                over = [x.format(cold_share=round(cold_share, 4)) for x in extra]
                if args.negatives:
                    over.append(f"heads.next_item.uniform_negatives={args.negatives}")
                costs[arm].append({**train(data, run, args.steps, seed, over), "seconds": time.perf_counter() - t0})
                for d in delays:
                    flag = ["--items", d] if args.study == "cold-start" else ["--delay", d]
                    r = json.loads(argus("eval", str(run), "--data", str(data), *flag, "--json"))
                    cold_share = r.get("cold_share", cold_share)
                    reports[arm][d].append(r)
        reference = args.study == "multi-token" and (not args.arms or "sasrec" in args.arms.split(","))
        if reference:  # the reference model on the same split, from the same stale states
            reports["sasrec"] = {d: [] for d in delays}
            costs["sasrec"] = []
            for seed in seeds:
                got = sasrec(data, Path(tmp) / f"sasrec-{seed}", seed, delays)
                for d, r in zip(delays, got):
                    reports["sasrec"][d].append(r)
                costs["sasrec"].append({"step_s": got[0]["seconds"] / max(got[0]["steps"], 1), "head_flops": 0.0,
                                        "seconds": got[0]["seconds"]})  # fmt: skip
            arms = {**arms, "sasrec": []}
    summary = {f"{arm}@{d}": summarize(reports[arm][d]) for arm in arms for d in delays}
    cost = {arm: {k: statistics.mean(c[k] for c in cs) for k in cs[0]} for arm, cs in costs.items()}
    report = {"machine": f"{platform.node()}: {os.cpu_count()} CPUs", "study": args.study, "seeds": seeds,
              "steps": args.steps, "cost": cost, "summary": summary}  # fmt: skip
    if args.study == "cold-start":
        report["cold_share"] = cold_share
    if args.json:
        print(json.dumps(report, indent=1))
        return
    if args.study == "cold-start":
        print(f"cold items: {cold_share:.2%} of the test window's targets")
    print(f"{'arm':14} {'delay':>6} {'HR@10':>16} {'NDCG@10':>16} {'pop HR@10':>10} {'step s':>7} {'head FLOPs':>11}")
    for key, out in summary.items():
        arm, d = key.split("@")
        hr, nd, c = out["model/hr@10"], out["model/ndcg@10"], cost[arm]
        print(f"{arm:14} {d:>6} {hr[0]:9.4f} ± {hr[1]:.4f} {nd[0]:9.4f} ± {nd[1]:.4f} "
              f"{out['popularity/hr@10'][0]:10.4f} {c['step_s']:7.3f} {c['head_flops']:11.3g}")  # fmt: skip


if __name__ == "__main__":
    main()
