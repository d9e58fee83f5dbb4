"""`argus checkpoint list RUN` and `argus checkpoint verify RUN [--step N]`: a run's checkpoints, their sizes and
whether each still matches its manifest (wired into launch/cli.py's build_parser). Both read files only
(``trainer/checkpoint_store.py``, no torch) and change nothing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from launch.console import print_json


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _retention(run: Path) -> tuple[int, int]:
    """(keep_last, keep_every) from the run's config.yaml (the defaults when it has none)."""
    import yaml

    from trainer.checkpoint_store import Retention

    keep_last, keep_every = Retention.keep_last, Retention.keep_every  # train.keep_last / keep_every's defaults
    config = run / "config.yaml"
    train = ((yaml.safe_load(config.read_text()) or {}) if config.is_file() else {}).get("train") or {}
    return int(train.get("keep_last", keep_last)), int(train.get("keep_every", keep_every))


def _targets(path: str, step: int | None) -> list[Path]:
    """The checkpoints to verify: RUN's (only step N with ``--step``), or the one checkpoint directory ``path``."""
    from trainer import checkpoint_store as store

    p = Path(path)
    if (p / "meta.json").is_file() and step is None:
        return [p]
    root = store.checkpoint_root(p)
    if not root.is_dir():
        raise FileNotFoundError(f"{path}: not a run directory (no checkpoints/) or a checkpoint (no meta.json)")
    found = store.checkpoints(p)
    if not found:
        raise FileNotFoundError(
            f"{path}: no complete checkpoint to verify (checkpoints/ holds no step_N with meta.json)"
        )
    if step is None:
        return list(found.values())
    if step not in found:
        have = ", ".join(map(str, found)) or "none"
        raise FileNotFoundError(f"{path}: no checkpoint at step {step} (steps: {have})")
    return [found[step]]


def cmd_checkpoint_list(a: argparse.Namespace) -> int:
    from trainer import checkpoint_store as store

    run = Path(a.run)
    if not store.checkpoint_root(run).is_dir():
        raise FileNotFoundError(f"{a.run}: not a run directory (no checkpoints/)")
    found = list(store.checkpoints(run).values())
    keep_last, keep_every = _retention(run)
    policy = store.Retention(keep_last, keep_every)
    pointers = {name: store.pointer_target(run, name) for name in (store.LATEST, store.BEST)}
    rows = []
    for path in found:
        verdict = store.verify(path, quick=a.quick)
        roles = [name for name, target in pointers.items() if target is not None and target.name == path.name]
        if policy.milestone(verdict.step or 0):
            roles.append("milestone")
        rows.append(
            {
                "step": verdict.step,
                "checkpoint": path.name,
                "bytes": store.checkpoint_bytes(path),
                "status": verdict.status,
                "roles": roles,
                "problems": verdict.problems,
            }
        )
    root = store.checkpoint_root(run)
    leftovers = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.endswith((store.TMP, store.TRASH)))
    dangling = [
        f"{name} names {target.name}, which is missing"
        for name, target in pointers.items()
        if target is not None and not (target / "meta.json").is_file()
    ]
    total = sum(r["bytes"] for r in rows)
    if a.json:
        print_json(
            {
                "run": str(run),
                "keep_last": keep_last,
                "keep_every": keep_every,
                "bytes": total,
                "checkpoints": rows,
                "leftovers": leftovers,
                "problems": dangling,
            }
        )
        return 0
    print(
        f"{run}: {len(rows)} checkpoint{'s' if len(rows) != 1 else ''}, {_mb(total)} "
        f"(train.keep_last={keep_last}, train.keep_every={keep_every})"
    )
    print(f"{'step':>10}  {'checkpoint':<16}{'size':>12}  {'check':<11} kept as")
    for r in rows:
        line = f"{r['step']:>10}  {r['checkpoint']:<16}{_mb(r['bytes']):>12}  {r['status']:<11} {', '.join(r['roles'])}"
        print(line.rstrip())
    for name in leftovers:
        what = "an interrupted save" if name.endswith(store.TMP) else "an interrupted deletion"
        print(f"leftover: {name} ({what}; removed after the next checkpoint)")
    for line in dangling:
        print(f"problem: {line}")
    if any(r["status"] == "bad" for r in rows):
        print(f"bad checkpoints: `argus checkpoint verify {run}` names the files")
    return 0


def cmd_checkpoint_verify(a: argparse.Namespace) -> int:
    from trainer import checkpoint_store as store

    found = _targets(a.run, a.step)
    verdicts = [store.verify(path, quick=a.quick) for path in found]
    if a.json:
        print_json([_verdict_json(v) for v in verdicts])
    else:
        what = "sizes match" if a.quick else "match"
        for v in verdicts:
            if v.status == "verified":
                size = _mb(store.checkpoint_bytes(v.path))
                print(f"OK {v.path}: step {v.step}, {v.files} files, {size} {what} the manifest")
            elif v.status == "unverified":
                print(f"UNVERIFIED {v.path}: step {v.step} has no {store.MANIFEST} (written by an older argus)")
            for problem in v.problems:
                name, _, detail = problem.partition(": ")
                print(f"BAD {v.path / name}: step {v.step}: {detail}", file=sys.stderr)
    return 1 if any(v.status == "bad" for v in verdicts) else 0


def _verdict_json(v: Any) -> dict[str, Any]:
    return {"checkpoint": str(v.path), "step": v.step, "status": v.status, "files": v.files, "problems": v.problems}


def add_checkpoint(sub: Any) -> None:
    """Add `checkpoint list` and `checkpoint verify` to the sub-parsers of `argus`."""
    ck = sub.add_parser("checkpoint", help="list a run's checkpoints, verify them against their manifests")
    csub = ck.add_subparsers(dest="checkpoint_command", metavar="CHECKPOINT_COMMAND", required=True)

    ls = csub.add_parser("list", help="step, size, verified/bad/unverified, and which is latest, best or a milestone")
    ls.add_argument("run", help="run directory")
    ls.add_argument("--quick", action="store_true", help="compare file sizes only (no checksums)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_checkpoint_list)

    v = csub.add_parser(
        "verify", help="check every file of a run's checkpoints against their manifests; exit 1 if any is bad"
    )
    v.add_argument("run", help="run directory (or one checkpoint directory)")
    v.add_argument("--step", type=int, default=None, help="only the checkpoint of this step")
    v.add_argument("--quick", action="store_true", help="compare file sizes only (no checksums)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_checkpoint_verify)
