"""The data model: one interaction per row, one user-history chunk per sample.

A sample is stored as ONE tar member (``<key>.msg``): a msgpack map whose
``fields`` entry holds every column as ``[numpy dtype string, raw bytes]``.
One member per sample is what makes tar reading fast (see STACK.md), and
carrying the dtype inside the member keeps shards readable by any stock
tarfile/webdataset + numpy script (docs/data-format.md).
"""

from __future__ import annotations

import enum
import functools
from typing import TYPE_CHECKING, Any, Mapping

import msgpack
import numpy as np

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1
# Time constants (seconds, hours): one definition for synth, features and fine-tuning.
DAY = 86_400
HOURS_PER_WEEK = 168
MEMBER_EXT = "msg"  # webdataset's stock .decode() understands .msg/.mp


class EventType(enum.IntEnum):
    """Feedback kinds, as in Yambda's event_type column (+ an explicit skip)."""

    LISTEN = 0
    LIKE = 1
    DISLIKE = 2
    UNLIKE = 3
    UNDISLIKE = 4
    SKIP = 5

    @classmethod
    def parse(cls, name: str) -> "EventType":
        try:
            return cls[name.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown event type {name!r}; expected one of {[e.name.lower() for e in cls]}") from None


# Column name -> storage dtype. Little-endian explicitly so shards are portable.
FIELDS: dict[str, str] = {
    "item": "<i8",  # dense item id in [0, num_items)
    "timestamp": "<i8",  # seconds
    "event": "|u1",  # EventType
    "played": "<u2",  # played ratio in percent; PLAYED_NA where it does not apply (likes, ratings)
    "organic": "|u1",  # 1 = organic (user-initiated), 0 = recommended
    "context": "<i4",  # context id, 0 = unknown
}
# Impressions (fine-tuning data): what a recommender showed a user at a request time and how the user
# reacted to each shown item. Stored in the same sample as the user's history up to the request.
IMPRESSION_FIELDS: dict[str, str] = {
    "imp_time": "<i8",  # request time (seconds), one per impression, ascending
    "imp_size": "<i4",  # items shown in that impression
}
SHOWN_FIELDS: dict[str, str] = {
    "imp_item": "<i8",  # shown items, impressions concatenated
    "imp_event": "|u1",  # EventType the user gave the shown item (LISTEN, LIKE, SKIP, DISLIKE)
    "imp_played": "<u2",  # played percent, PLAYED_NA where it does not apply
    "imp_score": "<f4",  # the production ranker's score, NaN where the data has none
}
PLAYED_NA = 0xFFFF
PLAYED_MAX = 0xFFFE
# Played-ratio buckets (percent edges) used as a feature and as the feedback head's target:
# 0 = not applicable, 1 = [0,25), 2 = [25,50), 3 = [50,75), 4 = [75,100), 5 = >= 100.
PLAYED_BUCKET_EDGES = (25, 50, 75, 100)
NUM_PLAYED_BUCKETS = len(PLAYED_BUCKET_EDGES) + 2


def played_bucket(played: "torch.Tensor") -> "torch.Tensor":
    """Played percent (int tensor, PLAYED_NA where not applicable) -> bucket id in [0, NUM_PLAYED_BUCKETS)."""
    import torch

    played = played.to(torch.int64)  # batches carry int32, raw columns uint16
    edges = torch.tensor(PLAYED_BUCKET_EDGES, dtype=torch.int64, device=played.device)
    bucket = torch.bucketize(played, edges, right=True) + 1
    return bucket.masked_fill(played == PLAYED_NA, 0)


def relevance(event: np.ndarray, played: np.ndarray) -> np.ndarray:
    """Graded relevance of a shown item for pairwise fine-tuning: LIKE 3, a listen of >= 75% (or of
    unknown length) 2, a shorter listen 1, SKIP / DISLIKE 0. Pairs are formed between different grades."""
    event = np.asarray(event)
    played = np.asarray(played).astype(np.int64)
    full = (played >= 75) | (played == PLAYED_NA)
    grade = np.where(full, 2, 1)
    grade = np.where(event == EventType.LIKE, 3, grade)
    grade = np.where((event == EventType.SKIP) | (event == EventType.DISLIKE), 0, grade)
    return grade.astype(np.int8)


class SampleError(ValueError):
    """A sample that cannot be decoded or is internally inconsistent."""


class Sample:
    """One chunk of one user's time-ordered history.

    ``offset`` is the index of the chunk's first interaction in the user's full
    history, so chunks of a long history can be put back together.
    ``target_start`` is the first position that is a prediction target: 0 for
    training samples (every position is), ``n - k`` for evaluation samples whose
    last ``k`` interactions are held out.

    Columns stay as raw bytes (``raw[name] = (dtype, bytes)``) until asked for:
    batching joins the bytes of many samples and makes one array per column,
    which is several times faster than one numpy array per sample and column.
    """

    __slots__ = ("key", "user", "offset", "target_start", "n", "raw", "_cols", "imps", "shown")

    def __init__(
        self,
        key: str,
        user: int,
        offset: int,
        target_start: int,
        n: int,
        raw: dict[str, tuple[str, bytes]],
        imps: int = 0,
        shown: int = 0,
    ) -> None:
        self.key, self.user, self.offset, self.target_start, self.n, self.raw = key, user, offset, target_start, n, raw
        self.imps, self.shown = imps, shown  # impressions and shown items (impression splits only)
        self._cols: dict[str, np.ndarray] | None = None

    @property
    def cols(self) -> dict[str, np.ndarray]:
        if self._cols is None:
            self._cols = {name: np.frombuffer(buf, dtype=dt) for name, (dt, buf) in self.raw.items()}
        return self._cols

    def __len__(self) -> int:
        return self.n


def make_key(user: int, offset: int) -> str:
    """Stable, sortable sample key (no dots: webdataset splits keys at the first dot)."""
    return f"u{user:012d}-o{offset:08d}"


def _pack_columns(
    user: int, cols: Mapping[str, np.ndarray], spec: Mapping[str, str], fields: dict[str, list[Any]]
) -> int:
    n = None
    for name, dtype in spec.items():
        arr = np.ascontiguousarray(cols[name], dtype=dtype)
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise SampleError(f"user {user}: column {name!r} has {arr.shape[0]} rows, expected {n}")
        fields[name] = [dtype, arr.tobytes()]
    return int(n or 0)


def encode_sample(
    user: int,
    offset: int,
    cols: Mapping[str, np.ndarray],
    target_start: int = 0,
    impressions: Mapping[str, np.ndarray] | None = None,
) -> bytes:
    """Serialise one sample (all FIELDS present, equal lengths) to the member payload.

    ``impressions`` (impression splits): IMPRESSION_FIELDS (one row per impression) and SHOWN_FIELDS
    (one row per shown item; ``imp_size`` must add up to their length)."""
    fields: dict[str, list[Any]] = {}
    n = _pack_columns(user, cols, FIELDS, fields)
    header = {
        "v": SCHEMA_VERSION,
        "user": int(user),
        "offset": int(offset),
        "n": n,
        "target_start": int(target_start),
        "fields": fields,
    }
    if impressions is not None:
        m = _pack_columns(user, impressions, IMPRESSION_FIELDS, fields)
        shown = _pack_columns(user, impressions, SHOWN_FIELDS, fields)
        if int(np.asarray(impressions["imp_size"], np.int64).sum()) != shown:
            raise SampleError(
                f"user {user}: imp_size adds up to {int(np.sum(impressions['imp_size']))}, "
                f"but {shown} shown items are given"
            )
        header.update(imps=m, shown=shown)
    return msgpack.packb(header, use_bin_type=True)


@functools.lru_cache(maxsize=64)
def _itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def decode_sample(key: str, payload: bytes | memoryview) -> Sample:
    """Inverse of :func:`encode_sample`; raises SampleError naming the key on any inconsistency."""
    try:
        obj = msgpack.unpackb(payload, raw=False)
        n = int(obj["n"])
        m, shown = int(obj.get("imps", 0)), int(obj.get("shown", 0))
        raw = obj["fields"]
        for name, (dtype, buf) in raw.items():
            rows = m if name in IMPRESSION_FIELDS else shown if name in SHOWN_FIELDS else n
            if len(buf) != rows * _itemsize(dtype):
                raise SampleError(f"column {name!r} has {len(buf)} bytes, header says {rows} x {dtype}")
        if len(raw) < len(FIELDS) and FIELDS.keys() - raw.keys():
            raise SampleError(f"missing columns {sorted(FIELDS.keys() - raw.keys())}")
        if "imps" in obj and (IMPRESSION_FIELDS.keys() | SHOWN_FIELDS.keys()) - raw.keys():
            raise SampleError(
                f"missing impression columns {sorted((IMPRESSION_FIELDS.keys() | SHOWN_FIELDS.keys()) - raw.keys())}"
            )
        return Sample(key, int(obj["user"]), int(obj["offset"]), int(obj.get("target_start", 0)), n, raw, m, shown)
    except SampleError as e:
        raise SampleError(f"sample {key!r}: {e}") from None
    except Exception as e:  # msgpack/numpy errors on corrupt bytes
        raise SampleError(f"sample {key!r}: corrupt payload ({type(e).__name__}: {e})") from None
