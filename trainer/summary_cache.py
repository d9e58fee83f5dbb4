"""A summary cache: history-summary tokens (``model.summary``, docs/lifelong.md) before each sample; layout, reader.

VISTA computes the summary of a user's long history once, stores it, and lets the model read it in place of the
history. Here a cache holds, for every sample of a split, the summary tokens a run's model reads before the sample's
most recent window (``model.max_seq_len`` interactions): the summary of every older interaction of the user (older
members of the same history too, however long: trainer/data/lifelong.py) before a cutoff, with how many interactions
it covers and the time of the last one. A reader picks, per user, the freshest summary that ends before the window it
is read with, and can tell a stale one (interactions between it and the window left out) from one newer than the
history (refused). Train, eval and export read it (``data.summary_cache``, ``argus export --summary-cache``): each
sample is then encoded from its most recent window alone, after the cached tokens.

`argus summarize` writes one (``trainer/export.py: summarize``; plain, torchrun or the deepspeed launcher, each
rank its share of the shards):
``CACHE/users/part-RRRRR.parquet`` (user, offset: the sample's key, before: the history index the summary stops at,
covered, until), ``CACHE/users/part-RRRRR.parquet.tokens`` (row i's summary tokens, i-th: ``tokens x model.summary.dim``
values at the summariser's width, before its output projection to ``d_model``; raw little-endian fp32, or bf16
bits), ``CACHE/empty.npy`` (the summary of an empty history) and ``CACHE/manifest.json``, written last by rank 0.
Readers map the token files (``np.memmap``) rather than load them: the ranks of a node share one copy in the page
cache, and a cache larger than memory is paged in as batches read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer.data.outdir import Layout, read_json

if TYPE_CHECKING:
    from trainer.data.batch import Batch
    from trainer.job import JobConfig

FORMAT = "argus-summary-cache"
FORMAT_VERSION = 3  # 2: a row per sample (offset), summaries of whole lifelong histories; 3: tokens mapped, apart
TOKENS = ".tokens"  # beside each part's parquet: its rows' tokens, raw
MANIFEST = "manifest.json"
EMPTY = "empty.npy"  # the summary of an empty history (what a user new since the cache reads)


class CacheLayout(Layout):
    """``manifest.json`` (written last), each rank's parquet part and the token file beside it."""

    kind = "summary cache"
    files = (MANIFEST, MANIFEST + ".tmp", EMPTY, "users/part-*.parquet", "users/part-*.parquet.tmp",
             "users/part-*.parquet.tokens", "users/part-*.parquet.tokens.tmp")  # fmt: skip
    dirs = ("users",)

    def unvouched(self, root: Path) -> str | None:
        path = root / MANIFEST
        if path.exists() and (read_json(path) or {}).get("format") != FORMAT:
            return f"{MANIFEST} is not a summary cache's"
        return None

    def describe(self, root: Path) -> str:
        m = read_json(root / MANIFEST)
        if m is None:
            return f"an incomplete summary cache (no {MANIFEST}: a write that stopped part-way)"
        return f"a summary cache ({m.get('samples', 0):,} samples of {m.get('split')!r})"


CACHE = CacheLayout()


def cached_context(cfg: JobConfig) -> int:
    """History rows a reader of cached summaries takes per user: the window, plus the row before it, which only gives
    the window's first interaction its time gap, as the in-line windows of a long sample have it. A run trained on a
    cache (``data.summary_cache``) saw samples cut to the window, whose first interaction has no gap: served alike."""
    return cfg.window() + (0 if cfg.data.summary_cache else 1)


def summariser_checkpoint(cfg: JobConfig, checkpoint: Path) -> Path:
    """The checkpoint whose summaries a run reads: its own (in-line summaries), or, for a run trained on a cache
    (``data.summary_cache``), the one that wrote that cache (the run learnt to read those summaries)."""
    if not cfg.data.summary_cache:
        return checkpoint
    m = read_json(Path(cfg.data.summary_cache) / MANIFEST)
    if m is None or "checkpoint" not in m:
        raise ValueError(f"data.summary_cache: {cfg.data.summary_cache} (the run's training cache) is gone: it names "
                         "the summariser whose summaries this run reads")  # fmt: skip
    return Path(m["checkpoint"])


class _Rows:
    """The token rows of every part in the reader's order, mapped (``np.memmap``), one row read per lookup."""

    def __init__(self, parts: list[np.ndarray], part: np.ndarray, local: np.ndarray) -> None:
        self.parts, self.part, self.local = parts, part, local

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, j: int) -> np.ndarray:
        return self.parts[self.part[j]][self.local[j]]


def _check_open_files(root: Path, parts: int) -> None:
    """A mapped file stays open as long as the cache is read: refuse a cache whose parts would take more than half of
    this process's open-file limit (a cache written by many ranks), in one line."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError):  # no such limit here
        return
    if soft != resource.RLIM_INFINITY and parts > soft // 2:
        raise ValueError(
            f"{root}: its {parts} token files each stay open while mapped, over half this process's open-file limit "
            f"({soft}): raise it (ulimit -n) or write the cache on fewer ranks"
        )


def _map_tokens(root: Path, name: str, rows: int, shape: tuple[int, int], dtype: type) -> np.ndarray:
    """A part's token file mapped as (rows, tokens, dim); one line if its size does not match its row count."""
    path = root / (name + TOKENS)
    want = rows * shape[0] * shape[1] * np.dtype(dtype).itemsize
    if not path.is_file():
        raise ValueError(f"{path}: missing (a cache written part-way, or changed since): rebuild it (argus summarize)")
    size = path.stat().st_size
    if size != want:
        raise ValueError(f"{path}: {size} bytes where {rows} summaries take {want} (a cache written part-way, or "
                         "changed since): rebuild it with argus summarize")  # fmt: skip
    if rows == 0:  # an empty file cannot be mapped
        return np.zeros((0, *shape), dtype)
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", shape=(rows, *shape))


@dataclass
class SummaryCache:
    """A summary cache read back: the index columns held, the tokens mapped from their files (bf16 stays 2 bytes a
    value; a training cache of 10^6 samples x 64 x 64 tokens is 8 GiB on disk, shared through the page cache by
    the ranks of a node); the planner's header prints the bytes per summary."""

    root: Path
    manifest: dict[str, Any]
    index: dict[int, tuple[int, int]]  # user -> its rows [lo, hi), in order of their summary point
    before: np.ndarray  # each summary's point: the history index every row it read comes before
    covered: np.ndarray
    until: np.ndarray
    tokens: np.ndarray | _Rows  # row j: (tokens, dim) float32, or bf16 bits as uint16
    empty: np.ndarray  # (tokens, dim) float32: the summary of an empty history (a user new since the cache)

    @staticmethod
    def load(
        root: str | Path, cfg: JobConfig, split: str, writer: Path | None = None, samples: int | None = None
    ) -> SummaryCache:
        """Read ``root`` and check it is a cache of ``split`` (of ``samples`` samples, given: a summary per sample, so
        a cache of other data is told apart before any step) that fits ``cfg``'s model (tokens, width, window) and,
        given, was written by checkpoint ``writer`` (the tokens are that model's summariser's); one-line errors name
        the cache."""
        import pyarrow.parquet as pq

        root = Path(root)
        m = read_json(root / MANIFEST)
        if m is None or m.get("format") != FORMAT:
            raise ValueError(f"{root}: not a summary cache (no {MANIFEST} written by argus summarize)")
        if m.get("version") != FORMAT_VERSION:
            raise ValueError(f"{root}: a version {m.get('version')} summary cache; this argus reads version "
                             f"{FORMAT_VERSION}: rebuild it with argus summarize")  # fmt: skip
        if m.get("split") != split:
            raise ValueError(f"{root}: a summary cache of split {m.get('split')!r}, read with split {split!r}: "
                             f"build one with argus summarize --split {split}")  # fmt: skip
        if samples is not None and m.get("samples") != samples:
            raise ValueError(f"{root}: a summary cache of {m.get('samples')} samples of {m.get('data')} {split!r}, "
                             f"read with data whose {split!r} has {samples}: rebuild it from this data")  # fmt: skip
        if writer is not None and Path(m.get("checkpoint", "")).resolve() != Path(writer).resolve():
            raise ValueError(
                f"{root}: the summary cache was written by checkpoint {m.get('checkpoint')}, not {writer}: "
                "summaries are a summariser's own; run argus summarize with that one"
            )
        want = {"tokens": cfg.model.summary.tokens, "dim": cfg.model.summary.dim, "window": cfg.window()}
        for key, value in want.items():
            if m.get(key) != value:
                raise ValueError(f"{root}: summary cache {key} {m.get(key)} does not match the run's {value}")
        dtype = np.uint16 if m["dtype"] == "bf16" else np.float32
        _check_open_files(root, len(m["files"]))
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "before", "covered", "until", "part", "local")}
        parts = []
        for i, name in enumerate(m["files"]):
            t = pq.read_table(root / name, columns=["user", "before", "covered", "until"])
            for k in ("user", "before", "covered", "until"):
                cols[k].append(t.column(k).to_numpy())
            cols["part"].append(np.full(len(t), i, np.int32))
            cols["local"].append(np.arange(len(t), dtype=np.int64))
            parts.append(_map_tokens(root, name, len(t), (m["tokens"], m["dim"]), dtype))
        cat = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()}
        order = np.lexsort((cat["before"], cat["user"]))
        users = cat["user"][order]
        cuts = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True]) if users.size else np.zeros(1, np.int64)
        index = {int(users[lo]): (int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:])}
        tokens = _Rows(parts, cat["part"][order], cat["local"][order])
        empty = np.load(root / EMPTY).astype(np.float32)
        return SummaryCache(root, m, index, cat["before"][order], cat["covered"][order], cat["until"][order],
                            tokens, empty)  # fmt: skip

    def summaries(
        self,
        users: list[int],
        older: np.ndarray,
        window_start: np.ndarray,
        strict: bool = True,
        stale: list[int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(summary tokens (users, tokens, dim) float32, older interactions each leaves out) for windows that start at
        history index ``older`` of the user, at times ``window_start``: each user's freshest summary whose point is at
        or before that index. A user the cache lacks (no history when it was built) reads the summary of an empty
        history. Raises one line when a user's every summary reaches into its window (a cache built later than this
        history); not ``strict`` (fine-tuning: impressions at any time, summaries at member boundaries), such a
        window reads the empty summary, everything before it left out. ``stale`` (windows whose summary leaves older
        interactions out, and how many) is added to."""
        out = np.repeat(self.empty[None], len(users), 0)
        left_out = np.asarray(older, np.int64).copy()
        for i, u in enumerate(users):
            lo, hi = self.index.get(int(u), (0, 0))
            if hi == lo:
                continue
            j = lo + int(np.searchsorted(self.before[lo:hi], older[i], side="right")) - 1
            if j < lo and not strict:
                continue
            if j < lo or (self.covered[j] > 0 and self.until[j] > window_start[i]):
                j = max(j, lo)
                raise ValueError(
                    f"{self.root}: user {u}'s summary covers {int(self.covered[j])} interactions up to time "
                    f"{int(self.until[j])}, past the start of the window it would be read with "
                    f"({int(window_start[i])}): the cache is newer than this history; rebuild it with an earlier --at"
                )
            out[i] = _decode(self.tokens[j])
            left_out[i] -= int(self.covered[j])
        if stale is not None:
            stale[0] += int((left_out > 0).sum())
            stale[1] += int(left_out.sum())
        return out, left_out

    def for_batch(
        self, batch: Batch, strict: bool = True, stale: list[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`summaries` for every sample of a jagged ``batch`` read as one window: its first row is the window's
        start (``batch.offsets``: its index in the user's history)."""
        from trainer.data.batch import sample_starts

        first = sample_starts(batch.lengths)
        ts = batch.values["timestamp"][first.clamp_max(max(batch.num_interactions - 1, 0))]
        return self.summaries(batch.users.tolist(), batch.offsets.numpy(), ts.numpy(), strict, stale)


def _decode(tokens: np.ndarray) -> np.ndarray:
    """Stored tokens as float32 (bf16 bits are the top half of a float32's)."""
    if tokens.dtype == np.uint16:
        return (tokens.astype(np.uint32) << 16).view(np.float32)
    return tokens.astype(np.float32, copy=False)
