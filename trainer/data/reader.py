"""Reading samples out of shards by global index, sequentially, with named errors.

Shards are ordinary tars; the stdlib ``tarfile`` walks their headers and seeks
past members that are not needed (already consumed, or another worker's), so
skipping costs one 512-byte header read per member, never the payload.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from trainer.data.manifest import Manifest
from trainer.data.schema import MEMBER_EXT, Sample, SampleError, decode_sample


class ShardReadError(RuntimeError):
    """A shard that is missing, truncated or holds a corrupt sample; the message names shard and key."""


@dataclass
class ShardTable:
    """The shards of one split, in manifest order, with their sample counts."""

    root: Path
    paths: list[str]
    counts: np.ndarray

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: str) -> "ShardTable":
        info = manifest.split(split)
        return cls(manifest.root, [s.path for s in info.shards], np.array([s.samples for s in info.shards], np.int64))

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())


def iter_members(path: Path, wanted: np.ndarray) -> Iterator[tuple[int, str, bytes]]:
    """Yield (local index, key, payload) for the sorted local indices ``wanted`` of one shard.

    Stops after the last wanted member. Raises ShardReadError if the shard ends
    before it (a truncated tar can look like a shorter valid one).
    """
    if wanted.size == 0:
        return
    last = int(wanted[-1])
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ShardReadError(f"shard {path}: cannot open ({e.strerror})") from None
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as e:
            raise ShardReadError(f"shard {path}: not a readable tar ({e})") from None
        k = 0  # position in wanted
        local = -1
        key = "<start of shard>"
        while True:
            try:
                m = tar.next()
            except (tarfile.TarError, OSError, EOFError) as e:
                raise ShardReadError(f"shard {path}: broken after key {key!r} ({e})") from None
            if m is None:
                raise ShardReadError(f"shard {path}: ends after {local + 1} samples but sample #{last} was expected "
                                     f"(truncated? last key {key!r})")
            tar.members.clear()  # tarfile keeps every header otherwise
            if not m.isfile():
                continue
            local += 1
            key, _, ext = m.name.partition(".")
            if ext != MEMBER_EXT:
                raise ShardReadError(f"shard {path}: member {m.name!r} is not a .{MEMBER_EXT} sample")
            if local == wanted[k]:
                f.seek(m.offset_data)
                payload = f.read(m.size)
                if len(payload) != m.size:
                    raise ShardReadError(f"shard {path}: sample {key!r} is cut short "
                                         f"({len(payload)} of {m.size} bytes; truncated tar)")
                yield local, key, payload
                k += 1
                if local == last:
                    return


class SampleReader:
    """Reads samples by global index for one epoch's shard permutation.

    ``on_error="raise"`` (default) raises ShardReadError naming shard and key;
    ``"skip"`` yields ``None`` for each sample that could not be read, so the
    caller can count every one of them.
    """

    def __init__(self, table: ShardTable, perm: np.ndarray, on_error: str = "raise") -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r}: expected 'raise' or 'skip'")
        self.table, self.perm, self.on_error = table, perm, on_error
        self.cum = np.concatenate([[0], np.cumsum(table.counts[perm])])
        self.errors: list[str] = []

    def read(self, indices: Sequence[int] | np.ndarray) -> Iterator[tuple[int, Sample | None]]:
        """Yield (global index, sample or None) for sorted global ``indices``, in that order."""
        idx = np.asarray(indices, np.int64)
        if idx.size and (idx[0] < 0 or idx[-1] >= self.cum[-1]):
            raise IndexError(f"sample index out of range [0, {self.cum[-1]})")
        pos = np.searchsorted(self.cum, idx, side="right") - 1  # position in the permuted shard list
        cuts = np.flatnonzero(np.diff(pos)) + 1
        for run in np.split(np.arange(idx.size), cuts):
            if run.size == 0:
                continue
            j = int(pos[run[0]])
            shard = self.table.root / self.table.paths[self.perm[j]]
            local = idx[run] - self.cum[j]
            done = 0
            try:
                for _, key, payload in iter_members(shard, local):
                    try:
                        sample = decode_sample(key, payload)
                    except SampleError as e:
                        if self.on_error == "raise":
                            raise ShardReadError(f"shard {shard}: {e}") from None
                        self.errors.append(f"shard {shard}: {e}")
                        sample = None
                    yield int(idx[run[done]]), sample
                    done += 1
            except ShardReadError as e:
                if self.on_error == "raise":
                    raise
                self.errors.append(str(e))
                for r in run[done:]:
                    yield int(idx[r]), None
