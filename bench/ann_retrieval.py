"""Approximate (faiss IVF-Flat, HNSW-Flat) vs exact streamed top-K on this machine: build s, queries/s, recall@k.

    python bench/ann_retrieval.py [--items 1000000] [--dim 64] [--queries 1000] [--k 100] [--threads N]
                                  [--nprobe 8,32] [--ef-search 128,256] [--hnsw-m 16] [--ef-construction 40]
                                  [--no-hnsw] [--json]

Synthetic, seeded: item vectors around 4,096 random centres (clustered, as learned item embeddings are);
users are noisy copies of random items, so each has a meaningful neighbourhood. Exact is `argus retrieve`'s
own `top_k` (streamed over item chunks); the indexes are built and searched by the same functions as
`argus retrieve --index faiss` (trainer/retrieve.py). recall@k = |ANN top-k ∩ exact top-k| / k, averaged
over queries (the report's `ann_recall@K`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer.retrieve import AnnSpec, build_ann, import_faiss, overlap_recall, search_ann, threads, top_k  # noqa: E402


def synth(items: int, dim: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(items, dim) clustered item vectors and (queries, dim) users near random items, float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((min(4096, items), dim), dtype=np.float32)
    x = np.empty((items, dim), np.float32)
    for i0 in range(0, items, 1 << 17):  # chunks: no float64 temporaries of the whole table
        n = min(1 << 17, items - i0)
        x[i0 : i0 + n] = centres[rng.integers(0, centres.shape[0], n)] + 0.5 * rng.standard_normal((n, dim), np.float32)
    users = x[rng.integers(0, items, queries)] + 0.3 * rng.standard_normal((queries, dim), np.float32)
    return x, users


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: as they are)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: argus retrieve's)")
    p.add_argument("--nprobe", default="8,32", help="IVF nprobe values, comma-separated")
    p.add_argument("--ef-search", default="128,256", help="HNSW efSearch values, comma-separated")
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--no-hnsw", action="store_true", help="skip HNSW (its build is the slowest step)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    faiss = import_faiss()
    t0 = time.perf_counter()
    items, users = synth(a.items, a.dim, a.queries)
    print(
        f"data: {a.items:,} x {a.dim} items, {a.queries:,} queries in {time.perf_counter() - t0:.1f} s", file=sys.stderr
    )
    rows: list[dict] = []
    with threads(a.threads):
        t0 = time.perf_counter()
        exact = top_k(torch.from_numpy(users), torch.from_numpy(items), a.k).numpy()
        s = time.perf_counter() - t0
        rows.append({"index": "exact (top_k)", "params": "", "build_s": 0.0, "qps": a.queries / s, "recall": 1.0})

        def run(spec: AnnSpec, searches: list[AnnSpec], label: str) -> None:
            t0 = time.perf_counter()
            index = build_ann(items, spec)
            build = time.perf_counter() - t0
            print(f"{label}: built in {build:.1f} s", file=sys.stderr)
            for s in searches:
                t0 = time.perf_counter()
                found = search_ann(index, users, a.k, s)
                qps = a.queries / (time.perf_counter() - t0)
                params = {f: v for f, v in s.params().items() if f not in ("type", "seed")}
                rows.append(
                    {
                        "index": label,
                        "params": ", ".join(f"{f}={v}" for f, v in params.items()),
                        "build_s": build,
                        "qps": qps,
                        "recall": overlap_recall(found, exact, a.k),
                    }
                )
                print(rows[-1], file=sys.stderr)

        ivf = AnnSpec("ivf", nlist=a.nlist).resolve(a.items, a.k)
        run(
            ivf,
            [AnnSpec("ivf", nlist=ivf.nlist, nprobe=int(v)).resolve(a.items, a.k) for v in a.nprobe.split(",")],
            "faiss IVF-Flat",
        )
        if not a.no_hnsw:
            hnsw = dict(hnsw_m=a.hnsw_m, ef_construction=a.ef_construction)
            spec = AnnSpec("hnsw", **hnsw).resolve(a.items, a.k)
            run(
                spec,
                [AnnSpec("hnsw", **hnsw, ef_search=int(v)).resolve(a.items, a.k) for v in a.ef_search.split(",")],
                "faiss HNSW-Flat",
            )
        used = {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads()}
    meta = {
        "items": a.items,
        "dim": a.dim,
        "queries": a.queries,
        "k": a.k,
        "threads": used,
        "faiss": faiss.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load": os.getloadavg(),
    }
    if a.json:
        print(json.dumps({**meta, "rows": rows}, indent=2))
        return
    print(json.dumps(meta))
    print("| index | search parameters | build s | queries/s | recall@%d vs exact |" % a.k)
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['index']} | {r['params']} | {r['build_s']:.1f} | {r['qps']:,.0f} | {r['recall']:.4f} |")


if __name__ == "__main__":
    main()
