"""A run's checkpoints as files, without torch: the ``latest``/``best`` pointers, each checkpoint's manifest and
its verification, and retention (which checkpoints a run keeps). The trainer uses it through
``trainer/checkpoint.py`` (which re-exports the pointer functions); ``argus checkpoint list|verify`` uses it
directly, so that they start without importing torch.

- **Manifest.** ``RUN/checkpoints/step_N/manifest.json`` lists every other file of the checkpoint with its size
  and sha256, with the step, the world size and the sha256 of the saved ``config.yaml``. It is written last,
  inside ``step_N.tmp``, before the rename and the ``latest`` flip: a published checkpoint written by this
  version always has one. A checkpoint without it (an older argus) loads unverified.
- **Verification** (:func:`verify`): ``meta.json`` present, the manifest readable, and every file it lists
  present with its size and checksum. ``share=(rank, world)`` checks one rank's share of the files: ranks
  verify a checkpoint together, each reading ``1/world`` of it (``trainer/checkpoint.py: select_resume``).
- **Retention** (:class:`Retention`, :func:`prune`): a run keeps its ``train.keep_last`` newest checkpoints,
  the milestones (steps that are multiples of ``train.keep_every``), and whatever ``latest`` and ``best`` name;
  rank 0 deletes the rest after each newer checkpoint is published. Deleting is a rename to
  ``step_N.trash`` first, then removing that: a kill at any moment leaves ``latest`` and ``best`` on complete
  checkpoints, and the next prune removes what a kill left (``*.trash``, ``step_N.tmp``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

LATEST = "latest"
BEST = "best"  # the checkpoint validation selected (eval.every / eval.select), when the run validates
MANIFEST = "manifest.json"
CHECKSUM = "sha256"  # 1.09 GB/s per core, zlib.crc32 1.85 GB/s (docs/training.md): keep `sha256sum`-checkable
TMP, TRASH = ".tmp", ".trash"
_STEP = re.compile(r"step_(\d+)")
_LEFTOVER = re.compile(r"step_\d+(\.tmp|\.trash)")
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (or no usable one): one line naming the checkpoint, step and file."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: str | Path) -> int | None:
    """The step a ``step_N`` directory name stands for, or None."""
    m = _STEP.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


# ---- pointers ---------------------------------------------------------------------------------------------------
def pointer_target(run_dir: str | Path, name: str) -> Path | None:
    """The directory ``checkpoints/<name>`` names, complete or not; None without the pointer."""
    root = checkpoint_root(run_dir)
    pointer = root / name
    if not pointer.is_file():
        return None
    return root / pointer.read_text().strip()


def _pointer(run_dir: str | Path, name: str) -> Path | None:
    path = pointer_target(run_dir, name)
    if path is not None and not (path / "meta.json").is_file():
        pointer = checkpoint_root(run_dir) / name
        raise FileNotFoundError(f"{pointer}: points to {path.name}, which is incomplete or missing")
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    return _pointer(run_dir, LATEST)


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint validation selected, or None when the run kept no ``best``."""
    return _pointer(run_dir, BEST)


def set_pointer(run_dir: str | Path, name: str, checkpoint_dir: Path) -> None:
    """Atomically point ``checkpoints/<name>`` (``latest``, ``best``) at ``checkpoint_dir``."""
    root = checkpoint_root(run_dir)
    tmp = root / f"{name}.tmp"
    tmp.write_text(checkpoint_dir.name + "\n")
    os.replace(tmp, root / name)


def resolve_checkpoint(path: str | Path, prefer_best: bool = False) -> Path:
    """A checkpoint directory (has meta.json), or a run directory's ``best`` (when ``prefer_best`` and the run
    kept one) or ``latest`` checkpoint."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    found = None
    if (p / "checkpoints").is_dir():
        found = (best_checkpoint(p) if prefer_best else None) or latest_checkpoint(p)
    if found is None:
        raise FileNotFoundError(
            f"{path}: no checkpoint (expected a run directory with checkpoints/latest, "
            f"or a checkpoint directory with meta.json)"
        )
    return found


def checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """The run's published checkpoints (``step_N`` with ``meta.json``), by step."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return {}
    out = {}
    for p in root.iterdir():
        step = step_of(p)
        if step is not None and (p / "meta.json").is_file():
            out[step] = p
    return dict(sorted(out.items()))


# ---- manifest ---------------------------------------------------------------------------------------------------
def checkpoint_files(ckpt: Path) -> list[str]:
    """Every file of checkpoint ``ckpt`` but the manifest: paths relative to it, sorted."""
    return sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def describe_files(ckpt: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "sha256"}}`` for files ``names`` of ``ckpt`` (one rank's share while saving)."""
    return {n: {"size": (ckpt / n).stat().st_size, CHECKSUM: file_digest(ckpt / n)} for n in names}


def file_sizes(ckpt: Path, names: Iterable[str]) -> dict[str, int]:
    return {n: (ckpt / n).stat().st_size for n in names}


def shares(sizes: dict[str, int], world: int) -> list[list[str]]:
    """The files (name -> size) split over ``world`` ranks, about the same number of bytes each (largest first, to
    the least-loaded rank): who hashes or checks which file."""
    out: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    for size, name in sorted(((size, name) for name, size in sizes.items()), reverse=True):
        r = load.index(min(load))
        out[r].append(name)
        load[r] += size
    return out


def write_manifest(ckpt: Path, files: dict[str, dict[str, Any]], step: int, world_size: int) -> None:
    config = ckpt / "config.yaml"
    manifest = {
        "format": 1,
        "step": step,
        "world_size": world_size,
        "checksum": CHECKSUM,
        "config_sha256": file_digest(config) if config.is_file() else None,
        "bytes": sum(f["size"] for f in files.values()),
        "files": dict(sorted(files.items())),
    }
    (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=1))


def checkpoint_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())


@dataclass
class Verdict:
    """What :func:`verify` found: ``verified`` (every file matches its manifest), ``unverified`` (no manifest:
    an older argus wrote it) or ``bad`` (``problems``: one line per file at fault)."""

    path: Path
    step: int | None
    status: str
    problems: list[str] = field(default_factory=list)
    files: int = 0

    @property
    def ok(self) -> bool:
        return self.status != "bad"

    def merge(self, others: Iterable[Verdict]) -> Verdict:
        """This rank's verdict combined with the other ranks' (each checked its share of the files)."""
        problems = sorted({p for v in (self, *others) for p in v.problems})
        status = "bad" if problems else self.status
        return Verdict(self.path, self.step, status, problems, self.files)

    def line(self) -> str:
        """One line: the checkpoint, its step and the first file at fault."""
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"checkpoint {self.path} (step {self.step}) is bad: {self.problems[0]}{more}"


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    path = ckpt / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def verify(ckpt: Path, share: tuple[int, int] = (0, 1), quick: bool = False) -> Verdict:
    """Check checkpoint ``ckpt`` against its manifest (read-only). ``share=(rank, world)``: only that rank's
    share of the files (:func:`shares`; the manifest and ``meta.json`` are checked by every rank); ``quick``:
    sizes only, no checksums."""
    step = step_of(ckpt)
    if not (ckpt / "meta.json").is_file():
        return Verdict(ckpt, step, "bad", ["meta.json: missing (an incomplete checkpoint)"])
    if step is None:  # not a step_N directory (a Ray copy of an older argus): meta.json says
        try:
            step = json.loads((ckpt / "meta.json").read_text()).get("step")
        except (ValueError, AttributeError) as e:
            return Verdict(ckpt, step, "bad", [f"meta.json: unreadable ({type(e).__name__}: {e})"])
    try:
        manifest = read_manifest(ckpt)
        if manifest is not None:
            files = manifest["files"]
            step = manifest.get("step", step)
    except (ValueError, KeyError, TypeError) as e:
        return Verdict(ckpt, step, "bad", [f"{MANIFEST}: unreadable ({type(e).__name__}: {e})"])
    if manifest is None:
        return Verdict(ckpt, step, "unverified")
    rank, world = share
    names = sorted(files)
    mine = shares({n: f["size"] for n, f in files.items()}, world)[rank] if world > 1 else names
    problems = []
    for name in mine:
        want, p = files[name], ckpt / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif (size := p.stat().st_size) != want["size"]:
            problems.append(f"{name}: {size:,} bytes, the manifest says {want['size']:,}")
        elif not quick and file_digest(p) != want[CHECKSUM]:
            problems.append(f"{name}: {CHECKSUM} differs from the manifest ({want['size']:,} bytes)")
    return Verdict(ckpt, step, "bad" if problems else "verified", sorted(problems), len(names))


# ---- retention ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Retention:
    """Which checkpoints a run keeps: the ``keep_last`` newest, every milestone (a step that is a multiple of
    ``keep_every``; 0: none), and those ``latest`` and ``best`` name. Checkpoints newer than ``latest`` were
    abandoned (resume fell back past a bad one) and go too."""

    keep_last: int = 3
    keep_every: int = 0

    def keep(self, steps: Iterable[int], latest: int, best: int | None = None) -> set[int]:
        live = sorted(s for s in steps if s <= latest)
        kept = set(live[-self.keep_last :]) if self.keep_last > 0 else set()
        if self.keep_every:
            kept |= {s for s in live if s % self.keep_every == 0}
        return kept | {latest} | ({best} if best is not None else set())

    def milestone(self, step: int) -> bool:
        return bool(self.keep_every) and step % self.keep_every == 0


def discard(path: Path, mid_delete: Callable[[Path], None] | None = None) -> None:
    """Delete a checkpoint directory: rename it to ``<name>.trash`` (atomic), then remove that. A kill in
    between leaves only a ``.trash`` directory, which no pointer names and :func:`prune` removes."""
    trash = path.with_name(path.name.removesuffix(TMP) + TRASH)
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    if mid_delete is not None:
        mid_delete(trash)
    shutil.rmtree(trash)


def prune(run_dir: str | Path, policy: Retention, mid_delete: Callable[[Path], None] | None = None) -> list[str]:
    """Delete the checkpoints ``policy`` does not keep, and what interrupted saves and deletions left
    (``step_N.tmp``, ``step_N.trash``). Rank 0 only, and only while no checkpoint is being written: after a
    newer checkpoint is published (and validation has moved ``best``). Returns the names removed."""
    root = checkpoint_root(run_dir)
    latest, best = pointer_target(run_dir, LATEST), pointer_target(run_dir, BEST)
    if latest is None or not (latest / "meta.json").is_file():
        return []  # nothing published to keep: delete nothing
    removed = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and _LEFTOVER.fullmatch(p.name):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    found = checkpoints(run_dir)
    best_step = step_of(best) if best is not None and best.is_dir() else None
    keep = policy.keep(found, step_of(latest), best_step)
    for step, path in found.items():
        if step not in keep:
            try:
                discard(path, mid_delete)
                removed.append(path.name)
            except OSError as e:  # the next prune tries again
                log.warning("could not delete %s: %s", path, e)
    return removed
