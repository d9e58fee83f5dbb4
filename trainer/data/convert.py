"""Convert interaction logs into an argus shard set (``argus data convert``).

Inputs (one file, or a directory of files of one format):

- **Yambda-style parquet** (``fmt="yambda"``, ``*.parquet``/``*.pq``): columns
  ``uid``, ``item_id``, ``timestamp``, ``event_type`` (required) and
  ``is_organic``, ``played_ratio_pct`` (optional). ``event_type`` holds
  ``listen``/``like``/``dislike``/``unlike``/``undislike`` (or ``skip``), parsed
  with :meth:`EventType.parse` (integer codes of :class:`EventType` are accepted
  too). ``played_ratio_pct`` becomes ``played`` for listens (null -> PLAYED_NA;
  negative, fractional or > PLAYED_MAX values are bad rows, never clipped); for
  every other event ``played`` is PLAYED_NA. ``is_organic`` (0/1 or bool)
  becomes ``organic``. ``context`` is 0 (Yambda has no context column).
  ``track_length_seconds`` is **not stored** (the schema has no field for it; it is
  listed under ``source["dropped_columns"]``). A missing optional column is filled
  (organic=1, played=PLAYED_NA) and listed under ``source["defaulted_columns"]``.
- **CSV / TSV logs** (``fmt="csv"``/``"tsv"``, ``*.csv``/``*.tsv``/``*.tab``,
  optionally ``.gz``/``.bz2``/``.zst``/``.lz4`` compressed): a header row, and
  columns user, item, timestamp and an optional rating, named by
  :class:`ColumnMap`. Ids may be any strings. A rating ``>= like_threshold`` is
  a LIKE, ``<= dislike_threshold`` a DISLIKE, anything between a LISTEN; without
  a rating column every row is a LISTEN. ``played`` = PLAYED_NA, ``organic`` = 1,
  ``context`` = 0. TSV is read without quote handling (tabs never appear inside
  fields); CSV uses standard double-quote quoting. Empty fields are nulls.

Timestamps: integers in ``timestamp_unit`` (``s``, ``ms``, ``us``, ``ns``; converted
to seconds by floor division), parquet timestamp columns, or ISO-8601 strings
(``2020-01-01``, ``2020-01-01T10:00:00[.fff]``, optionally with ``Z``/``+hh:mm``;
strings without a zone are taken as UTC), all stored as int64 seconds.

Ids: items are remapped to the dense range ``[0, num_items)``, ordered by their
original id (numerically when every id is a canonical integer, else by the
UTF-8 bytes of the string), with the mapping in ``out/item_map.parquet``
(columns ``item_id``, ``index``). User ids are kept as they are when every one is
a non-negative integer; otherwise (e.g. string ids) they are remapped densely in
the same way and the mapping is saved as ``out/user_map.parquet``
(``user_id``, ``index``). Strings that are canonical integers (``"42"``, not
``"042"`` or ``" 42"``) count as integers.

Scale: the input is streamed in record batches and never held whole.

1. pass 1 reads every row once: validates it, collects the distinct item (and
   user) ids and the timestamp range, and counts rows;
2. pass 2 reads the input again and appends each valid row (dense ids, parsed
   columns; 28 bytes) to one of ``shards`` bucket spill files under a temporary
   directory in ``out``, by ``user % shards``;
3. per bucket: load it, stable-sort by (user, timestamp) -- rows with equal
   timestamps keep their input order (files in sorted path order, rows in file
   order) -- and feed each user's full history to
   :class:`~trainer.data.writer.ShardSetWriter` (shard index = bucket index).
   Buckets are independent: ``workers > 1`` writes them in parallel processes.
   Then :func:`~trainer.data.writer.finalize` writes item counts and the manifest.

Memory: pass 1 holds the distinct ids (string ids also a Python dict during
pass 2); pass 3 holds one bucket, about ``28 * rows / shards`` bytes plus sort
indices -- choose ``shards`` so that fits.

Bad input never loses data silently. A row with a null user/item/timestamp
(/event type/rating), an unknown event type, or a value that cannot be parsed is
a *bad row*: by default (``on_error="raise"``) the first one stops the
conversion with a :class:`ConvertError` naming the file, the row (counted from 1
inside that file; in a CSV/TSV file row 1 is the first line after the header, and
the message says "after the header") and the column. With
``on_error="skip"`` bad rows are dropped and counted by reason (a row with
several problems counts once, under the first in column order) in
``manifest.source["skipped_rows"]``; ``source["rows"]`` holds read / written /
skipped totals. A CSV line with the wrong number of fields is a bad row too
(reason ``malformed_row``; the error quotes the line since the streaming reader
cannot number it). Every other input row becomes exactly one interaction of the
output: a training interaction, an evaluation target, an evaluation target cut
by ``max_len`` (``targets_cut_to_max_len``) or a temporal-gap row
(``gap_interactions``); ``convert`` checks this accounting before writing the
manifest.

Item features (``item_features=``, ``--item-features FILE``): a parquet file (or a
directory of them) of item metadata vectors, one row per item: the item id in a
column named like the logs' item column (``item_id`` for Yambda parquet; for
CSV/TSV the ``ColumnMap.item`` name, else ``item_id``) and the vector in
``vector`` (else ``embedding``), a list or fixed-size list of numbers, every one
of the same length. Text is embedded by the user beforehand; only vectors are
taken. The file is read and checked whole before the logs are read, so a bad one
stops the conversion before anything is written (whatever ``on_error``): a
missing column, a null id or vector, vectors of differing lengths, a NaN or
infinite value (or one beyond float32), a duplicate id, each one line naming the
file, row and column. Ids compare with the logs' ids as in the item map
(canonical-integer strings are integers); ids the catalog lacks are dropped and
counted (``unknown_items``), catalog items without a vector keep a zero row
(``missing``). The vectors go to ``out/item_features.npy`` (float32, row = dense
item id; :mod:`trainer.data.item_features`) and ``manifest.item_features``
records them with ``read`` = ``rows`` (matched) + ``unknown_items``.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq

from trainer.data.item_features import write_item_features
from trainer.data.manifest import Manifest
from trainer.data.outdir import DATASET, check_output, clear_output
from trainer.data.schema import FIELDS, PLAYED_MAX, PLAYED_NA, EventType
from trainer.data.storage import PipeLocation, is_remote, location, open_read, redact
from trainer.data.writer import Holdout, ShardResult, ShardSetWriter, finalize, iter_users

__all__ = ["ColumnMap", "ConvertError", "Hints", "convert", "detect_format", "FORMATS", "ITEM_MAP", "USER_MAP"]

FORMATS = ("yambda", "csv", "tsv")
ITEM_MAP = "item_map.parquet"
USER_MAP = "user_map.parquet"

_EXTENSIONS = {".parquet": "yambda", ".pq": "yambda", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
_COMPRESSION = (".gz", ".bz2", ".zst", ".lz4")
_UNIT_DIVISOR = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
# Canonical integers only, so that int -> str -> int round-trips and no two strings share an id.
_CANON_INT = r"^(0|-?[1-9][0-9]{0,17})$"
_ANY_INT = r"^-?[0-9]{1,18}$"
_TZ_SUFFIX = r"[0-9]:[0-9][0-9].*(Z|z|[+-][0-9][0-9](:?[0-9][0-9])?)$"
_UNKNOWN = 255  # event code sentinel for unparsable event types

# Spill record: one valid row, dense ids, everything the shards need except context (always 0).
_SPILL = np.dtype(
    [("user", "<i8"), ("item", "<i8"), ("timestamp", "<i8"), ("event", "u1"), ("played", "<u2"), ("organic", "u1")]
)


# Impression spill record: one shown item, with its input position (ties keep input order).
_IMP_SPILL = np.dtype(
    [
        ("user", "<i8"),
        ("impression", "<i8"),
        ("timestamp", "<i8"),
        ("item", "<i8"),
        ("event", "u1"),
        ("played", "<u2"),
        ("score", "<f4"),
        ("order", "<i8"),
    ]
)


class ConvertError(ValueError):
    """Bad input to :func:`convert`; the message names the file (and row and column where known)."""


@dataclass
class ColumnMap:
    """Input column names for CSV/TSV logs (ignored for Yambda parquet while user/item/timestamp
    keep their defaults; customising them for parquet input is an error).

    ``rating`` may be absent from the file while it has its default name (every
    row is then a LISTEN); a non-default name must exist; ``None`` ignores ratings.
    """

    user: str = "user"
    item: str = "item"
    timestamp: str = "timestamp"
    rating: str | None = "rating"


_DEFAULT_RATING = ColumnMap().rating


@dataclass(frozen=True)
class Hints:
    """How :func:`convert`'s messages name the options that fix a problem. The defaults are the Python API's
    words; `argus data convert` passes its flags (``--on-error skip``, ``--user-col NAME``, ``--shards``)."""

    skip: str = "on_error='skip'"
    column: str = "ColumnMap({role}=...)"  # {role}: user, item, timestamp or rating
    no_rating: str = "ColumnMap(rating=None)"
    columns: str = "columns"  # the column-name options as a whole (refused for Yambda parquet)
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # convert() parameter -> its name here

    def name(self, param: str) -> str:
        return self.names.get(param, param)


def detect_format(path: str | os.PathLike) -> str | None:
    """Format by file extension (compressed CSV/TSV allowed), or None if unknown."""
    suffixes = [s.lower() for s in (path if hasattr(path, "suffixes") else Path(path)).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
        fmt = _EXTENSIONS.get(suffixes[-1]) if suffixes else None
        return fmt if fmt in ("csv", "tsv") else None
    return _EXTENSIONS.get(suffixes[-1]) if suffixes else None


# ----------------------------------------------------------------------------------------- helpers


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _plain(arr: pa.Array) -> pa.Array:
    """Dictionary-encoded columns (common in parquet) -> plain arrays."""
    if isinstance(arr, pa.ChunkedArray):
        arr = pa.concat_arrays(arr.chunks) if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr


def _mask(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Boolean arrow result -> numpy bool, nulls as False."""
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def _try_cast(arr: pa.Array, typ: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """Cast, with per-row failure: (result with nulls where the cast failed, failed mask).

    Bisects on failure, so a batch with k bad values costs O(k log n) small casts.
    """
    try:
        return pc.cast(arr, typ), np.zeros(len(arr), bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if len(arr) <= 1:
            return pa.nulls(len(arr), typ), np.ones(len(arr), bool)
        h = len(arr) // 2
        a, fa = _try_cast(arr.slice(0, h), typ)
        b, fb = _try_cast(arr.slice(h), typ)
        return pa.concat_arrays([a, b]), np.concatenate([fa, fb])


def _int_values(arr: pa.Array) -> np.ndarray:
    """int64 arrow array (nulls allowed: they become 0) -> numpy int64."""
    return np.asarray(pc.fill_null(arr, 0).to_numpy(zero_copy_only=False), dtype=np.int64)


def _row(index: int, header: bool) -> str:
    """A 0-based data row index as a user counts: from 1, and in a CSV/TSV file from the line after the header."""
    return f"row {index + 1}{' after the header' if header else ''}"


class _Checker:
    """Flags bad rows of one batch: counts them by reason (``skip``), or (``raise``) raises on
    :meth:`done` for the earliest bad row of the batch."""

    def __init__(
        self,
        path: Path,
        row0: int,
        n: int,
        on_error: str,
        counts: dict[str, int] | None,
        hints: Hints,
        header: bool = False,
    ) -> None:
        self.path, self.row0, self.on_error, self.counts = path, row0, on_error, counts
        self.hints, self.header = hints, header
        self.bad = np.zeros(n, bool)
        self._first: tuple[int, str] | None = None

    def flag(self, mask: np.ndarray, reason: str, column: str, problem: str, raw: pa.Array | None = None) -> None:
        mask = np.asarray(mask, bool) & ~self.bad
        if not mask.any():
            return
        if self.on_error == "raise":
            i = int(np.argmax(mask))
            if self._first is None or i < self._first[0]:
                value = ""
                if raw is not None:
                    v = repr(raw[i].as_py())
                    value = f" (value {v[:80] + '...' if len(v) > 80 else v})"
                self._first = (
                    i,
                    f"{self.path}: {_row(self.row0 + i, self.header)}, column {column!r}: {problem}{value} "
                    f"[{reason}]; pass {self.hints.skip} to drop and count such rows",
                )
        elif self.counts is not None:
            self.counts[reason] = self.counts.get(reason, 0) + int(mask.sum())
        self.bad |= mask

    def done(self) -> np.ndarray:
        """The bad-row mask; raises for the earliest bad row in ``raise`` mode."""
        if self._first is not None:
            raise ConvertError(self._first[1])
        return self.bad


def _parse_id(arr: pa.Array, name: str, column: str, chk: _Checker) -> pa.Array:
    """User/item ids: int64 or large_string arrow array (nulls where bad)."""
    arr = _plain(arr)
    chk.flag(_mask(arr.is_null()), f"null_{name}", column, "null id")
    if _is_int(arr.type):
        out, failed = _try_cast(arr, pa.int64())
        chk.flag(failed, f"bad_{name}", column, "id does not fit in int64", arr)
        return out
    if _is_str(arr.type):
        return pc.cast(arr, pa.large_string())
    raise ConvertError(f"{chk.path}: column {column!r} has type {arr.type}, expected integer or string ids")


def _parse_timestamp(arr: pa.Array, column: str, chk: _Checker, divisor: int) -> np.ndarray:
    """Timestamps -> int64 seconds (0 where bad)."""
    arr = _plain(arr)
    chk.flag(_mask(arr.is_null()), "null_timestamp", column, "null timestamp")
    n = len(arr)
    if _is_int(arr.type):
        ints, failed = _try_cast(arr, pa.int64())
        chk.flag(failed, "bad_timestamp", column, "timestamp does not fit in int64", arr)
        return _int_values(ints) // divisor
    if pa.types.is_date(arr.type):
        arr = pc.cast(arr, pa.timestamp("s"))
    if pa.types.is_timestamp(arr.type):
        unit_div = _UNIT_DIVISOR[arr.type.unit]
        return _int_values(pc.cast(arr, pa.int64())) // unit_div
    if not _is_str(arr.type):
        raise ConvertError(
            f"{chk.path}: column {column!r} has type {arr.type}, expected integer, timestamp, date or ISO-8601 string"
        )
    out = np.zeros(n, np.int64)
    is_int = _mask(pc.match_substring_regex(arr, _ANY_INT))
    if is_int.any():
        idx = np.flatnonzero(is_int)
        out[idx] = _int_values(pc.cast(arr.take(pa.array(idx)), pa.int64())) // divisor
    rest = ~is_int & ~_mask(arr.is_null())
    if rest.any():
        has_tz = _mask(pc.match_substring_regex(arr, _TZ_SUFFIX))
        failed = np.zeros(n, bool)
        for sel, typ in ((rest & ~has_tz, pa.timestamp("ns")), (rest & has_tz, pa.timestamp("ns", tz="UTC"))):
            if not sel.any():
                continue
            idx = np.flatnonzero(sel)
            parsed, bad = _try_cast(arr.take(pa.array(idx)), typ)
            out[idx] = _int_values(pc.cast(parsed, pa.int64())) // 1_000_000_000
            failed[idx[bad]] = True
        chk.flag(
            failed, "bad_timestamp", column, "not an integer or an ISO-8601 timestamp (or outside years 1677-2262)", arr
        )
    return out


# ------------------------------------------------------------------------------------------ readers


@dataclass
class _Parsed:
    """The valid rows of one batch: original ids (arrow) and parsed columns (numpy)."""

    user: pa.Array
    item: pa.Array
    timestamp: np.ndarray
    event: np.ndarray
    played: np.ndarray
    organic: np.ndarray

    def __len__(self) -> int:
        return int(self.timestamp.shape[0])


def _keep(
    chk: _Checker,
    user: pa.Array,
    item: pa.Array,
    ts: np.ndarray,
    event: np.ndarray,
    played: np.ndarray,
    organic: np.ndarray,
) -> _Parsed:
    bad = chk.done()
    if not bad.any():
        return _Parsed(user, item, ts, event, played, organic)
    good = ~bad
    sel = pa.array(good)
    return _Parsed(user.filter(sel), item.filter(sel), ts[good], event[good], played[good], organic[good])


class _YambdaReader:
    fmt = "yambda"
    REQUIRED = ("uid", "item_id", "timestamp", "event_type")
    OPTIONAL = ("is_organic", "played_ratio_pct")
    DROPPED = ("track_length_seconds",)

    def __init__(self, divisor: int, batch_rows: int, hints: Hints = Hints()) -> None:
        self.divisor, self.batch_rows, self.hints = divisor, batch_rows, hints
        self.defaulted: set[str] = set()
        self.dropped: set[str] = set()
        self._event_cache: dict[str, int] = {}

    def column_map(self) -> dict[str, str]:
        return {
            "user": "uid",
            "item": "item_id",
            "timestamp": "timestamp",
            "event": "event_type",
            "organic": "is_organic",
            "played": "played_ratio_pct",
        }

    def batches(self, path: Path, on_error: str, counts: dict[str, int] | None) -> Iterator[tuple[int, _Parsed]]:
        try:
            pf = pq.ParquetFile(path if not is_remote(path) else open_read(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise ConvertError(redact(f"{path}: not a readable parquet file ({e})")) from None
        with pf:
            yield from self._batches(pf, path, on_error, counts)

    def _batches(
        self, pf: pq.ParquetFile, path: Path, on_error: str, counts: dict[str, int] | None
    ) -> Iterator[tuple[int, _Parsed]]:
        names = pf.schema_arrow.names
        for col in self.REQUIRED:
            if col not in names:
                raise ConvertError(
                    f"{path}: missing required column {col!r} (Yambda parquet input); columns found: {names}"
                )
        present = [c for c in self.OPTIONAL if c in names]
        self.defaulted.update(c for c in self.OPTIONAL if c not in names)
        self.dropped.update(c for c in self.DROPPED if c in names)
        row0 = 0
        for batch in pf.iter_batches(batch_size=self.batch_rows, columns=list(self.REQUIRED) + present):
            chk = _Checker(path, row0, batch.num_rows, on_error, counts, self.hints)
            yield batch.num_rows, self._parse(batch, chk)
            row0 += batch.num_rows

    def _events(self, arr: pa.Array, chk: _Checker) -> np.ndarray:
        arr = _plain(arr)
        chk.flag(_mask(arr.is_null()), "null_event_type", "event_type", "null event type")
        if _is_int(arr.type):
            codes = _int_values(pc.cast(arr, pa.int64()))
            known = np.isin(codes, [int(e) for e in EventType])
            chk.flag(
                ~known & ~_mask(arr.is_null()),
                "unknown_event_type",
                "event_type",
                f"unknown event type code (expected one of {[int(e) for e in EventType]})",
                arr,
            )
            return np.where(known, codes, _UNKNOWN).astype(np.uint8)
        if not _is_str(arr.type):
            raise ConvertError(f"{chk.path}: column 'event_type' has type {arr.type}, expected string or integer")
        enc = arr.dictionary_encode()
        names = enc.dictionary.to_pylist()
        lut = np.empty(len(names) + 1, np.uint8)
        for i, name in enumerate(names):
            if name not in self._event_cache:
                try:
                    self._event_cache[name] = int(EventType.parse(name))
                except ValueError:
                    self._event_cache[name] = _UNKNOWN
            lut[i] = self._event_cache[name]
        lut[-1] = _UNKNOWN  # nulls
        idx = np.asarray(pc.fill_null(enc.indices, len(names)).to_numpy(zero_copy_only=False), np.int64)
        codes = lut[idx]
        expected = [e.name.lower() for e in EventType]
        chk.flag(
            (codes == _UNKNOWN) & ~_mask(arr.is_null()),
            "unknown_event_type",
            "event_type",
            f"unknown event type (expected one of {expected})",
            arr,
        )
        return codes

    def _organic(self, batch: pa.RecordBatch, chk: _Checker) -> np.ndarray:
        n = batch.num_rows
        if "is_organic" not in batch.schema.names:
            return np.ones(n, np.uint8)
        arr = _plain(batch.column("is_organic"))
        chk.flag(_mask(arr.is_null()), "null_is_organic", "is_organic", "null is_organic")
        if pa.types.is_boolean(arr.type):
            return _mask(arr).astype(np.uint8)
        if not _is_int(arr.type):
            raise ConvertError(f"{chk.path}: column 'is_organic' has type {arr.type}, expected bool or 0/1 integer")
        vals = _int_values(pc.cast(arr, pa.int64(), safe=False))
        ok = (vals == 0) | (vals == 1)
        chk.flag(~ok & ~_mask(arr.is_null()), "bad_is_organic", "is_organic", "expected 0 or 1", arr)
        return np.where(ok, vals, 0).astype(np.uint8)

    def _played(self, batch: pa.RecordBatch, event: np.ndarray, chk: _Checker) -> np.ndarray:
        n = batch.num_rows
        played = np.full(n, PLAYED_NA, np.uint16)
        if "played_ratio_pct" not in batch.schema.names:
            return played
        arr = _plain(batch.column("played_ratio_pct"))
        if pa.types.is_floating(arr.type):
            arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)  # NaN = missing
        elif not _is_int(arr.type):
            raise ConvertError(f"{chk.path}: column 'played_ratio_pct' has type {arr.type}, expected a number")
        listen = (event == EventType.LISTEN) & ~_mask(arr.is_null())
        if not listen.any():
            return played
        idx = np.flatnonzero(listen)
        sub = arr.take(pa.array(idx))
        ints, failed = _try_cast(sub, pa.int64())  # fractional or out-of-int64 floats fail
        vals = _int_values(ints)
        bad = failed | (vals < 0) | (vals > PLAYED_MAX)
        mask = np.zeros(n, bool)
        mask[idx[bad]] = True
        chk.flag(
            mask,
            "bad_played_ratio_pct",
            "played_ratio_pct",
            f"played ratio must be an integer in [0, {PLAYED_MAX}] (not clipped)",
            arr,
        )
        played[idx[~bad]] = vals[~bad].astype(np.uint16)
        return played

    def _parse(self, batch: pa.RecordBatch, chk: _Checker) -> _Parsed:
        user = _parse_id(batch.column("uid"), "user", "uid", chk)
        item = _parse_id(batch.column("item_id"), "item", "item_id", chk)
        ts = _parse_timestamp(batch.column("timestamp"), "timestamp", chk, self.divisor)
        event = self._events(batch.column("event_type"), chk)
        organic = self._organic(batch, chk)
        played = self._played(batch, event, chk)
        return _keep(chk, user, item, ts, event, played, organic)


@dataclass
class _ImpParsed:
    """The valid rows of one impressions batch."""

    user: pa.Array
    item: pa.Array
    timestamp: np.ndarray
    event: np.ndarray
    played: np.ndarray
    score: np.ndarray
    impression: np.ndarray  # the input's impression id, -1 where the file has none

    def __len__(self) -> int:
        return int(self.timestamp.shape[0])


class _ImpressionReader(_YambdaReader):
    """Impression logs: one row per shown item, Yambda-style column names, parquet or CSV/TSV.

    Required: ``uid``, ``item_id``, ``timestamp`` (request time), ``event_type`` (the reaction to the
    shown item: listen, like, dislike or skip). Optional: ``played_ratio_pct`` (listens),
    ``score`` (the production ranker's score; NaN when absent) and ``impression_id`` (rows of one
    user with the same request time form one impression unless ids tell them apart).
    """

    OPTIONAL = ("played_ratio_pct", "score", "impression_id")
    DROPPED = ()

    def batches(
        self,
        path: Path,
        on_error: str,
        counts: dict[str, int] | None,  # type: ignore[override]
    ) -> Iterator[tuple[int, _ImpParsed]]:
        fmt = detect_format(path)
        if fmt == "yambda":
            yield from super().batches(path, on_error, counts)  # type: ignore[misc]
            return
        delimiter = "\t" if fmt == "tsv" else ","
        try:
            with _input_stream(path) as f:
                table = pv.read_csv(
                    f,
                    parse_options=pv.ParseOptions(delimiter=delimiter),
                    convert_options=pv.ConvertOptions(strings_can_be_null=True, null_values=[""]),
                )
        except pa.ArrowInvalid as e:
            raise ConvertError(f"{path}: cannot read the impressions file ({e})") from None
        for col in self.REQUIRED:
            if col not in table.column_names:
                raise ConvertError(
                    f"{path}: missing required column {col!r} (impressions); columns found: {table.column_names}"
                )
        row0 = 0
        for batch in table.to_batches(max_chunksize=self.batch_rows):
            chk = _Checker(path, row0, batch.num_rows, on_error, counts, self.hints, header=True)
            yield batch.num_rows, self._parse(batch, chk)  # type: ignore[misc]
            row0 += batch.num_rows

    def _parse(self, batch: pa.RecordBatch, chk: _Checker) -> _ImpParsed:  # type: ignore[override]
        n = batch.num_rows
        user = _parse_id(batch.column("uid"), "user", "uid", chk)
        item = _parse_id(batch.column("item_id"), "item", "item_id", chk)
        ts = _parse_timestamp(batch.column("timestamp"), "timestamp", chk, self.divisor)
        event = self._events(batch.column("event_type"), chk)
        played = self._played(batch, event, chk)
        score = np.full(n, np.nan, np.float32)
        if "score" in batch.schema.names:
            arr = _plain(batch.column("score"))
            if not (pa.types.is_floating(arr.type) or _is_int(arr.type)):
                raise ConvertError(f"{chk.path}: column 'score' has type {arr.type}, expected a number")
            score = np.asarray(
                pc.fill_null(pc.cast(arr, pa.float32()), np.nan).to_numpy(zero_copy_only=False), np.float32
            )
        imp = np.full(n, -1, np.int64)
        if "impression_id" in batch.schema.names:
            arr = _plain(batch.column("impression_id"))  # empty = no id: grouped by request time alone
            if not (_is_int(arr.type) or pa.types.is_null(arr.type)):
                raise ConvertError(f"{chk.path}: column 'impression_id' has type {arr.type}, expected integers")
            if _is_int(arr.type):
                imp = _int_values(pc.cast(pc.fill_null(arr, -1), pa.int64()))
        bad = chk.done()
        good = ~bad
        sel = pa.array(good)
        return _ImpParsed(
            user.filter(sel), item.filter(sel), ts[good], event[good], played[good], score[good], imp[good]
        )


class _CsvReader:
    def __init__(
        self,
        fmt: str,
        columns: ColumnMap,
        like: float,
        dislike: float,
        divisor: int,
        batch_rows: int,
        hints: Hints = Hints(),
    ) -> None:
        self.fmt, self.columns, self.like, self.dislike = fmt, columns, like, dislike
        self.divisor, self.batch_rows, self.hints = divisor, batch_rows, hints
        self.delimiter = "\t" if fmt == "tsv" else ","
        self.defaulted: set[str] = set()
        self.dropped: set[str] = set()

    def column_map(self) -> dict[str, Any]:
        return dataclasses.asdict(self.columns)

    def _parse_options(self, handler: Any = None) -> pv.ParseOptions:
        return pv.ParseOptions(
            delimiter=self.delimiter, quote_char=False if self.fmt == "tsv" else '"', invalid_row_handler=handler
        )

    def _header(self, path: Path) -> list[str] | None:
        """Column names, or None for an empty (0-byte) file."""
        try:
            with _input_stream(path) as f:
                reader = pv.open_csv(
                    f,
                    read_options=pv.ReadOptions(block_size=1 << 20),
                    parse_options=self._parse_options(lambda row: "skip"),
                    convert_options=pv.ConvertOptions(column_types={}, strings_can_be_null=True, null_values=[""]),
                )
                names = reader.schema.names
            return names
        except pa.ArrowInvalid as e:
            if "Empty CSV file" in str(e):
                return None
            raise ConvertError(f"{path}: cannot read the {self.fmt.upper()} header ({e})") from None

    def batches(self, path: Path, on_error: str, counts: dict[str, int] | None) -> Iterator[tuple[int, _Parsed]]:
        names = self._header(path)
        if names is None:
            return
        cm, hints = self.columns, self.hints
        for role in ("user", "item", "timestamp"):
            col = getattr(cm, role)
            if col not in names:
                raise ConvertError(
                    f"{path}: missing required {role} column {col!r}; columns found: {names}; "
                    f"name the {role} column with {hints.column.format(role=role)}"
                )
        rating = cm.rating
        if rating is not None and rating not in names:
            if rating != _DEFAULT_RATING:
                raise ConvertError(
                    f"{path}: missing rating column {rating!r}; columns found: {names}; name the rating column "
                    f"with {hints.column.format(role='rating')} ({hints.no_rating} reads every row as a listen)"
                )
            rating = None
            self.defaulted.add("rating")
        wanted = list(dict.fromkeys([cm.user, cm.item, cm.timestamp] + ([rating] if rating else [])))

        malformed: list[str] = []

        def on_invalid(row: Any) -> str:
            if on_error == "raise":
                malformed.append(f"expected {row.expected_columns} fields, got {row.actual_columns}: {row.text!r}")
                return "error"
            if counts is not None:
                counts["malformed_row"] = counts.get("malformed_row", 0) + 1
            return "skip"

        block = int(min(max(self.batch_rows * 64, 1 << 20), 1 << 26))
        row0 = 0
        with _input_stream(path) as f:
            try:
                reader = pv.open_csv(
                    f,
                    read_options=pv.ReadOptions(block_size=block),
                    parse_options=self._parse_options(on_invalid),
                    convert_options=pv.ConvertOptions(
                        include_columns=wanted,
                        column_types={c: pa.string() for c in wanted},
                        strings_can_be_null=True,
                        null_values=[""],
                    ),
                )
                for big in reader:
                    for start in range(0, big.num_rows, self.batch_rows):
                        batch = big.slice(start, self.batch_rows)
                        chk = _Checker(path, row0, batch.num_rows, on_error, counts, hints, header=True)
                        yield batch.num_rows, self._parse(batch, rating, chk)
                        row0 += batch.num_rows
            except pa.ArrowInvalid as e:
                if malformed:
                    raise ConvertError(
                        f"{path}: malformed {self.fmt.upper()} line in the block starting at "
                        f"{_row(row0, True)} ({malformed[0]}) [malformed_row]; pass {hints.skip} to drop "
                        f"and count such rows"
                    ) from None
                raise ConvertError(
                    f"{path}: cannot parse {self.fmt.upper()} in the block starting at {_row(row0, True)}: {e}"
                ) from None

    def _parse(self, batch: pa.RecordBatch, rating: str | None, chk: _Checker) -> _Parsed:
        cm = self.columns
        user = _parse_id(batch.column(cm.user), "user", cm.user, chk)
        item = _parse_id(batch.column(cm.item), "item", cm.item, chk)
        ts = _parse_timestamp(batch.column(cm.timestamp), cm.timestamp, chk, self.divisor)
        n = batch.num_rows
        event = np.full(n, int(EventType.LISTEN), np.uint8)
        if rating is not None:
            raw = batch.column(rating)
            chk.flag(_mask(raw.is_null()), "null_rating", rating, "null rating")
            vals, failed = _try_cast(raw, pa.float64())
            r = np.asarray(pc.fill_null(vals, 0.0).to_numpy(zero_copy_only=False), np.float64)
            chk.flag(failed | ~np.isfinite(r), "bad_rating", rating, "rating is not a finite number", raw)
            event[r >= self.like] = int(EventType.LIKE)
            event[r <= self.dislike] = int(EventType.DISLIKE)
        played = np.full(n, PLAYED_NA, np.uint16)
        organic = np.ones(n, np.uint8)
        return _keep(chk, user, item, ts, event, played, organic)


# ------------------------------------------------------------------------------------- id mappings


class _Distinct:
    """Distinct ids seen in pass 1 (int64 and/or strings), merged in bounded steps."""

    def __init__(self, flush_every: int = 1 << 22) -> None:
        self.flush_every = flush_every
        self.ints = np.zeros(0, np.int64)
        self.strs = pa.array([], pa.large_string())
        self._pi: list[np.ndarray] = []
        self._ps: list[pa.Array] = []
        self._pending = 0

    def add(self, arr: pa.Array) -> None:
        if _is_int(arr.type):
            u = np.unique(_int_values(arr))
            self._pi.append(u)
        else:
            u = pc.unique(arr)
            self._ps.append(u)
        self._pending += len(u)
        if self._pending >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        if self._pi:
            self.ints = np.unique(np.concatenate([self.ints] + self._pi))
        if self._ps:
            self.strs = pc.unique(pa.concat_arrays([self.strs] + self._ps))
        self._pi, self._ps, self._pending = [], [], 0

    def finish(self) -> "_IdMap":
        self._flush()
        if len(self.strs) == 0:
            return _IdMap(ints=self.ints)
        strs = self.strs
        if self.ints.size:
            strs = pc.unique(pa.concat_arrays([strs, pa.array(self.ints.astype(str).tolist(), pa.large_string())]))
        if bool(pc.all(pc.match_substring_regex(strs, _CANON_INT)).as_py()):
            return _IdMap(ints=np.unique(_int_values(pc.cast(strs, pa.int64()))))
        return _IdMap(strs=strs.take(pc.array_sort_indices(strs)))


class _IdMap:
    """Sorted distinct original ids; dense index = position."""

    def __init__(self, ints: np.ndarray | None = None, strs: pa.Array | None = None) -> None:
        self.ints, self.strs = ints, strs
        self._index: dict[str, int] | None = None

    def __len__(self) -> int:
        return int(self.ints.shape[0]) if self.ints is not None else len(self.strs)

    @property
    def kind(self) -> str:
        return "int" if self.ints is not None else "str"

    def identity_ok(self) -> bool:
        """Non-negative integer ids can be used as they are."""
        return self.ints is not None and (self.ints.size == 0 or int(self.ints[0]) >= 0)

    def table(self, name: str) -> pa.Table:
        values = pa.array(self.ints, pa.int64()) if self.ints is not None else self.strs
        return pa.table({name: values, "index": pa.array(np.arange(len(self), dtype=np.int64))})

    def lookup(self, arr: pa.Array, what: str, path: Path) -> np.ndarray:
        if self.ints is not None:
            x = _int_values(pc.cast(arr, pa.int64()) if _is_str(arr.type) else arr)
            idx = np.searchsorted(self.ints, x)
            ok = idx < self.ints.shape[0]
            if not (ok.all() and np.array_equal(self.ints[idx], x)):
                raise ConvertError(f"{path}: {what} ids differ between passes (was the input modified?)")
            return idx.astype(np.int64)
        if self._index is None:
            self._index = {s: i for i, s in enumerate(self.strs.to_pylist())}
        if not _is_str(arr.type):
            arr = pc.cast(arr, pa.large_string())
        enc = arr.dictionary_encode()
        try:
            lut = np.fromiter((self._index[s] for s in enc.dictionary.to_pylist()), np.int64, len(enc.dictionary))
        except KeyError:
            raise ConvertError(f"{path}: {what} ids differ between passes (was the input modified?)") from None
        return lut[np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64)]

    def find(self, arr: pa.Array) -> np.ndarray:
        """Dense index of each id (int64 or large_string, no nulls), -1 where the catalog has none: item features may
        name items the logs never mention. Ids compare as in pass 1: canonical-integer strings are integers."""
        n = len(arr)
        if self.ints is not None:
            ok = np.ones(n, bool)
            if _is_str(arr.type):
                ok = _mask(pc.match_substring_regex(arr, _CANON_INT))
                x = np.zeros(n, np.int64)
                if ok.any():
                    x[ok] = _int_values(pc.cast(arr.filter(pa.array(ok)), pa.int64()))
            else:
                x = _int_values(arr)
            idx = np.searchsorted(self.ints, x)
            hit = ok & (idx < self.ints.shape[0])
            hit[hit] = self.ints[idx[hit]] == x[hit]
            return np.where(hit, idx, -1).astype(np.int64)
        if self._index is None:
            self._index = {s: i for i, s in enumerate(self.strs.to_pylist())}
        if not _is_str(arr.type):
            arr = pc.cast(arr, pa.large_string())
        enc = arr.dictionary_encode()
        index = self._index
        lut = np.fromiter((index.get(s, -1) for s in enc.dictionary.to_pylist()), np.int64, len(enc.dictionary))
        return lut[np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64)]


# ------------------------------------------------------------------------------------------ item features

FEATURE_VECTOR_COLUMNS = ("vector", "embedding")  # the vector column's accepted names, in order of preference
FEATURE_ID_FALLBACK = "item_id"  # accepted as the id column when the logs' item column is not in the file
_FEATURE_BATCH = 65_536  # rows per record batch at most (a row is a whole vector)


class _ItemFeatures:
    """``convert(item_features=...)``: item metadata vectors (the user embeds text or content offline; only
    vectors are taken) from one parquet file or a directory of them, with an item id column and a vector column
    (a list or fixed-size list of numbers).

    :meth:`check` reads the file(s) once before anything is written and stops at the first problem, one
    :class:`ConvertError` line naming the file, row (from 1, within that file) and column: a missing column, a
    column of the wrong type, a null id or vector, an empty vector, vectors of different lengths, a null, NaN
    or infinite value (also one that overflows float32), an item id given twice. :meth:`match` maps the ids to
    the catalog's dense ids once pass 1 knows it (ids the catalog lacks are counted, not an error);
    :meth:`table` reads the vectors again into the (num_items, dim) table, a zero row where an item has none.
    """

    def __init__(self, source: Any, item_column: str, batch_rows: int, hints: Hints) -> None:
        self.input = location(source)
        self.flag = hints.name("item_features")
        self.id_names = tuple(dict.fromkeys((item_column, FEATURE_ID_FALLBACK)))
        self.batch_rows = max(1, min(batch_rows, _FEATURE_BATCH))
        self.files: list[Any] = []
        self.file_rows: list[int] = []
        self.columns: list[tuple[str, str]] = []  # (id column, vector column) per file
        self.dim = 0
        self._dim_from = ""  # "row R of FILE": the row whose length set dim
        self._ids: list[pa.Array] = []  # per batch, int64 or large_string
        self.dense = np.zeros(0, np.int64)  # per input row: dense item id, -1 when not in the catalog

    @property
    def read(self) -> int:
        return sum(self.file_rows)

    def _error(self, path: Any, problem: str, row: int | None = None, column: str | None = None) -> ConvertError:
        where = "".join(
            [f"{_row(row, False)}, " if row is not None else "", f"column {column!r}: " if column is not None else ""]
        )
        return ConvertError(redact(f"{path}: {where}{problem} (item features, {self.flag})"))

    def _open(self, path: Any) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(path if not is_remote(path) else open_read(path))
        except (pa.ArrowInvalid, OSError) as e:
            raise self._error(path, f"not a readable parquet file ({e})") from None

    def _list(self) -> list[Any]:
        loc = self.input
        if isinstance(loc, PipeLocation) or not loc.exists() or loc.is_file():
            return _list_inputs(loc, "yambda")[0]  # one file is read as parquet whatever its name
        files, fmt, _ = _list_inputs(loc, "auto")
        if fmt != "yambda":
            raise self._error(loc, f"a directory of {fmt} files; item features are parquet (.parquet/.pq)")
        return files

    def _columns(self, path: Any, schema: pa.Schema) -> tuple[str, str]:
        names = schema.names
        id_col = next((c for c in self.id_names if c in names), None)
        if id_col is None:
            alt = f" (or {self.id_names[1]!r})" if len(self.id_names) > 1 else ""
            raise self._error(path, f"missing item id column {self.id_names[0]!r}{alt}; columns found: {names}")
        vec_col = next((c for c in FEATURE_VECTOR_COLUMNS if c in names), None)
        if vec_col is None:
            raise self._error(
                path,
                f"missing vector column {FEATURE_VECTOR_COLUMNS[0]!r} (or {FEATURE_VECTOR_COLUMNS[1]!r}); "
                f"columns found: {names}",
            )
        it = schema.field(id_col).type
        it = it.value_type if pa.types.is_dictionary(it) else it
        if not (_is_int(it) or _is_str(it)):
            raise self._error(path, f"type {it}, expected integer or string ids", column=id_col)
        vt = schema.field(vec_col).type
        is_list = pa.types.is_list(vt) or pa.types.is_large_list(vt) or pa.types.is_fixed_size_list(vt)
        if not (is_list and (pa.types.is_floating(vt.value_type) or _is_int(vt.value_type))):
            raise self._error(path, f"type {vt}, expected a list of floats", column=vec_col)
        return id_col, vec_col

    def _batches(self, pf: pq.ParquetFile, cols: tuple[str, str]) -> Iterator[tuple[int, pa.Array, pa.Array]]:
        row0 = 0
        for batch in pf.iter_batches(batch_size=self.batch_rows, columns=list(cols)):
            yield row0, _plain(batch.column(cols[0])), _plain(batch.column(cols[1]))
            row0 += batch.num_rows

    def _check_batch(self, path: Any, row0: int, ids: pa.Array, vec: pa.Array, cols: tuple[str, str]) -> pa.Array:
        """The batch's ids (int64 or large_string); raises for its earliest bad row."""
        id_col, vec_col = cols
        n = len(ids)
        problems: list[tuple[np.ndarray, Any]] = []  # (bad rows, message for row i), in column order
        problems.append((_mask(ids.is_null()), lambda i: (id_col, "null item id")))
        if _is_int(ids.type):
            raw = ids
            ids, failed = _try_cast(raw, pa.int64())
            problems.append((failed, lambda i: (id_col, f"id {raw[i]} does not fit in int64")))
        else:
            ids = pc.cast(ids, pa.large_string())
        null_vec = _mask(vec.is_null())
        problems.append((null_vec, lambda i: (vec_col, "null vector")))
        lens = np.asarray(pc.fill_null(pc.list_value_length(vec), 0).to_numpy(zero_copy_only=False), np.int64)
        problems.append((~null_vec & (lens == 0), lambda i: (vec_col, "empty vector")))
        if not self.dim and (lens > 0).any():
            first = int(np.argmax(lens > 0))
            self.dim, self._dim_from = int(lens[first]), f"{_row(row0 + first, False)} of {redact(path)}"
        problems.append(
            (
                (lens > 0) & (lens != self.dim),
                lambda i: (
                    vec_col,
                    f"{lens[i]} values, expected {self.dim} as in {self._dim_from}: "
                    "every vector must have the same length",
                ),
            )
        )
        flat = pc.list_flatten(vec)
        parent = np.repeat(np.arange(n), np.where(null_vec, 0, lens))  # flatten skips null vectors
        null_val = _mask(flat.is_null())
        with np.errstate(over="ignore", invalid="ignore"):
            vals = np.asarray(pc.fill_null(pc.cast(flat, pa.float64()), 0.0).to_numpy(zero_copy_only=False))
            f32 = vals.astype(np.float32)
        nonfinite = ~np.isfinite(f32) & ~null_val

        def at(bad_el: np.ndarray, what: str) -> Any:
            rows = np.zeros(n, bool)
            rows[parent[bad_el]] = True

            def message(i: int) -> tuple[str, str]:
                el = np.flatnonzero(bad_el & (parent == i))[0]
                pos = int(el - np.flatnonzero(parent == i)[0])
                value = "" if what == "null value" else f" {float(vals[el])!r}"
                extra = " (as float32)" if what != "null value" and np.isfinite(vals[el]) else ""
                return vec_col, f"{what}{value} at position {pos}{extra}"

            return rows, message

        problems.append(at(null_val, "null value"))
        problems.append(at(nonfinite, "NaN or infinite value"))
        first_bad = [(int(np.argmax(m)), k) for k, (m, _) in enumerate(problems) if m.any()]
        if first_bad:
            i, k = min(first_bad)
            column, problem = problems[k][1](i)
            raise self._error(path, problem, row=row0 + i, column=column)
        return ids

    def check(self) -> None:
        """Read every row once, before anything is written; raise one line for the first problem."""
        self.files = self._list()
        for path in self.files:
            with self._open(path) as pf:
                cols = self._columns(path, pf.schema_arrow)
                rows = 0
                for row0, ids, vec in self._batches(pf, cols):
                    self._ids.append(self._check_batch(path, row0, ids, vec, cols))
                    rows += len(ids)
            self.columns.append(cols)
            self.file_rows.append(rows)
        if self.read == 0:
            raise self._error(redact(self.input), f"no rows in {len(self.files)} file(s)")
        self._check_unique()

    def _all_ids(self) -> pa.Array:
        if any(_is_str(a.type) for a in self._ids):  # int 42 and "42" are one id, as in the logs
            return pa.concat_arrays([pc.cast(a, pa.large_string()) for a in self._ids])
        return pa.concat_arrays(self._ids)

    def _where(self, pos: int) -> tuple[Any, int]:
        """A row of all files together -> (file, row within it)."""
        ends = np.cumsum(self.file_rows)
        f = int(np.searchsorted(ends, pos, side="right"))
        return self.files[f], pos - (int(ends[f - 1]) if f else 0)

    def _check_unique(self) -> None:
        ids = self._all_ids()
        order = pc.array_sort_indices(ids)
        s = ids.take(order)
        if len(s) < 2:
            return
        again = _mask(pc.equal(s.slice(1), s.slice(0, len(s) - 1)))
        if not again.any():
            return
        second = int(np.asarray(order)[1:][again].min())  # the earliest row repeating an earlier id
        value = ids[second]
        first = int(np.argmax(_mask(pc.equal(ids, value))))
        path, row = self._where(second)
        first_path, first_row = self._where(first)
        at = _row(first_row, False) + ("" if first_path == path else f" of {redact(first_path)}")
        column = self.columns[self.files.index(path)][0]
        raise self._error(path, f"duplicate item id {value.as_py()!r} (first at {at})", row=row, column=column)

    def match(self, item_map: _IdMap) -> None:
        """Map the ids to the catalog (known after pass 1); ids it lacks are counted as unknown. Not one id in the
        catalog is an error: the ids are not the logs' (another id space, or dense ids)."""
        ids = self._all_ids()
        self.dense = item_map.find(ids)
        if not (self.dense >= 0).any():
            catalog = int(item_map.ints[0]) if item_map.ints is not None else item_map.strs[0].as_py()
            raise self._error(
                self.input,
                f"none of the {len(ids)} item ids is in the logs' catalog of {len(item_map)} items (e.g. "
                f"{ids[0].as_py()!r} here, {catalog!r} in the logs): they must be the logs' item ids",
            )
        self._ids = []

    @property
    def unknown(self) -> int:
        return int(np.count_nonzero(self.dense < 0))

    def table(self, item_map: _IdMap, num_items: int) -> tuple[np.ndarray, np.ndarray]:
        """Read the vectors again: ((num_items, dim) float32, zero rows where an item has none; which rows have)."""
        vectors = np.zeros((num_items, self.dim), np.float32)
        has = np.zeros(num_items, bool)
        pos = 0
        for path, cols in zip(self.files, self.columns):
            with self._open(path) as pf:
                for _, ids, vec in self._batches(pf, cols):
                    n = len(ids)
                    ids = pc.cast(ids, pa.large_string() if _is_str(ids.type) else pa.int64())
                    dense = item_map.find(ids)
                    flat = pc.list_flatten(vec)
                    if not np.array_equal(dense, self.dense[pos : pos + n]) or len(flat) != n * self.dim:
                        raise self._error(path, "changed during conversion (ids or vector lengths differ)")
                    vals = np.asarray(pc.cast(flat, pa.float32()).to_numpy(zero_copy_only=False)).reshape(n, self.dim)
                    ok = dense >= 0
                    vectors[dense[ok]] = vals[ok]
                    has[dense[ok]] = True
                    pos += n
        if pos != self.dense.shape[0]:
            raise self._error(redact(self.input), f"changed during conversion ({pos} rows, {self.read} before)")
        return vectors, has

    def entry(self, written: dict[str, Any]) -> dict[str, Any]:
        """The manifest's ``item_features``: the written table's entry plus where the vectors came from and the
        row accounting (``read`` = ``rows`` + ``unknown_items``)."""
        rows, unknown = int(written["rows"]), self.unknown
        if rows + unknown != self.read:
            raise ConvertError(f"internal error: {self.read} item feature rows but {rows} matched + {unknown} unknown")
        return {
            **written,
            "input": redact(self.input),
            "files": [
                {
                    "path": str(p.relative_to(self.input)) if p != self.input else p.name,
                    "rows": r,
                    "id_column": c[0],
                    "vector_column": c[1],
                }
                for p, r, c in zip(self.files, self.file_rows, self.columns)
            ],
            "read": self.read,
            "unknown_items": unknown,
        }


# ------------------------------------------------------------------------------------------ convert


def _input_stream(path: Any) -> Any:
    """A CSV/TSV input as an Arrow stream, decompressed by its extension (.gz, .bz2, .zst, .lz4): a local file, or an
    object at a URL read sequentially through fsspec (storage.py), never downloaded first."""
    if not is_remote(path):
        return pa.input_stream(str(path), compression="detect")
    codec = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}.get(path.suffix.lower())
    return pa.input_stream(open_read(path), compression=codec)


def _list_inputs(input: Any, fmt: str, fmt_option: str | None = None) -> tuple[list[Any], str, list[str]]:
    """(files to read in order, format, ignored file names). ``fmt_option``: the option that sets the format,
    named when the extension does not tell it (None: the name must)."""
    if isinstance(input, PipeLocation):
        raise ConvertError(f"{redact(input)}: convert reads files or object-store URLs, not pipe: commands")
    if not input.exists():
        raise ConvertError(f"{redact(input)}: no such file or directory")
    if input.is_file():
        f = fmt if fmt != "auto" else detect_format(input)
        if f is None:
            fix = f"pass {fmt_option} (one of {', '.join(FORMATS)})" if fmt_option else "name it .parquet, .csv or .tsv"
            raise ConvertError(f"{redact(input)}: cannot tell the format from the extension; {fix}")
        return [input], f, []
    files = sorted(
        p
        for p in input.rglob("*")
        if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(input).parts)
    )
    detected = {p: detect_format(p) for p in files}
    if fmt == "auto":
        kinds = sorted({k for k in detected.values() if k})
        if not kinds:
            raise ConvertError(
                f"{redact(input)}: empty input: no .parquet/.csv/.tsv files in the directory ({len(files)} other files)"
            )
        if len(kinds) > 1:
            raise ConvertError(f"{redact(input)}: files of several formats {kinds}; a directory must hold one format")
        fmt = kinds[0]
    chosen = [p for p in files if detected[p] == fmt]
    if not chosen:
        raise ConvertError(f"{redact(input)}: empty input: no {fmt} files in the directory ({len(files)} other files)")
    ignored = [str(p.relative_to(input)) for p in files if detected[p] != fmt]
    return chosen, fmt, ignored


def convert(
    input: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fmt: str = "auto",
    columns: ColumnMap | None = None,
    holdout: str = "loo",
    val_seconds: int = 86400,
    test_seconds: int = 86400,
    gap_seconds: int = 0,
    shards: int = 8,
    max_len: int = 8192,
    like_threshold: float = 4.0,
    dislike_threshold: float = 2.0,
    timestamp_unit: str = "s",
    on_error: str = "raise",
    batch_rows: int = 1_000_000,
    workers: int = 1,
    impressions: str | os.PathLike | None = None,
    impressions_test_seconds: int = 86400,
    item_features: str | os.PathLike | None = None,
    overwrite: bool = False,
    hints: Hints = Hints(),
) -> Manifest:
    """Convert an interaction log (file or directory) into shards + manifest under ``out``.

    ``holdout``: ``loo``, ``temporal`` (test targets are the last ``test_seconds``
    before the global maximum timestamp, validation targets the ``val_seconds``
    before that, and ``gap_seconds`` before validation are context only) or
    ``none``. ``out`` must be missing or empty; an earlier dataset there is replaced only with
    ``overwrite`` (removed once every input row has been read and checked, so bad input loses nothing), and a
    directory holding anything else is refused (:mod:`trainer.data.outdir`). ``workers`` > 1 writes the
    shards (pass 3) in that many processes; the output is byte-identical to
    ``workers=1``. Returns the written manifest;
    ``manifest.source`` records the input, options, split boundaries, row counts
    and ``skipped_rows``.

    ``impressions`` (a file or directory, see :class:`_ImpressionReader`) adds the fine-tuning
    splits ``impressions`` and ``impressions_test`` (request times in the last
    ``impressions_test_seconds`` before the latest one); every valid impression row becomes exactly
    one shown item, bad rows follow ``on_error`` and are counted under ``impression_skipped_rows``.

    ``item_features`` (a parquet file or a directory of them, see :class:`_ItemFeatures`): item metadata
    vectors, checked whole before anything is written (every problem stops the conversion, whatever
    ``on_error``), written as ``out/item_features.npy`` (row = dense item id; zero rows for catalog items
    without a vector) and recorded in ``manifest.item_features`` with ``read`` = ``rows`` + ``unknown_items``
    (ids not in the catalog are dropped and counted).

    ``hints``: how messages name the options (the command line passes its flags); see :class:`Hints`.
    """
    if fmt not in ("auto",) + FORMATS:
        raise ValueError(f"fmt {fmt!r}: expected auto, {', '.join(FORMATS)}")
    if holdout not in ("loo", "temporal", "none"):
        raise ValueError(f"holdout {holdout!r}: expected loo, temporal or none")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error {on_error!r}: expected raise or skip")
    if timestamp_unit not in _UNIT_DIVISOR:
        raise ValueError(f"timestamp_unit {timestamp_unit!r}: expected one of {list(_UNIT_DIVISOR)}")
    name = hints.name
    for param, value in (("shards", shards), ("max_len", max_len), ("batch_rows", batch_rows), ("workers", workers)):
        if value < 1:
            raise ValueError(f"{name(param)}: must be >= 1, got {value}")
    for param, value in (
        ("val_seconds", val_seconds),
        ("test_seconds", test_seconds),
        ("gap_seconds", gap_seconds),
        ("impressions_test_seconds", impressions_test_seconds),
    ):
        if value < 0:
            raise ValueError(f"{name(param)}: must be >= 0, got {value}")
    if not dislike_threshold < like_threshold:
        raise ValueError(
            f"{name('dislike_threshold')} ({dislike_threshold}) must be < {name('like_threshold')} ({like_threshold})"
        )

    input_path, out = location(input), Path(out)  # the input may be a URL (storage.py); the output is local
    files, fmt, ignored = _list_inputs(input_path, fmt, hints.name("fmt"))
    default_names = (ColumnMap.user, ColumnMap.item, ColumnMap.timestamp)
    if fmt == "yambda" and columns is not None and (columns.user, columns.item, columns.timestamp) != default_names:
        raise ValueError(
            f"{hints.columns}: user/item/timestamp column names apply to csv/tsv input; Yambda parquet has fixed "
            f"column names (uid, item_id, timestamp, event_type, ...)"
        )
    divisor = _UNIT_DIVISOR[timestamp_unit]
    reader: _YambdaReader | _CsvReader
    if fmt == "yambda":
        reader = _YambdaReader(divisor, batch_rows, hints)
    else:
        reader = _CsvReader(fmt, columns or ColumnMap(), like_threshold, dislike_threshold, divisor, batch_rows, hints)
    # Read-only here; an earlier dataset is removed (with overwrite) only once the input has been read.
    replace = check_output(out, DATASET, overwrite=overwrite, flag="--overwrite")
    feats = None
    if item_features is not None:  # checked whole before the logs are read: a bad file costs no pass over them
        feats = _ItemFeatures(item_features, reader.column_map()["item"], batch_rows, hints)
        feats.check()

    # Pass 1: validate every row, collect distinct ids and the time range.
    skipped: dict[str, int] = {}
    users, items = _Distinct(), _Distinct()
    ts_min, ts_max = None, None
    n_read = n_valid = 0
    file_rows = []
    for path in files:
        malformed_before = skipped.get("malformed_row", 0)
        rows = 0
        for n_raw, parsed in reader.batches(path, on_error, skipped):
            rows += n_raw
            if len(parsed):
                users.add(parsed.user)
                items.add(parsed.item)
                lo, hi = int(parsed.timestamp.min()), int(parsed.timestamp.max())
                ts_min = lo if ts_min is None else min(ts_min, lo)
                ts_max = hi if ts_max is None else max(ts_max, hi)
                n_valid += len(parsed)
        file_rows.append(rows + skipped.get("malformed_row", 0) - malformed_before)
    n_read = sum(file_rows)
    if n_read == 0:
        raise ConvertError(f"{redact(input_path)}: empty input: no data rows in {len(files)} file(s)")
    if n_valid == 0:
        raise ConvertError(f"{redact(input_path)}: all {n_read} rows are bad ({skipped}); nothing to convert")
    assert ts_min is not None and ts_max is not None
    imp_files: list[Path] = []
    imp_reader = _ImpressionReader(divisor, batch_rows, hints)
    imp_skipped: dict[str, int] = {}
    imp_valid, imp_read, imp_ts_max = 0, 0, None
    if impressions is not None:
        imp_files, _, _ = _list_inputs(location(impressions), "auto")
        for path in imp_files:
            for n_raw, parsed in imp_reader.batches(path, on_error, imp_skipped):
                imp_read += n_raw
                if len(parsed):
                    users.add(parsed.user)
                    items.add(parsed.item)
                    hi = int(parsed.timestamp.max())
                    imp_ts_max = hi if imp_ts_max is None else max(imp_ts_max, hi)
                    imp_valid += len(parsed)
        if imp_valid == 0:
            raise ConvertError(f"{impressions}: no valid impression rows ({imp_read} read, {imp_skipped})")
    imp_test_start = None if imp_ts_max is None else imp_ts_max + 1 - impressions_test_seconds
    item_map, user_map = items.finish(), users.finish()
    remap_users = not user_map.identity_ok()
    if feats is not None:
        feats.match(item_map)

    if holdout == "temporal":
        test_start = ts_max + 1 - test_seconds
        hold = Holdout("temporal", test_start - val_seconds, test_start, gap_seconds)
    else:
        hold = Holdout(holdout)

    if replace:
        clear_output(out, DATASET)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(item_map.table("item_id"), out / ITEM_MAP)
    if remap_users:
        pq.write_table(user_map.table("user_id"), out / USER_MAP)

    spill = Path(tempfile.mkdtemp(prefix=".convert-spill-", dir=out))

    def dense_users(user: pa.Array, path: Path) -> np.ndarray:
        if remap_users:
            return user_map.lookup(user, "user", path)
        return _int_values(pc.cast(user, pa.int64()) if _is_str(user.type) else user)

    def spill_by_user(rec: np.ndarray, prefix: str) -> None:
        """Append rows to per-shard bucket files by user % shards (input order kept within a bucket)."""
        bucket = rec["user"] % shards
        order = np.argsort(bucket, kind="stable")
        ends = np.cumsum(np.bincount(bucket, minlength=shards))
        rec = rec[order]
        start = 0
        for b in range(shards):
            end = int(ends[b])
            if end > start:
                with open(spill / f"{prefix}-{b:06d}.bin", "ab") as f:
                    f.write(rec[start:end].tobytes())
            start = end

    try:
        # Pass 2: dense ids, partition rows into per-shard buckets (input order kept within a bucket).
        n_spilled = 0
        for path in files:
            for _, parsed in reader.batches(path, "skip", None):
                n = len(parsed)
                if not n:
                    continue
                rec = np.empty(n, _SPILL)
                rec["user"] = dense_users(parsed.user, path)
                rec["item"] = item_map.lookup(parsed.item, "item", path)
                rec["timestamp"] = parsed.timestamp
                rec["event"] = parsed.event
                rec["played"] = parsed.played
                rec["organic"] = parsed.organic
                spill_by_user(rec, "bucket")
                n_spilled += n
        if n_spilled != n_valid:
            raise ConvertError(
                f"{redact(input_path)}: pass 2 read {n_spilled} valid rows, pass 1 {n_valid} "
                f"(was the input modified during conversion?)"
            )
        order = 0
        for path in imp_files:
            for _, ip in imp_reader.batches(path, "skip", None):
                n = len(ip)
                if not n:
                    continue
                rec = np.empty(n, _IMP_SPILL)
                rec["user"] = dense_users(ip.user, path)
                rec["item"] = item_map.lookup(ip.item, "item", path)
                rec["timestamp"], rec["event"], rec["played"] = ip.timestamp, ip.event, ip.played
                rec["score"], rec["impression"] = ip.score, ip.impression
                rec["order"] = np.arange(order, order + n)
                order += n
                spill_by_user(rec, "imp")
        if order != imp_valid:
            raise ConvertError(f"{impressions}: pass 2 read {order} valid impression rows, pass 1 {imp_valid}")

        # Pass 3: per bucket, stable sort by (user, timestamp) and write whole histories.
        jobs = [(str(out), b, str(spill / f"bucket-{b:06d}.bin"), hold, max_len, imp_test_start) for b in range(shards)]
        if workers > 1 and shards > 1:
            ctx = multiprocessing.get_context("spawn")  # no fork after arrow's threads have started
            with ProcessPoolExecutor(max_workers=min(workers, shards), mp_context=ctx) as pool:
                results = list(pool.map(_write_bucket, *zip(*jobs)))
        else:
            results = [_write_bucket(*job) for job in jobs]
    finally:
        shutil.rmtree(spill, ignore_errors=True)

    accounted = _accounted(results, hold)
    if accounted != n_valid:
        raise ConvertError(
            f"internal error: {n_valid} valid rows but {accounted} written (train + targets + cut targets + gap)"
        )
    shown = sum(st.get("shown", 0) for r in results for sp, st in r.stats.items() if sp.startswith("impressions"))
    if shown != imp_valid:
        raise ConvertError(f"internal error: {imp_valid} valid impression rows but {shown} shown items written")
    features_entry = None
    if feats is not None:
        vectors, has = feats.table(item_map, len(item_map))
        features_entry = feats.entry(write_item_features(out, vectors, has))
        del vectors, has

    source: dict[str, Any] = {
        "kind": "convert",
        "input": redact(input_path),
        "files": [
            {"path": str(p.relative_to(input_path)) if p != input_path else p.name, "rows": r}
            for p, r in zip(files, file_rows)
        ],
        "ignored_files": ignored,
        "format": fmt,
        "columns": reader.column_map(),
        "defaulted_columns": sorted(reader.defaulted),
        "dropped_columns": sorted(reader.dropped),
        "like_threshold": float(like_threshold),
        "dislike_threshold": float(dislike_threshold),
        "timestamp_unit": timestamp_unit,
        "timestamp_min": ts_min,
        "timestamp_max": ts_max,
        "holdout": (
            {
                "kind": hold.kind,
                "val_start": int(hold.val_start),
                "test_start": int(hold.test_start),
                "gap": int(hold.gap),
                "val_seconds": int(val_seconds),
                "test_seconds": int(test_seconds),
            }
            if hold.kind == "temporal"
            else {"kind": hold.kind}
        ),
        "rows": {"read": n_read, "written": n_valid, "skipped": n_read - n_valid},
        "skipped_rows": dict(sorted(skipped.items())),
        "on_error": on_error,
        "num_users": len(user_map),
        "user_ids": "remapped" if remap_users else "original",
        "user_map": USER_MAP if remap_users else None,
        "item_map": ITEM_MAP,
        "item_ids": "numeric" if item_map.kind == "int" else "string",
    }
    if impressions is not None:
        source["impressions"] = {
            "input": redact(impressions),
            "files": [redact(p) for p in imp_files],
            "test_start": imp_test_start,
            "test_seconds": int(impressions_test_seconds),
            "rows": {"read": imp_read, "written": imp_valid, "skipped": imp_read - imp_valid},
        }
        source["impression_skipped_rows"] = dict(sorted(imp_skipped.items()))
    manifest = finalize(out, results, hold, len(item_map), max_len, source)
    if features_entry is not None:
        manifest.item_features = features_entry
        manifest.save(out)
    return manifest


def _write_bucket(
    out: str, index: int, part: str, hold: Holdout, max_len: int, imp_test_start: int | None = None
) -> ShardResult:
    """Pass 3 for one bucket: load, stable-sort by (user, timestamp), write shard ``index``; delete the bucket."""
    path = Path(part)
    rec = np.fromfile(path, _SPILL) if path.exists() else np.empty(0, _SPILL)
    rec = rec[np.lexsort((rec["timestamp"], rec["user"]))]  # lexsort is stable: ties keep input order
    cols = {name: np.ascontiguousarray(rec[name]) for name in ("item", "timestamp", "event", "played", "organic")}
    cols["context"] = np.zeros(rec.shape[0], np.dtype(FIELDS["context"]))
    users = np.ascontiguousarray(rec["user"])
    del rec
    imps = _bucket_impressions(path.with_name(path.name.replace("bucket-", "imp-")))
    writer = ShardSetWriter(out, index, hold, max_len, impressions_test_start=imp_test_start)
    histories = dict(iter_users(cols, users))
    empty = {k: np.zeros(0, np.dtype(v)) for k, v in FIELDS.items()}
    for user in sorted(histories.keys() | imps.keys()):  # users with impressions but no history too
        writer.add_user(user, histories.get(user, empty), imps.get(user))
    result = writer.close()
    path.unlink(missing_ok=True)
    return result


def _bucket_impressions(path: Path) -> dict[int, dict[str, np.ndarray]]:
    """A bucket's impression rows grouped into each user's impressions, by request time."""
    if not path.exists():
        return {}
    rec = np.fromfile(path, _IMP_SPILL)
    path.unlink()
    rec = rec[np.lexsort((rec["order"], rec["impression"], rec["timestamp"], rec["user"]))]
    key_change = np.ones(rec.shape[0], bool)
    key_change[1:] = (
        (rec["user"][1:] != rec["user"][:-1])
        | (rec["timestamp"][1:] != rec["timestamp"][:-1])
        | (rec["impression"][1:] != rec["impression"][:-1])
    )
    starts = np.flatnonzero(key_change)
    sizes = np.diff(np.append(starts, rec.shape[0]))
    imp_user = rec["user"][starts]
    out: dict[int, dict[str, np.ndarray]] = {}
    user_change = np.flatnonzero(np.r_[True, imp_user[1:] != imp_user[:-1]])
    bounds = np.append(user_change, imp_user.shape[0])
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        r0, r1 = int(starts[a]), int(starts[b]) if b < starts.shape[0] else rec.shape[0]
        out[int(imp_user[a])] = {
            "imp_time": rec["timestamp"][starts[a:b]],
            "imp_size": sizes[a:b].astype(np.int32),
            "imp_item": rec["item"][r0:r1],
            "imp_event": rec["event"][r0:r1],
            "imp_played": rec["played"][r0:r1],
            "imp_score": rec["score"][r0:r1],
        }
    return out


def _accounted(results: list[ShardResult], hold: Holdout) -> int:
    """Rows present in the output: train interactions + eval targets (+ cut) + gap rows."""
    total = 0
    for r in results:
        for split, info in r.shards.items():
            if split.startswith("impressions"):
                continue  # impression samples repeat history rows; shown items are counted separately
            total += info.interactions if split == "train" else info.targets
        for split, stats in r.stats.items():
            if not split.startswith("impressions"):
                total += stats.get("targets_cut_to_max_len", 0) + stats.get("gap_interactions", 0)
    return total
