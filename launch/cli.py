"""`argus`: the one console command. Thin: parse, validate, hand over to library code.

Each command group's parser and commands live in their own module under launch/ (data_cli, train_cli,
checkpoint_cli, ray_launch, deepspeed_launch, cluster_cli, plan_cli, export_cli); this one only assembles them. Building
the parser imports no torch, DeepSpeed, TorchRec, Ray or pyarrow: `argus --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from launch.checkpoint_cli import add_checkpoint
from launch.cluster_cli import add_cluster
from launch.data_cli import add_data
from launch.deepspeed_launch import add_launch_deepspeed
from launch.export_cli import add_export, add_retrieve
from launch.plan_cli import add_plan
from launch.ray_launch import add_launch_ray
from launch.train_cli import add_train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="argus",
        description="Train billion-parameter transformer recommenders "
        "(ARGUS recipe): data, training, launch, capacity planning.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_data(sub)
    add_train(sub)  # train, finetune, eval
    add_checkpoint(sub)  # checkpoint list, checkpoint verify

    la = sub.add_parser("launch", help="launch training on a cluster: ray, deepspeed")
    lsub = la.add_subparsers(dest="launch_command", metavar="LAUNCHER", required=True)
    add_launch_ray(lsub)
    add_launch_deepspeed(lsub)

    add_cluster(sub)  # cluster check, cluster hostfile
    add_plan(sub)
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
