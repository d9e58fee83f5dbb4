"""Wall time of `argus --help` and of every subcommand's `--help` (fresh interpreter each time).

    python bench/cli_startup.py [--repeat 5] [--json]

Each command runs ``--repeat`` times in a new process (``python -m launch.cli ... --help``); the table shows
the median and the slowest. Printing help must import neither torch nor any other heavy library.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def commands() -> list[list[str]]:
    """Every command path of the parser: [], [data], [data, synth], ..."""
    sys.path.insert(0, str(REPO))
    from launch.cli import build_parser

    out: list[list[str]] = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        out.append(path)
        for action in parser._actions:  # argparse has no public accessor for subparsers
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])

    walk(build_parser(), [])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    rows = []
    for path in commands():
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "launch.cli", *path, "--help"],
                cwd=REPO,
                check=True,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            times.append(time.perf_counter() - t0)
        rows.append(
            {"command": " ".join(["argus", *path, "--help"]), "median_s": statistics.median(times), "max_s": max(times)}
        )
        if not a.json:
            print(
                f"{rows[-1]['command']:<45} median {rows[-1]['median_s']:.2f} s   max {rows[-1]['max_s']:.2f} s",
                flush=True,
            )
    if a.json:
        json.dump(
            {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "repeat": a.repeat, "results": rows},
            sys.stdout,
            indent=1,
        )
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
