"""`argus export`: user-state vectors and item vectors of a checkpoint, for serving and offline retrieval.

Score = dot product of an exported user vector and an exported item vector, and it equals the model's
own score: for a pre-training run the next-item head's (cosine or dot, / temperature), for a fine-tuning
run the two-tower ranker's. :func:`served_vectors` is the one place that defines the served vectors.

Runs the same under a plain process, torchrun or the deepspeed launcher (RANK/WORLD_SIZE from the
environment). The item table is sharded by TorchRec exactly as in training (DCP reshards the saved
tables for this world size); the dense model is small and is loaded in full on every rank.

* Users: every sample of a split (one per user in an eval split), each rank its exactly-once part. The
  state is taken after the last history row: rows before ``target_start`` (held-out targets are not
  history) and, with ``at``, before the cutoff time; at most ``context`` of them, the most recent.
* Items: the whole item table; rank r exports a contiguous id range.

Layout: ``OUT/users/part-RRRRR.parquet``, ``OUT/items/part-RRRRR.parquet``, ``OUT/manifest.json``
(written last, by rank 0: an export without it is incomplete). ``OUT`` must be missing or empty, or hold an
earlier export and ``overwrite`` be set (:class:`ExportLayout`). See docs/export.md.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from trainer import checkpoint
from trainer.data.outdir import Layout, check_output, clear_output, read_json
from trainer.data.storage import absolute, redact
from trainer.dist import together

if TYPE_CHECKING:
    from trainer.data.batch import Batch
    from trainer.data.lifelong import Emit
    from trainer.job import JobConfig
    from trainer.model.argus import Grid
    from trainer.summary_cache import SummaryCache

FORMAT = "argus-export"
FORMAT_VERSION = 1
DTYPES = ("fp32", "bf16")
MANIFEST = "manifest.json"


class ExportLayout(Layout):
    """``manifest.json`` (written last: without it the export is incomplete) and each rank's parquet parts."""

    kind = "export"
    files = (
        MANIFEST,
        MANIFEST + ".tmp",
        *(f"{sub}/part-*.parquet{tmp}" for sub in ("users", "items") for tmp in ("", ".tmp")),
    )
    dirs = ("users", "items")

    def unvouched(self, root: Path) -> str | None:
        path = root / MANIFEST
        if path.exists() and (read_json(path) or {}).get("format") != FORMAT:
            return f"{MANIFEST} is not an export's"  # another tool's, or a dataset's
        return None

    def describe(self, root: Path) -> str:
        m = read_json(root / MANIFEST)
        if m is None:
            return f"an incomplete export (no {MANIFEST}: a write that stopped part-way)"
        return f"an export ({m.get('users', 0):,} users, {m.get('items', 0):,} items of {m.get('split')!r})"


EXPORT = ExportLayout()


# ---- the served vectors ----------------------------------------------------------------------------------------
class History(NamedTuple):
    """Looked-up history of a jagged batch and, per user, the flat row its state is taken after."""

    item: torch.Tensor  # (rows, item_dim)
    side: dict[str, torch.Tensor]  # side feature -> (rows,) ids (trainer.model.interaction.side_features)
    lengths: torch.Tensor  # (users,)
    last: torch.Tensor  # (users,) flat row index
    grid: Grid | None = None  # where the encoder places each user (Batch.grid); None: one per row
    ids: torch.Tensor | None = None  # (rows,) item table rows of ``item`` (the semantic item tower reads them)


def served_vectors(
    cfg: JobConfig,
    dense: torch.nn.Module,
    history: History | None = None,
    item_emb: torch.Tensor | None = None,
    item_ids: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(user vectors, item vectors) whose dot products are the model's scores; either part may be skipped.
    ``item_emb``: looked-up ID rows of table rows ``item_ids`` (``history.ids`` likewise), both through the
    model's item tower (``ArgusModel.item_vectors``) first.

    TwoTower (fine-tuning): its own towers. ArgusModel (pre-training): the next-item head's scoring,
    cosine or dot / temperature, split so that the temperature rides on the user side and item vectors
    stay plain (unit) embeddings. ``prefix``: cached summary tokens of the history's users
    (``ArgusModel.states``).
    """
    from trainer.model.two_tower import TwoTower

    users = items = None
    argus = dense.argus if isinstance(dense, TwoTower) else dense
    if history is not None:
        history = history._replace(item=argus.item_vectors(history.item, history.ids))
    if item_emb is not None:
        item_emb = argus.item_vectors(item_emb, item_ids)
    if isinstance(dense, TwoTower):
        if history is not None:
            users = dense.user_vectors(history.item, history.side, history.lengths, history.last, history.grid, prefix)
        if item_emb is not None:
            items = dense.item_vectors(item_emb)
        return users, items
    if history is not None:
        states = dense.states(history.item, history.side, history.lengths, history.grid, prefix)
        rows = history.last * 2 + 1 if dense.interleaved else history.last  # interleaved: the feedback token
        users = served_users(cfg, dense.proj(states[rows]))
    if item_emb is not None:
        items = served_items(cfg, item_emb)
    return users, items


def served_users(cfg: JobConfig, u: torch.Tensor) -> torch.Tensor:
    """The next-item head's user side (ArgusModel.user_vectors) as a served vector: cosine scoring normalises it,
    and the temperature rides on it."""
    ni = cfg.heads.next_item
    u = u.float()
    return (F.normalize(u, dim=-1) if ni.normalize else u) / ni.temperature


def served_items(cfg: JobConfig, item_emb: torch.Tensor) -> torch.Tensor:
    """Item table rows as served vectors: plain (unit, for cosine scoring) embeddings."""
    v = item_emb.float()
    return F.normalize(v, dim=-1) if cfg.heads.next_item.normalize else v


# ---- which rows each user state sees ---------------------------------------------------------------------------
@dataclass
class UserRows:
    """Per sample of a batch: where its state is taken, what comes next; plus the context batch to encode."""

    kept: torch.Tensor  # indices (into the batch) of samples with at least one history row
    next_item: torch.Tensor  # (batch,) item of the first row the state did not see; -1 if none
    history_len: torch.Tensor  # (batch,) rows the state is computed from (<= context)
    context: Batch | None  # the kept samples' context rows (None if none kept)


def context_rows(batch: Batch, context: int, at: int | None = None, targets_held_out: bool = True) -> UserRows:
    """The most recent ``context`` history rows of each sample of a jagged (untruncated) batch.

    History = the leading rows before ``target_start`` (``targets_held_out``: eval splits) with
    timestamp < ``at`` (when given). ``next_item`` = the row right after the history, i.e. the held-out
    target, or with ``at`` the first interaction at/after the cutoff.
    """
    from trainer.data.batch import Batch, sample_starts

    lengths = batch.lengths.long()
    n = lengths.numel()
    starts = sample_starts(lengths)
    owner = torch.repeat_interleave(torch.arange(n), lengths)
    pos = torch.arange(int(lengths.sum())) - starts[owner]
    end = batch.target_start.long() if targets_held_out else lengths
    outside = pos >= end[owner]
    if at is not None:
        outside |= batch.values["timestamp"].long() >= at
    # History is a prefix: it stops at the first row outside it (events are time-ordered).
    cut = lengths.clone().scatter_reduce_(0, owner[outside], pos[outside], reduce="amin", include_self=True)
    has_next = cut < lengths
    next_item = torch.full((n,), -1, dtype=torch.long)
    next_item[has_next] = batch.values["item"].long()[(starts + cut)[has_next]]
    lo = (cut - context).clamp_min(0)
    count = cut - lo
    kept = torch.nonzero(count > 0, as_tuple=True)[0]
    ctx = None
    if kept.numel():
        c = count[kept]
        first = starts[kept] + lo[kept]
        rows = (
            torch.repeat_interleave(first, c)
            + torch.arange(int(c.sum()))
            - torch.repeat_interleave(sample_starts(c), c)
        )
        ctx = Batch(
            keys=[batch.keys[i] for i in kept.tolist()],
            users=batch.users[kept],
            offsets=batch.offsets[kept] + lo[kept],
            lengths=c,
            target_start=torch.zeros_like(c),
            values={k: v[rows] for k, v in batch.values.items()},
            padded=False,
        )
    return UserRows(kept=kept, next_item=next_item, history_len=count.to(torch.int32), context=ctx)


Lookup = Callable[[Any], Any]  # a DMP, an unsharded SparseArch or a ReplicatedItemTables (features.lookup_*)


def encode_users(
    batch: Batch,
    cfg: JobConfig,
    dense: torch.nn.Module,
    lookup: Lookup,
    item_rows: int,
    context: int,
    at: int | None,
    targets_held_out: bool,
    device: torch.device,
    cache: SummaryCache | None = None,
    stale: list[int] | None = None,
) -> tuple[UserRows, torch.Tensor]:
    """(rows, user vectors of ``rows.kept``) for one batch. Always makes exactly one ``lookup`` call and one
    forward (:func:`served_vectors`), even for an empty batch or one whose users all lack history (a dummy sample's
    then): under DMP the lookup is a collective, under ZeRO-3 (validation) every submodule's forward.

    ``cache``: summary tokens read from a summary cache (``argus summarize``) instead of computed from the older
    history: each state is computed from the most recent window alone (``context``: ``cached_context``); ``stale``
    (users, older interactions the summaries left out) is added to."""
    from trainer.engine import dummy_batch
    from trainer.model.interaction import history_rows, lookup_interactions

    if batch.size:
        rows = context_rows(batch, context, at, targets_held_out)
    else:
        empty = torch.zeros(0, dtype=torch.long)
        rows = UserRows(empty, empty, empty.int(), None)
    ctx = rows.context if rows.context is not None else dummy_batch()
    # a run trained on packed rows exports packed rows; with a cache each window is cut anew below, one a row
    if rows.context is not None and cfg.data.batch_tokens and cache is None:
        ctx.pack(context)
    item, side, _ = lookup_interactions(lookup, ctx, cfg, item_rows, torch.zeros(0, dtype=torch.long), device)
    hist, prefix = None, None
    if rows.context is not None:
        lengths = ctx.lengths.to(device)
        grid = ctx.grid()
        if grid[0] is not None:
            grid = (grid[0].to(device), grid[1].to(device), grid[2])
        hist = History(item, side, lengths, torch.cumsum(lengths, 0) - 1, grid, history_rows(ctx, item_rows, device))
    if cache is not None:  # every rank, every batch, history or not: a summary newer than its window stops them all

        def window() -> tuple[History | None, torch.Tensor | None, UserRows]:
            if hist is None:
                return hist, prefix, rows
            return _cached_window(hist, rows, cache, cfg.window(), device, stale)

        hist, prefix, rows = together(window, device)
    if hist is None:  # the forward a batch with history runs, over the dummy batch, for the peers: under ZeRO-3
        # (validation on a summary cache) each submodule's forward gathers its weights from every rank together
        one = torch.ones(1, dtype=torch.long, device=device)  # its first interaction: within any window
        ids = history_rows(ctx, item_rows, device)
        dummy = History(
            item[:1], {k: v[:1] for k, v in side.items()}, one, one - 1, None, None if ids is None else ids[:1]
        )
        if cache is not None:
            prefix = torch.zeros(1, cfg.model.summary.tokens, cfg.model.summary.dim, device=device)
        served_vectors(cfg, dense, history=dummy, prefix=prefix)
        return rows, torch.zeros(0, cfg.embeddings.item_dim)
    users, _ = served_vectors(cfg, dense, history=hist, prefix=prefix)
    return rows, users.cpu()


def _cached_window(
    hist: History, rows: UserRows, cache: SummaryCache, window: int, device: torch.device, stale: list[int] | None
) -> tuple[History, torch.Tensor, UserRows]:
    """The most recent ``window`` rows of each context (which may hold one more, for the first one's time gap) and
    the cached summaries they read."""
    from trainer.data.batch import sample_starts

    ctx = rows.context
    lengths = ctx.lengths.long()
    drop = (lengths > window).long()  # the extra leading row
    keep_len = lengths - drop
    starts = sample_starts(lengths)
    pick = torch.repeat_interleave(starts + drop, keep_len) + (
        torch.arange(int(keep_len.sum())) - torch.repeat_interleave(sample_starts(keep_len), keep_len)
    )
    older = (ctx.offsets.long() + drop).numpy()  # the window's first row: its index in the user's whole history
    window_start = ctx.values["timestamp"].long()[starts + drop].numpy()
    tokens, _ = cache.summaries(ctx.users.tolist(), older, window_start, stale=stale)
    on = pick.to(device)
    hist = History(
        hist.item[on],
        {k: v[on] for k, v in hist.side.items()},
        keep_len.to(device),
        torch.cumsum(keep_len, 0).to(device) - 1,
        None,
        None if hist.ids is None else hist.ids[on],
    )
    history_len = rows.history_len.clone()  # per sample of the batch, like next_item (kept: those with history)
    history_len[rows.kept] = keep_len.to(history_len.dtype)
    rows = UserRows(rows.kept, rows.next_item, history_len, ctx)
    return hist, torch.from_numpy(tokens).to(device), rows


def encode_items(
    ids: torch.Tensor, cfg: JobConfig, dense: torch.nn.Module, lookup: Lookup, device: torch.device
) -> torch.Tensor:
    """Served vectors of item table rows ``ids`` (may be empty: the lookup still runs, as a collective)."""
    from embeddings.features import lookup_ids

    emb = lookup_ids(lookup, ids, device)
    if ids.numel() == 0:
        return torch.zeros(0, cfg.embeddings.item_dim)
    _, items = served_vectors(cfg, dense, item_emb=emb, item_ids=ids.to(device))
    return items.cpu()


# ---- files -------------------------------------------------------------------------------------------------------
def stored_values(v: torch.Tensor, dtype: str) -> np.ndarray:
    """Values as stored: float32, or bf16 as its raw bits in uint16 (rounded to nearest even, torch's cast)."""
    if dtype == "bf16":
        return v.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return v.float().numpy()


def vector_array(v: torch.Tensor, dtype: str) -> Any:
    """(n, dim) vectors -> a parquet fixed_size_list column (:func:`stored_values`)."""
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(stored_values(v, dtype).reshape(-1)), v.shape[1])


class PartWriter:
    """One rank's parquet file, written under a temporary name and renamed into place when closed."""

    def __init__(self, path: Path, columns: dict[str, Any]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.schema = pa.schema(list(columns.items()))
        self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.rows = 0

    def write(self, columns: dict[str, Any]) -> None:
        import pyarrow as pa

        table = pa.Table.from_arrays(list(columns.values()), schema=self.schema)
        if table.num_rows:
            self.writer.write_table(table)
            self.rows += table.num_rows

    def close(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.path)


class SummaryPartWriter:
    """One rank's part of a summary cache: each summary's index columns (user, offset, before, covered, until) in
    the parquet part, its tokens raw in the token file beside it, row i of one the i-th of the other; both written
    under temporary names and renamed into place when closed."""

    def __init__(self, part: Path) -> None:
        import pyarrow as pa

        from trainer.summary_cache import TOKENS

        self.tokens_path = part.with_name(part.name + TOKENS)
        self.tokens_tmp = self.tokens_path.with_name(self.tokens_path.name + ".tmp")
        self.tokens = open(self.tokens_tmp, "wb")  # closed by close(), after the part's last batch
        try:
            self.index = PartWriter(part, {k: pa.int64() for k in ("user", "offset", "before", "covered", "until")})
        except BaseException:
            self.tokens.close()
            raise

    @property
    def rows(self) -> int:
        return self.index.rows

    def write(self, emits: list[tuple[int, Emit]], tokens: np.ndarray) -> None:
        """``emits``: (user, what the summary covers: ``offset``, ``before``, ``covered``, ``until``) per row of
        ``tokens`` [rows, summary tokens, dim], stored little-endian."""
        import pyarrow as pa

        if len(emits) != tokens.shape[0]:
            raise ValueError(f"summary cache: {len(emits)} index rows for {tokens.shape[0]} token rows")
        columns = {"user": pa.array([u for u, _ in emits])}
        for key in ("offset", "before", "covered", "until"):
            columns[key] = pa.array([getattr(e, key) for _, e in emits])  # the Emit fields
        self.index.write(columns)
        self.tokens.write(np.ascontiguousarray(tokens, dtype=tokens.dtype.newbyteorder("<")).tobytes())

    def close(self) -> None:
        self.index.close()
        self.tokens.close()
        os.replace(self.tokens_tmp, self.tokens_path)


def part_name(kind: str, rank: int) -> str:
    return f"{kind}/part-{rank:05d}.parquet"


def load_export(out_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, user vectors, next items, item ids, item vectors) of an export; numpy + pyarrow only.

    Vectors come back as float32 (n, dim) whatever the stored dtype. This is the snippet in docs/export.md.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    m = json.loads((out / "manifest.json").read_text())

    def read(kind: str) -> pa.Table:
        return pa.concat_tables([pq.read_table(out / f) for f in m["files"][kind]])

    def vectors(t: pa.Table) -> np.ndarray:
        flat = t.column("vector").combine_chunks().flatten().to_numpy()
        if m["dtype"] == "bf16":  # stored as the top 16 bits of float32
            flat = (flat.astype(np.uint32) << 16).view(np.float32)
        return flat.reshape(-1, m["dim"])

    users, items = read("users"), read("items")
    return (
        users.column("user").to_numpy(),
        vectors(users),
        users.column("next_item").to_numpy(),
        items.column("item").to_numpy(),
        vectors(items),
    )


# ---- argus export ------------------------------------------------------------------------------------------------
def export(
    checkpoint_or_run: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    split: str = "test",
    at: int | None = None,
    dtype: str = "fp32",
    batch_size: int = 256,
    items_chunk: int = 65536,
    context: int | None = None,
    num_workers: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    summary_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Export user vectors of ``split`` and item vectors of the whole table; collective (every rank calls it).

    ``out_dir`` must be missing or empty; an earlier export there is replaced only with ``overwrite`` (rank 0
    removes it once every rank has checked it), and a directory holding anything else is refused
    (:mod:`trainer.data.outdir`).

    ``at``: cutoff (unix seconds): only interactions strictly before it are history. ``context``: the most
    recent history rows a state is computed from; default ``data.max_seq_len - 1``, the longest prefix the
    model was trained to predict the next item from. ``summary_cache``: an ``argus summarize`` cache of the run's
    summary tokens (``model.summary``): each state is computed from the most recent window after its user's cached
    summary (``context`` does not apply). Returns the manifest (on every rank).
    """
    from trainer.data.manifest import Manifest

    # Everything that can be wrong with the inputs is checked before any process group exists, so a bad
    # argument fails the same way on every rank instead of leaving the others waiting in a collective.
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size < 1 or items_chunk < 1:
        raise ValueError(f"batch_size and items_chunk must be >= 1, got {batch_size} and {items_chunk}")
    path = checkpoint.resolve_checkpoint(checkpoint_or_run, prefer_best=True)
    cfg = checkpoint.saved_job(path)
    manifest = Manifest.load(data_dir)
    kind = manifest.split(split).kind
    longest = cfg.interactions_per_sample()
    context = max(longest - 1, 1) if context is None else context
    if not 1 <= context <= longest:
        raise ValueError(f"context: must be in [1, {longest}] (the run's data.max_seq_len), got {context}")
    cache = None
    if summary_cache is not None:
        from trainer.summary_cache import SummaryCache, cached_context, summariser_checkpoint

        if not cfg.model.summary.tokens or (cfg.finetune.enabled and not cfg.data.summary_cache):
            raise ValueError(f"--summary-cache: {path} is neither a model.summary pre-training run nor one trained on "
                             "cached summaries (data.summary_cache)")  # fmt: skip
        n = manifest.split(split).samples
        cache = SummaryCache.load(summary_cache, cfg, split, summariser_checkpoint(cfg, path), n)
        context = cached_context(cfg)
    elif cfg.data.summary_cache:
        raise ValueError(f"{path}: the run was trained on cached summaries (data.summary_cache): export it with "
                         "--summary-cache (an argus summarize cache of this split by the same summariser)")  # fmt: skip
    out = Path(out_dir)
    replace = check_output(out, EXPORT, overwrite=overwrite, flag="--overwrite")  # every rank, read-only

    import pyarrow as pa
    import torch.distributed as dist

    from trainer.dist import process_group

    with process_group(device, cfg.train.timeout_s) as info:  # a caller's group is kept
        rank, world, dev = info.rank, info.world_size, info.device
        _prepare_out(out, EXPORT, replace, rank, ("users", "items"))

        _, tables, item_rows, dense = checkpoint.load_model_sharded(path, manifest, dev, world)
        dim = cfg.embeddings.item_dim
        vec_type = _vector_type(dtype, dim)
        loader = _users_loader(data_dir, split, batch_size, num_workers, rank, world, manifest)
        dist.barrier()
        t0 = time.perf_counter()
        users = PartWriter(
            out / part_name("users", rank),
            {"user": pa.int64(), "next_item": pa.int64(), "history_len": pa.int32(), "vector": vec_type},
        )
        skipped, stale = 0, [0, 0]
        with torch.no_grad():
            for batch in loader:  # the same number of batches on every rank (padding batches are empty)
                rows, vecs = encode_users(
                    batch, cfg, dense, tables, item_rows, context, at, kind == "eval", dev, cache, stale
                )
                skipped += batch.size - rows.kept.numel()
                k = rows.kept
                users.write(
                    {
                        "user": pa.array(batch.users[k].numpy()),
                        "next_item": pa.array(rows.next_item[k].numpy()),
                        "history_len": pa.array(rows.history_len[k].numpy()),
                        "vector": vector_array(vecs, dtype),
                    }
                )
        users.close()
        dist.barrier()
        t1 = time.perf_counter()

        per_rank = -(-item_rows // world)
        lo, hi = min(rank * per_rank, item_rows), min((rank + 1) * per_rank, item_rows)
        items = PartWriter(out / part_name("items", rank), {"item": pa.int64(), "vector": vec_type})
        with torch.no_grad():
            for c0 in range(0, per_rank, items_chunk):  # same number of lookups on every rank, some maybe empty
                ids = torch.arange(min(lo + c0, hi), min(lo + c0 + items_chunk, hi))
                vecs = encode_items(ids, cfg, dense, tables, dev)
                items.write({"item": pa.array(ids.numpy()), "vector": vector_array(vecs, dtype)})
        items.close()
        dist.barrier()
        t2 = time.perf_counter()

        mine = {"rank": rank, "users": users.rows, "items": items.rows, "skipped": skipped, "stale": stale}
        stats: list[Any] = [None] * world
        dist.all_gather_object(stats, mine)
        n_users, n_items = sum(s["users"] for s in stats), sum(s["items"] for s in stats)
        ni = cfg.heads.next_item
        m = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "checkpoint": str(path.resolve()),
            "data": redact(absolute(data_dir)),
            "split": split,
            "split_kind": kind,
            "at": at,
            "context": cfg.window() if cache is not None else context,
            "model": "two_tower" if cfg.finetune.enabled else "argus",
            "normalize": ni.normalize,
            "temperature": ni.temperature,
            "score": "dot",
            "dim": dim,
            "dtype": dtype,
            "vector_encoding": "float32"
            if dtype == "fp32"
            else "bfloat16 bits as uint16 (float32 = bits << 16; round-to-nearest-even from float32)",
            "item_rows": item_rows,
            "num_items": manifest.num_items,
            "world_size": world,
            "users": n_users,
            "items": n_items,
            "users_skipped": sum(s["skipped"] for s in stats),
            "summary_cache": None
            if cache is None
            else {
                "path": redact(absolute(summary_cache)),
                "at": cache.manifest.get("at"),
                "stale_users": sum(s["stale"][0] for s in stats),
                "interactions_left_out": sum(s["stale"][1] for s in stats),
            },
            "files": {
                "users": [part_name("users", s["rank"]) for s in stats],
                "items": [part_name("items", s["rank"]) for s in stats],
            },
            "counts": {
                **{part_name("users", s["rank"]): s["users"] for s in stats},
                **{part_name("items", s["rank"]): s["items"] for s in stats},
            },
            "timing": {
                "users_s": round(t1 - t0, 4),
                "items_s": round(t2 - t1, 4),
                "users_per_s": n_users / max(t1 - t0, 1e-9),
                "items_per_s": n_items / max(t2 - t1, 1e-9),
            },
        }
        _publish(out / MANIFEST, m, rank)
    return m


# ---- argus summarize: the summary cache ------------------------------------------------------------------------
def summarize(
    checkpoint_or_run: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    split: str = "test",
    at: int | None = None,
    dtype: str = "fp32",
    batch_size: int = 64,
    device: str = "auto",
    overwrite: bool = False,
) -> dict[str, Any]:
    """`argus summarize`: write the summary cache (trainer/summary_cache.py) of ``split``'s samples at cutoff ``at``
    (None: all their history; an eval split's held-out targets are never history): per sample, the summary tokens
    the run's model reads before the sample's most recent window, of the user's whole history before it (older
    members of the same user, and for an eval split the train members beside it: trainer/data/lifelong.py), read
    in pieces of ``model.summary.chunk`` tokens, ``batch_size`` pieces at a time. Collective, like :func:`export`
    (each rank its share of the shards); the same output checks. Returns the manifest (on every rank)."""
    from trainer.data.manifest import Manifest
    from trainer.summary_cache import CACHE
    from trainer.summary_cache import EMPTY as CACHE_EMPTY
    from trainer.summary_cache import FORMAT as CACHE_FORMAT
    from trainer.summary_cache import FORMAT_VERSION as CACHE_VERSION
    from trainer.summary_cache import MANIFEST as CACHE_MANIFEST
    from trainer.summary_cache import TOKENS as CACHE_TOKENS

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    path = checkpoint.resolve_checkpoint(checkpoint_or_run, prefer_best=True)
    cfg = checkpoint.saved_job(path)
    if not cfg.model.summary.tokens or cfg.finetune.enabled:
        raise ValueError(f"{path}: a pre-training run with model.summary.tokens > 0 is needed to summarize")
    if cfg.data.summary_cache:
        raise ValueError(f"{path}: trained on cached summaries (data.summary_cache), its own summariser never trained: "
                         "summarize with the run that wrote that cache")  # fmt: skip
    manifest = Manifest.load(data_dir)
    kind = manifest.split(split).kind
    if kind not in ("train", "eval"):
        raise ValueError(f"--split {split}: a {kind} split has no summary point per sample (use train or an eval one)")
    out = Path(out_dir)
    replace = check_output(out, CACHE, overwrite=overwrite, flag="--overwrite")

    import torch.distributed as dist

    from trainer.data.lifelong import pieces
    from trainer.dist import process_group

    tokens, d = cfg.model.summary.tokens, cfg.model.summary.dim
    with process_group(device, cfg.train.timeout_s) as info:
        rank, world, dev = info.rank, info.world_size, info.device
        _prepare_out(out, CACHE, replace, rank, ("users",))
        _, tables, item_rows, dense = checkpoint.load_model_sharded(path, manifest, dev, world)
        dist.barrier()
        t0 = time.perf_counter()
        writer = SummaryPartWriter(out / part_name("users", rank))
        piece = max(1, cfg.model.summary.chunk // cfg.tokens_per_interaction())
        shards = list(range(rank, len(manifest.split(split).shards), world))  # a user's members stay together
        stream = iter(pieces(manifest, split, shards, cfg.window(), piece, at))
        reader = _PieceReader(cfg, dense, tables, item_rows, dev)
        read = 0
        with torch.no_grad():
            while True:
                group = list(itertools.islice(stream, batch_size))
                more = torch.tensor([len(group)], device=dev)
                dist.all_reduce(more, op=dist.ReduceOp.MAX)  # every rank looks up as often (a collective)
                if not int(more.item()):
                    break
                emits, summ = reader.read(group)
                read += sum(p.rows for p in group)
                if emits:
                    writer.write(emits, stored_values(summ, dtype))
            if rank == 0:  # what a user new since the cache reads: the summary of an empty history
                empty = dense.summary.readout(dense.summary.init_state(1), project=False)
                np.save(out / CACHE_EMPTY, empty[0].float().cpu().numpy())
        writer.close()
        dist.barrier()
        seconds = time.perf_counter() - t0
        stats: list[Any] = [None] * world
        dist.all_gather_object(stats, {"rank": rank, "samples": writer.rows, "read": read})
        n_rows = sum(s["samples"] for s in stats)
        n_read = sum(s["read"] for s in stats)
        m = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "checkpoint": str(path.resolve()),
            "data": redact(absolute(data_dir)),
            "split": split,
            "at": at,
            "tokens": tokens,
            "dim": d,
            "window": cfg.window(),
            "dtype": dtype,
            "samples": n_rows,
            "interactions_read": n_read,
            "world_size": world,
            "files": [part_name("users", s["rank"]) for s in stats],
            "counts": {part_name("users", s["rank"]): s["samples"] for s in stats},
            # beside each part: its rows' tokens in order, raw little-endian (rows, tokens, dim), float32 or bf16 bits
            "token_files": [part_name("users", s["rank"]) + CACHE_TOKENS for s in stats],
            "timing": {
                "seconds": round(seconds, 4),
                "samples_per_s": n_rows / max(seconds, 1e-9),
                "interactions_per_s": n_read / max(seconds, 1e-9),
            },
        }
        _publish(out / CACHE_MANIFEST, m, rank)
    return m


class _PieceReader:
    """Reads pieces of lifelong histories (trainer/data/lifelong.py) through a model's summariser: a batch of pieces
    at once, each on its own, then folded in order into its user's running state (``Summariser.combine``), which
    carries over to the next batch while the same user goes on."""

    def __init__(self, cfg: JobConfig, dense: torch.nn.Module, tables: Any, item_rows: int, device: torch.device):
        self.cfg, self.dense, self.tables, self.item_rows, self.device = cfg, dense, tables, item_rows, device
        self.user: int | None = None
        self.state: Any = None

    def read(self, group: list[Any]) -> tuple[list[tuple[int, Any]], torch.Tensor]:
        """((user, Emit) of each summary point in ``group``, their summaries (n, tokens, model.summary.dim) on the
        host). Always one lookup (a collective under TorchRec), even for an empty group."""
        from trainer.data.batch import BATCH_DTYPES, Batch
        from trainer.data.schema import FIELDS
        from trainer.engine import dummy_batch
        from trainer.model.interaction import history_rows, lookup_interactions

        summariser = self.dense.summary
        lengths = torch.tensor([p.cols["item"].shape[0] for p in group], dtype=torch.long)
        batch = dummy_batch()
        if group:
            batch = Batch(
                keys=[""] * len(group),
                users=torch.tensor([p.user for p in group], dtype=torch.long),
                offsets=torch.zeros(len(group), dtype=torch.long),
                lengths=lengths,
                target_start=torch.zeros(len(group), dtype=torch.long),
                values={f: torch.from_numpy(np.concatenate([p.cols[f] for p in group]).astype(BATCH_DTYPES[f]))
                        for f in FIELDS},
                padded=False,
            )  # fmt: skip
        item, side, _ = lookup_interactions(
            self.tables, batch, self.cfg, self.item_rows, torch.zeros(0, dtype=torch.long), self.device
        )
        if not group:
            return [], torch.zeros(0)
        item = self.dense.item_vectors(item, history_rows(batch, self.item_rows, self.device))
        lead = torch.tensor([p.lead for p in group], dtype=torch.long)
        part = self.dense.read_pieces(item, side, lengths.to(self.device), lead.to(self.device))
        emits, states = [], []
        for j, p in enumerate(group):
            if p.user != self.user:
                self.user, self.state = p.user, summariser.init_state(1)
            self.state = summariser.combine(self.state, part.rows(torch.tensor([j], device=self.device)))
            if p.emit is not None:
                emits.append((p.user, p.emit))
                states.append(self.state)
        if not states:
            return [], torch.zeros(0)
        return emits, summariser.readout(type(self.state).cat(states), project=False).float().cpu()


def _users_loader(
    data_dir: str | Path, split: str, batch_size: int, num_workers: int, rank: int, world: int, manifest: Any
) -> Any:
    """Every sample of ``split`` whole, in order, this rank's exactly-once part (the users of export / summarize)."""
    from trainer.data.loader import ShardLoader

    return ShardLoader.Config(
        path=str(data_dir), split=split, batch_size=batch_size, max_seq_len=0, num_workers=num_workers, shuffle=False
    ).build(rank, world, manifest)


def _publish(path: Path, manifest: dict[str, Any], rank: int) -> None:
    """Collective: rank 0 writes the output's manifest last and atomically (without it the output is incomplete);
    every rank returns once it is published."""
    import torch.distributed as dist

    if rank == 0:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)
    dist.barrier()


def _prepare_out(out: Path, layout: Layout, replace: bool, rank: int, subdirs: tuple[str, ...]) -> None:
    """Collective: once every rank has checked ``out`` (read-only), rank 0 clears an earlier output it was told to
    replace; then every rank makes the subdirectories (``out`` is shared by all ranks, like the checkpoint)."""
    import torch.distributed as dist

    dist.barrier()
    if rank == 0 and replace:
        clear_output(out, layout)
    dist.barrier()
    for sub in subdirs:
        (out / sub).mkdir(parents=True, exist_ok=True)
    dist.barrier()


def _vector_type(dtype: str, dim: int) -> Any:
    import pyarrow as pa

    return pa.list_(pa.uint16() if dtype == "bf16" else pa.float32(), dim)
