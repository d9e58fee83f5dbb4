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

    __slots__ = ("key", "user", "offset", "target_start", "n", "raw", "_cols")

    def __init__(self, key: str, user: int, offset: int, target_start: int, n: int,
                 raw: dict[str, tuple[str, bytes]]) -> None:
        self.key, self.user, self.offset, self.target_start, self.n, self.raw = key, user, offset, target_start, n, raw
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


def encode_sample(user: int, offset: int, cols: Mapping[str, np.ndarray], target_start: int = 0) -> bytes:
    """Serialise one sample (all FIELDS present, equal lengths) to the member payload."""
    n = None
    fields: dict[str, list[Any]] = {}
    for name, dtype in FIELDS.items():
        arr = np.ascontiguousarray(cols[name], dtype=dtype)
        if n is None:
            n = arr.shape[0]
        elif arr.shape[0] != n:
            raise SampleError(f"user {user}: column {name!r} has {arr.shape[0]} rows, expected {n}")
        fields[name] = [dtype, arr.tobytes()]
    return msgpack.packb(
        {"v": SCHEMA_VERSION, "user": int(user), "offset": int(offset), "n": int(n or 0),
         "target_start": int(target_start), "fields": fields},
        use_bin_type=True,
    )


@functools.lru_cache(maxsize=64)
def _itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def decode_sample(key: str, payload: bytes | memoryview) -> Sample:
    """Inverse of :func:`encode_sample`; raises SampleError naming the key on any inconsistency."""
    try:
        obj = msgpack.unpackb(payload, raw=False)
        n = int(obj["n"])
        raw = obj["fields"]
        for name, (dtype, buf) in raw.items():
            if len(buf) != n * _itemsize(dtype):
                raise SampleError(f"column {name!r} has {len(buf)} bytes, header says {n} x {dtype}")
        if len(raw) < len(FIELDS) and FIELDS.keys() - raw.keys():
            raise SampleError(f"missing columns {sorted(FIELDS.keys() - raw.keys())}")
        return Sample(key, int(obj["user"]), int(obj["offset"]), int(obj.get("target_start", 0)), n, raw)
    except SampleError as e:
        raise SampleError(f"sample {key!r}: {e}") from None
    except Exception as e:  # msgpack/numpy errors on corrupt bytes
        raise SampleError(f"sample {key!r}: corrupt payload ({type(e).__name__}: {e})") from None
