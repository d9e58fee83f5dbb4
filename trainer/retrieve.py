"""`argus retrieve`: brute-force top-K over an export's item vectors, and Recall@K against next items.

Checks an export end to end: the user vectors, scored against every item vector by batched matmul,
should retrieve each user's held-out next item as often as `argus eval` says the model does. With one
next item per user Recall@K is HR@K, and it is defined exactly as in `argus eval` (trainer/metrics.py):
the item is retrieved when fewer than K items are ahead of it, an item being ahead when it scores
higher, or equal with a lower item id. The top-K lists use the same order, so they are deterministic.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

_LOW = 0xFFFFFFFF


def _keys(scores: torch.Tensor, col0: int) -> torch.Tensor:
    """One int64 per (user, item) whose order is (score descending, item id ascending): topk on these keys
    is exact and deterministic, which topk on float scores is not when scores tie."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 becomes +0.0, they tie
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # float order as signed-int order
    ordered = torch.where(torch.isnan(scores), -(1 << 31), ordered)  # NaN: below -inf, never ahead (as in eval)
    ids = torch.arange(col0, col0 + scores.shape[1], dtype=torch.long)
    return (ordered << 32) | (_LOW - ids)[None, :]


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
            keys = _keys(u @ items[c0 : c0 + item_chunk].T, c0)
            best = torch.cat([best, keys], dim=1).topk(min(k, best.shape[1] + keys.shape[1]), dim=1).values
        out[u0 : u0 + batch] = _LOW - (best & _LOW)
    return out


def retrieve(
    export_dir: str | Path, k: int = 100, users: int | None = None, batch: int = 1024, ks: list[int] | None = None
) -> dict[str, Any]:
    """Recall@K (= HR@K: one next item per user) of an export's top-K over users with a next item.

    ``users``: only the first N of them by user id. ``ks``: the cutoffs reported (default 10 and ``k``).
    """
    from trainer.export import load_export

    if k < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if users is not None and users < 1:
        raise ValueError(f"users: must be >= 1, got {users}")
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
    t0 = time.perf_counter()
    top = top_k(torch.from_numpy(np.ascontiguousarray(user_vecs[sel], np.float32)), items, k, batch)
    # next items are raw ids: rows of a hashed table (embeddings.item_rows < num_items) are id mod rows, as in eval
    target = torch.from_numpy(next_items[sel] % items.shape[0])
    hit = top == target[:, None]
    seconds = time.perf_counter() - t0
    n = int(sel.size)
    report: dict[str, Any] = {
        "export": str(path),
        "k": k,
        "users": n,
        "users_without_next": int((~has_next).sum()),
        "items": int(items.shape[0]),
        "seconds": round(seconds, 4),
        "users_per_s": n / max(seconds, 1e-9),
    }
    for c in ks:
        report[f"recall@{c}"] = float(hit[:, :c].any(1).double().mean()) if n else float("nan")
    return report
