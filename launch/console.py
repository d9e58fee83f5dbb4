"""What the command-line modules share: the rich console they print to, and --json output."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console, ConsoleDimensions

PIPED_WIDTH = 10_000
"""Columns when stdout is not a terminal (a pipe, a file, a CI log): wide enough that no table or line is cut."""


class _Console(Console):
    """rich's Console, except that output to a pipe or a file is not cut to 80 columns (rich's default when it
    finds no terminal): scripts and log files get every column. A terminal's own width, or ``COLUMNS`` set in
    the environment, still apply."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and not self.is_terminal and not self._environ.get("COLUMNS", "").isdigit():
            return ConsoleDimensions(PIPED_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


console = _Console(stderr=False)


def print_json(obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON on stdout (what every ``--json`` prints)."""
    sys.stdout.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
