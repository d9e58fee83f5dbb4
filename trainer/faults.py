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


def install(trainer: Trainer) -> None:
    """Set the trainer's hooks for the faults ``$ARGUS_FAULT_INJECT`` gives its rank (none: nothing changes)."""
    spec = os.environ.get(ENV, "")
    rank = trainer.info.rank
    faults = [dict(kv.split("=", 1) for kv in part.split(",")) for part in spec.split(";") if part.strip()]
    mine = [f for f in faults if int(f["rank"]) == rank and not Path(f["once"]).exists()]
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
