"""Reading samples out of shards by global index, sequentially, with named errors.

Shards are ordinary tars (any tar tool reads them). The loader walks their
ustar headers itself over an mmap: members that are not needed (already
consumed, or another worker's) cost one header read, never the payload.
Shards at a URL (storage.py) are read with range requests placed by each
shard's sample index.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from trainer.data.manifest import Manifest
from trainer.data.schema import MEMBER_EXT, Sample, SampleError, decode_sample
from trainer.data.storage import (
    PipeLocation,
    cached_shard,
    is_remote,
    local_copy,
    read_bytes,
    read_range,
    redact,
)

READ_AHEAD = 8 << 20  # data.read_ahead's default: remote range reads span up to 8 MiB of consecutive samples


class ShardReadError(RuntimeError):
    """A shard that is missing, truncated or holds a corrupt sample; the message names shard and key."""


@dataclass
class ShardTable:
    """The shards of one split, in manifest order, with their sample counts."""

    root: Any  # a Path, or a UPath for a dataset URL (storage.py)
    paths: list[str]
    counts: np.ndarray
    lengths: list[str] = field(default_factory=list)  # per-shard sample-length tables ("" = none written)
    lengths_sha256: list[str] = field(default_factory=list)
    index: list[str] = field(default_factory=list)  # per-shard sample byte offsets ("" = none written)
    index_sha256: list[str] = field(default_factory=list)
    read_ahead: int = READ_AHEAD  # remote data: bytes one range read may span
    sha256: list[str] = field(default_factory=list)
    cache_bytes: int = 0  # remote data: > 0 keeps whole shards in a local cache of at most this many bytes
    _index_cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: str, read_ahead: int = 0, cache_bytes: int = 0) -> "ShardTable":
        info = manifest.split(split)
        return cls(
            manifest.root,
            [s.path for s in info.shards],
            np.array([s.samples for s in info.shards], np.int64),
            [s.lengths for s in info.shards],
            [s.lengths_sha256 for s in info.shards],
            [s.index for s in info.shards],
            [s.index_sha256 for s in info.shards],
            read_ahead or READ_AHEAD,
            [s.sha256 for s in info.shards],
            cache_bytes,
        )

    def members(self, i: int, wanted: np.ndarray) -> Iterator[tuple[int, str, bytes | memoryview]]:
        """(local index, key, payload) of shard ``i``'s sorted local samples ``wanted``: an mmap walk for a local
        shard, range reads for a remote one."""
        path = self.root / self.paths[i]
        if not is_remote(path):
            return iter_members(path, wanted)
        if self.cache_bytes and i < len(self.sha256) and self.sha256[i]:
            return self._cached(i, path, wanted)
        return iter_remote_members(path, wanted, self._offsets(i), self.read_ahead)

    def _cached(self, i: int, path: Any, wanted: np.ndarray) -> Iterator[tuple[int, str, bytes | memoryview]]:
        try:
            f = cached_shard(path, self.sha256[i], self.cache_bytes)
        except OSError as e:
            raise _fetch_error(path, e) from None
        yield from iter_file_members(f, redact(path), wanted)

    def _offsets(self, i: int) -> np.ndarray | None:
        """Shard ``i``'s sample index (None: a version-1 dataset), fetched once per process."""
        rel = self.index[i] if i < len(self.index) else ""
        if not rel:
            return None
        if i not in self._index_cache:
            where = self.root / rel
            try:
                self._index_cache[i] = np.load(local_copy(where, self.index_sha256[i]))
            except OSError as e:
                raise _fetch_error(where, e) from None
        return self._index_cache[i]

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    def shard_lengths(self) -> list[np.ndarray]:
        """Every sample's interaction count, per shard in manifest order: from the tables the writer left
        beside the shards, or, for shards written without one, by reading the shard once."""
        out = []
        for i in range(len(self.paths)):
            rel = self.lengths[i] if i < len(self.lengths) else ""
            if rel:
                sha = self.lengths_sha256[i] if i < len(self.lengths_sha256) else ""
                try:
                    arr = np.load(local_copy(self.root / rel, sha)).astype(np.int64)
                except OSError as e:
                    raise _fetch_error(self.root / rel, e) from None
                if arr.shape != (int(self.counts[i]),):
                    raise ShardReadError(f"{rel}: holds {arr.shape[0]} lengths, the manifest says {self.counts[i]}")
            else:
                local = np.arange(int(self.counts[i]))
                arr = np.fromiter(
                    (len(decode_sample(key, p)) for _, key, p in self.members(i, local)),
                    np.int64,
                    local.size,
                )
            out.append(arr)
        return out


_BLOCK = 512
_REGULAR = (b"0", b"\0")


def _octal(field: bytes) -> int:
    """A tar header's octal number; garbage (a shard overwritten, or not a tar) is a ValueError _walk names."""
    field = field.rstrip(b"\0 ").lstrip(b" ")
    return int(field, 8) if field else 0


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        length = int(data[pos : data.index(b" ", pos)])
        key, _, value = data[pos : pos + length].partition(b" ")[2].rstrip(b"\n").partition(b"=")
        out[key.decode()] = value.decode()
        pos += length
    return out


def iter_members(path: Path, wanted: np.ndarray) -> Iterator[tuple[int, str, bytes | memoryview]]:
    """Yield (local index, key, payload) for the sorted local indices ``wanted`` of one shard.

    Walks ustar headers over an mmap (checksums verified; pax and GNU long-name
    headers understood). Python's ``tarfile`` spends ~40 us per member parsing
    headers, which capped reading at ~26k samples/s/core; skipping a member
    here costs one header read and no payload I/O.

    Stops after the last wanted member. Raises ShardReadError if the shard ends
    before it (a truncated tar can look like a shorter valid one).
    """
    if wanted.size == 0:
        return
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ShardReadError(f"shard {path}: cannot open ({e.strerror})") from None
    yield from iter_file_members(f, path, wanted)


def iter_file_members(f: Any, path: Any, wanted: np.ndarray) -> Iterator[tuple[int, str, bytes | memoryview]]:
    """:func:`iter_members` of an open shard file ``f`` (closed here; ``path`` names it in messages)."""
    if wanted.size == 0:
        f.close()
        return
    last = int(wanted[-1])
    with f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ShardReadError(f"shard {path}: empty file, but sample #{last} was expected")
        # Not closed explicitly: payload views handed out keep it alive; it is unmapped when the last goes.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    yield from _walk(path, memoryview(mm), size, wanted, last)


def _fetch_error(path: Any, e: OSError) -> ShardReadError:
    what = "not found" if isinstance(e, FileNotFoundError) else f"cannot read ({e})"
    return ShardReadError(redact(f"shard {path}: {what}"))


def iter_remote_members(
    path: Any, wanted: np.ndarray, offsets: np.ndarray | None, read_ahead: int
) -> Iterator[tuple[int, str, bytes | memoryview]]:
    """:func:`iter_members` for a shard at a URL: range reads, never the whole object first.

    With the shard's sample index (``offsets``: where each sample's header starts, then the end) the wanted
    samples are read in spans of consecutive samples of at most ``read_ahead`` bytes (one sample more when a single
    sample is larger), each one range request, retried on transient failures (storage.py); the samples between two
    wanted ones in a span are read and skipped, cheaper than another request when they are few. Without an index
    (a version-1 dataset), or from a ``pipe:`` command (sequential only), the shard is read once from its start up to
    the last wanted sample."""
    if wanted.size == 0:
        return
    last = int(wanted[-1])
    if offsets is None or isinstance(path, PipeLocation):  # one sequential read, up to the last wanted sample
        try:
            upto = -1 if offsets is None else int(offsets[min(last + 1, len(offsets) - 1)])
            data = read_bytes(path) if upto < 0 else read_range(path, 0, upto)
        except OSError as e:
            raise _fetch_error(path, e) from None
        yield from _walk(redact(path), memoryview(data), len(data), wanted, last)
        return
    if offsets.shape[0] <= last + 1:
        raise ShardReadError(f"shard {redact(path)}: its index covers {offsets.shape[0] - 1} samples, #{last} wanted")
    k = 0
    while k < wanted.size:
        first = int(wanted[k])
        end = k + 1  # extend the span while it stays within read_ahead bytes
        while end < wanted.size and offsets[int(wanted[end]) + 1] - offsets[first] <= read_ahead:
            end += 1
        stop = int(wanted[end - 1])
        start_b, end_b = int(offsets[first]), int(offsets[stop + 1])
        try:
            data = read_range(path, start_b, end_b)
        except FileNotFoundError:
            raise ShardReadError(f"shard {redact(path)}: not found (sample #{first} wanted)") from None
        except OSError as e:
            raise ShardReadError(redact(f"shard {path}: cannot read sample #{first} ({e})")) from None
        if len(data) != end_b - start_b:
            raise ShardReadError(
                f"shard {redact(path)}: sample #{stop} is cut short (got {len(data)} of {end_b - start_b} bytes: "
                "truncated or changed since it was indexed?)"
            )
        # the span holds samples first..stop; walk it with local numbering from `first`
        span = wanted[k:end] - first
        for local, key, payload in _walk(redact(path), memoryview(data), len(data), span, int(span[-1])):
            yield local + first, key, payload
        k = end


def _walk(
    path: Any, view: memoryview, size: int, wanted: np.ndarray, last: int
) -> Iterator[tuple[int, str, bytes | memoryview]]:
    off, k, local = 0, 0, -1
    key = "<start of shard>"
    override: dict[str, str] = {}
    while True:
        if off + _BLOCK > size:
            raise ShardReadError(
                f"shard {path}: ends after {local + 1} samples but sample #{last} was expected "
                f"(truncated? last key {key!r})"
            )
        header = bytes(view[off : off + _BLOCK])
        if header == bytes(_BLOCK):  # end-of-archive marker
            raise ShardReadError(
                f"shard {path}: holds {local + 1} samples but sample #{last} was expected (last key {key!r})"
            )
        try:
            checksum_ok = _octal(header[148:156]) == sum(header) - sum(header[148:156]) + 8 * 32
            msize = int(override.get("size", _octal(header[124:136])))
        except ValueError:
            checksum_ok = False
        if not checksum_ok:
            raise ShardReadError(f"shard {path}: bad tar header checksum after key {key!r} (corrupt or truncated)")
        data_at = off + _BLOCK
        off = data_at + -(-msize // _BLOCK) * _BLOCK
        kind = header[156:157]
        regular = kind in _REGULAR
        if regular:
            prefix = header[345:500].rstrip(b"\0") if header[257:263] == b"ustar\0" else b""
            name = (
                override.get("path") or (prefix.decode() + "/" if prefix else "") + header[:100].rstrip(b"\0").decode()
            )
            key, _, ext = name.rpartition("/")[2].partition(".")
        if data_at + msize > size:
            what = f"sample {key!r}" if regular else f"header after key {key!r}"
            raise ShardReadError(f"shard {path}: {what} is cut short (truncated tar)")
        if kind in (b"x", b"L"):  # pax extended header / GNU long name: applies to the next member
            data = bytes(view[data_at : data_at + msize])
            override = _pax_records(data) if kind == b"x" else {"path": data.rstrip(b"\0").decode()}
            continue
        override = {}
        if not regular:  # directories, global pax headers, ...
            continue
        local += 1
        if ext != MEMBER_EXT:
            raise ShardReadError(f"shard {path}: member {name!r} is not a .{MEMBER_EXT} sample")
        if local == wanted[k]:
            yield local, key, view[data_at : data_at + msize]
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
            shard = redact(self.table.root / self.table.paths[self.perm[j]])
            local = idx[run] - self.cum[j]
            globals_ = idx[run].tolist()
            done = 0
            try:
                for _, key, payload in self.table.members(int(self.perm[j]), local):
                    try:
                        sample = decode_sample(key, payload)
                    except SampleError as e:
                        if self.on_error == "raise":
                            raise ShardReadError(f"shard {shard}: {e}") from None
                        self.errors.append(f"shard {shard}: {e}")
                        sample = None
                    yield globals_[done], sample
                    done += 1
            except ShardReadError as e:
                if self.on_error == "raise":
                    raise
                self.errors.append(str(e))
                for g in globals_[done:]:
                    yield g, None
