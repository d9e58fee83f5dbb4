"""The one place that picks device and collective backend (cpu+gloo here, cuda+nccl on GPU clusters)."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU when CUDA is available, else the CPU."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu or cuda, got {preference!r}")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but torch.cuda.is_available() is False")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def env_rank() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun, the deepspeed launcher or Ray Train."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(preference: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the default process group (env:// rendezvous when WORLD_SIZE > 1, an in-process store otherwise).

    The timeout is always set: a TorchRec planner error is raised on rank 0 only,
    and the other ranks would otherwise wait on the collective forever.
    """
    rank, world, local = env_rank()
    for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local)):
        os.environ.setdefault(key, str(value))  # DeepSpeed reads these even when the group exists
    device = pick_device(preference, local)
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if world > 1:
            dist.init_process_group(backend=backend, timeout=timeout, rank=rank, world_size=world)
        else:
            # A one-process group keeps a single code path: TorchRec's DMP and DeepSpeed both expect one.
            dist.init_process_group(backend=backend, timeout=timeout, rank=0, world_size=1, store=dist.HashStore())
    return DistInfo(rank, world, local, device, backend)


@contextlib.contextmanager
def process_group(preference: str = "auto", timeout_s: float = 600.0) -> Iterator[DistInfo]:
    """:func:`init_distributed` for one collective call (eval, export): a group started here is left here, a
    caller's (a Ray worker's, training's validation) is kept.

    On success every rank meets at a barrier before the group is destroyed, so no rank tears its sockets down
    while a peer is still in its last collective; on an error there is no barrier (the peers may never reach
    it). What is left of the destroyed group is :data:`left_a_group`'s concern."""
    global left_a_group
    owns = not dist.is_initialized()
    info = init_distributed(preference, timeout_s)
    try:
        yield info
        if owns:
            dist.barrier()
    finally:
        if owns:
            dist.destroy_process_group()
            left_a_group = True


class PeerFailed(ValueError):
    """Raised by :func:`together` on a rank whose own work was fine, with the failing rank's line: within a
    group the CLI leaves the printing to the failing rank; once the group is gone, it prints this line where the
    failing rank's would be silent (launch/cli.py)."""


def together(work: Callable[[], T], device: torch.device) -> T:
    """Collective: ``work()``'s result on every rank, or, when it raises a ValueError on any rank (bad input, e.g. a
    summary cache newer than the data), every rank stops: a failing rank raises its own, the others
    :class:`PeerFailed` with the first failing rank's line, so none is left waiting in a later collective for a
    rank that stopped (NCCL would wait until the group's timeout). One flag all-reduce when none failed; nothing
    more without a group of several ranks."""
    result, error = None, None
    try:
        result = work()
    except ValueError as e:
        error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([float(error is not None)], device=device)
        dist.all_reduce(flag)
        if flag.item():
            lines: list[str | None] = [None] * dist.get_world_size()
            dist.all_gather_object(lines, None if error is None else str(error))
            if error is None:
                raise PeerFailed(next((line for line in lines if line is not None), "another rank failed"))
    if error is not None:
        raise error
    return cast(T, result)  # work() returned it: no error on any rank


left_a_group = False
"""Whether :func:`process_group` destroyed a group in this process. TorchRec's sharded modules keep the destroyed
gloo group alive from C++ (measured: it outlives ``destroy_process_group`` and ``gc.collect``), and its destructor
at interpreter exit, or in a process forked later, can abort ("terminate called without an active exception",
seen once in CI on a rank of `argus eval`): ``launch/cli.py: entry`` then ends the process without tearing it
down."""
