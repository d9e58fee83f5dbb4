"""Read throughput per core: the project's loader vs a plain tarfile pass vs stock webdataset, same shards, same run.

    python bench/read_throughput.py DIR [--split train] [--batch-size 64] [--json]

Every reader runs in this one process (one core, page cache warmed by a first
pass), so the numbers are interactions per second per core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import time
from typing import Callable

import msgpack
import numpy as np

from trainer.data.loader import ShardLoader
from trainer.data.manifest import Manifest


def plain_tarfile(m: Manifest, split: str) -> tuple[int, int]:
    """Stdlib tarfile: every member's bytes, no decoding (a floor on any tar reader's cost)."""
    samples = nbytes = 0
    for sh in m.splits[split].shards:
        with tarfile.open(m.root / sh.path) as t:
            for mem in t:
                nbytes += len(t.extractfile(mem).read())
                samples += 1
    return samples, nbytes


def plain_tarfile_decode(m: Manifest, split: str) -> tuple[int, int]:
    """Stdlib tarfile + msgpack + numpy views: the 10-line decoder of docs/data-format.md."""
    samples = inter = 0
    for sh in m.splits[split].shards:
        with tarfile.open(m.root / sh.path) as t:
            for mem in t:
                s = msgpack.unpackb(t.extractfile(mem).read())
                cols = {k: np.frombuffer(b, dtype=dt) for k, (dt, b) in s["fields"].items()}
                inter += cols["item"].shape[0]
                samples += 1
    return samples, inter


def stock_webdataset(m: Manifest, split: str) -> tuple[int, int]:
    import webdataset as wds

    urls = [str(m.root / sh.path) for sh in m.splits[split].shards]
    samples = inter = 0
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        inter += s["msg"]["n"]
        samples += 1
    return samples, inter


def argus_loader(m: Manifest, split: str, batch_size: int, fmt: str) -> tuple[int, int]:
    cfg = ShardLoader.Config(path=str(m.root), split=split, batch_size=batch_size, num_workers=0, batch_format=fmt)
    loader = cfg.build(0, 1, manifest=m)
    samples = inter = 0
    for b in loader:
        samples += b.size
        inter += b.num_interactions
    return samples, inter


def timed(fn: Callable[[], tuple[int, int]]) -> tuple[float, tuple[int, int]]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="best of N runs per reader")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    m = Manifest.load(a.dir)
    info = m.splits[a.split]
    total = info.interactions
    plain_tarfile(m, a.split)  # warm the page cache
    readers: dict[str, Callable[[], tuple[int, int]]] = {
        "tarfile (bytes only, no decode)": lambda: plain_tarfile(m, a.split),
        "tarfile + msgpack + numpy (docs decoder)": lambda: plain_tarfile_decode(m, a.split),
        "webdataset .decode()": lambda: stock_webdataset(m, a.split),
        "argus ShardLoader, jagged batches": lambda: argus_loader(m, a.split, a.batch_size, "jagged"),
        "argus ShardLoader, padded batches": lambda: argus_loader(m, a.split, a.batch_size, "padded"),
    }
    rows = []
    for name, fn in readers.items():
        best = min(timed(fn)[0] for _ in range(a.repeats))
        rows.append(
            {
                "reader": name,
                "seconds": round(best, 4),
                "interactions_per_s": total / best,
                "samples_per_s": info.samples / best,
            }
        )
    rep = {
        "dir": str(m.root),
        "split": a.split,
        "shards": len(info.shards),
        "samples": info.samples,
        "interactions": total,
        "mean_sample_len": total / max(info.samples, 1),
        "bytes": sum(s.bytes for s in info.shards),
        "batch_size": a.batch_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}",
        "results": rows,
    }
    if a.json:
        json.dump(rep, sys.stdout, indent=1)
        print()
    else:
        print(
            f"{rep['dir']} [{a.split}]: {rep['shards']} shards, {rep['samples']:,} samples, "
            f"{total:,} interactions (mean {rep['mean_sample_len']:.0f}/sample), {rep['bytes'] / 2**20:.1f} MiB"
        )
        for r in rows:
            print(
                f"  {r['reader']:<42} {r['interactions_per_s'] / 1e6:8.2f} M interactions/s/core "
                f"{r['samples_per_s']:>10,.0f} samples/s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
