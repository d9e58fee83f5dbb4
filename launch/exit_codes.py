"""Exit codes of `argus` that scripts key on, and the one place that maps the project's errors to them
(docs/reliability.md lists them, with the line each prints; a test checks that table against this module).

`launch/cli.py: main()` prints an error as one line, ``argus: error: MESSAGE``, and exits with its class's code.
The error may arrive wrapped: re-raised by a DataLoader worker (torch puts the worker's whole traceback into
the message), inside Ray Train's ``WorkerGroupError`` (one exception per failed worker), or as the cause of
another; :func:`classify` finds the project's own error inside and its one-line message.

Classes are matched by the exception class's name (on its MRO), so this module imports nothing heavy and
``argus --help`` stays fast; ``tests/test_errors.py`` checks that every project name here is a class the project
defines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

OK = 0
CHECK_FAILED = 1
"""A command ran and a check it makes failed (`cluster check`, `data verify`, `data stream`)."""
CONFIG = 2
"""Bad input: a usage error (argparse), a bad config or override, an output directory refused, a bad input file to
`data convert`; also any other library error (ValueError, OSError, RuntimeError) not in a class below."""
PLAN_DOES_NOT_FIT = 3
"""`argus plan` (and `argus plan --json`): the plan for the given hardware does not fit GPU memory. The report
(or JSON) is printed in full first, with the single changes that would fit."""
DATA = 4
"""A dataset that cannot be read: a missing or malformed manifest, a missing, truncated or corrupt shard or
sample (the line names the shard and the sample's key)."""
CHECKPOINT = 5
"""A checkpoint that cannot be found or loaded (`resume=true`, `finetune --init`, `eval`, `export`)."""
CLUSTER = 6
"""The cluster, not the job: a host the launcher cannot reach, Ray workers that do not fit or died, a collective
that failed because a peer went away."""
INTERRUPTED = 130

CLASSES: dict[str, int] = {
    # config (bad input)
    "ConfigError": CONFIG,  # trainer/config.py
    "OutputExistsError": CONFIG,  # trainer/data/outdir.py
    "ConvertError": CONFIG,  # trainer/data/convert.py
    "FaultSpecError": CONFIG,  # trainer/faults.py
    "PeerFailed": CONFIG,  # trainer/dist.py: another rank's error (together: a summary cache's ValueError)
    # data
    "ShardReadError": DATA,  # trainer/data/reader.py
    "ManifestError": DATA,  # trainer/data/manifest.py
    "PipeError": DATA,  # trainer/data/storage.py: a pipe: command that failed
    "SampleError": DATA,  # trainer/data/schema.py
    # checkpoint (also: an OSError raised in trainer/checkpoint.py or checkpoint_store.py, see CHECKPOINT_MODULES)
    "CheckpointError": CHECKPOINT,  # the name for a typed checkpoint error (trainer/checkpoint.py)
    "CheckpointException": CHECKPOINT,  # torch.distributed.checkpoint
    # cluster
    "InsufficientResources": CLUSTER,  # cluster/ray_local.py
    "HostUnreachable": CLUSTER,  # cluster/hostfile.py
    "DistError": CLUSTER,  # torch.distributed: DistBackendError, DistNetworkError, DistStoreError
    "RayActorError": CLUSTER,  # a Ray worker died (ActorDiedError)
    "WorkerCrashedError": CLUSTER,
    "NodeDiedError": CLUSTER,
    "ConnectionError": CLUSTER,  # no Ray cluster at --address, a peer that hung up
}
"""Exception class name (anywhere on its MRO) -> exit code."""

NOT_DEFINED_HERE = {
    "CheckpointException",
    "DistError",
    "RayActorError",
    "WorkerCrashedError",
    "NodeDiedError",
    "ConnectionError",
}
"""The names above that torch, Ray or Python define; every other one is a class of this project."""
RESERVED = {"CheckpointError"}
"""Mapped before any module defines it: the name trainer/checkpoint.py's typed errors are to have."""

CHECKPOINT_MODULES = (os.path.join("trainer", "checkpoint.py"), os.path.join("trainer", "checkpoint_store.py"))
"""An OSError raised in these modules (a missing or incomplete checkpoint) is a checkpoint error."""

GENERIC = (ValueError, OSError, RuntimeError)
"""Other library errors: printed as one line too, with code CONFIG."""


@dataclass(frozen=True)
class Failure:
    code: int
    message: str  # one line
    error: BaseException  # the exception the message comes from


def _raised_in(e: BaseException, modules: tuple[str, ...]) -> bool:
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.endswith(modules)


def code_of(e: BaseException) -> int | None:
    """The class's exit code of ``e`` itself (not of what it wraps), or None."""
    for cls in type(e).__mro__:
        if cls.__name__ in CLASSES:
            return CLASSES[cls.__name__]
    if isinstance(e, OSError) and _raised_in(e, CHECKPOINT_MODULES):
        return CHECKPOINT
    return None


def _inside(e: BaseException, seen: set[int] | None = None) -> Iterator[BaseException]:
    """``e``, then what it wraps, depth first: Ray Train's failed workers (lowest rank first), the exception
    Ray wraps a worker's in, and the explicit cause (``raise ... from``)."""
    seen = set() if seen is None else seen
    if id(e) in seen:
        return
    seen.add(id(e))
    yield e
    failures = getattr(e, "worker_failures", None)  # ray.train.WorkerGroupError
    if isinstance(failures, dict):
        for rank in sorted(failures):
            if isinstance(failures[rank], BaseException):
                yield from _inside(failures[rank], seen)
    for attr in ("_base_exc", "controller_failure", "cause"):  # Ray's wrappers of a worker's exception
        inner = getattr(e, attr, None)
        if isinstance(inner, BaseException):
            yield from _inside(inner, seen)
    if e.__cause__ is not None:
        yield from _inside(e.__cause__, seen)


def one_line(e: BaseException) -> str:
    """``e``'s message on one line. A DataLoader worker's error is re-raised by torch as the same type with the
    worker's traceback as its message ("Caught ShardReadError in DataLoader worker process 0. Original Traceback
    ... trainer.data.reader.ShardReadError: MESSAGE"): the original MESSAGE is its last line."""
    text = str(e)
    if "\nOriginal Traceback" in text:
        cls = type(e)
        for prefix in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
            hits = [line for line in text.splitlines() if line.startswith(prefix)]
            if hits:
                return hits[-1][len(prefix) :].strip()
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1].strip() if lines else cls.__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        return " ".join(lines)
    return lines[0] if lines else type(e).__name__


def classify(e: BaseException) -> Failure | None:
    """The exit code and one-line message for ``e``, or None when it is none of ours (a bug: show the traceback).

    The first exception on :func:`_inside`'s walk that belongs to a class in CLASSES decides; failing that, the
    first ValueError/OSError/RuntimeError (code CONFIG)."""
    chain = list(_inside(e))
    for inner in chain:
        code = code_of(inner)
        if code is not None:
            return Failure(code, one_line(inner), inner)
    for inner in chain:
        if isinstance(inner, GENERIC):
            return Failure(CONFIG, one_line(inner), inner)
    return None
