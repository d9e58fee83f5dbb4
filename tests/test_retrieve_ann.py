"""`argus retrieve --index faiss`: the exact top-K against a numpy reference (ties included), IVF and HNSW against
the exact top-K, the nprobe knob, one-line errors naming the flag, and the command end to end on an export."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import argus_inproc

from trainer.retrieve import AnnSpec, build_ann, default_nlist, overlap_recall, search_ann, top_k

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss-cpu not installed")

ITEMS, DIM, USERS, K = 2000, 16, 300, 20


def numpy_top_k(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """The reference: per user, items by (score descending, id ascending), the first k."""
    scores = users.astype(np.float64) @ items.astype(np.float64).T
    ids = np.arange(items.shape[0])
    return np.stack([np.lexsort((ids, -row))[:k] for row in scores])


@pytest.fixture(scope="module")
def vectors() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((USERS, DIM)).astype(np.float32),
        rng.standard_normal((ITEMS, DIM)).astype(np.float32),
    )


@pytest.fixture(scope="module")
def exact(vectors) -> np.ndarray:
    users, items = vectors
    return top_k(torch.from_numpy(users), torch.from_numpy(items), K).numpy()


def test_exact_top_k_matches_numpy_with_ties():
    # small integer vectors: every dot product is exact in float32 and many tie, so the order rests on the ids
    rng = np.random.default_rng(1)
    items = rng.integers(-2, 3, (ITEMS, DIM)).astype(np.float32)
    items[1500:1600] = items[100:200]  # duplicate rows: exact ties between distinct ids
    users = rng.integers(-2, 3, (USERS, DIM)).astype(np.float32)
    ref = numpy_top_k(users, items, 50)
    scores = users @ items.T
    assert (np.take_along_axis(scores, ref[:, 1:], 1) == np.take_along_axis(scores, ref[:, :-1], 1)).any()
    for chunk in (ITEMS, 333):  # one chunk, and chunks that split ties across chunk boundaries
        got = top_k(torch.from_numpy(users), torch.from_numpy(items), 50, batch=64, item_chunk=chunk).numpy()
        assert np.array_equal(got, ref)
    # NaN scores (a NaN item vector): never ahead of anything, where float topk would rank them first
    items[7] = np.nan
    got = top_k(torch.from_numpy(users), torch.from_numpy(items), ITEMS, item_chunk=333).numpy()
    rest = np.delete(np.arange(ITEMS), 7)
    assert (got[:, -1] == 7).all() and np.array_equal(got[:, :50], rest[numpy_top_k(users, items[rest], 50)])


def test_overlap_recall():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert overlap_recall(exact[:, ::-1], exact, 4) == 1.0  # order within the top-k does not matter
    assert overlap_recall(np.array([[4, 9, -1, 1], [8, 7, 6, 0]]), exact, 4) == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert overlap_recall(np.array([[1, 9], [0, 5]]), exact, 2) == pytest.approx(0.5)  # cutoff on both lists


@needs_faiss
def test_ivf_full_probe_is_exact_and_hnsw_close(vectors, exact):
    users, items = vectors
    ivf = AnnSpec("ivf", nprobe=10**6).resolve(ITEMS, K)
    assert ivf.nlist == default_nlist(ITEMS) == 51 and ivf.nprobe == ivf.nlist  # nprobe: at most nlist
    found = search_ann(build_ann(items, ivf), users, K, ivf)
    assert overlap_recall(found, exact, K) == 1.0  # every list scanned: exhaustive (random floats: no ties)
    hnsw = AnnSpec("hnsw", ef_search=400).resolve(ITEMS, K)
    assert overlap_recall(search_ann(build_ann(items, hnsw), users, K, hnsw), exact, K) >= 0.99


@needs_faiss
def test_nprobe_knob_and_reproducible_build(vectors, exact):
    users, items = vectors
    spec = AnnSpec("ivf", nlist=64).resolve(ITEMS, K)
    index = build_ann(items, spec)
    recall = {
        p: overlap_recall(search_ann(index, users, K, AnnSpec("ivf", nlist=64, nprobe=p).resolve(ITEMS, K)), exact, K)
        for p in (1, 4, 64)
    }
    assert recall[1] < recall[4] < recall[64] == 1.0, recall
    again = build_ann(items, spec)  # seeded sample and k-means: the same lists, the same answers
    one = AnnSpec("ivf", nlist=64, nprobe=1).resolve(ITEMS, K)
    assert np.array_equal(search_ann(index, users, K, one), search_ann(again, users, K, one))


# ---- the command line ------------------------------------------------------------------------------------------------
def write_export(root: Path, users: np.ndarray, next_items: np.ndarray, items: np.ndarray) -> Path:
    """An export directory as `argus export` writes it (what trainer/export.py's load_export reads)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.export import vector_array

    (root / "users").mkdir(parents=True)
    (root / "items").mkdir()
    uid = np.arange(users.shape[0])[::-1].copy()  # out of id order on disk: retrieve sorts by id
    pq.write_table(
        pa.table(
            {
                "user": pa.array(uid, pa.int64()),
                "vector": vector_array(torch.from_numpy(users), "fp32"),
                "next_item": pa.array(next_items, pa.int64()),
            }
        ),
        root / "users/part-00000.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "item": pa.array(np.arange(items.shape[0]), pa.int64()),
                "vector": vector_array(torch.from_numpy(items), "fp32"),
            }
        ),
        root / "items/part-00000.parquet",
    )
    manifest = {
        "dim": items.shape[1],
        "dtype": "fp32",
        "files": {"users": ["users/part-00000.parquet"], "items": ["items/part-00000.parquet"]},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def export_dir(vectors, tmp_path_factory) -> Path:
    users, items = vectors
    rng = np.random.default_rng(2)
    # next item: one of the user's exact top-30 for most users (so recall is between 0 and 1), -1 for a few
    ref = numpy_top_k(users, items, 30)
    nxt = ref[np.arange(USERS), rng.integers(0, 30, USERS)]
    nxt[rng.random(USERS) < 0.1] = -1
    return write_export(tmp_path_factory.mktemp("export"), users, nxt, items)


@needs_faiss
def test_retrieve_faiss_end_to_end(export_dir, vectors, capsys):
    users, items = vectors
    code, out, err = argus_inproc(capsys, "retrieve", str(export_dir), "--k", str(K), "--json")
    assert code == 0, err
    plain = json.loads(out)
    assert plain["index"] == "exact" and not any(key.startswith("ann_") for key in plain)
    code, out, err = argus_inproc(
        capsys, "retrieve", str(export_dir), "--k", str(K), "--json", "--index", "faiss", "--nprobe", "1000",
        "--threads", "1",
    )  # fmt: skip
    assert code == 0, err
    rep = json.loads(out)
    # the exact keys are unchanged by --index faiss; recall@K against a numpy reference
    import pyarrow.parquet as pq

    order = np.argsort(np.arange(USERS)[::-1])  # users by id: the rows of the parquet file in reverse
    next_items = pq.read_table(export_dir / "users/part-00000.parquet").column("next_item").to_numpy()[order]
    qs = users[order][next_items >= 0]
    targets = next_items[next_items >= 0]
    ref = numpy_top_k(qs, items, K)
    assert rep["users"] == plain["users"] == targets.size and rep["users_without_next"] == USERS - targets.size
    for c in (10, K):
        expected = float((ref[:, :c] == targets[:, None]).any(1).mean())
        assert rep[f"recall@{c}"] == plain[f"recall@{c}"] == pytest.approx(expected)
        assert rep[f"ann_recall@{c}"] == 1.0  # all lists probed
        assert rep[f"ann_next_recall@{c}"] == rep[f"recall@{c}"]
    assert rep["faiss"]["type"] == "ivf" and rep["faiss"]["nprobe"] == rep["faiss"]["nlist"] == 51
    assert rep["faiss"]["threads"] == 1
    for key in ("ann_build_s", "ann_search_s", "ann_queries_per_s", "exact_search_s", "exact_queries_per_s"):
        assert rep[key] > 0, key
    # HNSW, and the table
    code, out, err = argus_inproc(
        capsys, "retrieve", str(export_dir), "--k", str(K), "--index", "faiss", "--faiss-type", "hnsw",
        "--ef-search", "400", "--hnsw-m", "16",
    )  # fmt: skip
    assert code == 0, err
    assert "ANN recall vs exact" in out and "faiss hnsw (hnsw_m=16" in out and "queries/s" in out


@needs_faiss
@pytest.mark.parametrize(
    "args, flag",
    [
        (["--nlist", "0"], "--nlist: must be >= 1, got 0"),
        (["--nprobe", "0"], "--nprobe: must be >= 1, got 0"),
        (["--k", "0"], "--k: must be >= 1, got 0"),
        (["--faiss-type", "hnsw", "--ef-search", "-3"], "--ef-search: must be >= 1, got -3"),
        (["--faiss-type", "hnsw", "--nprobe", "8"], "--nprobe: does not apply to --faiss-type hnsw"),
        (["--nlist", "5000"], "--nlist: must be <= the number of items (2000), got 5000"),
        (["--threads", "0"], "--threads: must be >= 1, got 0"),
    ],
)
def test_bad_flag_is_one_line(export_dir, capsys, args, flag):
    code, out, err = argus_inproc(capsys, "retrieve", str(export_dir), "--index", "faiss", *args)
    assert code == 2 and err == f"argus: error: {flag}\n", err


def test_faiss_flags_need_index_faiss_and_missing_faiss(export_dir, capsys, monkeypatch):
    code, _, err = argus_inproc(capsys, "retrieve", str(export_dir), "--nprobe", "4")
    assert code == 2 and err == "argus: error: --faiss-type and its parameters need --index faiss\n", err
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    code, _, err = argus_inproc(capsys, "retrieve", str(export_dir), "--index", "faiss")
    assert code == 2 and err == "argus: error: --index faiss needs faiss-cpu: pip install faiss-cpu\n", err
    code, out, _ = argus_inproc(capsys, "retrieve", str(export_dir), "--json")  # exact needs no faiss
    assert code == 0 and json.loads(out)["index"] == "exact"
