"""A summary cache: each user's history-summary tokens (``model.summary``, docs/lifelong.md); its layout and reader.

VISTA computes the summary of a user's long history once, stores it, and lets the model that serves read it in
place of the history. Here a cache holds, per user of a split, the summary tokens the run's model reads before the
user's most recent window (``model.max_seq_len`` interactions) at a cutoff: the summary of every older interaction
before the cutoff, with how many interactions it covers and the time of the last one, so a reader can tell a stale
summary (interactions between it and the window left out) from one that overlaps the window (a summary newer than
the history it is used with: refused). ``argus export --summary-cache`` reads it: each user's state is then
computed from its most recent window alone, after the cached tokens.

`argus summarize` writes one (``trainer/export.py: summarize``; plain, torchrun or the deepspeed launcher, each
rank its exactly-once part of the users):
``CACHE/users/part-RRRRR.parquet`` (user, covered, until, tokens: ``tokens x model.summary.dim`` values at the
summariser's width, before its output projection to ``d_model``; fp32 or bf16 bits)
and ``CACHE/manifest.json``, written last by rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trainer.data.outdir import Layout, read_json

if TYPE_CHECKING:
    from trainer.job import JobConfig

FORMAT = "argus-summary-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CacheLayout(Layout):
    """``manifest.json`` (written last) and each rank's parquet part."""

    kind = "summary cache"
    files = (MANIFEST, MANIFEST + ".tmp", "users/part-*.parquet", "users/part-*.parquet.tmp")
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
        return f"a summary cache ({m.get('users', 0):,} users of {m.get('split')!r})"


CACHE = CacheLayout()


@dataclass
class SummaryCache:
    """A summary cache read back (every rank reads all of it: fine up to ~10^6 users x a few thousand values)."""

    root: Path
    manifest: dict[str, Any]
    index: dict[int, int]  # user -> row
    covered: np.ndarray
    until: np.ndarray
    tokens: np.ndarray  # (users, tokens, dim) float32
    empty: np.ndarray | None = None  # (tokens, dim): the summary of an empty history (a user new since the cache)

    @staticmethod
    def load(root: str | Path, cfg: JobConfig, checkpoint: Path) -> SummaryCache:
        """Read ``root`` and check it was written by ``checkpoint`` (the tokens are that model's, before its output
        projection) and fits ``cfg``'s model (tokens, width, window); one-line errors name it."""
        import pyarrow.parquet as pq

        root = Path(root)
        m = read_json(root / MANIFEST)
        if m is None or m.get("format") != FORMAT:
            raise ValueError(f"{root}: not a summary cache (no {MANIFEST} written by argus summarize)")
        if Path(m.get("checkpoint", "")).resolve() != Path(checkpoint).resolve():
            raise ValueError(
                f"{root}: the summary cache was written by checkpoint {m.get('checkpoint')}, not {checkpoint}: "
                "summaries are a checkpoint's own; run argus summarize with this one"
            )
        want = {"tokens": cfg.model.summary.tokens, "dim": cfg.model.summary.dim, "window": cfg.window()}
        for key, value in want.items():
            if m.get(key) != value:
                raise ValueError(f"{root}: summary cache {key} {m.get(key)} does not match the run's {value}")
        users, covered, until, parts = [], [], [], []
        for name in m["files"]:
            t = pq.read_table(root / name)
            users.append(t.column("user").to_numpy())
            covered.append(t.column("covered").to_numpy())
            until.append(t.column("until").to_numpy())
            flat = np.asarray(t.column("tokens").combine_chunks().values.to_numpy(zero_copy_only=False))
            if m["dtype"] == "bf16":
                flat = (flat.astype(np.uint32) << 16).view(np.float32)
            parts.append(flat.astype(np.float32).reshape(len(t), m["tokens"], m["dim"]))
        all_users = np.concatenate(users) if users else np.zeros(0, np.int64)
        return SummaryCache(
            root,
            m,
            {int(u): i for i, u in enumerate(all_users.tolist())},
            np.concatenate(covered) if covered else np.zeros(0, np.int64),
            np.concatenate(until) if until else np.zeros(0, np.int64),
            np.concatenate(parts) if parts else np.zeros((0, m["tokens"], m["dim"]), np.float32),
        )

    def summaries(self, users: list[int], older: np.ndarray, window_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(summary tokens (users, tokens, dim), older interactions each leaves out) of ``users`` whose windows
        start at times ``window_start`` after ``older`` older interactions. A user the cache lacks (no history
        when it was built) reads the summary of an empty history. Raises one line for a summary that covers
        interactions inside its window (a cache built later than this history)."""
        idx = np.array([self.index.get(u, -1) for u in users], np.int64)
        have = idx >= 0
        covered = np.where(have, self.covered[idx.clip(0)] if len(self.covered) else 0, 0)
        until = np.where(have, self.until[idx.clip(0)] if len(self.until) else -1, -1)
        bad = (covered > older) | ((covered > 0) & (until > window_start))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{self.root}: user {users[i]}'s summary covers {int(covered[i])} interactions up to time "
                f"{int(until[i])}, past the start of the window it would be read with ({int(window_start[i])}): "
                "the cache is newer than this history; rebuild it with an earlier --at"
            )
        if self.empty is None:
            raise ValueError("SummaryCache.empty: set it to the model's summary of an empty history first")
        tokens = np.where(have[:, None, None], self.tokens[idx.clip(0)] if len(self.tokens) else 0.0, self.empty)
        return tokens.astype(np.float32), older - covered
