"""Exit codes of `argus` that scripts key on (docs/reliability.md lists them with the line each prints).

Besides 0: 1 when a command ran and a check it makes failed (`cluster check`, `data verify`, `data stream`),
2 for a usage error (argparse) or a library error (`launch/cli.py: main()` prints it as one line).
"""

from __future__ import annotations

PLAN_DOES_NOT_FIT = 3
"""`argus plan` (and `argus plan --json`): the plan for the given hardware does not fit GPU memory. The report
(or JSON) is printed in full first, with the single changes that would fit."""
