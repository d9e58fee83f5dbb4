"""A run directory (``out=``): what a run writes there, and the check every launch makes before it writes.

``out`` may be missing or empty. A directory that holds a run is refused unless ``resume=true`` (continue it)
or ``train.overwrite=true`` (start over: the run's files below are removed first) is passed; a directory holding
anything else is refused whatever is passed (:mod:`trainer.data.outdir`).

Under torchrun and the deepspeed launcher every rank checks the same directory, read-only, in
``trainer/run.py: load_job``, before any process group exists; only rank 0 removes an old run
(``trainer/run.py: train``, before it joins the group), and the trainer writes nothing before a barrier that
every rank reaches after its check. A Ray launch checks and removes in the driver, before any worker starts.
"""

from __future__ import annotations

import re
from pathlib import Path

from trainer.config import ConfigError
from trainer.data.outdir import Layout, OutputExistsError, check_output, clear_output


class RunLayout(Layout):
    """Everything a run writes in its directory (and nothing else is ever removed):

    - ``config.yaml``, ``sharding_plan.json``: ``trainer/train.py`` (Trainer, rank 0, at the start)
    - ``checkpoints/`` (``step_*``, ``latest``, ``best``): ``trainer/checkpoint.py``; while a run resumes on
      another world size also ``.universal-step_*`` (``trainer/elastic.py``, removed once loaded)
    - ``metrics.jsonl``, ``tb/``: ``trainer/logger.py`` (MetricsLogger)
    - ``validation.jsonl``: ``trainer/train.py`` (Validation); ``sample_keys/``: ``train.log_sample_keys``
    - ``ray_attempts.jsonl``: ``launch/ray_launch.py`` (one line per Ray worker-group attempt)
    """

    kind = "run"
    files = ("config.yaml", "sharding_plan.json", "metrics.jsonl", "validation.jsonl", "ray_attempts.jsonl")
    trees = ("checkpoints", "tb", "sample_keys")
    EVIDENCE = ("sharding_plan.json", "checkpoints", "metrics.jsonl")
    # Other ranks may check while rank 0 removes an old run: config.yaml goes first, so it is never left alone.
    removed_last = EVIDENCE

    def unvouched(self, root: Path) -> str | None:
        # A lone config.yaml is more likely the user's own (`argus train exp/config.yaml out=exp`) than a run's:
        # a run writes sharding_plan.json right after it.
        if (root / "config.yaml").exists() and not any((root / e).exists() for e in self.EVIDENCE):
            return "config.yaml has no run beside it"
        return None

    def describe(self, root: Path) -> str:
        step = last_step(root)
        return f"a run (checkpoints up to step {step})" if step is not None else "a run (no checkpoint yet)"


RUN = RunLayout()
REMEDY = "pass resume=true to continue it or train.overwrite=true to start over"


def last_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint (``checkpoints/step_N/meta.json``) of a run, if any."""
    steps = [
        int(m.group(1))
        for p in (run_dir / "checkpoints").glob("step_*")
        if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / "meta.json").is_file()
    ]
    return max(steps, default=None)


def check_run_dir(
    out: str | Path, resume: bool, overwrite: bool, init: str | Path | None = None, key: str = "finetune.init"
) -> bool:
    """Read-only: may a run write to ``out``? True when it holds a run that ``resume`` continues or
    ``overwrite`` replaces; False when it is missing or empty. Otherwise raises ConfigError, one line naming
    ``out`` and the settings. ``init``: the run the new one starts from (``key``), which ``out`` must not be."""
    out = Path(out)
    if resume and overwrite:
        raise ConfigError("resume=true and train.overwrite=true: pick one (continue the run in out, or start it over)")
    if init:
        pre, run = Path(init).resolve(), out.resolve()
        if pre == run or run in pre.parents or pre in run.parents:
            raise ConfigError(f"out {out}: is {key}'s run; the run that starts from it needs a directory of its own")
    try:
        return check_output(out, RUN, overwrite=resume or overwrite, flag="train.overwrite=true", remedy=REMEDY)
    except OutputExistsError as e:
        raise ConfigError(str(e)) from None


def start_over(out: str | Path) -> None:
    """Remove an earlier run's files from ``out`` (``train.overwrite=true``); once, before anything is written."""
    try:
        clear_output(out, RUN)
    except OutputExistsError as e:
        raise ConfigError(str(e)) from None
