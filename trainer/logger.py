"""Training metrics on rank 0: JSONL (the record), TensorBoard (the plots), a rich progress line (the eyes).

Stable metric names (dashboards and the benchmark docs key on these):

========================  =====================================================
``loss/total``            optimised loss (weighted sum of the heads)
``loss/next_item``        next-item sampled-softmax loss
``loss/feedback``         feedback (event / played) prediction loss
``ne/event``              normalised entropy of the event head (1.0 = prior)
``ne/played``             normalised entropy of the played-ratio head
``ne/next_item``          normalised entropy of the next-item head
``tps``                   tokens (history positions) per second, all ranks
``interactions_per_s``    training interactions per second, all ranks
``tflops``                achieved model TFLOP/s per GPU (trainer.flops)
``mfu(%)``                model FLOPs utilisation, percent; null on CPU
``memory/peak_gb``        peak memory of this process, GB (peak_memory_bytes)
``time/data_share``       share of the window's wall time spent waiting on data
``lr``                    learning rate of the first param group
========================  =====================================================

Any key under ``loss/``, ``ne/``, ``memory/``, ``time/`` or ``eval/`` is also
stable; other keys are logged but warned about once, so typos surface early.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

STABLE_NAMES: tuple[str, ...] = (
    "loss/total",
    "loss/next_item",
    "loss/feedback",
    "loss/reconstruction",
    "ne/event",
    "ne/played",
    "ne/next_item",
    "tps",
    "interactions_per_s",
    "tflops",
    "mfu(%)",
    "memory/peak_gb",
    "time/data_share",
    "tokens/padding_share",
    "tokens/rank_skew",
    "data/retries",
    "data/skipped",
    "lr",
    # fine-tuning
    "loss/pairwise",
    "pairwise_acc/train",
    "impressions",
    "impressions_no_history",
    "impressions_per_s",
)
STABLE_PREFIXES: tuple[str, ...] = ("loss/", "ne/", "memory/", "time/", "eval/", "tokens/")
_RESERVED = ("step", "time")


def is_stable_name(key: str) -> bool:
    return key in STABLE_NAMES or key.startswith(STABLE_PREFIXES)


def _scalar(key: str, value: Any) -> float | int | None:
    """A plain Python number (or None) from a float, int, 0-d tensor or numpy scalar."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {key!r}: expected a scalar tensor, got shape {tuple(value.shape)}")
        value = value.item()
    elif hasattr(value, "item"):  # numpy scalars
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__}") from None


class MetricsLogger:
    """Writes ``out_dir/metrics.jsonl`` and ``out_dir/tb``; every method is a no-op off rank 0.

    The JSONL file is appended to (a resumed run continues it) and flushed per
    line, so it survives a crash. Non-finite values are written as Python's json
    does (``NaN``/``Infinity``), None as ``null`` (and skipped in TensorBoard).
    """

    def __init__(
        self,
        out_dir: str | Path,
        rank: int = 0,
        total_steps: int | None = None,
        enabled_tensorboard: bool = True,
        progress: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.total_steps = total_steps
        self.enabled = rank == 0
        self._warned: set[str] = set()
        self._file = None
        self._tb = None
        self._progress = None
        self._task = None
        self._console = None
        self._closed = False
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8", buffering=1)
        if enabled_tensorboard:
            # Imported here: tensorboard is slow to import and unused off rank 0.
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"))
        if progress:
            from rich.console import Console

            self._console = Console(stderr=True)
            if self._console.is_terminal:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

                self._progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"),
                    console=self._console,
                )
                self._progress.start()
                self._task = self._progress.add_task(self._step_text(0), total=total_steps, info="")

    def _step_text(self, step: int) -> str:
        return f"step {step}/{self.total_steps if self.total_steps is not None else '?'}"

    @staticmethod
    def _summary(values: dict[str, float | int | None]) -> str:
        parts = []
        for key, label in (
            ("loss/total", "loss"),
            ("loss/pairwise", "loss"),  # fine-tuning's loss (it logs no loss/total)
            ("tps", "tps"),
            ("mfu(%)", "mfu%"),
            ("lr", "lr"),
        ):
            v = values.get(key)
            if v is None:
                continue
            parts.append(f"{label} {v:.3g}" if key in ("lr",) or abs(v) < 1e4 else f"{label} {v:,.0f}")
        return "  ".join(parts)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one JSON line, add TensorBoard scalars and advance the progress bar."""
        if not self.enabled:
            return
        if self._closed:
            raise RuntimeError("MetricsLogger.log after close()")
        values: dict[str, float | int | None] = {}
        for key, value in metrics.items():
            if key in _RESERVED:
                raise ValueError(f"metric name {key!r} is reserved for the record itself")
            if not is_stable_name(key) and key not in self._warned:
                self._warned.add(key)
                warnings.warn(
                    f"metric {key!r} is not a stable name (trainer.logger.STABLE_NAMES or a prefix "
                    f"in {STABLE_PREFIXES}); dashboards will not pick it up",
                    stacklevel=2,
                )
            values[key] = _scalar(key, value)
        record = {"step": int(step), "time": time.time(), **values}
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, v in values.items():
                if v is not None:
                    self._tb.add_scalar(key, v, global_step=int(step))
        info = self._summary(values)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step, description=self._step_text(step), info=info)
        elif self._console is not None:
            # Not a terminal (cluster log files): one plain line per call instead of a redrawn bar.
            self._console.print(f"{self._step_text(step)}  {info}", highlight=False, soft_wrap=True)

    def flush(self) -> None:
        if self._file is not None and not self._closed:
            self._file.flush()
        if self._tb is not None and not self._closed:
            self._tb.flush()

    def close(self) -> None:
        """Flush and release everything; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process on ``device``: CUDA allocator peak, or peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux but bytes on macOS.
    return int(peak if sys.platform == "darwin" else peak * 1024)


class StepTimer:
    """Splits a logging window's wall time into data loading and compute.

    ``with timer.data(): batch = next(it)`` / ``with timer.compute(): step(batch)``;
    ``summary()`` returns the window's numbers and starts a new window. The
    window opens at the first block after a reset, so setup time is not counted;
    time outside both blocks lowers both shares. The blocks read the host clock
    only: on CUDA the data share is the time the host waited for the loader, and
    the device is synchronised once per window, in ``summary()``, so a step never
    waits for its kernels (``sync=True`` syncs every block instead, to bill queued
    kernels to the block that launched them, at the cost of the CPU/GPU overlap).
    """

    def __init__(self, device: torch.device | None = None, sync: bool = False) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.sync = sync
        self.reset()

    def reset(self) -> None:
        self._start: float | None = None
        self._data_s = 0.0
        self._compute_s = 0.0
        self._steps = 0

    def _now(self, sync: bool | None = None) -> float:
        if (self.sync if sync is None else sync) and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def _block(self, kind: str) -> Iterator[None]:
        t0 = self._now()
        if self._start is None:
            self._start = t0
        try:
            yield
        finally:
            dt = self._now() - t0
            if kind == "data":
                self._data_s += dt
            else:
                self._compute_s += dt
                self._steps += 1

    def data(self) -> contextlib.AbstractContextManager[None]:
        return self._block("data")

    def compute(self) -> contextlib.AbstractContextManager[None]:
        """One compute block counts as one step unless ``summary(steps=...)`` says otherwise."""
        return self._block("compute")

    def summary(self, steps: int | None = None) -> dict[str, float]:
        """``time/step_s``, ``time/data_share``, ``time/compute_share`` for the window; then resets."""
        now = self._now(sync=True)
        wall = now - self._start if self._start is not None else 0.0
        n = steps if steps is not None else self._steps
        out = {
            "time/step_s": wall / n if n else math.nan,
            "time/data_share": self._data_s / wall if wall > 0 else math.nan,
            "time/compute_share": self._compute_s / wall if wall > 0 else math.nan,
        }
        self.reset()
        return out


VERBOSE_ENV = "ARGUS_VERBOSE"


def verbose(environ: Mapping[str, str] | None = None) -> bool:
    """``argus --verbose`` (or ARGUS_VERBOSE set to anything but 0): third-party start-up chatter is shown."""
    return (os.environ if environ is None else environ).get(VERBOSE_ENV, "") not in ("", "0")


class _FbgemmInfo(logging.Filter):
    """fbgemm_gpu logs through the root logger at INFO: 14 "Successfully loaded" lines at import and a 10-line
    argument dump per embedding kernel. Silent wherever the root logger prints INFO (Ray workers do)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}fbgemm_gpu{os.sep}" not in record.pathname


def quiet_library_logs() -> None:
    """Silence known-harmless library chatter in entry points (argus train/eval, Ray workers), unless
    ``--verbose`` (:func:`verbose`).

    TorchRec's planner warns about how its Topology was built and its storage heuristic, torch's fx
    tracer and c10d about deprecations, DeepSpeed about falling back to the CPU accelerator, fbgemm_gpu
    (imported by TorchRec) about its own modules' deprecations (shown under ``-W default``, ``-X dev`` or
    pytest) and, where INFO is printed, about every library it loads; none of it is actionable for a user and it
    buries the progress lines. Call it before importing the modules that import those libraries: some warn at
    import.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise warns at import
    if verbose():
        return
    root = logging.getLogger()
    if not any(isinstance(f, _FbgemmInfo) for f in root.filters):
        root.addFilter(_FbgemmInfo())
    for name in ("torchrec", "torch.fx._symbolic_trace", "torch.distributed.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchrec\..*")
    # TorchRec's sharded modules script their helpers with torch.jit, which torch 2.13 deprecates
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"`torch\.jit\.\w+` is deprecated")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"fbgemm_gpu(\..*)?$")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*all_gather_into_tensor.*")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*set_vital.*")
