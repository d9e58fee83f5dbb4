"""Fault drills for every launcher (plain, torchrun, the deepspeed launcher, Ray): a rank kills itself at a chosen
point, so that recovery can be rehearsed and tested.

``ARGUS_FAULT_INJECT="rank=R,step=S,once=PATH[,phase=step|checkpoint|prune][,delay=SEC][;...]"``: rank R
SIGKILLs itself once (PATH marks that it happened):

- ``phase=step`` (the default): right after optimizer step S;
- ``phase=checkpoint``: in the middle of writing the step-S checkpoint (dense states written, sparse tables not
  yet, nothing published);
- ``phase=prune``: while deleting the checkpoints retention drops after the step-S checkpoint was published
  (the first one renamed to ``step_N.trash``, not yet removed).

``delay`` waits that long first (the other ranks block in their next collective meanwhile). Several faults are
separated by ``;``; each fires at most once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.train import Trainer

ENV = "ARGUS_FAULT_INJECT"
PHASES = ("step", "checkpoint", "prune")
_KEYS = {"rank", "step", "once", "phase", "delay"}


class FaultSpecError(ValueError):
    """A malformed ``ARGUS_FAULT_INJECT``; the message names the part at fault."""


def parse_faults(spec: str, world_size: int | None = None) -> list[dict[str, str]]:
    """The faults of ``spec``, checked: a launcher refuses a drill that would never fire (or crash every rank) with
    one line, before any work (``world_size``: the ranks it will start, when known)."""
    faults = []
    for part in spec.split(";"):
        if not part.strip():
            continue
        where = f"{ENV}: {part.strip()!r}"
        pairs = [kv.strip().split("=", 1) for kv in part.split(",")]
        if any(len(kv) != 2 for kv in pairs):
            raise FaultSpecError(f"{where}: expected key=value pairs separated by ',' (rank=R,step=S,once=PATH)")
        f = {k: v for k, v in pairs}
        if missing := sorted({"rank", "step", "once"} - f.keys()):
            raise FaultSpecError(f"{where}: missing {', '.join(missing)}")
        if unknown := sorted(f.keys() - _KEYS):
            raise FaultSpecError(f"{where}: unknown key {unknown[0]} (known: {', '.join(sorted(_KEYS))})")
        for key, conv in (("rank", int), ("step", int), ("delay", float)):
            try:
                if key in f and conv(f[key]) < 0:
                    raise ValueError
            except ValueError:
                raise FaultSpecError(f"{where}: {key} must be a number >= 0, got {f[key]!r}") from None
        if f.get("phase", "step") not in PHASES:
            raise FaultSpecError(f"{where}: phase must be one of {', '.join(PHASES)}, got {f['phase']!r}")
        if world_size is not None and int(f["rank"]) >= world_size:
            raise FaultSpecError(f"{where}: rank {f['rank']} does not exist with --num-workers {world_size}")
        faults.append(f)
    return faults


def install(trainer: Trainer, spec: str | None = None) -> None:
    """Set the trainer's hooks for the faults ``spec`` (default ``$ARGUS_FAULT_INJECT``) gives its rank (none:
    nothing changes)."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    rank = trainer.info.rank
    mine = [f for f in parse_faults(spec) if int(f["rank"]) == rank and not Path(f["once"]).exists()]
    if not mine:
        return

    def fire(phase: str, step: int, detail: str) -> None:
        for f in mine:
            if f.get("phase", "step") == phase and int(f["step"]) == step and not Path(f["once"]).exists():
                time.sleep(float(f.get("delay", 0)))
                Path(f["once"]).write_text(f"rank {rank} killed at {phase} {step}{detail}\n")
                os.kill(os.getpid(), signal.SIGKILL)

    def latest(tr: Trainer) -> str:
        pointer = tr.run_dir / "checkpoints" / "latest"
        return pointer.read_text().strip() if pointer.is_file() else "none"

    trainer.after_step = lambda tr, step: fire("step", step, "")
    trainer.mid_checkpoint = lambda tr, tmp: fire("checkpoint", tr.step, f"; latest={latest(tr)}; writing={tmp.name}")
    trainer.mid_prune = lambda tr, trash: fire("prune", tr.step, f"; latest={latest(tr)}; deleting={trash.name}")
