"""Read throughput per core: the project's loader vs a plain tarfile pass vs stock webdataset, same shards, same run.

    python bench/read_throughput.py DIR [--split train] [--batch-size 64] [--json]
    python bench/read_throughput.py DIR --moto [--read-ahead 64KiB,1MiB,8MiB]   # + DIR uploaded to a local S3 server
    python bench/read_throughput.py DIR --url s3://bucket/prefix               # + the same dataset at a URL

Every reader runs in this one process (one core, page cache warmed by a first
pass), so the numbers are interactions per second per core.

With ``--url`` (the dataset DIR holds, already at that URL) or ``--moto`` (a moto S3 server started on 127.0.0.1
in this process, DIR uploaded to it with ``storage.upload_tree``: ``--url`` then names the bucket and prefix,
``s3://argus-bench/data`` by default), the project's loader (num_workers=0) also reads the URL once per
``data.read_ahead`` value: range reads placed by the shards' sample indices. With ``--moto`` the server's threads
share this process (and its GIL) with the reader, so those rows include the server's CPU; loopback is not a WAN:
no latency, no bandwidth limit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

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


def argus_loader(m: Manifest, split: str, batch_size: int, fmt: str, read_ahead: int = 0) -> tuple[int, int]:
    cfg = ShardLoader.Config(
        path=str(m.root), split=split, batch_size=batch_size, num_workers=0, batch_format=fmt, read_ahead=read_ahead
    )
    loader = cfg.build(0, 1, manifest=m)
    samples = inter = 0
    for b in loader:
        samples += b.size
        inter += b.num_interactions
    return samples, inter


def size_arg(text: str) -> int:
    """``64KiB``, ``1MiB``, ``8M``, ``4096`` -> bytes."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def show_size(n: int) -> str:
    for unit, mult in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}"
    return f"{n} B"


def start_moto(local: Path, url: str) -> tuple[Any, str, float]:
    """A moto S3 server on 127.0.0.1 (threads of this process), the AWS variables pointing at it (fake
    credentials), the bucket of ``url`` made and ``local`` uploaded there, the manifest last. Returns the server,
    its endpoint and the upload's seconds."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from trainer.data.manifest import MANIFEST_NAME
    from trainer.data.storage import location, upload_tree

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    t0 = time.perf_counter()
    upload_tree(local, location(url), MANIFEST_NAME)
    return server, endpoint, time.perf_counter() - t0


def counting_requests(url: str) -> dict[str, int]:
    """Count the range reads (``cat_file`` calls) the loader makes on ``url``'s (cached) filesystem instance."""
    from trainer.data.storage import location

    fs = location(url).fs
    real, n = fs.cat_file, {"requests": 0}

    def cat_file(*args: Any, **kw: Any) -> Any:
        n["requests"] += 1
        return real(*args, **kw)

    fs.cat_file = cat_file
    return n


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
    p.add_argument("--url", default="", help="the same dataset at a URL; with --moto: where on the local server")
    p.add_argument("--moto", action="store_true", help="upload DIR to a moto S3 server on 127.0.0.1 and read it back")
    p.add_argument(
        "--read-ahead", default="64KiB,1MiB,8MiB", help="data.read_ahead values for the URL rows, comma-separated"
    )
    a = p.parse_args()
    if a.moto and not a.url:
        a.url = "s3://argus-bench/data"
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
    remote: dict[str, Any] = {}
    server = None
    if a.url:
        os.environ["ARGUS_CACHE"] = tempfile.mkdtemp(prefix="argus-bench-cache-")  # side files: a fresh cache
        if a.moto:
            server, endpoint, up_s = start_moto(Path(a.dir), a.url)
            remote = {"server": f"moto {endpoint} (threads of this process; loopback)", "upload_s": round(up_s, 2)}
        try:
            rm = Manifest.load(a.url)
            if rm.splits[a.split].samples != info.samples or rm.splits[a.split].interactions != total:
                raise SystemExit(f"{a.url}: not the dataset in {a.dir} (split {a.split} differs)")
            sizes = [size_arg(x) for x in a.read_ahead.split(",") if x.strip()]
            argus_loader(rm, a.split, a.batch_size, "jagged", sizes[0])  # fetch the sample indices into the cache
            n = counting_requests(a.url)
            for ra in sizes:
                times = []
                for _ in range(a.repeats):
                    n["requests"] = 0
                    times.append(timed(lambda ra=ra: argus_loader(rm, a.split, a.batch_size, "jagged", ra))[0])
                best = min(times)
                rows.append(
                    {
                        "reader": f"argus ShardLoader, URL, read_ahead {show_size(ra)}",
                        "seconds": round(best, 4),
                        "interactions_per_s": total / best,
                        "samples_per_s": info.samples / best,
                        "read_ahead": ra,
                        "requests": n["requests"],
                    }
                )
        finally:
            if server is not None:
                server.stop()
    rep = {
        "dir": str(m.root),
        "split": a.split,
        "shards": len(info.shards),
        "samples": info.samples,
        "interactions": total,
        "mean_sample_len": total / max(info.samples, 1),
        "bytes": sum(s.bytes for s in info.shards),
        "batch_size": a.batch_size,
        **({"url": a.url, **remote} if a.url else {}),
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
        if a.url:
            how = f" via {remote['server']}, uploaded in {remote['upload_s']} s" if remote else ""
            print(f"URL rows: {a.url}{how}; jagged batches, num_workers=0")
        for r in rows:
            print(
                f"  {r['reader']:<42} {r['interactions_per_s'] / 1e6:8.2f} M interactions/s/core "
                f"{r['samples_per_s']:>10,.0f} samples/s"
                + (f" {r['requests']:>7,} requests" if "requests" in r else "")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
