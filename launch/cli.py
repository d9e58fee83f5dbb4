"""`argus`: the one console command. Thin: parse, validate, hand over to library code.

Each command group's parser and commands live in their own module under launch/ (data_cli, train_cli,
checkpoint_cli, ray_launch, deepspeed_launch, cluster_cli, plan_cli, export_cli, sweep_cli); this one only
assembles them. Building the parser imports no torch, DeepSpeed, TorchRec, Ray or pyarrow: `argus --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Callable, Sequence

from launch import exit_codes
from launch.checkpoint_cli import add_checkpoint
from launch.cluster_cli import add_cluster
from launch.data_cli import add_data
from launch.deepspeed_launch import add_launch_deepspeed
from launch.export_cli import add_export, add_retrieve, add_summarize
from launch.plan_cli import add_plan
from launch.ray_launch import add_launch_ray
from launch.sweep_cli import add_sweep
from launch.train_cli import add_train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="argus",
        description="Train billion-parameter transformer recommenders "
        "(ARGUS recipe): data, training, launch, capacity planning.",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="on an error, the full traceback before its one line (also: ARGUS_DEBUG=1); anywhere on the line",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show third-party start-up chatter too: Ray's INFO lines, fbgemm's library list, ... "
        "(also: ARGUS_VERBOSE=1); anywhere on the line",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_data(sub)
    add_train(sub)  # train, finetune, eval
    add_checkpoint(sub)  # checkpoint list, checkpoint verify

    la = sub.add_parser("launch", help="launch training (or evaluation) on a cluster: ray, ray-eval, deepspeed")
    lsub = la.add_subparsers(dest="launch_command", metavar="LAUNCHER", required=True)
    add_launch_ray(lsub)
    add_launch_deepspeed(lsub)

    add_cluster(sub)  # cluster check, cluster hostfile
    add_plan(sub)
    add_export(sub)
    add_summarize(sub)
    add_retrieve(sub)
    add_sweep(sub)  # sweep fit
    return p


GLOBAL_FLAGS = ("--debug", "--verbose")


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the environment too); --debug and --verbose,
    global, may come anywhere and are dropped here (parse_args sets ``args.debug`` and ``args.verbose``)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in GLOBAL_FLAGS:
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed, options and key=value overrides in any order (argparse leaves over the overrides that come
    after an option: `argus launch ray CONFIG --local key=value`); anything else unknown is a usage error."""
    parser = build_parser()
    args, extra = parser.parse_known_args(_strip_launcher_args(list(argv)))
    args.debug, args.verbose = "--debug" in argv, "--verbose" in argv
    if extra:
        stray = [x for x in extra if not hasattr(args, "overrides") or x.startswith("-") or "=" not in x]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = [*args.overrides, *extra]
    return args


def debugging(args: argparse.Namespace) -> bool:
    """--debug, or ARGUS_DEBUG set (to anything but 0): an error's full traceback is printed before its line."""
    return bool(getattr(args, "debug", False)) or os.environ.get("ARGUS_DEBUG", "") not in ("", "0")


def _first_to_fail() -> bool | None:
    """Under a process group of several ranks: whether this rank is the first to report an error (a counter in
    the group's store, which rank 0 or the launcher's agent holds); None without a group, or when the store is
    gone (its holder, rank 0, has exited: it failed first, or finished)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    try:
        import datetime

        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=5))
        return store.add("argus/errors", 1) == 1
    except Exception:
        return None


SILENT_RANK_GRACE_S = 3.0


def _in_group() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def prints_error(code: int) -> bool:
    """Whether this process prints its error line: the only process, or one rank of several (torchrun, the
    deepspeed launcher), so that an error every rank raises is printed once.

    Once the process group exists, the first rank to fail prints (rank 0, or another when rank 0 is fine). Before
    it exists (a config or output error: every rank raises the same one) LOCAL_RANK 0 prints: once per node. When
    the group's store is gone, a rank prints unless its error is a failed collective (a cluster error): the
    store's holder, rank 0, exited first and printed the cause."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return True
    first = _first_to_fail()
    if first is not None:
        return first
    if _in_group():
        return code != exit_codes.CLUSTER
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0) == 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.verbose:
        os.environ["ARGUS_VERBOSE"] = "1"  # trainer.logger.verbose(): read here, in ranks and in Ray workers
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return exit_codes.INTERRUPTED
    except Exception as e:
        failure = exit_codes.classify(e)
        if failure is None:
            raise  # none of ours: a bug, its traceback is what helps
        dist_module = sys.modules.get("trainer.dist")  # loaded by then if the error came from together
        if dist_module is not None and isinstance(failure.error, dist_module.PeerFailed) and _in_group():
            # another rank failed and, first in the group's counter, prints its line (trainer.dist.together);
            # exit after it, as a silent rank does: a launcher that stops the ranks once one exits could cut it off.
            # Once the group is gone (eval, export) LOCAL_RANK 0 prints, and this error carries the failing line.
            time.sleep(SILENT_RANK_GRACE_S)
            return failure.code
        # One line, naming the file, key, shard or host at fault (docs/reliability.md), with its class's code.
        if prints_error(failure.code):
            if debugging(args):
                traceback.print_exception(e, file=sys.stderr)
            print(f"argus: error: {failure.message}", file=sys.stderr, flush=True)
        elif not _in_group():
            # Every rank raised the same error, and only LOCAL_RANK 0 prints it: do not exit first, or torchrun (which
            # stops the other ranks once one exits) may stop LOCAL_RANK 0 before it has printed.
            time.sleep(SILENT_RANK_GRACE_S)
        return failure.code


def entry() -> None:
    """The ``argus`` executable (and ``python -m launch.cli``): :func:`main`, then the exit. After a command that
    made and destroyed a process group in this process (eval, export: ``trainer.dist.left_a_group``), output is
    flushed and the process ends with ``os._exit``: the destroyed group's C++ destructor, run at interpreter
    teardown, can abort the process after its work is done and printed."""
    code = main()
    dist_module = sys.modules.get("trainer.dist")
    if dist_module is not None and getattr(dist_module, "left_a_group", False):
        import logging

        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
