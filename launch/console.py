"""What the command-line modules share: the rich console they print to, and --json output."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

console = Console(stderr=False)


def print_json(obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON on stdout (what every ``--json`` prints)."""
    sys.stdout.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
