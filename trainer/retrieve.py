"""`argus retrieve`: brute-force top-K over an export's item vectors, and Recall@K against next items.

Checks an export end to end: the user vectors, scored against every item vector by batched matmul,
should retrieve each user's held-out next item as often as `argus eval` says the model does. With one
next item per user Recall@K is HR@K, and it is defined exactly as in `argus eval` (trainer/metrics.py):
the item is retrieved when fewer than K items are ahead of it, an item being ahead when it scores
higher, or equal with a lower item id. The top-K lists use the same order, so they are deterministic.

`--index faiss` also builds a faiss index (IVF-Flat or HNSW-Flat, inner product) over the same item vectors and
reports how much of the exact top-K it finds (``ann_recall@K``), its own Recall@K against next items, and the
build and search times next to the exact search's. faiss is optional and imported only then.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

_LOW = 0xFFFFFFFF


def _keys(scores: torch.Tensor, col0: int | torch.Tensor) -> torch.Tensor:
    """One int64 per (user, item) whose order is (score descending, item id ascending): topk on these keys
    is exact and deterministic, which topk on float scores is not when scores tie.

    ``col0``: the id of column 0, or a tensor of each entry's item id (same shape as ``scores``)."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 becomes +0.0, they tie
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # float order as signed-int order
    ordered = torch.where(torch.isnan(scores), -(1 << 31), ordered)  # NaN: below -inf, never ahead (as in eval)
    if isinstance(col0, torch.Tensor):
        return (ordered << 32) | (_LOW - col0)
    ids = torch.arange(col0, col0 + scores.shape[1], dtype=torch.long)
    return (ordered << 32) | (_LOW - ids)[None, :]


def _chunk_keys(scores: torch.Tensor, col0: int, k: int) -> torch.Tensor:
    """The keys of each row's best ``min(k, C)`` items of a (B, C) score chunk, any order.

    Building keys for the whole chunk is ~10 passes over (B, C) int64 memory; instead take the float top-k and key
    only those. That set is the keyed top-k unless a row ties at its k-th score (another item with that score may
    have a lower id) or holds NaN (float topk ranks NaN first, the keys last): those rows are keyed in full."""
    k = min(k, scores.shape[1])
    vals, idx = scores.topk(k, dim=1)
    ties = (scores >= vals[:, -1:]).sum(1) > k
    exact = ~(ties | torch.isnan(vals).any(1))
    out = torch.empty(scores.shape[0], k, dtype=torch.long)
    out[exact] = _keys(vals[exact], idx[exact] + col0)
    if not bool(exact.all()):
        slow = ~exact
        out[slow] = _keys(scores[slow], col0).topk(k, dim=1).values
    return out


def top_k(
    users: torch.Tensor, items: torch.Tensor, k: int, batch: int = 1024, item_chunk: int = 1 << 16
) -> torch.Tensor:
    """(U, min(k, M)) item ids of the best-scoring items (dot product) per user, best first; ties: lower id."""
    m = items.shape[0]
    if m >= 1 << 32:
        raise ValueError(f"{m} items: top_k keys hold item ids below 2^32")
    k = min(k, m)
    out = torch.empty(users.shape[0], k, dtype=torch.long)
    for u0 in range(0, users.shape[0], batch):
        u = users[u0 : u0 + batch]
        best = torch.empty(u.shape[0], 0, dtype=torch.long)
        for c0 in range(0, m, item_chunk):  # bounded (batch, chunk) temporaries for large catalogs
            keys = _chunk_keys(u @ items[c0 : c0 + item_chunk].T, c0, k)
            best = torch.cat([best, keys], dim=1).topk(min(k, best.shape[1] + keys.shape[1]), dim=1).values
        out[u0 : u0 + batch] = _LOW - (best & _LOW)
    return out


# ---- approximate search (`--index faiss`) ------------------------------------------------------------------------
FAISS_MISSING = "--index faiss needs faiss-cpu: pip install faiss-cpu"
FAISS_TYPES = ("ivf", "hnsw")
_IVF_FLAGS = {"nlist": "--nlist", "nprobe": "--nprobe", "train_size": "--train-size"}
_HNSW_FLAGS = {"hnsw_m": "--hnsw-m", "ef_search": "--ef-search", "ef_construction": "--ef-construction"}


def import_faiss() -> Any:
    """faiss, imported only here (it is optional, and `argus --help` must not load it)."""
    try:
        import faiss
    except ImportError as e:
        raise ValueError(FAISS_MISSING) from e
    return faiss


def default_nlist(items: int) -> int:
    """About 4*sqrt(items) inverted lists, but at least 39 training points per list (faiss's k-means minimum)."""
    return max(1, min(round(4 * items**0.5), items // 39))


@dataclass(frozen=True)
class AnnSpec:
    """A faiss index and its search parameters. ``None``: the default, resolved by :meth:`resolve`."""

    kind: str = "ivf"
    nlist: int | None = None  # IVF: inverted lists (k-means centroids)
    nprobe: int | None = None  # IVF: lists scanned per query
    train_size: int | None = None  # IVF: k-means sample, drawn with `seed`
    hnsw_m: int | None = None  # HNSW: links per node
    ef_search: int | None = None  # HNSW: candidate list at search (faiss uses max(ef_search, k))
    ef_construction: int | None = None  # HNSW: candidate list at build
    seed: int = 0

    def check(self) -> None:
        """ValueError naming the flag: a type faiss is not asked for, a value < 1, a flag of the other type."""
        if self.kind not in FAISS_TYPES:
            raise ValueError(f"--faiss-type: expected one of {', '.join(FAISS_TYPES)}, got {self.kind!r}")
        for field, flag in {**_IVF_FLAGS, **_HNSW_FLAGS}.items():
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"{flag}: must be >= 1, got {value}")
        other = _HNSW_FLAGS if self.kind == "ivf" else _IVF_FLAGS
        given = [flag for field, flag in other.items() if getattr(self, field) is not None]
        if given:  # silently ignoring it would report a run the user did not ask for
            raise ValueError(f"{given[0]}: does not apply to --faiss-type {self.kind}")

    def resolve(self, items: int, k: int) -> AnnSpec:
        """The defaults filled in for a catalog of ``items``; nprobe above nlist is nlist (what faiss does)."""
        self.check()
        if self.kind == "hnsw":
            return replace(
                self,
                hnsw_m=self.hnsw_m or 32,
                ef_construction=self.ef_construction or 80,
                ef_search=self.ef_search or max(2 * k, 64),
            )
        nlist = self.nlist or default_nlist(items)
        if nlist > items:
            raise ValueError(f"--nlist: must be <= the number of items ({items}), got {nlist}")
        train = min(items, self.train_size or 64 * nlist)
        if train < nlist:
            raise ValueError(f"--train-size: must be >= --nlist ({nlist}), got {train}")
        return replace(self, nlist=nlist, nprobe=min(self.nprobe or 32, nlist), train_size=train)

    def params(self) -> dict[str, Any]:
        """The parameters of this type (for the report)."""
        fields = _IVF_FLAGS if self.kind == "ivf" else _HNSW_FLAGS
        return {"type": self.kind, **{f: getattr(self, f) for f in fields}, "seed": self.seed}


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch and faiss on ``n`` threads inside the block (None: leave both as they are), restored after."""
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"--threads: must be >= 1, got {n}")
    faiss = sys.modules.get("faiss")  # only set if loaded: the exact path must not import it
    before = torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else None
    torch.set_num_threads(n)
    if faiss:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        if faiss:
            faiss.omp_set_num_threads(before[1])


def build_ann(items: np.ndarray, spec: AnnSpec) -> Any:
    """A faiss inner-product index over (M, dim) float32 item vectors; row i is item id i. ``spec`` resolved."""
    faiss = import_faiss()
    x = np.ascontiguousarray(items, np.float32)
    d = x.shape[1]
    if spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, spec.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = spec.seed  # k-means init; with the seeded sample below the lists are reproducible
        # faiss would subsample itself past 256 points per list; our own seeded sample keeps the size a knob
        index.cp.max_points_per_centroid = max(256, -(-spec.train_size // spec.nlist))
        rows = np.random.default_rng(spec.seed).choice(x.shape[0], spec.train_size, replace=False)
        index.train(x[np.sort(rows)])  # sorted: the sample's order does not depend on the generator's
    index.add(x)
    return index


def search_ann(index: Any, queries: np.ndarray, k: int, spec: AnnSpec) -> np.ndarray:
    """(U, k) int64 item ids, best first by faiss's score; -1 where the index found fewer than k items."""
    if spec.kind == "hnsw":
        index.hnsw.efSearch = spec.ef_search
    else:
        index.nprobe = spec.nprobe
    _, ids = index.search(np.ascontiguousarray(queries, np.float32), k)
    return ids


def overlap_recall(ann: np.ndarray | torch.Tensor, exact: np.ndarray | torch.Tensor, k: int) -> float:
    """Mean over rows of |ann[:, :k] ∩ exact[:, :k]| / k: how much of the exact top-k the ANN top-k finds."""
    a, e = np.asarray(ann)[:, :k].astype(np.int64), np.asarray(exact)[:, :k].astype(np.int64)
    if a.shape[0] == 0:
        return float("nan")
    # each row's sorted exact ids, offset per row so the flattened array is sorted: one searchsorted for all rows
    # (O(U k log k), where a (U, k, k) equality test would be O(U k^2))
    big = int(max(a.max(initial=0), e.max(initial=0))) + 1
    off = np.arange(a.shape[0], dtype=np.int64)[:, None] * big
    flat = (np.sort(e, axis=1) + off).ravel()
    q = a + off
    pos = np.minimum(np.searchsorted(flat, q), flat.size - 1)
    found = (flat[pos] == q) & (a >= 0)  # -1: faiss found fewer than k
    return float(found.sum(1).mean() / min(k, e.shape[1]))  # k above the catalog: all of it is the exact top-k


def retrieve(
    export_dir: str | Path,
    k: int = 100,
    users: int | None = None,
    batch: int = 1024,
    ks: list[int] | None = None,
    index: str = "exact",
    ann: AnnSpec | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Recall@K (= HR@K: one next item per user) of an export's top-K over users with a next item.

    ``users``: only the first N of them by user id. ``ks``: the cutoffs reported (default 10 and ``k``).
    ``index="faiss"``: also the approximate top-K of ``ann`` (default: IVF with default parameters), compared with
    the exact one. ``num_threads``: torch's and faiss's threads for the searches (None: as they are).
    """
    from trainer.export import load_export

    if k < 1:
        raise ValueError(f"--k: must be >= 1, got {k}")
    if users is not None and users < 1:
        raise ValueError(f"--users: must be >= 1, got {users}")
    if batch < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {batch}")
    if index not in ("exact", "faiss"):
        raise ValueError(f"--index: expected exact or faiss, got {index!r}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"--threads: must be >= 1, got {num_threads}")
    if index == "exact" and ann is not None:
        raise ValueError("--faiss-type and its parameters need --index faiss")
    if index == "faiss":
        ann = ann or AnnSpec()
        ann.check()  # bad flags fail before the export is read
        import_faiss()  # and a missing faiss too
    path = Path(export_dir)
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{export_dir}: no manifest.json (not an `argus export` directory, or the export did not finish)"
        )
    user_ids, user_vecs, next_items, item_ids, item_vecs = load_export(path)
    order = np.argsort(item_ids, kind="stable")
    if not np.array_equal(item_ids[order], np.arange(item_ids.size)):
        raise ValueError(f"{export_dir}: item ids are not exactly 0..{item_ids.size - 1}")
    items = torch.from_numpy(np.ascontiguousarray(item_vecs[order], np.float32))
    order = np.argsort(user_ids, kind="stable")
    has_next = next_items[order] >= 0
    sel = order[has_next][:users]
    ks = sorted({c for c in (ks or [10, k]) if c <= k})
    queries = torch.from_numpy(np.ascontiguousarray(user_vecs[sel], np.float32))
    # next items are raw ids: rows of a hashed table (embeddings.item_rows < num_items) are id mod rows, as in eval
    target = torch.from_numpy(next_items[sel] % items.shape[0])
    n = int(sel.size)
    with threads(num_threads):
        t0 = time.perf_counter()
        top = top_k(queries, items, k, batch)
        t1 = time.perf_counter()
        hit = top == target[:, None]
        seconds = time.perf_counter() - t0
        report: dict[str, Any] = {
            "export": str(path),
            "index": index,
            "k": k,
            "users": n,
            "users_without_next": int((~has_next).sum()),
            "items": int(items.shape[0]),
            "seconds": round(seconds, 4),
            "users_per_s": n / max(seconds, 1e-9),
        }
        for c in ks:
            report[f"recall@{c}"] = float(hit[:, :c].any(1).double().mean()) if n else float("nan")
        if index == "faiss":
            assert ann is not None
            report.update(_ann_report(ann.resolve(items.shape[0], k), items, queries, top, target, k, ks, t1 - t0))
    return report


def _ann_report(
    spec: AnnSpec,
    items: torch.Tensor,
    queries: torch.Tensor,
    exact: torch.Tensor,
    target: torch.Tensor,
    k: int,
    ks: list[int],
    exact_s: float,
) -> dict[str, Any]:
    """The `--index faiss` keys of the report (docs/export.md lists them)."""
    faiss = import_faiss()
    t0 = time.perf_counter()
    index = build_ann(items.numpy(), spec)
    t1 = time.perf_counter()
    found = search_ann(index, queries.numpy(), k, spec) if queries.shape[0] else np.zeros((0, k), np.int64)
    t2 = time.perf_counter()
    n = int(queries.shape[0])
    hit = torch.from_numpy(found[:, : exact.shape[1]]) == target[:, None]
    rep: dict[str, Any] = {
        "faiss": {**spec.params(), "threads": faiss.omp_get_max_threads(), "version": faiss.__version__},
        "exact_search_s": round(exact_s, 4),
        "exact_queries_per_s": n / max(exact_s, 1e-9),
        "ann_build_s": round(t1 - t0, 4),
        "ann_search_s": round(t2 - t1, 4),
        "ann_queries_per_s": n / max(t2 - t1, 1e-9),
    }
    for c in ks:
        rep[f"ann_recall@{c}"] = overlap_recall(found, exact, c)
    for c in ks:
        rep[f"ann_next_recall@{c}"] = float(hit[:, :c].any(1).double().mean()) if n else float("nan")
    return rep
